//! Training examples from OpenAI's fine-tuning JSONL: chat lines
//! (`{"messages": [...]}`, the last message the assistant's answer) and
//! completion lines (`{"prompt", "completion"}`), tokenized as serving
//! tokenizes them. Bad lines are reported by number, good ones kept.

use serde_json::Value;

use super::sft::SftExample;
use super::LearnError;
use crate::model::chat::{ChatMessage, ChatTemplate};
use crate::model::TextTokenizer;

/// Longest training sequence (prompt + answer) accepted, in tokens.
pub const MAX_EXAMPLE_TOKENS: usize = 2048;

/// Parses every line; returns the examples and the errors of bad lines.
pub fn parse_jsonl(text: &str, tokenizer: &TextTokenizer, chat: &ChatTemplate) -> (Vec<SftExample>, Vec<LearnError>) {
    let mut examples = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match parse_line(line, tokenizer, chat) {
            Ok(e) => examples.push(e),
            Err(message) => errors.push(LearnError::BadExample { line: i + 1, message }),
        }
    }
    (examples, errors)
}

fn parse_line(line: &str, tokenizer: &TextTokenizer, chat: &ChatTemplate) -> Result<SftExample, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not valid JSON: {e}"))?;
    let (prompt, answer) = if let Some(messages) = v.get("messages") {
        let list = messages.as_array().ok_or("'messages' must be a list")?;
        let mut parsed = Vec::with_capacity(list.len());
        for (j, m) in list.iter().enumerate() {
            let role = m.get("role").and_then(Value::as_str).ok_or(format!("messages[{j}].role is missing"))?;
            if !["system", "developer", "user", "assistant"].contains(&role) {
                return Err(format!("messages[{j}].role {role:?} is not supported"));
            }
            let content = m.get("content").and_then(Value::as_str).ok_or(format!("messages[{j}].content must be a string"))?;
            let role = if role == "developer" { "system" } else { role };
            parsed.push(ChatMessage { role: role.to_string(), content: content.to_string() });
        }
        let Some(last) = parsed.pop() else { return Err("'messages' is empty".into()) };
        if last.role != "assistant" || last.content.trim().is_empty() {
            return Err("the last message must be the assistant's (non-empty) answer".into());
        }
        if parsed.is_empty() {
            return Err("'messages' needs at least one message before the answer".into());
        }
        let rendered = chat.render(&parsed).map_err(|e| e.to_string())?;
        (tokenizer.encode_chat(&rendered).map_err(|e| e.to_string())?, tokenizer.encode_answer(&last.content).map_err(|e| e.to_string())?)
    } else if let (Some(p), Some(c)) = (v.get("prompt"), v.get("completion")) {
        let p = p.as_str().ok_or("'prompt' must be a string")?;
        let c = c.as_str().filter(|c| !c.trim().is_empty()).ok_or("'completion' must be a non-empty string")?;
        (tokenizer.encode_prompt(p).map_err(|e| e.to_string())?, tokenizer.encode_answer(c).map_err(|e| e.to_string())?)
    } else if v.get("preferred_output").is_some() {
        return Err("preference (DPO) lines are not supported yet; send chat or prompt/completion lines".into());
    } else {
        return Err("expected {\"messages\": [...]} or {\"prompt\", \"completion\"}".into());
    };
    if prompt.is_empty() {
        return Err("the prompt encodes to no tokens".into());
    }
    if prompt.len() + answer.len() > MAX_EXAMPLE_TOKENS {
        return Err(format!("{} tokens; the limit is {MAX_EXAMPLE_TOKENS}", prompt.len() + answer.len()));
    }
    Ok(SftExample { prompt, answer })
}
