//! One sequence's state on the engine thread: its tokens, KV cache,
//! sampler, text decoding and stop matching, and its response channel.

use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::detokenize::IncrementalDecoder;
use super::request::{Event, FinishReason, GenerationRequest};
use super::sampling::{logprobs_of, PositionLogprobs, Sampler};
use super::stop::{StopMatcher, StopOutcome};
use crate::model::{KvCache, TextTokenizer};

/// A request being served.
pub struct Sequence {
    pub request: GenerationRequest,
    /// Prompt followed by generated tokens.
    pub tokens: Vec<u32>,
    /// Tokens already written to the cache.
    pub fed: usize,
    pub cache: Option<KvCache>,
    /// KV bytes reserved at admission (prompt + max_tokens).
    pub reserved_bytes: u64,
    pub prompt_logprobs: Vec<Option<PositionLogprobs>>,
    /// The prompt was read once (its logprobs sent, first token timed): a
    /// preempted sequence recomputing its KV does not report it again.
    pub prompt_reported: bool,
    pub submitted: Instant,
    sampler: Sampler,
    decoder: IncrementalDecoder,
    stop: StopMatcher,
    tx: UnboundedSender<Event>,
}

impl Sequence {
    /// Wraps a submitted request.
    pub fn new(request: GenerationRequest, tx: UnboundedSender<Event>) -> Self {
        let decoder = IncrementalDecoder::new(&request.prompt);
        Sequence {
            tokens: request.prompt.clone(),
            fed: 0,
            cache: None,
            reserved_bytes: 0,
            prompt_logprobs: Vec::new(),
            prompt_reported: false,
            submitted: Instant::now(),
            sampler: Sampler::new(request.params.clone(), &request.prompt),
            decoder,
            stop: StopMatcher::new(request.stop.clone()),
            tx,
            request,
        }
    }

    /// Prompt length.
    pub fn prompt_len(&self) -> usize {
        self.request.prompt.len()
    }

    /// Generated so far.
    pub fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len()
    }

    /// Still reading its input: the prompt, or after a preemption the
    /// prompt and what it generated (a decoding sequence has exactly one
    /// token pending, the one it sampled last).
    pub fn is_prefilling(&self) -> bool {
        self.fed < self.prompt_len() || self.pending() > 1
    }

    /// Gives up its KV cache to go back to waiting; when admitted again it
    /// recomputes the cache from its tokens and carries on where it was.
    pub fn preempt(&mut self) {
        self.cache = None;
        self.fed = 0;
        self.reserved_bytes = 0;
        if !self.prompt_reported {
            self.prompt_logprobs.clear();
        }
    }

    /// Tokens not yet in the cache.
    pub fn pending(&self) -> usize {
        self.tokens.len() - self.fed
    }

    /// The client went away (its receiver was dropped).
    pub fn is_abandoned(&self) -> bool {
        self.tx.is_closed()
    }

    /// Sends an event; a closed channel is noticed by [`Sequence::is_abandoned`].
    pub fn send(&self, event: Event) {
        let _ = self.tx.send(event);
    }

    /// Records prompt log-probabilities from rows predicting prompt tokens
    /// `first + 1 ..`; `rows[i]` predicts token `first + i + 1`.
    pub fn record_prompt_logprobs(&mut self, first: usize, rows: &[Vec<f32>], top: usize) {
        if first == 0 {
            self.prompt_logprobs.push(None);
        }
        for (i, row) in rows.iter().enumerate() {
            if let Some(&next) = self.request.prompt.get(first + i + 1) {
                self.prompt_logprobs.push(Some(logprobs_of(row, next, top)));
            }
        }
    }

    /// Samples the next token from `logits`, emits it, and says whether the
    /// sequence is finished (and why).
    pub fn advance(
        &mut self,
        mut logits: Vec<f32>,
        tokenizer: &TextTokenizer,
        eos: &[u32],
        max_context: usize,
    ) -> Option<FinishReason> {
        let raw = self.request.logprobs.map(|_| logits.clone());
        let id = self.sampler.sample(&mut logits);
        self.sampler.observe(id);
        self.tokens.push(id);
        let logprobs = raw.map(|r| logprobs_of(&r, id, self.request.logprobs.unwrap_or(0)));
        if !self.request.ignore_eos && eos.contains(&id) {
            let tail = self.decoder.flush(tokenizer) + &self.stop.flush();
            self.send(Event::Token {
                id,
                text: String::new(),
                logprobs,
            });
            return self.finish(FinishReason::Stop, tail);
        }
        let delta = self.decoder.push(tokenizer, id);
        match self.stop.push(&delta) {
            StopOutcome::Stopped(text) => {
                self.send(Event::Token { id, text, logprobs });
                self.finish(FinishReason::Stop, String::new())
            }
            StopOutcome::Continue(text) => {
                self.send(Event::Token { id, text, logprobs });
                if self.generated() >= self.request.max_tokens || self.tokens.len() >= max_context {
                    let tail = self.decoder.flush(tokenizer);
                    let tail = match self.stop.push(&tail) {
                        StopOutcome::Stopped(t) => t,
                        StopOutcome::Continue(t) => t + &self.stop.flush(),
                    };
                    self.finish(FinishReason::Length, tail)
                } else {
                    None
                }
            }
        }
    }

    /// Sends the prompt's logprobs (when asked) and the final event.
    pub fn finish(&mut self, reason: FinishReason, text: String) -> Option<FinishReason> {
        self.send(Event::Done {
            reason,
            text,
            prompt_tokens: self.prompt_len(),
            completion_tokens: self.generated(),
        });
        Some(reason)
    }

    /// Sends the prompt's logprobs once the prompt is read, if asked.
    pub fn send_prompt_logprobs(&mut self) {
        if self.request.prompt_logprobs.is_some() {
            let logprobs = std::mem::take(&mut self.prompt_logprobs);
            self.send(Event::Prompt { logprobs });
        }
    }
}
