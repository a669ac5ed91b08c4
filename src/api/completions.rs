//! `POST /v1/completions`: raw prompts (text or token ids), plain or
//! streamed, with `echo` and `logprobs`.

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Map, Value};

use crate::engine::{Event, GenerationRequest, PositionLogprobs};
use crate::model::TextTokenizer;

use super::body::{parse_json, read_limited};
use super::error::ApiError;
use super::generate::{collect_all, merged, random_id, submit_all, unix_now, ChoiceResult};
use super::sse::{self, ChunkFormatter};
use super::state::{AppState, LogEntry};
use super::types::{CompletionRequest, PromptInput, Usage};
use super::validate;

/// Most alternatives per token in completions' `logprobs`.
const MAX_LOGPROBS: i64 = validate::MAX_TOP_LOGPROBS;

/// Handler.
pub async fn create(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_limited(&req, payload, state.settings.server.max_body_bytes).await?;
    let r: CompletionRequest = parse_json(&body)?;
    let target = state.target(&req, &r.model, r.tenant.as_deref()).await?;
    let adapter = target.adapter.clone();
    let v = validate::sampling(&r.sampling(), &state.settings.engine, &state.settings.limits, state.model.model.config.vocab_size)?;
    if r.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid(
            "'suffix' is not supported by this model",
            Some("suffix"),
        ));
    }
    if let Some(b) = r.best_of {
        if b != v.n as i64 {
            return Err(ApiError::invalid(
                "'best_of' is only supported equal to 'n'",
                Some("best_of"),
            ));
        }
    }
    let logprobs = match r.logprobs {
        None => None,
        Some(k) if (0..=MAX_LOGPROBS).contains(&k) => Some(k as usize),
        Some(k) => {
            return Err(ApiError::invalid(
                format!("'logprobs' must be between 0 and {MAX_LOGPROBS}, got {k}"),
                Some("logprobs"),
            ))
        }
    };
    let echo = r.echo.unwrap_or(false);
    let tok = &state.model.tokenizer;
    let count = match &r.prompt {
        PromptInput::Texts(ts) => ts.len(),
        PromptInput::TokenLists(lists) => lists.len(),
        _ => 1,
    };
    if count > state.settings.limits.max_prompts {
        return Err(ApiError::invalid(
            format!("'prompt' holds {count} prompts; this server takes at most {} in one request", state.settings.limits.max_prompts),
            Some("prompt"),
        ));
    }
    if let PromptInput::Text(_) | PromptInput::Texts(_) = &r.prompt {
        let texts: Vec<&String> = match &r.prompt {
            PromptInput::Text(t) => vec![t],
            PromptInput::Texts(ts) => ts.iter().collect(),
            _ => Vec::new(),
        };
        for t in texts {
            validate::text_fits(t.len(), tok.max_token_bytes, state.context(), &state.settings.limits, "prompt")?;
        }
    }
    let prompts: Vec<Vec<u32>> = match &r.prompt {
        PromptInput::Text(t) => vec![tok.encode_prompt(t)?],
        PromptInput::Texts(ts) => ts
            .iter()
            .map(|t| tok.encode_prompt(t))
            .collect::<Result<_, _>>()?,
        PromptInput::Tokens(ids) => vec![ids.clone()],
        PromptInput::TokenLists(lists) => lists.clone(),
    };
    if prompts.is_empty() {
        return Err(ApiError::invalid(
            "'prompt' must not be empty",
            Some("prompt"),
        ));
    }
    // One tenant may hold at most half of the waiting queue.
    let most = (state.settings.engine.max_waiting / 2).max(1);
    if prompts.len() * v.n > most {
        return Err(ApiError::invalid(
            format!("{} prompts × n = {} sequences in one request; this server queues at most {most} for one request", prompts.len(), prompts.len() * v.n),
            Some("prompt"),
        ));
    }
    let mut requests = Vec::with_capacity(prompts.len());
    let mut logprob_entries = 0usize;
    for ids in &prompts {
        validate::prompt_length(ids.len(), &state.settings.limits, "prompt")?;
        if ids.is_empty() {
            return Err(ApiError::invalid(
                "'prompt' must contain at least one token",
                Some("prompt"),
            ));
        }
        state.check_token_ids(ids, "prompt")?;
        let max_tokens = validate::max_tokens(
            r.max_tokens,
            "max_tokens",
            "prompt",
            ids.len(),
            state.context(),
            &state.settings.engine,
            echo,
        )?;
        if let Some(k) = logprobs {
            let positions = max_tokens + if echo { ids.len() } else { 0 };
            logprob_entries = logprob_entries.saturating_add(positions.saturating_mul(k + 1).saturating_mul(v.n));
        }
        requests.push(GenerationRequest {
            prompt: ids.clone(),
            params: v.params.clone(),
            max_tokens,
            stop: v.stop.clone(),
            logprobs,
            prompt_logprobs: if echo { logprobs } else { None },
            ignore_eos: v.ignore_eos,
            adapter: adapter.clone(),
            tenant: target.tenant.to_string(),
        });
    }
    validate::logprob_entries(logprob_entries, &state.settings.limits, "logprobs")?;
    let subs = submit_all(&state.engine, requests, v.n)?;
    let id = random_id("cmpl");
    let rendered_prompts = match &r.prompt {
        PromptInput::Text(t) => vec![t.clone()],
        PromptInput::Texts(ts) => ts.clone(),
        _ => prompts.iter().map(|p| tok.decode(p).unwrap_or_default()).collect(),
    };
    let sink = state.request_end(
        &target,
        LogEntry { id: id.clone(), kind: "completion", body: serde_json::from_slice(&body).unwrap_or_default(), rendered_prompts, prompt_ids: prompts.clone(), n: v.n },
    );
    let created = unix_now();
    let model = r.model.clone();
    if v.stream {
        let fmt = CompletionChunks {
            id,
            created,
            model,
            tokenizer: state.model.tokenizer.clone(),
            echo,
            echoed: Default::default(),
            prompts,
            logprobs,
            offsets: Default::default(),
        };
        return Ok(sse::respond(merged(subs), fmt, v.include_usage, sink));
    }
    let results = collect_all(subs).await?;
    let mut usage = Usage::default();
    let mut seen_prompt = std::collections::BTreeSet::new();
    let choices: Vec<Value> = results
        .iter()
        .map(|c| {
            if seen_prompt.insert(c.prompt_index) {
                usage.prompt_tokens += c.prompt_tokens;
            }
            usage.completion_tokens += c.completion_tokens;
            let mut choice = choice_json(c, &prompts[c.prompt_index], tok, echo, logprobs);
            if r.return_token_ids == Some(true) {
                choice["token_ids"] = json!(c.tokens.iter().map(|t| t.0).collect::<Vec<_>>());
                choice["prompt_token_ids"] = json!(prompts[c.prompt_index]);
            }
            choice
        })
        .collect();
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens;
    super::server::log_tokens(&req, usage.prompt_tokens, usage.completion_tokens);
    let outputs = results.iter().map(super::sse::ChoiceOutput::from).collect();
    web::block(move || sink.finish(usage, outputs)).await.map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(HttpResponse::Ok().json(json!({
        "id": id, "object": "text_completion", "created": created, "model": model,
        "choices": choices, "usage": usage,
    })))
}

