//! The HTTP edge: OpenAI wire types, handlers, and the mapping of every
//! error to OpenAI's error object. No tensors here.

pub mod adapters;
pub mod audit;
pub mod blocking;
pub mod body;
pub mod chat;
pub mod completions;
pub mod error;
pub mod examples;
pub mod feedback;
pub mod files;
pub mod fine_tuning;
pub mod fine_tuning_objects;
pub mod generate;
pub mod models;
pub mod policy;
pub mod quota;
pub mod server;
pub mod sse;
pub mod state;
pub mod tenant;
pub mod tenants;
pub mod types;
pub mod usage;
pub mod validate;

pub use error::ApiError;
pub use state::AppState;
