//! The frozen base model: configuration, weights, our batched forward pass,
//! tokenizer and chat template.

pub mod attention;
pub mod builtin;
pub mod chat;
pub mod config;
pub mod frozen_linear;
pub mod ggml_numerics;
pub mod gguf;
pub mod gguf_meta;
pub mod gguf_tokenizer;
pub mod kv_cache;
pub mod llama;
pub mod loader;
pub mod packed_bf16;
pub mod packed_matrix;
pub mod parallel;
pub mod projection;
pub mod quant_kernels;
pub mod rope;
pub mod tokenizer;

pub use config::ModelConfig;
pub use kv_cache::KvCache;
pub use llama::{Llama, SequenceInput};
pub use loader::LoadedModel;
pub use tokenizer::TextTokenizer;

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("missing file {0}")]
    MissingFile(String),
    #[error("invalid model config: {0}")]
    InvalidConfig(String),
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("cannot read {path}: {message}")]
    Io { path: String, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("weights: {0}")]
    Weights(String),
    #[error("tensor op failed: {0}")]
    Tensor(#[from] candle_core::Error),
}
