//! Reads and validates PEFT LoRA adapters (`adapter_config.json` +
//! `adapter_model.safetensors`) against the base model's LoRA sites,
//! refusing by name what we cannot serve.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use regex::Regex;
use safetensors::SafeTensors;
use serde_json::Value;

use super::adapter::{LoraAdapter, LoraModule, SiteSpec};
use super::LoraError;

/// What the server accepts.
#[derive(Debug, Clone)]
pub struct LoraLimits {
    pub max_rank: usize,
    /// Entries in `rank_pattern` and `alpha_pattern` together.
    pub max_patterns: usize,
}

impl Default for LoraLimits {
    fn default() -> Self {
        LoraLimits { max_rank: 64, max_patterns: 256 }
    }
}

/// Longest `rank_pattern` / `alpha_pattern` key, in bytes.
pub const MAX_PATTERN_BYTES: usize = 512;
/// Largest `lora_alpha` (or `alpha_pattern` value) and largest resulting
/// scale accepted: real adapters use tens; beyond this an adapter only
/// overflows the activations to infinity.
pub const MAX_ALPHA: f64 = 65536.0;
/// Compiled size one pattern's regex may reach (a key of 512 bytes with
/// nested repetition can otherwise compile to megabytes).
const MAX_PATTERN_REGEX_BYTES: usize = 1 << 20;

/// One `rank_pattern` / `alpha_pattern` entry, compiled once per adapter.
#[derive(Debug, Clone)]
pub struct Pattern<T> {
    pub key: String,
    regex: Regex,
    pub value: T,
}

/// The parts of `adapter_config.json` that change the math.
#[derive(Debug, Clone)]
pub struct PeftConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    /// `{pattern: rank}` in file order (first match wins).
    pub rank_pattern: Vec<Pattern<usize>>,
    pub alpha_pattern: Vec<Pattern<f64>>,
    /// `target_modules` when given as a list of names (a string is a regex, not checked by name).
    pub target_names: Vec<String>,
}

/// PEFT's rule: a pattern key k matches module m when `(.*\.)?(k)$` matches m.
fn compile_pattern(field: &str, key: &str) -> Result<Regex, LoraError> {
    if key.len() > MAX_PATTERN_BYTES {
        return Err(invalid(format!("{field} key of {} bytes; at most {MAX_PATTERN_BYTES}", key.len())));
    }
    regex::RegexBuilder::new(&format!(r"^(.*\.)?({key})$"))
        .size_limit(MAX_PATTERN_REGEX_BYTES)
        .build()
        .map_err(|e| invalid(format!("{field}[{key:?}] is not a usable regular expression: {e}")))
}

fn invalid(msg: impl Into<String>) -> LoraError {
    LoraError::InvalidConfig(msg.into())
}

fn unsupported(feature: impl Into<String>) -> LoraError {
    LoraError::Unsupported { feature: feature.into() }
}