fn choice_json(
    c: &ChoiceResult,
    prompt: &[u32],
    tok: &TextTokenizer,
    echo: bool,
    logprobs: Option<usize>,
) -> Value {
    let prompt_text = if echo {
        tok.decode(prompt).unwrap_or_default()
    } else {
        String::new()
    };
    let lp = logprobs.map(|_| {
        let mut acc = LogprobsAcc::default();
        if echo {
            for (i, &id) in prompt.iter().enumerate() {
                acc.push(
                    tok,
                    id,
                    c.prompt_logprobs.get(i).cloned().flatten().as_ref(),
                );
            }
        }
        for (id, p) in &c.tokens {
            acc.push(tok, *id, p.as_ref());
        }
        acc.into_json()
    });
    json!({
        "index": c.index,
        "text": format!("{prompt_text}{}", c.text),
        "logprobs": lp,
        "finish_reason": c.finish_reason.map(|f| f.as_str()),
    })
}

/// Completions' logprobs object, built token by token.
#[derive(Default)]
struct LogprobsAcc {
    tokens: Vec<String>,
    token_logprobs: Vec<Option<f32>>,
    top_logprobs: Vec<Option<Map<String, Value>>>,
    text_offset: Vec<usize>,
    offset: usize,
}

impl LogprobsAcc {
    fn push(&mut self, tok: &TextTokenizer, id: u32, p: Option<&PositionLogprobs>) {
        let text = tok.token_text(id);
        self.text_offset.push(self.offset);
        self.offset += text.chars().count();
        self.tokens.push(text);
        self.token_logprobs.push(p.map(|p| p.chosen.logprob));
        self.top_logprobs.push(p.map(|p| {
            p.top
                .iter()
                .map(|t| (tok.token_text(t.id), json!(t.logprob)))
                .collect::<Map<String, Value>>()
        }));
    }

