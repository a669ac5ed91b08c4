//! The built-in demo model: deterministic seeded weights and a byte-level
//! tokenizer, so the server starts offline with nothing downloaded. The same
//! generator makes the random models of tests and benchmarks.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use tokenizers::Tokenizer;

use super::chat::ChatTemplate;
use super::config::ModelConfig;
use super::loader::{build_llama, LoadedModel};
use super::tokenizer::TextTokenizer;
use super::ModelError;

/// The id the built-in model is served under.
pub const BUILTIN_MODEL_ID: &str = "lifelora-builtin-demo";
/// Seed of the built-in weights.
pub const BUILTIN_SEED: u64 = 20_261_128;
/// Token ids of the byte tokenizer's specials; bytes follow from id 3.
pub const UNK_ID: u32 = 0;
pub const BOS_ID: u32 = 1;
pub const EOS_ID: u32 = 2;

/// The built-in model's shape: small enough to start instantly on a laptop.
pub fn builtin_config() -> ModelConfig {
    ModelConfig {
        architecture: "llama".into(),
        hidden_size: 128,
        intermediate_size: 344,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 32,
        vocab_size: 259,
        max_position_embeddings: 2048,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: None,
        rope_freq_factors: None,
        tie_word_embeddings: false,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        bos_token_id: Some(BOS_ID),
        eos_token_ids: vec![EOS_ID],
    }
}

/// The shape of a 110M-parameter Llama, for benchmarks.
pub fn llama_110m_config() -> ModelConfig {
    ModelConfig {
        hidden_size: 768,
        intermediate_size: 2048,
        num_hidden_layers: 12,
        num_attention_heads: 12,
        num_key_value_heads: 12,
        head_dim: 64,
        vocab_size: 32_000,
        max_position_embeddings: 2048,
        tie_word_embeddings: false,
        ..builtin_config()
    }
}

/// Deterministic random weights in Hugging Face naming for `cfg`:
/// projections ~ N(0, 0.02)-ish (uniform), norms near 1.
pub fn random_weights(
    cfg: &ModelConfig,
    seed: u64,
    device: &Device,
) -> Result<HashMap<String, Tensor>, ModelError> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = HashMap::new();
    let mut put = |name: String,
                   shape: &[usize],
                   scale: f32,
                   center: f32,
                   rng: &mut StdRng|
     -> Result<(), ModelError> {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| center + scale * (rng.gen::<f32>() * 2.0 - 1.0))
            .collect();
        out.insert(name, Tensor::from_vec(data, shape, device)?);
        Ok(())
    };
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let qd = cfg.num_attention_heads * cfg.head_dim;
    let kvd = cfg.num_key_value_heads * cfg.head_dim;
    let s = 0.035;
    put(
        "model.embed_tokens.weight".into(),
        &[cfg.vocab_size, h],
        1.0,
        0.0,
        &mut rng,
    )?;
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        put(
            format!("{p}.input_layernorm.weight"),
            &[h],
            0.1,
            1.0,
            &mut rng,
        )?;
        put(
            format!("{p}.post_attention_layernorm.weight"),
            &[h],
            0.1,
            1.0,
            &mut rng,
        )?;
        for (name, out_dim, in_dim) in [
            ("self_attn.q_proj", qd, h),
            ("self_attn.k_proj", kvd, h),
            ("self_attn.v_proj", kvd, h),
            ("self_attn.o_proj", h, qd),
            ("mlp.gate_proj", i, h),
            ("mlp.up_proj", i, h),
            ("mlp.down_proj", h, i),
        ] {
            put(
                format!("{p}.{name}.weight"),
                &[out_dim, in_dim],
                s,
                0.0,
                &mut rng,
            )?;
            if cfg.qkv_bias
                && matches!(
                    name,
                    "self_attn.q_proj" | "self_attn.k_proj" | "self_attn.v_proj"
                )
            {
                put(format!("{p}.{name}.bias"), &[out_dim], s, 0.0, &mut rng)?;
            }
        }
    }
    put("model.norm.weight".into(), &[h], 0.1, 1.0, &mut rng)?;
    if !cfg.tie_word_embeddings {
        put(
            "lm_head.weight".into(),
            &[cfg.vocab_size, h],
            0.3,
            0.0,
            &mut rng,
        )?;
    }
    Ok(out)
}