impl PeftConfig {
    /// Parses and checks the config; unknown keys are ignored (PEFT adds new ones every release).
    pub fn parse(bytes: &[u8], limits: &LoraLimits) -> Result<Self, LoraError> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| invalid(format!("not valid JSON: {e}")))?;
        let obj = v.as_object().ok_or_else(|| invalid("expected a JSON object"))?;
        let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
        match get("peft_type").and_then(Value::as_str) {
            Some("LORA") => {}
            Some(other) => return Err(unsupported(format!("peft_type {other:?} (only LORA)"))),
            None => return Err(invalid("peft_type is missing")),
        }
        if get("use_dora").and_then(Value::as_bool) == Some(true) {
            return Err(unsupported("use_dora (DoRA magnitude vectors)"));
        }
        if get("modules_to_save").and_then(Value::as_array).is_some_and(|a| !a.is_empty()) {
            return Err(unsupported("modules_to_save (full copies of base modules)"));
        }
        if get("fan_in_fan_out").and_then(Value::as_bool) == Some(true) {
            return Err(unsupported("fan_in_fan_out: true"));
        }
        if let Some(b) = get("bias").and_then(Value::as_str) {
            if b != "none" {
                return Err(unsupported(format!("bias {b:?} (only \"none\")")));
            }
        }
        if get("lora_bias").and_then(Value::as_bool) == Some(true) {
            return Err(unsupported("lora_bias"));
        }
        if let Some(init) = get("init_lora_weights").and_then(Value::as_str) {
            let lower = init.to_ascii_lowercase();
            if ["pissa", "olora", "corda", "loftq"].iter().any(|p| lower.starts_with(p)) {
                return Err(unsupported(format!("init_lora_weights {init:?} (changes the base weights)")));
            }
        }
        let mut target_names = Vec::new();
        if let Some(t) = get("target_modules") {
            let names: Vec<String> = match t {
                Value::String(s) => vec![s.clone()],
                Value::Array(a) => a.iter().filter_map(Value::as_str).map(str::to_string).collect(),
                _ => return Err(invalid("target_modules must be a string or a list")),
            };
            if let Some(bad) = names.iter().find(|n| n.contains("embed_tokens") || n.contains("lm_head")) {
                return Err(unsupported(format!("LoRA on {bad} (embedding and lm_head adapters)")));
            }
            if t.is_array() {
                target_names = names;
            }
        }
        let r = match get("r") {
            Some(v) => positive_integer(v).ok_or_else(|| invalid(format!("r must be a positive integer, got {v}")))?,
            None => return Err(invalid("r must be a positive integer")),
        };
        let lora_alpha = match get("lora_alpha") {
            None => 8.0,
            Some(v) => alpha_value(v).ok_or_else(|| invalid(format!("lora_alpha must be a positive number up to {MAX_ALPHA}, got {v}")))?,
        };
        let use_rslora = get("use_rslora").and_then(Value::as_bool).unwrap_or(false);
        let entries = |key: &str| -> Result<Vec<(&String, &Value)>, LoraError> {
            match get(key) {
                None => Ok(Vec::new()),
                Some(Value::Object(m)) => Ok(m.iter().collect()),
                Some(_) => Err(invalid(format!("{key} must be an object"))),
            }
        };
        let (ranks, alphas) = (entries("rank_pattern")?, entries("alpha_pattern")?);
        if ranks.len() + alphas.len() > limits.max_patterns {
            return Err(invalid(format!(
                "rank_pattern and alpha_pattern hold {} entries; at most {} are accepted",
                ranks.len() + alphas.len(),
                limits.max_patterns
            )));
        }
        let rank_pattern = ranks
            .into_iter()
            .map(|(k, v)| {
                let value = positive_integer(v).ok_or_else(|| invalid(format!("rank_pattern[{k:?}] must be a positive integer, got {v}")))?;
                Ok(Pattern { key: k.clone(), regex: compile_pattern("rank_pattern", k)?, value })
            })
            .collect::<Result<Vec<_>, LoraError>>()?;
        let alpha_pattern = alphas
            .into_iter()
            .map(|(k, v)| {
                let value = alpha_value(v).ok_or_else(|| invalid(format!("alpha_pattern[{k:?}] must be a positive number up to {MAX_ALPHA}, got {v}")))?;
                Ok(Pattern { key: k.clone(), regex: compile_pattern("alpha_pattern", k)?, value })
            })
            .collect::<Result<Vec<_>, LoraError>>()?;
        Ok(PeftConfig { r, lora_alpha, use_rslora, rank_pattern, alpha_pattern, target_names })
    }

    /// Rank and scale of the module with full name `name` (PEFT's rule: a
    /// pattern key k matches when `(.*\.)?(k)$` matches; first match wins).
    /// The scale must be finite and at most [`MAX_ALPHA`].
    pub fn rank_and_scale(&self, name: &str) -> Result<(usize, f64), LoraError> {
        fn first<T: Copy>(patterns: &[Pattern<T>], name: &str) -> Option<T> {
            patterns.iter().find(|p| p.regex.is_match(name)).map(|p| p.value)
        }
        let r = first(&self.rank_pattern, name).unwrap_or(self.r);
        let alpha = first(&self.alpha_pattern, name).unwrap_or(self.lora_alpha);
        let scale = if self.use_rslora { alpha / (r as f64).sqrt() } else { alpha / r as f64 };
        if !(scale.is_finite() && scale.abs() <= MAX_ALPHA) {
            return Err(invalid(format!("the scale of {name} (alpha {alpha}, rank {r}) is {scale}; at most {MAX_ALPHA}")));
        }
        Ok((r, scale))
    }
}

