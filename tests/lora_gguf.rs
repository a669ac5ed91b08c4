//! LoRA over a quantized GGUF base (the QLoRA setting) on SmolLM2: the
//! delta runs in f32 on the activations and adds no error beyond the base's
//! own quantized-activation noise, measured against the merged reference
//! (dequantized weights plus s·B·A) computed densely.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use lifelora::lora::peft::{parse, LoraLimits};
use lifelora::model::gguf::load_gguf;
use lifelora::model::llama::{LogitsWanted, SequenceInput};
use lifelora::model::loader::build_llama;
use lifelora::model::Llama;
use rand::{Rng, SeedableRng};

fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let num = (a - b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
    num / b.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt()
}

fn logits(m: &Llama, tokens: &[u32], adapter: Option<std::sync::Arc<lifelora::lora::LoraAdapter>>) -> Tensor {
    let mut cache = m.new_cache();
    m.forward_with_adapters(&mut [SequenceInput { tokens, cache: &mut cache, logits: LogitsWanted::All }], &[adapter]).unwrap()
}

#[test]
fn adapters_over_a_quantized_base_match_the_merged_dense_reference() {
    let path = common::smollm2_gguf();
    let loaded = load_gguf(&path, None, &Device::Cpu).unwrap();
    let model = &loaded.model;
    // A random r=8 adapter on q, v and down of every layer, as PEFT names it.
    let (r, alpha) = (8usize, 16.0f64);
    let scale = alpha / r as f64;
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut deltas: HashMap<String, Tensor> = HashMap::new();
    for site in model.lora_sites().into_iter().filter(|s| matches!(s.module.as_str(), "q_proj" | "v_proj" | "down_proj")) {
        let mut rand = |n: usize, amp: f32| (0..n).map(|_| rng.gen_range(-amp..amp)).collect::<Vec<f32>>();
        let a = Tensor::from_vec(rand(r * site.in_features, 0.06), (r, site.in_features), &Device::Cpu).unwrap();
        let b = Tensor::from_vec(rand(site.out_features * r, 0.06), (site.out_features, r), &Device::Cpu).unwrap();
        let group = if site.module == "down_proj" { "mlp" } else { "self_attn" };
        let name = format!("model.layers.{}.{group}.{}", site.layer, site.module);
        deltas.insert(format!("{name}.weight"), (b.matmul(&a).unwrap() * scale).unwrap());
        tensors.insert(format!("base_model.model.{name}.lora_A.weight"), a);
        tensors.insert(format!("base_model.model.{name}.lora_B.weight"), b);
    }
    let dir = tempfile::tempdir().unwrap();
    candle_core::safetensors::save(&tensors, dir.path().join("w.safetensors")).unwrap();
    let weights = std::fs::read(dir.path().join("w.safetensors")).unwrap();
    let config = format!(r#"{{"peft_type":"LORA","r":{r},"lora_alpha":{alpha},"target_modules":["q_proj","v_proj","down_proj"]}}"#);
    let adapter = std::sync::Arc::new(parse(config.as_bytes(), &weights, &model.lora_sites(), &LoraLimits { max_rank: 64, ..Default::default() }, DType::F32, &Device::Cpu).unwrap());

    // Dense references: the dequantized base, and the same plus s·B·A.
    let base_w = model.dense_weights().unwrap();
    let mut merged_w = base_w.clone();
    for (k, d) in &deltas {
        let w = merged_w.get_mut(k).unwrap();
        *w = (&*w + d).unwrap();
    }
    let dense = |w: &HashMap<String, Tensor>| build_llama(model.config.clone(), &|n: &str| Ok(w.get(n).cloned())).unwrap();
    let (dense_base, dense_merged) = (dense(&base_w), dense(&merged_w));

    let tokens: Vec<u32> = loaded.tokenizer.encode_prompt("The quick brown fox jumps over the lazy dog, and then").unwrap();
    let merged = logits(&dense_merged, &tokens, None);
    // 1. The delta itself is exact: our unmerged path on the dequantized
    //    base equals the merged weights up to float32 rounding.
    let exact = rel_err(&logits(&dense_base, &tokens, Some(adapter.clone())), &merged);
    // 2. On the quantized base, the error against the merged reference is
    //    the base's own quantized-activation noise, which the adapted
    //    network amplifies no more than the base network does.
    let noise_floor = rel_err(&logits(model, &tokens, None), &logits(&dense_base, &tokens, None));
    let with_lora = rel_err(&logits(model, &tokens, Some(adapter)), &merged);
    let effect = rel_err(&merged, &logits(&dense_base, &tokens, None));
    eprintln!("unmerged vs merged (dense) {exact:.2e}; quantized vs dense: base {noise_floor:.4}, with adapter {with_lora:.4}; adapter effect {effect:.4}");
    assert!(exact < 1e-5, "unmerged LoRA differs from the merged weights: {exact}");
    assert!(effect > 2.0 * with_lora, "the adapter's effect {effect} is not clearly above the error {with_lora}");
    assert!(with_lora < 2.0 * noise_floor, "LoRA over GGUF: {with_lora} vs the base's noise {noise_floor}");
}
