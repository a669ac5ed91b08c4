//! Loads a Hugging Face model directory: `config.json`, memory-mapped
//! safetensors (single file or sharded index), tokenizer files and
//! `generation_config.json`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::chat::ChatTemplate;
use super::config::ModelConfig;
use super::llama::{Block, Embedding, Llama};
use super::projection::Projection;
use super::tokenizer::TextTokenizer;
use super::ModelError;

/// Everything the server needs about its base model.
pub struct LoadedModel {
    /// The id clients send as `model`.
    pub id: String,
    pub model: Llama,
    pub tokenizer: TextTokenizer,
    pub chat: ChatTemplate,
    /// True for the built-in demo model.
    pub builtin: bool,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("id", &self.id)
            .field("builtin", &self.builtin)
            .finish()
    }
}

/// Parses a dtype setting.
pub fn parse_dtype(name: &str) -> Result<DType, ModelError> {
    match name {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        other => Err(ModelError::InvalidConfig(format!(
            "dtype {other:?} (use f32, bf16 or f16)"
        ))),
    }
}

/// Parses a device setting: `cpu`, `cuda`, `cuda:N`.
pub fn parse_device(name: &str) -> Result<Device, ModelError> {
    match name {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = s
                .strip_prefix("cuda:")
                .map(|n| n.parse::<usize>())
                .transpose()
                .map_err(|_| ModelError::InvalidConfig(format!("device {s:?}: expected cuda:N")))?;
            Ok(Device::new_cuda(ordinal.unwrap_or(0))?)
        }
        other => Err(ModelError::InvalidConfig(format!(
            "device {other:?} (use cpu or cuda[:N])"
        ))),
    }
}

fn read_text(path: &Path) -> Result<String, ModelError> {
    std::fs::read_to_string(path).map_err(|e| ModelError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

fn read_json(path: &Path) -> Result<Value, ModelError> {
    serde_json::from_str(&read_text(path)?)
        .map_err(|e| ModelError::InvalidConfig(format!("{}: {e}", path.display())))
}

/// The safetensors files of a directory: the index's shards, or `model.safetensors`.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let v = read_json(&index)?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| {
                ModelError::InvalidConfig(format!("{}: no weight_map", index.display()))
            })?;
        let files: BTreeSet<&str> = map.values().filter_map(Value::as_str).collect();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(ModelError::MissingFile(format!(
        "{}: neither model.safetensors nor model.safetensors.index.json",
        dir.display()
    )))
}

/// A special token in tokenizer_config.json: a string or `{"content": ...}`.
fn special_token(cfg: &Value, key: &str) -> Option<String> {
    match cfg.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// `chat_template`: a string, or a list of named templates (take "default").
fn chat_template(cfg: &Value) -> Option<String> {
    match cfg.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .or_else(|| list.first())
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    }
}

fn eos_from_generation_config(dir: &Path) -> Result<Vec<u32>, ModelError> {
    let path = dir.join("generation_config.json");
    if !path.exists() {
        return Ok(Vec::new());
    }
    let v = read_json(&path)?;
    Ok(match v.get("eos_token_id") {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    })
}