/// A JSON integer ≥ 1 (`4`, not `4.0`, `0.5` or `"4"`).
fn positive_integer(v: &Value) -> Option<usize> {
    v.as_u64().filter(|&n| n >= 1 && n <= u32::MAX as u64).map(|n| n as usize)
}

/// A finite number in (0, MAX_ALPHA].
fn alpha_value(v: &Value) -> Option<f64> {
    v.as_f64().filter(|a| a.is_finite() && *a > 0.0 && *a <= MAX_ALPHA)
}

/// The first element of `t` that is NaN or infinite, if any (every
/// element is read: a maximum of absolute values skips NaN).
fn first_non_finite(t: &Tensor) -> Result<Option<f32>, LoraError> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?.into_iter().find(|x| !x.is_finite()))
}

/// A tensor key's meaning: `(layer, module, is_a)`.
fn parse_key(key: &str) -> Result<(usize, String, bool), LoraError> {
    let k = key.strip_prefix("base_model.model.").unwrap_or(key);
    if k.contains("lora_embedding") || k.contains("embed_tokens") || k.contains("lm_head") {
        return Err(unsupported(format!("{key} (embedding and lm_head adapters)")));
    }
    if k.contains("lora_magnitude_vector") {
        return Err(unsupported(format!("{key} (DoRA)")));
    }
    let unknown = || LoraError::UnknownModule { key: key.to_string() };
    let rest = k.strip_prefix("model.layers.").ok_or_else(unknown)?;
    let (layer, rest) = rest.split_once('.').ok_or_else(unknown)?;
    let layer: usize = layer.parse().map_err(|_| unknown())?;
    let rest = rest.strip_suffix(".weight").ok_or_else(unknown)?;
    let rest = rest.strip_suffix(".default").unwrap_or(rest);
    let (path, ab) = rest.rsplit_once('.').ok_or_else(unknown)?;
    let is_a = match ab {
        "lora_A" => true,
        "lora_B" => false,
        _ => return Err(unknown()),
    };
    let module = match path {
        "self_attn.q_proj" | "self_attn.k_proj" | "self_attn.v_proj" | "self_attn.o_proj" | "mlp.gate_proj" | "mlp.up_proj"
        | "mlp.down_proj" => path.rsplit('.').next().unwrap_or(path).to_string(),
        _ => return Err(unknown()),
    };
    Ok((layer, module, is_a))
}

/// PEFT's module path for `(layer, module)`, as it appears in tensor keys and patterns.
pub fn full_module_name(layer: usize, module: &str) -> String {
    let group = if matches!(module, "gate_proj" | "up_proj" | "down_proj") { "mlp" } else { "self_attn" };
    format!("model.layers.{layer}.{group}.{module}")
}

