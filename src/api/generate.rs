//! Submitting a request's sequences to the engine and gathering their
//! events: all at once (plain responses) or merged as they come (streams).

use futures_util::stream::{self, Stream, StreamExt};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::engine::{EngineHandle, Event, FinishReason, GenerationRequest, PositionLogprobs};

use super::error::ApiError;

/// One choice being generated: its index in the response and prompt.
pub struct Submitted {
    pub index: usize,
    pub prompt_index: usize,
    pub rx: UnboundedReceiver<Event>,
}

/// Submits `n` sequences per prompt. Choice `i` of prompt `p` has index
/// `p * n + i` and seed `seed + i`, so choices differ but reproduce.
pub fn submit_all(
    engine: &EngineHandle,
    requests: Vec<GenerationRequest>,
    n: usize,
) -> Result<Vec<Submitted>, ApiError> {
    let mut all = Vec::with_capacity(requests.len() * n);
    let mut places = Vec::with_capacity(requests.len() * n);
    for (p, req) in requests.into_iter().enumerate() {
        for i in 0..n {
            let mut r = req.clone();
            r.params.seed = r.params.seed.map(|s| s.wrapping_add(i as u64));
            all.push(r);
            places.push((p * n + i, p));
        }
    }
    // All of a request's sequences are queued, or none.
    let receivers = engine.submit_many(all)?;
    Ok(places.into_iter().zip(receivers).map(|((index, prompt_index), rx)| Submitted { index, prompt_index, rx }).collect())
}

/// Everything one choice produced.
#[derive(Debug, Default)]
pub struct ChoiceResult {
    pub index: usize,
    pub prompt_index: usize,
    pub text: String,
    pub tokens: Vec<(u32, Option<PositionLogprobs>)>,
    pub prompt_logprobs: Vec<Option<PositionLogprobs>>,
    pub finish_reason: Option<FinishReason>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

impl From<&ChoiceResult> for super::sse::ChoiceOutput {
    fn from(c: &ChoiceResult) -> Self {
        super::sse::ChoiceOutput {
            text: c.text.clone(),
            ids: c.tokens.iter().map(|(id, _)| *id).collect(),
            finish_reason: c.finish_reason.map(|r| r.as_str().to_string()).unwrap_or_default(),
        }
    }
}

/// Waits for one choice to finish.
pub async fn collect(mut s: Submitted) -> Result<ChoiceResult, ApiError> {
    let mut r = ChoiceResult {
        index: s.index,
        prompt_index: s.prompt_index,
        ..Default::default()
    };
    while let Some(ev) = s.rx.recv().await {
        match ev {
            Event::Prompt { logprobs } => r.prompt_logprobs = logprobs,
            Event::Token { id, text, logprobs } => {
                r.text.push_str(&text);
                r.tokens.push((id, logprobs));
            }
            Event::Done {
                reason,
                text,
                prompt_tokens,
                completion_tokens,
            } => {
                r.text.push_str(&text);
                r.finish_reason = Some(reason);
                r.prompt_tokens = prompt_tokens;
                r.completion_tokens = completion_tokens;
                return Ok(r);
            }
            Event::Error(message) => return Err(ApiError::internal(message)),
        }
    }
    Err(ApiError::internal("the engine dropped the request"))
}

/// Waits for every choice; results ordered by index.
pub async fn collect_all(subs: Vec<Submitted>) -> Result<Vec<ChoiceResult>, ApiError> {
    let results = futures_util::future::join_all(subs.into_iter().map(collect)).await;
    let mut out = results.into_iter().collect::<Result<Vec<_>, _>>()?;
    out.sort_by_key(|r| r.index);
    Ok(out)
}

/// All choices' events as one stream of `(index, prompt_index, event)`.
/// Dropping it drops every receiver, which cancels the sequences.
pub fn merged(subs: Vec<Submitted>) -> impl Stream<Item = (usize, usize, Event)> + Unpin {
    let streams = subs.into_iter().map(|s| {
        let (index, prompt_index) = (s.index, s.prompt_index);
        stream::unfold(
            s.rx,
            |mut rx| async move { rx.recv().await.map(|e| (e, rx)) },
        )
        .map(move |e| (index, prompt_index, e))
        .boxed()
    });
    stream::select_all(streams)
}

/// Seconds since the epoch, for `created`.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A random response id such as `cmpl-3f9a…`.
pub fn random_id(prefix: &str) -> String {
    crate::store::new_id(prefix)
}