/// A random model of shape `cfg` (tests and benchmarks).
pub fn random_llama(
    cfg: &ModelConfig,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<super::Llama, ModelError> {
    let weights = random_weights(cfg, seed, device)?;
    let get = |name: &str| -> Result<Option<Tensor>, ModelError> {
        weights
            .get(name)
            .map(|t| t.to_dtype(dtype).map_err(ModelError::from))
            .transpose()
    };
    build_llama(cfg.clone(), &get)
}

/// A byte-level tokenizer: `<unk>`, `<s>`, `</s>`, then the 256 bytes as
/// `<0xNN>` tokens; text encodes one token per UTF-8 byte.
pub fn byte_tokenizer() -> Result<Tokenizer, ModelError> {
    byte_tokenizer_with_vocab(BYTE_VOCAB)
}

/// Specials plus the 256 byte tokens.
const BYTE_VOCAB: usize = 259;

/// The byte tokenizer padded to `vocab` ids: ids past the bytes decode to
/// ` tN` words, so every id a random model emits turns into visible text.
pub fn byte_tokenizer_with_vocab(vocab_size: usize) -> Result<Tokenizer, ModelError> {
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        vocab.insert((*t).into(), i.into());
    }
    for b in 0..=255u32 {
        vocab.insert(format!("<0x{b:02X}>"), (b + 3).into());
    }
    for id in BYTE_VOCAB..vocab_size {
        vocab.insert(format!("\u{2581}t{id}"), id.into());
    }
    let special = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(UNK_ID, "<unk>"), special(BOS_ID, "<s>"), special(EOS_ID, "</s>")],
        "normalizer": null,
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab, "merges": []}
    });
    json.to_string()
        .parse::<Tokenizer>()
        .map_err(|e| ModelError::Tokenizer(e.to_string()))
}

/// Writes a random model of shape `cfg` as a Hugging Face directory
/// (config.json, model.safetensors, byte tokenizer), so benchmarks and
/// tests can serve a model of any shape through the real loader.
pub fn write_hf_dir(cfg: &ModelConfig, seed: u64, dir: &std::path::Path) -> Result<(), ModelError> {
    let io = |e: std::io::Error| ModelError::Io {
        path: dir.display().to_string(),
        message: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": cfg.architecture,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_word_embeddings, "hidden_act": "silu",
        "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "torch_dtype": "float32",
    });
    let write = |name: &str, text: String| std::fs::write(dir.join(name), text).map_err(io);
    write(
        "config.json",
        serde_json::to_string_pretty(&config).unwrap_or_default(),
    )?;
    let tok_cfg = serde_json::json!({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": true});
    write("tokenizer_config.json", tok_cfg.to_string())?;
    let tokenizer = byte_tokenizer_with_vocab(cfg.vocab_size.max(BYTE_VOCAB))?
        .to_string(false)
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    write("tokenizer.json", tokenizer)?;
    let weights = random_weights(cfg, seed, &Device::Cpu)?;
    candle_core::safetensors::save(&weights, dir.join("model.safetensors"))?;
    Ok(())
}

/// The built-in demo model, ready to serve.
pub fn load_builtin(dtype: DType, device: &Device) -> Result<LoadedModel, ModelError> {
    let cfg = builtin_config();
    let model = random_llama(&cfg, BUILTIN_SEED, dtype, device)?;
    let tokenizer = TextTokenizer::new(
        byte_tokenizer()?,
        Some("<s>".into()),
        Some("</s>".into()),
        true,
        &[EOS_ID],
    );
    let chat = ChatTemplate::new(None, "<s>", "</s>")?;
    Ok(LoadedModel {
        id: BUILTIN_MODEL_ID.into(),
        model,
        tokenizer,
        chat,
        builtin: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_tokenizer_round_trips_utf8() {
        let t = TextTokenizer::new(
            byte_tokenizer().unwrap(),
            Some("<s>".into()),
            Some("</s>".into()),
            true,
            &[],
        );
        let ids = t.encode_prompt("héllo").unwrap();
        assert_eq!(ids[0], BOS_ID);
        assert_eq!(ids.len(), 1 + "héllo".len());
        assert_eq!(t.decode(&ids).unwrap(), "héllo");
    }

    #[test]
    fn builtin_weights_are_deterministic() {
        let a = random_weights(&builtin_config(), 7, &Device::Cpu).unwrap();
        let b = random_weights(&builtin_config(), 7, &Device::Cpu).unwrap();
        let k = "model.layers.0.self_attn.q_proj.weight";
        let diff = (&a[k] - &b[k])
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0);
    }
}
