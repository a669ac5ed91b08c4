//! OpenAI's server-sent events framing: `data: {json}\n\n` chunks, a usage
//! chunk when `stream_options.include_usage` asks, then `data: [DONE]`.

use std::collections::{BTreeMap, VecDeque};

use actix_web::web::Bytes;
use actix_web::HttpResponse;
use futures_util::stream::{self, Stream, StreamExt};
use serde_json::Value;

use crate::engine::Event;

use super::error::ApiError;
use super::types::Usage;

/// What happens when a request ends: its token counts go to the
/// per-adapter metrics, and (unless the request said `store: false`) the
/// completion goes to the completion log.
pub struct UsageSink {
    pub metrics: crate::metrics::Metrics,
    pub tenant: String,
    pub adapter: String,
    /// The log entry, its outputs still empty; `None`: not logged.
    pub log: Option<CompletionLog>,
    /// The quotas to charge the tokens to, and the request's permit (released when the sink goes).
    pub quotas: Option<(std::sync::Arc<super::quota::Quotas>, Option<std::sync::Arc<super::quota::Permit>>)>,
    pub request_id: Option<String>,
}

impl UsageSink {
    /// Records the request's usage and logs its outputs (choices by
    /// index). Blocks on the database commit: call off the async runtime
    /// or accept a few milliseconds.
    pub fn finish(self, usage: Usage, outputs: Vec<ChoiceOutput>) {
        self.metrics.record_usage(&self.tenant, &self.adapter, usage.prompt_tokens, usage.completion_tokens);
        tracing::info!(
            request_id = self.request_id.as_deref().unwrap_or(""),
            tenant = %self.tenant,
            adapter = %self.adapter,
            prompt_tokens = usage.prompt_tokens,
            completion_tokens = usage.completion_tokens,
            "generation finished"
        );
        if let Some((quotas, _permit)) = &self.quotas {
            quotas.charge(&self.tenant, (usage.prompt_tokens + usage.completion_tokens) as u64);
        }
        if let Some(CompletionLog { store, mut record, tenants, tenant }) = self.log {
            record.outputs = outputs.iter().map(|o| o.text.clone()).collect();
            record.output_ids = outputs.iter().map(|o| o.ids.clone()).collect();
            record.finish_reasons = outputs.into_iter().map(|o| o.finish_reason).collect();
            match tenants.write_as(&tenant, || store.log_completion(&record)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(id = %record.id, "completion log write failed: {e}"),
                Err(gone) => tracing::info!(id = %record.id, "completion not logged: {gone}"),
            }
        }
    }
}

/// Where a finished completion is logged, for which tenant (a tenant
/// deleted while its request ran has nothing logged).
pub struct CompletionLog {
    pub store: std::sync::Arc<dyn crate::store::RecordStore>,
    pub record: crate::store::CompletionRecord,
    pub tenants: std::sync::Arc<crate::tenants::Tenants>,
    pub tenant: crate::tenants::TenantRef,
}

/// What one choice said, as the completion log keeps it.
#[derive(Debug, Clone, Default)]
pub struct ChoiceOutput {
    pub text: String,
    pub ids: Vec<u32>,
    /// `stop`, `length`, or empty when the choice failed.
    pub finish_reason: String,
}

/// Turns one endpoint's events into its chunk objects.
pub trait ChunkFormatter: Send + 'static {
    /// Chunks for one event of choice `index` (of prompt `prompt_index`).
    fn on_event(&mut self, index: usize, prompt_index: usize, event: Event) -> Vec<Value>;
    /// The final chunk that carries `usage`.
    fn usage_chunk(&self, usage: Usage) -> Value;
}

/// Longest silence before a keep-alive comment.
const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(1);
const KEEPALIVE_FRAME: &[u8] = b": keep-alive\n\n";

struct State<S, F> {
    events: S,
    formatter: F,
    queue: VecDeque<Bytes>,
    include_usage: bool,
    prompt_tokens: BTreeMap<usize, usize>,
    completion_tokens: usize,
    /// Each choice so far, by index.
    texts: BTreeMap<usize, ChoiceOutput>,
    sink: Option<UsageSink>,
    done: bool,
}

fn frame(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// Streams `events` as an SSE response.
pub fn respond<S, F>(events: S, formatter: F, include_usage: bool, sink: UsageSink) -> HttpResponse
where
    S: Stream<Item = (usize, usize, Event)> + Unpin + 'static,
    F: ChunkFormatter,
{
    let state = State {
        events,
        formatter,
        queue: VecDeque::new(),
        include_usage,
        prompt_tokens: BTreeMap::new(),
        completion_tokens: 0,
        texts: BTreeMap::new(),
        sink: Some(sink),
        done: false,
    };
    let body = stream::unfold(state, |mut st| async move {
        loop {
            if let Some(b) = st.queue.pop_front() {
                return Some((Ok::<Bytes, actix_web::Error>(b), st));
            }
            if st.done {
                return None;
            }
            // A comment line now and then: actix notices a gone client only
            // when a write fails, and clients ignore SSE comments.
            let next = match tokio::time::timeout(KEEPALIVE, st.events.next()).await {
                Ok(next) => next,
                Err(_) => {
                    st.queue.push_back(Bytes::from_static(KEEPALIVE_FRAME));
                    continue;
                }
            };
            match next {
                Some((index, prompt_index, event)) => {
                    let out = st.texts.entry(index).or_default();
                    match &event {
                        Event::Token { id, text, .. } => {
                            out.text.push_str(text);
                            out.ids.push(*id);
                        }
                        Event::Done { text, reason, .. } => {
                            out.text.push_str(text);
                            out.finish_reason = reason.as_str().to_string();
                        }
                        _ => {}
                    }
                    if let Event::Done {
                        prompt_tokens,
                        completion_tokens,
                        ..
                    } = &event
                    {
                        st.prompt_tokens.insert(prompt_index, *prompt_tokens);
                        st.completion_tokens += completion_tokens;
                    }
                    if let Event::Error(message) = &event {
                        st.queue
                            .push_back(frame(&ApiError::internal(message.clone()).body()));
                        continue;
                    }
                    let chunks = st.formatter.on_event(index, prompt_index, event);
                    if chunks.is_empty() {
                        // Held-back text: still write something so a gone client is noticed.
                        st.queue.push_back(Bytes::from_static(KEEPALIVE_FRAME));
                    }
                    for chunk in chunks {
                        st.queue.push_back(frame(&chunk));
                    }
                }
                None => {
                    let usage = Usage::new(st.prompt_tokens.values().sum(), st.completion_tokens);
                    if let Some(sink) = st.sink.take() {
                        let outputs = std::mem::take(&mut st.texts).into_values().collect();
                        // The completion log's commit, off the HTTP workers.
                        if let Err(e) = actix_web::web::block(move || sink.finish(usage, outputs)).await {
                            tracing::error!("cannot finish a stream's bookkeeping: {e}");
                        }
                    }
                    if st.include_usage {
                        st.queue.push_back(frame(&st.formatter.usage_chunk(usage)));
                    }
                    st.queue.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                    st.done = true;
                }
            }
        }
    });
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body.boxed_local())
}
