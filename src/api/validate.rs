//! Turns the wire's sampling fields into engine settings, refusing values
//! out of range with an error naming the field.

use crate::config::EngineSettings;
use crate::engine::SamplingParams;

use super::error::ApiError;
use super::types::SamplingFields;

/// Most alternatives per token (OpenAI allows 20 in chat, 5 in completions).
pub const MAX_TOP_LOGPROBS: i64 = 20;

fn range(name: &str, v: Option<f32>, lo: f32, hi: f32, default: f32) -> Result<f32, ApiError> {
    match v {
        None => Ok(default),
        Some(x) if x.is_finite() && x >= lo && x <= hi => Ok(x),
        Some(x) => Err(ApiError::invalid(
            format!("'{name}' must be between {lo} and {hi}, got {x}"),
            Some(name),
        )),
    }
}

/// The sampling settings, `n` and stop strings of a request.
pub struct Validated {
    pub params: SamplingParams,
    pub n: usize,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub ignore_eos: bool,
}

/// Most entries of `logit_bias` (OpenAI documents no limit; a bound keeps a
/// request's per-step work small).
pub const MAX_LOGIT_BIAS_ENTRIES: usize = 1024;

/// `logit_bias` as the engine takes it: every key a token id of the model's
/// vocabulary, every bias within [-100, 100].
fn logit_bias(bias: Option<&super::types::LogitBias>, vocab: usize) -> Result<Vec<(u32, f32)>, ApiError> {
    let Some(bias) = bias else { return Ok(Vec::new()) };
    if bias.len() > MAX_LOGIT_BIAS_ENTRIES {
        return Err(ApiError::invalid(
            format!("'logit_bias' may hold at most {MAX_LOGIT_BIAS_ENTRIES} tokens, got {}", bias.len()),
            Some("logit_bias"),
        ));
    }
    bias.iter()
        .map(|(key, &value)| {
            let id = key.parse::<u32>().ok().filter(|&id| (id as usize) < vocab).ok_or_else(|| {
                ApiError::invalid(
                    format!("'logit_bias' keys must be token ids from 0 to {}, got '{key}'", vocab.saturating_sub(1)),
                    Some("logit_bias"),
                )
            })?;
            if !(value.is_finite() && (-100.0..=100.0).contains(&value)) {
                return Err(ApiError::invalid(
                    format!("'logit_bias' values must be between -100 and 100, got {value} for token {key}"),
                    Some("logit_bias"),
                ));
            }
            Ok((id, value))
        })
        .collect()
}

/// Validates the shared fields against the engine's limits and the model's
/// vocabulary size.
pub fn sampling(f: &SamplingFields, limits: &EngineSettings, request: &crate::config::LimitSettings, vocab: usize) -> Result<Validated, ApiError> {
    let temperature = range("temperature", f.temperature, 0.0, 2.0, 1.0)?;
    let top_p = range("top_p", f.top_p, 0.0, 1.0, 1.0)?;
    if top_p <= 0.0 {
        return Err(ApiError::invalid(
            "'top_p' must be greater than 0",
            Some("top_p"),
        ));
    }
    let top_k = match f.top_k {
        None | Some(-1) => 0,
        Some(k) if k >= 0 => k as usize,
        Some(k) => {
            return Err(ApiError::invalid(
                format!("'top_k' must be -1 or at least 0, got {k}"),
                Some("top_k"),
            ))
        }
    };
    let presence_penalty = range("presence_penalty", f.presence_penalty, -2.0, 2.0, 0.0)?;
    let frequency_penalty = range("frequency_penalty", f.frequency_penalty, -2.0, 2.0, 0.0)?;
    let min_p = range("min_p", f.min_p, 0.0, 1.0, 0.0)?;
    let repetition_penalty = match f.repetition_penalty {
        None => 1.0,
        Some(x) if x.is_finite() && x > 0.0 => x,
        Some(x) => {
            return Err(ApiError::invalid(
                format!("'repetition_penalty' must be greater than 0, got {x}"),
                Some("repetition_penalty"),
            ))
        }
    };
    let logit_bias = logit_bias(f.logit_bias.as_ref(), vocab)?;
    let n = match f.n {
        None => 1,
        Some(n) if n >= 1 && n as usize <= limits.max_n => n as usize,
        Some(n) => {
            return Err(ApiError::invalid(
                format!("'n' must be between 1 and {}, got {n}", limits.max_n),
                Some("n"),
            ))
        }
    };
    let stop = f.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
    if stop.len() > request.max_stop_sequences {
        return Err(ApiError::invalid(
            format!("'stop' may hold at most {} sequences, got {}", request.max_stop_sequences, stop.len()),
            Some("stop"),
        ));
    }
    if stop.iter().any(|s| s.is_empty() || s.len() > request.max_stop_bytes) {
        return Err(ApiError::invalid(
            format!("each 'stop' sequence must be 1 to {} bytes long", request.max_stop_bytes),
            Some("stop"),
        ));
    }
    let seed = f.seed.map(|s| s as u64);
    let stream = f.stream.unwrap_or(false);
    let include_usage = f.stream_options.as_ref().is_some_and(|o| o.include_usage);
    if f.stream_options.is_some() && !stream {
        return Err(ApiError::invalid(
            "'stream_options' is only allowed when 'stream' is true",
            Some("stream_options"),
        ));
    }
    Ok(Validated {
        params: SamplingParams {
            temperature,
            top_p,
            top_k,
            seed,
            presence_penalty,
            frequency_penalty,
            min_p,
            repetition_penalty,
            logit_bias,
        },
        n,
        stop,
        stream,
        include_usage,
        ignore_eos: f.ignore_eos.unwrap_or(false),
    })
}

