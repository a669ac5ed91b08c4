//! `POST /v1/chat/completions`: messages rendered with the model's chat
//! template, plain or streamed, with `logprobs` / `top_logprobs`.

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};

use crate::engine::{Event, GenerationRequest, PositionLogprobs};
use crate::model::chat::ChatMessage;
use crate::model::TextTokenizer;

use super::body::{parse_json, read_limited};
use super::error::ApiError;
use super::generate::{collect_all, merged, random_id, submit_all, unix_now};
use super::sse::{self, ChunkFormatter};
use super::state::{AppState, LogEntry};
use super::types::{ChatMessageIn, ChatRequest, MessageContent, Usage};
use super::validate;

const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// Checks roles and contents and turns the wire messages into the template's input.
pub fn to_template_messages(messages: &[ChatMessageIn]) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "'messages' must contain at least one message",
            Some("messages"),
        ));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if !ROLES.contains(&m.role.as_str()) {
                return Err(ApiError::invalid(
                    format!("Invalid value for 'messages[{i}].role': {:?}; expected one of {}", m.role, ROLES.join(", ")),
                    Some(&format!("messages[{i}].role")),
                ));
            }
            let content = match &m.content {
                None => String::new(),
                Some(MessageContent::Text(t)) => t.clone(),
                Some(MessageContent::Parts(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => text.push_str(t),
                            (kind, _) => {
                                return Err(ApiError::invalid(
                                    format!("content part type {kind:?} is not supported by this model (only text)"),
                                    Some(&format!("messages[{i}].content[{j}]")),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            let role = if m.role == "developer" { "system".to_string() } else { m.role.clone() };
            Ok(ChatMessage { role, content })
        })
        .collect()
}

/// Handler.
pub async fn create(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_limited(&req, payload, state.settings.server.max_body_bytes).await?;
    let r: ChatRequest = parse_json(&body)?;
    let target = state.target(&req, &r.model, r.tenant.as_deref()).await?;
    let adapter = target.adapter.clone();
    if r.messages.len() > state.settings.limits.max_messages {
        return Err(ApiError::invalid(
            format!("'messages' holds {} messages; this server takes at most {}", r.messages.len(), state.settings.limits.max_messages),
            Some("messages"),
        ));
    }
    let v = validate::sampling(&r.sampling(), &state.settings.engine, &state.settings.limits, state.model.model.config.vocab_size)?;
    if r.tools
        .as_ref()
        .is_some_and(|t| !t.is_null() && t.as_array().is_none_or(|a| !a.is_empty()))
    {
        return Err(ApiError::invalid(
            "'tools' are not supported by this server yet",
            Some("tools"),
        ));
    }
    if let Some(fmt) = &r.response_format {
        if fmt
            .get("type")
            .and_then(Value::as_str)
            .is_some_and(|t| t != "text")
        {
            return Err(ApiError::invalid(
                "only response_format {\"type\": \"text\"} is supported",
                Some("response_format"),
            ));
        }
    }
    let want_logprobs = r.logprobs.unwrap_or(false);
    let top = match r.top_logprobs {
        None => 0,
        Some(k) if !want_logprobs => {
            let _ = k;
            return Err(ApiError::invalid(
                "'top_logprobs' requires 'logprobs' to be true",
                Some("top_logprobs"),
            ));
        }
        Some(k) if (0..=validate::MAX_TOP_LOGPROBS).contains(&k) => k as usize,
        Some(k) => {
            return Err(ApiError::invalid(
                format!(
                    "'top_logprobs' must be between 0 and {}, got {k}",
                    validate::MAX_TOP_LOGPROBS
                ),
                Some("top_logprobs"),
            ))
        }
    };
    let messages = to_template_messages(&r.messages)?;
    let rendered = state.model.chat.render(&messages)?;
    validate::text_fits(rendered.len(), state.model.tokenizer.max_token_bytes, state.context(), &state.settings.limits, "messages")?;
    let prompt = state.model.tokenizer.encode_chat(&rendered)?;
    validate::prompt_length(prompt.len(), &state.settings.limits, "messages")?;
    if prompt.is_empty() {
        return Err(ApiError::invalid(
            "the rendered conversation is empty",
            Some("messages"),
        ));
    }
    let (requested, param) = match (r.max_completion_tokens, r.max_tokens) {
        (Some(m), _) => (Some(m), "max_completion_tokens"),
        (None, m) => (m, "max_tokens"),
    };
    let max_tokens = validate::max_tokens(
        requested,
        param,
        "messages",
        prompt.len(),
        state.context(),
        &state.settings.engine,
        false,
    )?;
    if want_logprobs {
        let entries = max_tokens.saturating_mul(top + 1).saturating_mul(v.n);
        validate::logprob_entries(entries, &state.settings.limits, "logprobs")?;
    }
    let prompt_ids = prompt.clone();
    let prompt_for_ids = prompt.clone();
    let request = GenerationRequest {
        prompt,
        params: v.params.clone(),
        max_tokens,
        stop: v.stop.clone(),
        logprobs: want_logprobs.then_some(top),
        prompt_logprobs: None,
        ignore_eos: v.ignore_eos,
        adapter: adapter.clone(),
            tenant: target.tenant.to_string(),
    };
    let subs = submit_all(&state.engine, vec![request], v.n)?;
    let id = random_id("chatcmpl");
    let sink = state.request_end(
        &target,
        LogEntry { id: id.clone(), kind: "chat", body: serde_json::from_slice(&body).unwrap_or_default(), rendered_prompts: vec![rendered], prompt_ids: vec![prompt_ids], n: v.n },
    );
    let created = unix_now();
    let model = r.model.clone();
    let tok = state.model.tokenizer.clone();
    if v.stream {
        let fmt = ChatChunks {
            id,
            created,
            model,
            tokenizer: tok,
            started: Default::default(),
            include_usage: v.include_usage,
        };
        return Ok(sse::respond(merged(subs), fmt, v.include_usage, sink));
    }
    let results = collect_all(subs).await?;
    let prompt_tokens = results.first().map_or(0, |c| c.prompt_tokens);
    let completion_tokens: usize = results.iter().map(|c| c.completion_tokens).sum();
    super::server::log_tokens(&req, prompt_tokens, completion_tokens);
    let outputs = results.iter().map(super::sse::ChoiceOutput::from).collect();
    web::block(move || sink.finish(Usage::new(prompt_tokens, completion_tokens), outputs))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let choices: Vec<Value> = results
        .iter()
        .map(|c| {
            let lp = want_logprobs.then(|| {
                json!({"content": c.tokens.iter().map(|(id, p)| token_logprob_json(&tok, *id, p.as_ref())).collect::<Vec<_>>()})
            });
            let mut choice = json!({
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": lp,
                "finish_reason": c.finish_reason.map(|f| f.as_str()),
            });
            if r.return_token_ids == Some(true) {
                choice["token_ids"] = json!(c.tokens.iter().map(|t| t.0).collect::<Vec<_>>());
            }
            choice
        })
        .collect();
    let mut response = json!({
        "id": id, "object": "chat.completion", "created": created, "model": model,
        "choices": choices, "usage": Usage::new(prompt_tokens, completion_tokens),
    });
    if r.return_token_ids == Some(true) {
        response["prompt_token_ids"] = json!(prompt_for_ids);
    }
    Ok(HttpResponse::Ok().json(response))
}

fn entry(tok: &TextTokenizer, id: u32, logprob: f32) -> Value {
    let text = tok.token_text(id);
    json!({"token": text, "logprob": logprob, "bytes": text.as_bytes()})
}

fn token_logprob_json(tok: &TextTokenizer, id: u32, p: Option<&PositionLogprobs>) -> Value {
    let Some(p) = p else {
        return entry(tok, id, 0.0);
    };
    let mut v = entry(tok, id, p.chosen.logprob);
    v["top_logprobs"] = Value::Array(p.top.iter().map(|t| entry(tok, t.id, t.logprob)).collect());
    v
}

struct ChatChunks {
    id: String,
    created: u64,
    model: String,
    tokenizer: TextTokenizer,
    started: std::collections::HashSet<usize>,
    include_usage: bool,
}

impl ChatChunks {
    fn chunk(
        &self,
        index: usize,
        delta: Value,
        logprobs: Option<Value>,
        finish: Option<&str>,
    ) -> Value {
        let mut v = json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
        });
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }
}

impl ChunkFormatter for ChatChunks {
    fn on_event(&mut self, index: usize, _prompt_index: usize, event: Event) -> Vec<Value> {
        let mut out = Vec::new();
        if self.started.insert(index) {
            out.push(self.chunk(
                index,
                json!({"role": "assistant", "content": ""}),
                None,
                None,
            ));
        }
        match event {
            Event::Prompt { .. } | Event::Error(_) => {}
            Event::Token { id, text, logprobs } => {
                let lp = logprobs.map(
                    |p| json!({"content": [token_logprob_json(&self.tokenizer, id, Some(&p))]}),
                );
                if !text.is_empty() || lp.is_some() {
                    out.push(self.chunk(index, json!({"content": text}), lp, None));
                }
            }
            Event::Done { reason, text, .. } => {
                if !text.is_empty() {
                    out.push(self.chunk(index, json!({"content": text}), None, None));
                }
                out.push(self.chunk(index, json!({}), None, Some(reason.as_str())));
            }
        }
        out
    }

    fn usage_chunk(&self, usage: Usage) -> Value {
        json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model, "choices": [], "usage": usage})
    }
}