/// Loads the directory at `dir` onto `device` with weights in `dtype`.
pub fn load_hf_dir(
    dir: &Path,
    served_name: Option<&str>,
    dtype: DType,
    device: &Device,
) -> Result<LoadedModel, ModelError> {
    let config_path = dir.join("config.json");
    if !config_path.exists() {
        return Err(ModelError::MissingFile(config_path.display().to_string()));
    }
    let config = ModelConfig::from_hf_json(&read_text(&config_path)?)?;
    let files = weight_files(dir)?;
    // SAFETY: the files are memory-mapped read-only; the server treats the
    // model directory as immutable while it runs.
    let st = unsafe { MmapedSafetensors::multi(&files) }
        .map_err(|e| ModelError::Weights(format!("{}: {e}", dir.display())))?;
    let progress = std::cell::RefCell::new(crate::progress::Progress::items(&format!("loading {}: tensors", dir.display()), st.tensors().len() as u64));
    let get = |name: &str| -> Result<Option<Tensor>, ModelError> {
        if st.get(name).is_err() {
            return Ok(None);
        }
        progress.borrow_mut().advance(1);
        Ok(Some(st.load(name, device)?.to_dtype(dtype)?))
    };
    let eos_extra: Vec<u32> = eos_from_generation_config(dir)?
        .into_iter()
        .chain(config.eos_token_ids.iter().copied())
        .collect();
    let model = build_llama(config, &get)?;
    progress.borrow_mut().finish();

    let tok_path = dir.join("tokenizer.json");
    if !tok_path.exists() {
        return Err(ModelError::MissingFile(tok_path.display().to_string()));
    }
    let inner = TextTokenizer::from_file(&tok_path)?;
    let tok_cfg_path = dir.join("tokenizer_config.json");
    let tok_cfg = if tok_cfg_path.exists() {
        read_json(&tok_cfg_path)?
    } else {
        Value::Null
    };
    let bos = special_token(&tok_cfg, "bos_token");
    let eos = special_token(&tok_cfg, "eos_token");
    let add_bos = tok_cfg
        .get("add_bos_token")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let tokenizer = TextTokenizer::new(inner, bos.clone(), eos.clone(), add_bos, &eos_extra);
    let chat = ChatTemplate::new(
        chat_template(&tok_cfg).as_deref(),
        bos.as_deref().unwrap_or(""),
        eos.as_deref().unwrap_or(""),
    )?;
    let id = match served_name {
        Some(n) if !n.is_empty() => n.to_string(),
        _ => dir
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "model".into()),
    };
    Ok(LoadedModel {
        id,
        model,
        tokenizer,
        chat,
        builtin: false,
    })
}

/// Assembles a [`Llama`] from tensors named as in Hugging Face checkpoints,
/// checking every shape against `config`.
pub fn build_llama(
    config: ModelConfig,
    get: &dyn Fn(&str) -> Result<Option<Tensor>, ModelError>,
) -> Result<Llama, ModelError> {
    let need = |name: &str, shape: &[usize]| -> Result<Tensor, ModelError> {
        let t = get(name)?.ok_or_else(|| ModelError::Weights(format!("missing tensor {name}")))?;
        if t.dims() != shape {
            return Err(ModelError::Weights(format!(
                "{name}: shape {:?}, expected {shape:?}",
                t.dims()
            )));
        }
        Ok(t)
    };
    let (h, i) = (config.hidden_size, config.intermediate_size);
    let qd = config.num_attention_heads * config.head_dim;
    let kvd = config.num_key_value_heads * config.head_dim;
    let proj =
        |prefix: &str, out: usize, inp: usize, bias: bool| -> Result<Projection, ModelError> {
            let w = need(&format!("{prefix}.weight"), &[out, inp])?;
            let b = if bias {
                Some(need(&format!("{prefix}.bias"), &[out])?)
            } else {
                None
            };
            Ok(Projection::new(w, b))
        };
    let mut blocks = Vec::with_capacity(config.num_hidden_layers);
    for l in 0..config.num_hidden_layers {
        let p = format!("model.layers.{l}");
        blocks.push(Block::new(
            need(&format!("{p}.input_layernorm.weight"), &[h])?,
            need(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
            proj(&format!("{p}.self_attn.q_proj"), qd, h, config.qkv_bias)?,
            proj(&format!("{p}.self_attn.k_proj"), kvd, h, config.qkv_bias)?,
            proj(&format!("{p}.self_attn.v_proj"), kvd, h, config.qkv_bias)?,
            proj(&format!("{p}.self_attn.o_proj"), h, qd, config.o_bias)?,
            proj(&format!("{p}.mlp.gate_proj"), i, h, config.mlp_bias)?,
            proj(&format!("{p}.mlp.up_proj"), i, h, config.mlp_bias)?,
            proj(&format!("{p}.mlp.down_proj"), h, i, config.mlp_bias)?,
        )?);
    }
    let embed = Embedding::Dense(need("model.embed_tokens.weight", &[config.vocab_size, h])?);
    let final_norm = need("model.norm.weight", &[h])?;
    let lm_head = match (config.tie_word_embeddings, get("lm_head.weight")?) {
        (false, Some(_)) => Some(Projection::new(
            need("lm_head.weight", &[config.vocab_size, h])?,
            None,
        )),
        _ => None,
    };
    Llama::from_parts(config, embed, blocks, final_norm, lm_head)
}
