//! lifelora: one frozen base LLM served to many tenants over an
//! OpenAI-compatible API, with continuous batching.

pub mod adapter_store;
pub mod api;
pub mod config;
pub mod cpu;
pub mod engine;
pub mod fetch;
pub mod hub;
pub mod learner;
pub mod loadgen;
pub mod lora;
pub mod metrics;
pub mod registry;
pub mod model;
pub mod progress;
pub mod serve;
pub mod storage_quota;
pub mod store;
pub mod tenants;
