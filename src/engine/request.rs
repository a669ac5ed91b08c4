//! What the API hands the engine, and what flows back per request.

use std::sync::Arc;

use super::sampling::{PositionLogprobs, SamplingParams};
use crate::lora::LoraAdapter;

/// One sequence to generate (the API submits `n` of these for `n` choices).
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// Prompt token ids (non-empty), BOS already applied.
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// Tokens to generate at most; 0 only scores the prompt.
    pub max_tokens: usize,
    pub stop: Vec<String>,
    /// Alternatives per generated token to report; `None`: no logprobs.
    pub logprobs: Option<usize>,
    /// Alternatives per prompt token to report (echo); `None`: none.
    pub prompt_logprobs: Option<usize>,
    /// Keep generating past EOS (benchmarks).
    pub ignore_eos: bool,
    /// The adapter version this sequence uses for its whole life (`None`:
    /// the base model). Resolved at submission, so a promotion while it
    /// runs never changes it.
    pub adapter: Option<Arc<LoraAdapter>>,
    /// Who asked: admission shares the batch fairly between tenants.
    pub tenant: String,
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS or a stop string.
    Stop,
    /// `max_tokens` or the context length.
    Length,
}

impl FinishReason {
    /// OpenAI's `finish_reason` string.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// A streamed event of one sequence.
#[derive(Debug, Clone)]
pub enum Event {
    /// Log-probabilities of the prompt tokens (the first is `None`: nothing predicts it).
    Prompt {
        logprobs: Vec<Option<PositionLogprobs>>,
    },
    /// One generated token and the text it released (may be empty while a
    /// stop string or a multi-byte character is pending).
    Token {
        id: u32,
        text: String,
        logprobs: Option<PositionLogprobs>,
    },
    /// The end; `text` is what was still held back.
    Done {
        reason: FinishReason,
        text: String,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    /// The engine failed this sequence.
    Error(String),
}
