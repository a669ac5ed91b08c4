//! The architecture hyper-parameters of a Llama-family model, read from a
//! Hugging Face `config.json` (llama, mistral, qwen2) or built in code.

use serde::Deserialize;

use super::ModelError;

/// `rope_scaling` of type `llama3` (Llama 3.1+): frequency-dependent scaling.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// The hyper-parameters our forward pass needs, already normalised across
/// the architectures we serve.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// Per-frequency divisors (GGUF `rope_freqs.weight`, how llama.cpp
    /// stores Llama 3 scaling); applied after `rope_scaling`.
    pub rope_freq_factors: Option<Vec<f32>>,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry biases (qwen2, or `attention_bias: true`).
    pub qkv_bias: bool,
    /// o_proj carries a bias (`attention_bias: true` on llama).
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<u32> {
        match self {
            OneOrMany::One(x) => vec![x],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    bos_token_id: Option<OneOrMany>,
    eos_token_id: Option<OneOrMany>,
}

impl ModelConfig {
    /// Parses `config.json`, refusing architectures and options we cannot run.
    pub fn from_hf_json(text: &str) -> Result<Self, ModelError> {
        let raw: RawConfig = serde_json::from_str(text)
            .map_err(|e| ModelError::InvalidConfig(format!("config.json: {e}")))?;
        let arch = raw.model_type.clone().unwrap_or_else(|| "llama".into());
        if !matches!(arch.as_str(), "llama" | "mistral" | "qwen2") {
            return Err(ModelError::Unsupported(format!(
                "model_type {arch:?} (supported: llama, mistral, qwen2)"
            )));
        }
        if let Some(act) = &raw.hidden_act {
            if act != "silu" {
                return Err(ModelError::Unsupported(format!(
                    "hidden_act {act:?} (only silu)"
                )));
            }
        }
        let rope_scaling = match raw.rope_scaling {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => {
                let kind = v
                    .get("rope_type")
                    .or_else(|| v.get("type"))
                    .and_then(|t| t.as_str())
                    .unwrap_or("");
                match kind {
                    "llama3" => Some(serde_json::from_value(v.clone()).map_err(|e| {
                        ModelError::InvalidConfig(format!("config.json rope_scaling: {e}"))
                    })?),
                    "default" => None,
                    other => {
                        return Err(ModelError::Unsupported(format!(
                            "rope_scaling type {other:?} (supported: llama3)"
                        )))
                    }
                }
            }
        };
        let heads = raw.num_attention_heads;
        let kv_heads = raw.num_key_value_heads.unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
            return Err(ModelError::InvalidConfig(format!(
                "config.json: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            )));
        }
        let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / heads);
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(ModelError::InvalidConfig(format!(
                "config.json: head_dim {head_dim} must be even"
            )));
        }
        let attention_bias = raw.attention_bias.unwrap_or(false);
        let qwen = arch == "qwen2";
        // Sliding-window attention is not implemented: serve only the context
        // where full attention is exact (the window), never silently more.
        let window = match (arch.as_str(), raw.sliding_window, raw.use_sliding_window) {
            ("mistral", Some(w), _) | ("qwen2", Some(w), Some(true)) => Some(w),
            _ => None,
        };
        let max_positions = raw.max_position_embeddings.unwrap_or(2048);
        let max_positions = window.map_or(max_positions, |w| w.min(max_positions));
        Ok(ModelConfig {
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            vocab_size: raw.vocab_size,
            max_position_embeddings: max_positions,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: raw.rope_theta.unwrap_or(10_000.0),
            rope_scaling,
            rope_freq_factors: None,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias: qwen || attention_bias,
            o_bias: !qwen && attention_bias,
            mlp_bias: raw.mlp_bias.unwrap_or(false),
            bos_token_id: raw.bos_token_id.and_then(|b| b.into_vec().first().copied()),
            eos_token_ids: raw
                .eos_token_id
                .map(OneOrMany::into_vec)
                .unwrap_or_default(),
            architecture: arch,
        })
    }

    /// Bytes of KV cache one token takes across all layers at `dtype_bytes`.
    pub fn kv_bytes_per_token(&self, dtype_bytes: usize) -> usize {
        2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * dtype_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen2_gets_qkv_bias_and_eos_lists_are_read() {
        let c = ModelConfig::from_hf_json(
            r#"{"model_type":"qwen2","hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,
            "num_attention_heads":4,"num_key_value_heads":2,"vocab_size":100,"eos_token_id":[5,6]}"#,
        )
        .unwrap();
        assert!(c.qkv_bias && !c.o_bias);
        assert_eq!(c.eos_token_ids, vec![5, 6]);
        assert_eq!(c.head_dim, 16);
    }

    #[test]
    fn llama3_rope_scaling_is_parsed_and_unknown_kinds_refused() {
        let base = r#""model_type":"llama","hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"vocab_size":100"#;
        let c = ModelConfig::from_hf_json(&format!(
            r#"{{{base},"rope_scaling":{{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}}}}"#
        ))
        .unwrap();
        assert_eq!(c.rope_scaling.unwrap().factor, 8.0);
        let e = ModelConfig::from_hf_json(&format!(
            r#"{{{base},"rope_scaling":{{"type":"yarn","factor":2.0}}}}"#
        ));
        assert!(matches!(e, Err(ModelError::Unsupported(_))));
    }

    #[test]
    fn mistral_context_is_capped_at_its_sliding_window() {
        let c = ModelConfig::from_hf_json(
            r#"{"model_type":"mistral","hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,
            "num_attention_heads":4,"num_key_value_heads":2,"vocab_size":100,"max_position_embeddings":32768,"sliding_window":4096}"#,
        )
        .unwrap();
        assert_eq!(c.max_position_embeddings, 4096);
    }

    #[test]
    fn unknown_architecture_is_refused_by_name() {
        let e = ModelConfig::from_hf_json(
            r#"{"model_type":"gpt2","hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"vocab_size":100}"#,
        );
        assert!(matches!(e, Err(ModelError::Unsupported(m)) if m.contains("gpt2")));
    }
}
