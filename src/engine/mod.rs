//! Continuous batching on a dedicated thread.

pub mod detokenize;
pub mod handle;
pub mod request;
pub mod sampling;
pub mod scheduler;
pub mod sequence;
pub mod stop;
pub mod waiting;
pub mod worker;

pub use handle::EngineHandle;
pub use request::{Event, FinishReason, GenerationRequest};
pub use sampling::{PositionLogprobs, SamplingParams, TokenLogprob};

/// Why the engine could not take or run a request.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the server is at capacity ({max_waiting} requests waiting); retry later")]
    QueueFull { max_waiting: usize },
    #[error("this tenant already has {limit} sequences waiting, half of the server's queue; retry later")]
    TenantQueueFull { limit: usize },
    #[error("the engine has stopped")]
    Stopped,
    #[error("cannot start the engine thread: {0}")]
    Start(String),
}
