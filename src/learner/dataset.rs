//! Training examples from OpenAI's fine-tuning JSONL: chat lines
//! (`{"messages": [...]}`, the last message the assistant's answer) and
//! completion lines (`{"prompt", "completion"}`) for supervised training;
//! preference lines (`{"input": {"messages"}, "preferred_output",
//! "non_preferred_output"}`) for DPO. Tokenized as serving tokenizes them.
//! Bad lines are reported by number, good ones kept.

use serde_json::Value;

use super::sft::{Lesson, SftExample};
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

/// OpenAI's fine-tuning methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Supervised,
    Dpo,
}

impl Method {
    /// `supervised` or `dpo`; anything else is `None`.
    pub fn parse(name: &str) -> Option<Method> {
        match name {
            "supervised" => Some(Method::Supervised),
            "dpo" => Some(Method::Dpo),
            _ => None,
        }
    }
}

/// Parses every line as a lesson of `method`; returns the lessons and the errors of bad lines.
pub fn parse_lessons(text: &str, method: Method, tokenizer: &TextTokenizer, chat: &ChatTemplate) -> (Vec<Lesson>, Vec<LearnError>) {
    let mut lessons = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let parsed = match method {
            Method::Supervised => parse_line(line, tokenizer, chat).map(Lesson::Imitate),
            Method::Dpo => parse_preference(line, tokenizer, chat),
        };
        match parsed {
            Ok(l) => lessons.push(l),
            Err(message) => errors.push(LearnError::BadExample { line: i + 1, message }),
        }
    }
    (lessons, errors)
}

/// Chat messages as the template takes them.
fn parse_messages(list: &Value, field: &str) -> Result<Vec<ChatMessage>, String> {
    let list = list.as_array().ok_or(format!("'{field}' must be a list"))?;
    let mut parsed = Vec::with_capacity(list.len());
    for (j, m) in list.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).ok_or(format!("{field}[{j}].role is missing"))?;
        if !["system", "developer", "user", "assistant"].contains(&role) {
            return Err(format!("{field}[{j}].role {role:?} is not supported"));
        }
        let content = m.get("content").and_then(Value::as_str).ok_or(format!("{field}[{j}].content must be a string"))?;
        let role = if role == "developer" { "system" } else { role };
        parsed.push(ChatMessage { role: role.to_string(), content: content.to_string() });
    }
    Ok(parsed)
}

/// The one assistant answer of a preference output list.
fn single_answer(v: Option<&Value>, field: &str) -> Result<String, String> {
    let list = parse_messages(v.ok_or(format!("'{field}' is missing"))?, field)?;
    match list.as_slice() {
        [m] if m.role == "assistant" && !m.content.trim().is_empty() => Ok(m.content.clone()),
        _ => Err(format!("'{field}' must hold exactly one non-empty assistant message")),
    }
}

fn parse_preference(line: &str, tokenizer: &TextTokenizer, chat: &ChatTemplate) -> Result<Lesson, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not valid JSON: {e}"))?;
    let messages = v.get("input").and_then(|i| i.get("messages")).ok_or("a preference line needs 'input.messages'")?;
    let messages = parse_messages(messages, "input.messages")?;
    if messages.is_empty() {
        return Err("'input.messages' is empty".into());
    }
    let chosen = single_answer(v.get("preferred_output"), "preferred_output")?;
    let rejected = single_answer(v.get("non_preferred_output"), "non_preferred_output")?;
    if chosen.trim() == rejected.trim() {
        return Err("the preferred and non-preferred outputs are the same".into());
    }
    let rendered = chat.render(&messages).map_err(|e| e.to_string())?;
    let prompt = tokenizer.encode_chat(&rendered).map_err(|e| e.to_string())?;
    let chosen = tokenizer.encode_answer(&chosen).map_err(|e| e.to_string())?;
    let rejected = tokenizer.encode_answer(&rejected).map_err(|e| e.to_string())?;
    let longest = prompt.len() + chosen.len().max(rejected.len());
    if prompt.is_empty() {
        return Err("the prompt encodes to no tokens".into());
    }
    if longest > MAX_EXAMPLE_TOKENS {
        return Err(format!("{longest} tokens; the limit is {MAX_EXAMPLE_TOKENS}"));
    }
    Ok(Lesson::Prefer { prompt, chosen, rejected })
}

fn parse_line(line: &str, tokenizer: &TextTokenizer, chat: &ChatTemplate) -> Result<SftExample, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not valid JSON: {e}"))?;
    let (prompt, answer) = if let Some(messages) = v.get("messages") {
        let mut parsed = parse_messages(messages, "messages")?;
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
        return Err("a preference (DPO) line: use it in a fine-tuning job with method \"dpo\"".into());
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
