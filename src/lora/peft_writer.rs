//! Writes an adapter as PEFT files (`adapter_config.json` +
//! `adapter_model.safetensors`) that PEFT, vLLM and this server load: how
//! adapters made here (by the learner, or synthetic ones for benchmarks)
//! leave the process.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Tensor};
use serde_json::{json, Value};

use super::adapter::LoraAdapter;
use super::LoraError;

/// The two files' contents. `base_model` goes into `base_model_name_or_path`.
pub fn to_peft_files(adapter: &LoraAdapter, base_model: &str) -> Result<(Vec<u8>, Vec<u8>), LoraError> {
    let mut entries: Vec<(usize, &str, &super::LoraModule)> = adapter.modules().collect();
    entries.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    if entries.is_empty() {
        return Err(LoraError::NoWeights);
    }
    // The most common (rank, scale) becomes `r` / `lora_alpha`; the rest
    // are spelled out per module in rank_pattern / alpha_pattern.
    let mut counts: HashMap<(usize, u64), usize> = HashMap::new();
    for (_, _, m) in &entries {
        *counts.entry((m.rank, m.scale.to_bits())).or_default() += 1;
    }
    let Some(((r, scale_bits), _)) = counts.into_iter().max_by_key(|(k, n)| (*n, std::cmp::Reverse(*k))) else {
        return Err(LoraError::NoWeights);
    };
    let alpha = f64::from_bits(scale_bits) * r as f64;
    let mut rank_pattern = serde_json::Map::new();
    let mut alpha_pattern = serde_json::Map::new();
    let mut targets: Vec<&str> = Vec::new();
    let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
    for (layer, module, m) in &entries {
        let name = super::peft::full_module_name(*layer, module);
        if m.rank != r {
            rank_pattern.insert(name.clone(), json!(m.rank));
        }
        if m.rank != r || m.scale.to_bits() != scale_bits {
            alpha_pattern.insert(name.clone(), json!(m.scale * m.rank as f64));
        }
        if !targets.contains(module) {
            targets.push(module);
        }
        let a = m.a_t.t()?.to_dtype(DType::F32)?.contiguous()?;
        let b = (m.b_t_scaled.t()?.to_dtype(DType::F64)? / m.scale)?.to_dtype(DType::F32)?.contiguous()?;
        let a = a.to_device(&candle_core::Device::Cpu)?;
        let b = b.to_device(&candle_core::Device::Cpu)?;
        tensors.insert(format!("base_model.model.{name}.lora_A.weight"), a);
        tensors.insert(format!("base_model.model.{name}.lora_B.weight"), b);
    }
    targets.sort_unstable();
    let config: Value = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": null,
        "init_lora_weights": true,
        "inference_mode": true,
    });
    let config = serde_json::to_vec_pretty(&config).map_err(|e| LoraError::InvalidConfig(e.to_string()))?;
    let weights = safetensors_bytes(&tensors)?;
    Ok((config, weights))
}

/// Serializes f32 tensors into one safetensors buffer.
fn safetensors_bytes(tensors: &BTreeMap<String, Tensor>) -> Result<Vec<u8>, LoraError> {
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let values = t.flatten_all()?.to_vec1::<f32>()?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        data.push((name.clone(), t.dims().to_vec(), bytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(n, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|v| (n.clone(), v))
                .map_err(|e| LoraError::Safetensors(e.to_string()))
        })
        .collect::<Result<_, _>>()?;
    safetensors::serialize(views, None).map_err(|e| LoraError::Safetensors(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::init::{fresh_adapter, FreshSpec, InitB};
    use crate::lora::peft::{parse, LoraLimits};
    use crate::lora::SiteSpec;
    use candle_core::Device;

    #[test]
    fn written_files_load_back_to_the_same_adapter() {
        let sites: Vec<SiteSpec> = (0..2)
            .flat_map(|layer| {
                [("q_proj", 16, 16), ("down_proj", 40, 16)]
                    .map(|(m, i, o)| SiteSpec { layer, module: m.into(), in_features: i, out_features: o })
            })
            .collect();
        let spec = FreshSpec { targets: &["q_proj", "down_proj"], rank: 4, alpha: 8.0, seed: 3, init_b: InitB::Random };
        let adapter = fresh_adapter(&sites, &spec, DType::F32, &Device::Cpu).unwrap();
        let (config, weights) = to_peft_files(&adapter, "tiny").unwrap();
        let back = parse(&config, &weights, &sites, &LoraLimits { max_rank: 8, ..Default::default() }, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(back.len(), adapter.len());
        for (layer, module, m) in adapter.modules() {
            let n = back.module(layer, module).unwrap();
            assert_eq!(n.rank, m.rank);
            assert!((n.scale - m.scale).abs() < 1e-12);
            let da = (&n.a_t - &m.a_t).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let db = (&n.b_t_scaled - &m.b_t_scaled).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(da == 0.0 && db < 1e-6, "{layer} {module}: {da} {db}");
        }
    }
}
