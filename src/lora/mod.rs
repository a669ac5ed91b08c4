//! LoRA adapters as data (PEFT files) and as math (per-row deltas). Knows
//! nothing of any model: the model's LoRA sites come in as data.

pub mod adapter;
pub mod archive;
pub mod batched;
pub mod grouped;
pub mod init;
pub mod peft;
pub mod peft_writer;
pub mod trainable;

pub use adapter::{LoraAdapter, LoraModule, SiteSpec};
pub use batched::AdapterSegment;

/// Why an adapter was refused; each message names the file, field or tensor.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("missing file {0}")]
    MissingFile(String),
    #[error("invalid adapter_config.json: {0}")]
    InvalidConfig(String),
    #[error("unsupported adapter feature: {feature}")]
    Unsupported { feature: String },
    #[error("rank {rank} of {module} is above the limit of {limit}")]
    RankTooLarge { module: String, rank: usize, limit: usize },
    #[error("tensor {key} does not name a LoRA module of this model")]
    UnknownModule { key: String },
    #[error("{key} has no matching {missing}")]
    MissingPair { key: String, missing: String },
    #[error("tensor {key} has shape {got:?}, expected {expected:?}")]
    ShapeMismatch { key: String, expected: Vec<usize>, got: Vec<usize> },
    #[error("tensor {key} has dtype {dtype}; only f32, f16 and bf16 are accepted")]
    DtypeUnsupported { key: String, dtype: String },
    #[error("tensor {key} holds NaN or infinite values")]
    NonFinite { key: String },
    #[error("the adapter has no LoRA weights")]
    NoWeights,
    #[error("adapter_model.safetensors: {0}")]
    Safetensors(String),
    #[error("tensor op failed: {0}")]
    Tensor(#[from] candle_core::Error),
}