/// Validates an adapter given as file contents against `sites` and loads
/// it onto `device` in `dtype`.
pub fn parse(
    config_json: &[u8],
    weights: &[u8],
    sites: &[SiteSpec],
    limits: &LoraLimits,
    dtype: DType,
    device: &Device,
) -> Result<LoraAdapter, LoraError> {
    let config = PeftConfig::parse(config_json, limits)?;
    let st = SafeTensors::deserialize(weights).map_err(|e| LoraError::Safetensors(e.to_string()))?;
    let site_map: HashMap<(usize, &str), &SiteSpec> = sites.iter().map(|s| ((s.layer, s.module.as_str()), s)).collect();
    // Every module the config names must exist in this base model (PEFT
    // matches a listed name against the end of each module's path).
    let modules: HashSet<&str> = sites.iter().map(|s| s.module.as_str()).collect();
    if let Some(bad) = config.target_names.iter().find(|n| !modules.contains(n.rsplit('.').next().unwrap_or(n))) {
        let mut known: Vec<&str> = modules.iter().copied().collect();
        known.sort();
        return Err(invalid(format!("target_modules names {bad:?}, which this base model does not have (it has {})", known.join(", "))));
    }
    let mut pairs: HashMap<(usize, String), (Option<Tensor>, Option<Tensor>)> = HashMap::new();
    // Rank and scale per module, each worked out once (patterns are regexes).
    let mut rank_scale: HashMap<(usize, String), (usize, f64)> = HashMap::new();
    let mut seen = HashSet::new();
    for (key, view) in st.tensors() {
        let (layer, module, is_a) = parse_key(&key)?;
        let site = site_map.get(&(layer, module.as_str())).ok_or_else(|| LoraError::UnknownModule { key: key.clone() })?;
        let (rank, _) = match rank_scale.get(&(layer, module.clone())) {
            Some(&rs) => rs,
            None => {
                let rs = config.rank_and_scale(&full_module_name(layer, &module))?;
                rank_scale.insert((layer, module.clone()), rs);
                rs
            }
        };
        if rank > limits.max_rank {
            return Err(LoraError::RankTooLarge { module: full_module_name(layer, &module), rank, limit: limits.max_rank });
        }
        let expected = if is_a { vec![rank, site.in_features] } else { vec![site.out_features, rank] };
        if view.shape() != expected.as_slice() {
            return Err(LoraError::ShapeMismatch { key: key.clone(), expected, got: view.shape().to_vec() });
        }
        let source_dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            other => return Err(LoraError::DtypeUnsupported { key: key.clone(), dtype: format!("{other:?}") }),
        };
        let t = Tensor::from_raw_buffer(view.data(), source_dtype, view.shape(), &Device::Cpu)?.to_dtype(DType::F32)?;
        if first_non_finite(&t)?.is_some() {
            return Err(LoraError::NonFinite { key: key.clone() });
        }
        if !seen.insert((layer, module.clone(), is_a)) {
            return Err(invalid(format!("tensor {key} appears twice (with and without `.default`)")));
        }
        let slot = pairs.entry((layer, module)).or_default();
        if is_a {
            slot.0 = Some(t);
        } else {
            slot.1 = Some(t);
        }
    }
    if pairs.is_empty() {
        return Err(LoraError::NoWeights);
    }
    let mut modules = HashMap::with_capacity(pairs.len());
    for ((layer, module), (a, b)) in pairs {
        let name = full_module_name(layer, &module);
        let (a, b) = match (a, b) {
            (Some(a), Some(b)) => (a, b),
            (Some(_), None) => return Err(LoraError::MissingPair { key: format!("{name}.lora_A.weight"), missing: "lora_B".into() }),
            (None, _) => return Err(LoraError::MissingPair { key: format!("{name}.lora_B.weight"), missing: "lora_A".into() }),
        };
        let (rank, scale) = rank_scale.get(&(layer, module.clone())).copied().map_or_else(|| config.rank_and_scale(&name), Ok)?;
        let a_t = a.t()?.contiguous()?.to_dtype(dtype)?.to_device(device)?;
        let b_scaled = (b.t()?.contiguous()? * scale)?;
        // Finite weights times a bounded scale can still overflow f32.
        if first_non_finite(&b_scaled)?.is_some() {
            return Err(LoraError::NonFinite { key: format!("{name}.lora_B.weight (times its scale {scale})") });
        }
        let b_t_scaled = b_scaled.to_dtype(dtype)?.to_device(device)?;
        modules.insert((layer, module), LoraModule { a_t, b_t_scaled, rank, scale });
    }
    Ok(LoraAdapter::new(modules))
}

