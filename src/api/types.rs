//! OpenAI wire types for requests (what we accept) and responses.

use serde::{Deserialize, Serialize};

/// `prompt`: a string, a list of strings, a list of token ids, or a list of such lists.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Tokens(Vec<u32>),
    Texts(Vec<String>),
    TokenLists(Vec<Vec<u32>>),
}

/// `stop`: a string or a list of strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopInput {
    One(String),
    Many(Vec<String>),
}

impl StopInput {
    /// As a list.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StopInput::One(s) => vec![s],
            StopInput::Many(v) => v,
        }
    }
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// `logit_bias`: token ids (as JSON object keys, so strings) to a bias.
pub type LogitBias = std::collections::BTreeMap<String, f32>;

/// A field the server accepts and does nothing with, because it changes no
/// output: a caller's end-user id, a routing tier, its own labels, a cache
/// hint. Listed in `docs/api.md`; every other unknown field is refused.
pub type Harmless = Option<serde::de::IgnoredAny>;

/// The sampling fields common to both endpoints.
#[derive(Debug, Clone, Default)]
pub struct SamplingFields {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub n: Option<i64>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub stop: Option<StopInput>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub ignore_eos: Option<bool>,
    pub logit_bias: Option<LogitBias>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
}

/// `POST /v1/completions`. A field not named here is refused (400 naming
/// it): a parameter silently ignored is a bug the caller cannot see.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: PromptInput,
    pub max_tokens: Option<i64>,
    pub logprobs: Option<i64>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    pub best_of: Option<i64>,
    /// Extension: the tenant an admin-key request acts as.
    pub tenant: Option<String>,
    /// Extension (as vLLM): include `token_ids` in each choice.
    pub return_token_ids: Option<bool>,
    /// OpenAI's field: `false` keeps the completion out of the log.
    pub store: Option<bool>,
    pub user: Option<String>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub n: Option<i64>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub stop: Option<StopInput>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub ignore_eos: Option<bool>,
    /// OpenAI's: token id to a bias in [-100, 100] added to its logit.
    pub logit_bias: Option<LogitBias>,
    /// vLLM's: drop tokens under this share of the most likely one's probability.
    pub min_p: Option<f32>,
    /// vLLM's: divides (or multiplies, when negative) the logits of tokens already seen.
    pub repetition_penalty: Option<f32>,
    pub service_tier: Harmless,
    pub metadata: Harmless,
    pub safety_identifier: Harmless,
    pub prompt_cache_key: Harmless,
}

/// A content part of a chat message.
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

/// A chat message's content: text or text parts.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// One incoming chat message.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessageIn {
    pub role: String,
    pub content: Option<MessageContent>,
    pub name: Option<String>,
}

/// `POST /v1/chat/completions`. A field not named here is refused (400
/// naming it).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessageIn>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    pub tools: Option<serde_json::Value>,
    pub response_format: Option<serde_json::Value>,
    /// Extension: the tenant an admin-key request acts as.
    pub tenant: Option<String>,
    /// OpenAI's field: `false` keeps the completion out of the log.
    pub store: Option<bool>,
    pub user: Option<String>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub n: Option<i64>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub stop: Option<StopInput>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub ignore_eos: Option<bool>,
    /// Extension (as vLLM's): the prompt's token ids and each choice's.
    pub return_token_ids: Option<bool>,
    /// OpenAI's: token id to a bias in [-100, 100] added to its logit.
    pub logit_bias: Option<LogitBias>,
    /// vLLM's: drop tokens under this share of the most likely one's probability.
    pub min_p: Option<f32>,
    /// vLLM's: divides (or multiplies, when negative) the logits of tokens already seen.
    pub repetition_penalty: Option<f32>,
    pub service_tier: Harmless,
    pub metadata: Harmless,
    pub safety_identifier: Harmless,
    pub prompt_cache_key: Harmless,
}

/// Token counts of a response.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    /// Adds one sequence's counts (the prompt counted once per prompt by the caller).
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// An entry of `GET /v1/models`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: String,
    pub root: String,
    pub parent: Option<String>,
    pub max_model_len: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Copies the sampling fields out of a request (kept flat on the wire so
/// errors can name the field).
macro_rules! sampling_fields {
    ($t:ty) => {
        impl $t {
            /// The shared sampling fields.
            pub fn sampling(&self) -> SamplingFields {
                SamplingFields {
                    temperature: self.temperature,
                    top_p: self.top_p,
                    top_k: self.top_k,
                    n: self.n,
                    seed: self.seed,
                    presence_penalty: self.presence_penalty,
                    frequency_penalty: self.frequency_penalty,
                    stop: self.stop.clone(),
                    stream: self.stream,
                    stream_options: self.stream_options.clone(),
                    ignore_eos: self.ignore_eos,
                    logit_bias: self.logit_bias.clone(),
                    min_p: self.min_p,
                    repetition_penalty: self.repetition_penalty,
                }
            }
        }
    };
}
sampling_fields!(CompletionRequest);
sampling_fields!(ChatRequest);