    fn into_json(self) -> Value {
        json!({
            "tokens": self.tokens, "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs, "text_offset": self.text_offset,
        })
    }
}

struct CompletionChunks {
    id: String,
    created: u64,
    model: String,
    tokenizer: TextTokenizer,
    echo: bool,
    echoed: std::collections::HashSet<usize>,
    prompts: Vec<Vec<u32>>,
    logprobs: Option<usize>,
    offsets: std::collections::HashMap<usize, usize>,
}

impl CompletionChunks {
    fn chunk(
        &self,
        index: usize,
        text: String,
        logprobs: Option<Value>,
        finish: Option<&str>,
    ) -> Value {
        json!({
            "id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}],
        })
    }
}

impl ChunkFormatter for CompletionChunks {
    fn on_event(&mut self, index: usize, prompt_index: usize, event: Event) -> Vec<Value> {
        let mut out = Vec::new();
        if self.echo && self.echoed.insert(index) {
            let prompt = self.prompts.get(prompt_index).cloned().unwrap_or_default();
            let lp = match (&event, self.logprobs) {
                (Event::Prompt { logprobs }, Some(_)) => {
                    let mut acc = LogprobsAcc::default();
                    for (i, &id) in prompt.iter().enumerate() {
                        acc.push(
                            &self.tokenizer,
                            id,
                            logprobs.get(i).cloned().flatten().as_ref(),
                        );
                    }
                    self.offsets.insert(index, acc.offset);
                    Some(acc.into_json())
                }
                _ => None,
            };
            let text = self.tokenizer.decode(&prompt).unwrap_or_default();
            out.push(self.chunk(index, text, lp, None));
        }
        match event {
            Event::Prompt { .. } | Event::Error(_) => {}
            Event::Token { id, text, logprobs } => {
                let lp = self.logprobs.map(|_| {
                    let mut acc = LogprobsAcc {
                        offset: self.offsets.get(&index).copied().unwrap_or(0),
                        ..Default::default()
                    };
                    acc.push(&self.tokenizer, id, logprobs.as_ref());
                    self.offsets.insert(index, acc.offset);
                    acc.into_json()
                });
                if !text.is_empty() || lp.is_some() {
                    out.push(self.chunk(index, text, lp, None));
                }
            }
            Event::Done { reason, text, .. } => {
                out.push(self.chunk(index, text, None, Some(reason.as_str())));
            }
        }
        out
    }

    fn usage_chunk(&self, usage: Usage) -> Value {
        json!({"id": self.id, "object": "text_completion", "created": self.created, "model": self.model, "choices": [], "usage": usage})
    }
}
