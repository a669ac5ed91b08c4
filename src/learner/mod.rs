//! Learning from feedback: turning examples into a better adapter.
//! `sft` trains on prompt → answer pairs with candle's autograd, only the
//! LoRA matrices trainable, on the serving model's frozen weights.

pub mod dataset;
pub mod eval;
pub mod paraphrase;
pub mod phase_clock;
pub mod policy;
pub mod queue;
pub mod sft;
pub mod watch;
pub mod worker;

pub use worker::{FileJob, Learner};

/// Why training failed.
#[derive(Debug, thiserror::Error)]
pub enum LearnError {
    #[error("this model cannot be trained: {0}")]
    NotTrainable(String),
    #[error("no usable training examples: {0}")]
    NoExamples(String),
    #[error("line {line}: {message}")]
    BadExample { line: usize, message: String },
    #[error("tensor op failed: {0}")]
    Tensor(#[from] candle_core::Error),
}