/// Resolves `max_tokens` against the context left after the prompt.
pub fn max_tokens(
    requested: Option<i64>,
    param: &str,
    prompt_param: &str,
    prompt_len: usize,
    context: usize,
    limits: &EngineSettings,
    allow_zero: bool,
) -> Result<usize, ApiError> {
    if prompt_len >= context && !(allow_zero && requested == Some(0)) {
        return Err(context_error(
            prompt_param,
            context,
            prompt_len,
            requested.unwrap_or(0).max(0) as usize,
        ));
    }
    let left = context.saturating_sub(prompt_len);
    match requested {
        None => Ok(limits.default_max_tokens.min(left)),
        Some(m) if m < 0 || (m == 0 && !allow_zero) => Err(ApiError::invalid(
            format!(
                "'{param}' must be at least {}, got {m}",
                if allow_zero { 0 } else { 1 }
            ),
            Some(param),
        )),
        Some(m) if m as usize > limits.max_tokens_limit => Err(ApiError::invalid(
            format!(
                "'{param}' must be at most {}, got {m}",
                limits.max_tokens_limit
            ),
            Some(param),
        )),
        Some(m) if m as usize > left => {
            Err(context_error(prompt_param, context, prompt_len, m as usize))
        }
        Some(m) => Ok(m as usize),
    }
}

fn context_error(prompt_param: &str, context: usize, prompt: usize, completion: usize) -> ApiError {
    ApiError::invalid(
        format!(
            "This model's maximum context length is {context} tokens. However, you requested {} tokens ({prompt} in the prompt, {completion} in the completion). Please reduce your prompt or completion length.",
            prompt + completion
        ),
        Some(prompt_param),
    )
    .with_code("context_length_exceeded")
}

/// Refuses a prompt longer than `limits.max_prompt_tokens` (when set).
pub fn prompt_length(tokens: usize, limits: &crate::config::LimitSettings, param: &str) -> Result<(), ApiError> {
    if limits.max_prompt_tokens > 0 && tokens > limits.max_prompt_tokens {
        return Err(ApiError::invalid(
            format!("the prompt is {tokens} tokens; this server takes at most {}", limits.max_prompt_tokens),
            Some(param),
        )
        .with_code("context_length_exceeded"));
    }
    Ok(())
}

/// Refuses a text prompt that cannot fit before it is tokenized (a
/// megabytes-long prompt costs seconds and hundreds of MiB to tokenize):
/// no token is longer than `max_token_bytes`, so `bytes` of text are at
/// least `bytes / max_token_bytes` tokens. A factor of 4 leaves room for
/// normalizers that shrink text (full-width letters to ASCII).
pub fn text_fits(bytes: usize, max_token_bytes: usize, context: usize, limits: &crate::config::LimitSettings, param: &str) -> Result<(), ApiError> {
    let tokens = if limits.max_prompt_tokens > 0 { limits.max_prompt_tokens.min(context) } else { context };
    let most = tokens.saturating_mul(max_token_bytes.max(1)).saturating_mul(4);
    if bytes > most {
        return Err(ApiError::invalid(
            format!(
                "'{param}' is {bytes} bytes: at least {} tokens, more than the {tokens} this model takes. Please shorten it.",
                bytes / max_token_bytes.max(1)
            ),
            Some(param),
        )
        .with_code("context_length_exceeded"));
    }
    Ok(())
}

/// Refuses a request whose log-probabilities would exceed
/// `limits.max_logprob_entries` (positions × (alternatives + 1) × n): a
/// small request must not be able to ask for a response of gigabytes.
pub fn logprob_entries(entries: usize, limits: &crate::config::LimitSettings, param: &str) -> Result<(), ApiError> {
    if limits.max_logprob_entries > 0 && entries > limits.max_logprob_entries {
        return Err(ApiError::invalid(
            format!(
                "'{param}' asks for {entries} log-probability entries (positions × (alternatives + 1) × n); this server returns at most {} per request. Ask for fewer alternatives, tokens, prompts or choices.",
                limits.max_logprob_entries
            ),
            Some(param),
        )
        .with_code("too_many_logprobs"));
    }
    Ok(())
}