/// Loads a PEFT directory (never pickle `.bin`).
pub fn load_dir(dir: &Path, sites: &[SiteSpec], limits: &LoraLimits, dtype: DType, device: &Device) -> Result<LoraAdapter, LoraError> {
    let read = |name: &str| {
        let p = dir.join(name);
        std::fs::read(&p).map_err(|_| LoraError::MissingFile(p.display().to_string()))
    };
    if !dir.join("adapter_model.safetensors").exists() && dir.join("adapter_model.bin").exists() {
        return Err(unsupported("adapter_model.bin (pickle); save with safe_serialization=True"));
    }
    parse(&read("adapter_config.json")?, &read("adapter_model.safetensors")?, sites, limits, dtype, device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_with_and_without_prefix_and_default_are_understood() {
        assert_eq!(parse_key("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight").unwrap(), (3, "q_proj".into(), true));
        assert_eq!(parse_key("model.layers.0.mlp.down_proj.lora_B.default.weight").unwrap(), (0, "down_proj".into(), false));
        assert!(matches!(parse_key("base_model.model.lm_head.lora_A.weight"), Err(LoraError::Unsupported { .. })));
        assert!(matches!(parse_key("base_model.model.model.layers.0.self_attn.rotary.lora_A.weight"), Err(LoraError::UnknownModule { .. })));
    }

    #[test]
    fn rank_and_alpha_patterns_follow_peft_rules() {
        let c = PeftConfig::parse(
            br#"{"peft_type":"LORA","r":8,"lora_alpha":16,"rank_pattern":{"q_proj":4,"layers.1.self_attn.k_proj":2},"alpha_pattern":{"k_proj":4}}"#,
            &LoraLimits::default(),
        )
        .unwrap();
        assert_eq!(c.rank_and_scale("model.layers.0.self_attn.q_proj").unwrap(), (4, 4.0));
        assert_eq!(c.rank_and_scale("model.layers.1.self_attn.k_proj").unwrap(), (2, 2.0));
        assert_eq!(c.rank_and_scale("model.layers.0.self_attn.k_proj").unwrap(), (8, 0.5));
        assert_eq!(c.rank_and_scale("model.layers.0.self_attn.v_proj").unwrap(), (8, 2.0));
        let rs = PeftConfig::parse(br#"{"peft_type":"LORA","r":16,"lora_alpha":16,"use_rslora":true}"#, &LoraLimits::default()).unwrap();
        assert_eq!(rs.rank_and_scale("x.q_proj").unwrap().1, 4.0);
    }

    #[test]
    fn unservable_configs_are_refused_by_name() {
        for (json, word) in [
            (r#"{"peft_type":"LORA","r":4,"use_dora":true}"#, "dora"),
            (r#"{"peft_type":"LORA","r":4,"modules_to_save":["lm_head"]}"#, "modules_to_save"),
            (r#"{"peft_type":"LORA","r":4,"fan_in_fan_out":true}"#, "fan_in_fan_out"),
            (r#"{"peft_type":"LORA","r":4,"bias":"all"}"#, "bias"),
            (r#"{"peft_type":"LORA","r":4,"lora_bias":true}"#, "lora_bias"),
            (r#"{"peft_type":"LORA","r":4,"init_lora_weights":"pissa_niter_4"}"#, "pissa"),
            (r#"{"peft_type":"LORA","r":4,"target_modules":["embed_tokens"]}"#, "embed_tokens"),
            (r#"{"peft_type":"PREFIX_TUNING"}"#, "peft_type"),
            (r#"{"peft_type":"LORA","r":0}"#, "r"),
            (r#"{"peft_type":"LORA"}"#, "r"),
            (r#"not json"#, "JSON"),
            (r#"{"peft_type":"LORA","r":0.5}"#, "r must be a positive integer"),
            (r#"{"peft_type":"LORA","r":4,"rank_pattern":{"q_proj":0.5}}"#, "rank_pattern"),
            (r#"{"peft_type":"LORA","r":4,"rank_pattern":{"q_proj":0}}"#, "rank_pattern"),
            (r#"{"peft_type":"LORA","r":4,"rank_pattern":{"q_proj":"4"}}"#, "rank_pattern"),
            (r#"{"peft_type":"LORA","r":4,"lora_alpha":1e300}"#, "lora_alpha"),
            (r#"{"peft_type":"LORA","r":4,"lora_alpha":-8}"#, "lora_alpha"),
            (r#"{"peft_type":"LORA","r":4,"alpha_pattern":{"q_proj":1e300}}"#, "alpha_pattern"),
            (r#"{"peft_type":"LORA","r":4,"rank_pattern":{"(":4}}"#, "regular expression"),
        ] {
            let e = PeftConfig::parse(json.as_bytes(), &LoraLimits::default()).unwrap_err().to_string();
            assert!(e.to_lowercase().contains(&word.to_lowercase()), "{json}: {e}");
        }
    }

    #[test]
    fn pattern_count_and_length_are_capped_and_each_regex_compiles_once() {
        let many: serde_json::Map<String, Value> = (0..257).map(|i| (format!("never_{i}"), Value::from(4))).collect();
        let config = serde_json::json!({"peft_type": "LORA", "r": 4, "rank_pattern": many});
        let e = PeftConfig::parse(config.to_string().as_bytes(), &LoraLimits::default()).unwrap_err().to_string();
        assert!(e.contains("257 entries") && e.contains("256"), "{e}");
        let long = serde_json::json!({"peft_type": "LORA", "r": 4, "alpha_pattern": {"a".repeat(513): 8}});
        let e = PeftConfig::parse(long.to_string().as_bytes(), &LoraLimits::default()).unwrap_err().to_string();
        assert!(e.contains("513 bytes"), "{e}");
        let c = PeftConfig::parse(br#"{"peft_type":"LORA","r":8,"lora_alpha":8,"rank_pattern":{"q_proj":2}}"#, &LoraLimits::default()).unwrap();
        assert_eq!(c.rank_pattern.len(), 1);
        assert_eq!(c.rank_and_scale("model.layers.0.self_attn.q_proj").unwrap(), (2, 4.0));
    }

    #[test]
    fn one_nan_or_infinity_anywhere_or_an_overflowing_scale_is_refused() {
        let sites = vec![SiteSpec { layer: 0, module: "q_proj".into(), in_features: 4, out_features: 4 }];
        for (bad, config) in [
            (f32::NAN, &br#"{"peft_type":"LORA","r":2,"lora_alpha":4,"target_modules":["q_proj"]}"#[..]),
            (f32::INFINITY, br#"{"peft_type":"LORA","r":2,"lora_alpha":4}"#),
            (f32::NEG_INFINITY, br#"{"peft_type":"LORA","r":2,"lora_alpha":4}"#),
            // Finite, but the largest scale takes it past f32.
            (1e35, br#"{"peft_type":"LORA","r":2,"lora_alpha":65536,"use_rslora":true}"#),
        ] {
            let a = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
            let mut b = vec![0.1f32; 8];
            b[5] = bad;
            let b = Tensor::from_vec(b, (4, 2), &Device::Cpu).unwrap();
            let map = std::collections::HashMap::from([
                ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".to_string(), a),
                ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight".to_string(), b),
            ]);
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("w.safetensors");
            candle_core::safetensors::save(&map, &path).unwrap();
            let weights = std::fs::read(&path).unwrap();
            let e = parse(config, &weights, &sites, &LoraLimits::default(), DType::F32, &Device::Cpu).unwrap_err();
            assert!(matches!(&e, LoraError::NonFinite { key } if key.contains("lora_B")), "{bad}: {e}");
        }
    }
}
