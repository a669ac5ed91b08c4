//! LoRA adapters made by the real PEFT library on stories260K: our batched
//! application reproduces PEFT's logits and greedy completions, one adapter
//! at a time and mixed in one packed batch; bad adapters are refused by name.

mod common;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use lifelora::lora::peft::{load_dir, parse, LoraLimits};
use lifelora::lora::{LoraAdapter, LoraError};
use lifelora::model::llama::{argmax_rows, LogitsWanted, SequenceInput};
use lifelora::model::loader::load_hf_dir;
use lifelora::model::Llama;
use serde_json::Value;

const ADAPTERS: [&str; 3] = ["q_v_r8", "all_linear_r4", "rslora_r16"];

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

fn setup() -> (Llama, std::path::PathBuf) {
    let m = load_hf_dir(&common::stories_dir(), None, DType::F32, &Device::Cpu).unwrap();
    (m.model, common::fixtures_dir().join("adapters"))
}

fn load(model: &Llama, dir: &std::path::Path) -> Arc<LoraAdapter> {
    Arc::new(load_dir(dir, &model.lora_sites(), &LoraLimits { max_rank: 64, ..Default::default() }, DType::F32, &Device::Cpu).unwrap())
}

#[test]
fn each_adapter_reproduces_peft_logits_and_greedy_completions() {
    let (model, root) = setup();
    for name in ADAPTERS {
        let dir = root.join(name);
        let adapter = load(&model, &dir);
        let reference: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
        let tensors = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
        for p in reference["prompts"].as_array().unwrap() {
            let prompt = ids(&p["prompt_token_ids"]);
            let mut cache = model.new_cache();
            let logits = model
                .forward_with_adapters(
                    &mut [SequenceInput { tokens: &prompt, cache: &mut cache, logits: LogitsWanted::All }],
                    &[Some(adapter.clone())],
                )
                .unwrap();
            let want = &tensors[p["logits_tensor"].as_str().unwrap()];
            let d = max_diff(&logits, want);
            let peak = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            eprintln!("{name}: max |Δ logit| {d:.2e} (largest |logit| {peak:.1})");
            // float32 rounding through 5 layers: 1e-4 absolute, or 1e-5 of the
            // largest logit (rsLoRA at scale 4 reaches 1.2e-4 on logits of 16).
            assert!(d < 1e-4f32.max(1e-5 * peak), "{name}: logits differ by {d}");
            // Greedy continuation under the adapter, token for token.
            let expected = ids(&p["completion_token_ids"]);
            let mut next = argmax_rows(&logits).unwrap().last().copied().unwrap();
            let mut got = vec![next];
            while got.len() < expected.len() {
                let l = model
                    .forward_with_adapters(
                        &mut [SequenceInput { tokens: &[next], cache: &mut cache, logits: LogitsWanted::Last }],
                        &[Some(adapter.clone())],
                    )
                    .unwrap();
                next = argmax_rows(&l).unwrap()[0];
                got.push(next);
            }
            assert_eq!(got, expected, "{name}: greedy completion of {:?}", p["prompt"]);
        }
    }
}

#[test]
fn a_mixed_batch_gives_every_row_its_own_adapter() {
    let (model, root) = setup();
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(root.join("mixed_batch_reference.json")).unwrap()).unwrap();
    let tensors = candle_core::safetensors::load(root.join("mixed_batch_reference.safetensors"), &Device::Cpu).unwrap();
    let rows = reference["rows"].as_array().unwrap();
    let prompts: Vec<Vec<u32>> = rows.iter().map(|r| ids(&r["prompt_token_ids"])).collect();
    let mut adapters: Vec<Option<Arc<LoraAdapter>>> =
        rows.iter().map(|r| Some(load(&model, &root.join(r["adapter"].as_str().unwrap())))).collect();
    // A base-model row in the middle: rows without an adapter skip the delta.
    let base_prompt = prompts[0].clone();
    let mut caches: Vec<_> = (0..rows.len() + 1).map(|_| model.new_cache()).collect();
    let mut all_prompts = prompts.clone();
    all_prompts.insert(1, base_prompt.clone());
    adapters.insert(1, None);
    let mut batch: Vec<SequenceInput> = all_prompts
        .iter()
        .zip(caches.iter_mut())
        .map(|(p, cache)| SequenceInput { tokens: p, cache, logits: LogitsWanted::All })
        .collect();
    let logits = model.forward_with_adapters(&mut batch, &adapters).unwrap();
    let mut offset = 0;
    for (i, p) in all_prompts.iter().enumerate() {
        let got = logits.narrow(0, offset, p.len()).unwrap();
        offset += p.len();
        let want = if i == 1 {
            let mut c = model.new_cache();
            model.forward(&mut [SequenceInput { tokens: &base_prompt, cache: &mut c, logits: LogitsWanted::All }]).unwrap()
        } else {
            let r = if i == 0 { 0 } else { i - 1 };
            tensors[rows[r]["tensor"].as_str().unwrap()].clone()
        };
        let d = max_diff(&got, &want);
        assert!(d < 1e-4, "row {i}: differs by {d}");
    }
}

fn fixture(root: &std::path::Path, name: &str) -> (Vec<u8>, Vec<u8>) {
    (
        std::fs::read(root.join(name).join("adapter_config.json")).unwrap(),
        std::fs::read(root.join(name).join("adapter_model.safetensors")).unwrap(),
    )
}

fn rewrite_tensors(weights: &[u8], f: impl Fn(&str, Tensor) -> Option<(String, Tensor)>) -> Vec<u8> {
    let map = candle_core::safetensors::load_buffer(weights, &Device::Cpu).unwrap();
    let out: std::collections::HashMap<String, Tensor> = map.into_iter().filter_map(|(k, t)| f(&k, t)).collect();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.safetensors");
    candle_core::safetensors::save(&out, &p).unwrap();
    std::fs::read(p).unwrap()
}

#[test]
fn bad_adapters_are_refused_naming_the_tensor_or_field() {
    let (model, root) = setup();
    let sites = model.lora_sites();
    let limits = LoraLimits { max_rank: 64, ..Default::default() };
    let (config, weights) = fixture(&root, "q_v_r8");
    let try_parse = |c: &[u8], w: &[u8], limits: &LoraLimits| parse(c, w, &sites, limits, DType::F32, &Device::Cpu);

    assert!(try_parse(&config, &weights, &limits).is_ok());
    let e = try_parse(&config, &weights, &LoraLimits { max_rank: 4, ..Default::default() }).unwrap_err();
    assert!(matches!(e, LoraError::RankTooLarge { rank: 8, .. }), "{e}");

    let dora = String::from_utf8(config.clone()).unwrap().replace("\"use_dora\": false", "\"use_dora\": true");
    assert!(matches!(try_parse(dora.as_bytes(), &weights, &limits), Err(LoraError::Unsupported { .. })));

    let missing_b = rewrite_tensors(&weights, |k, t| (!k.ends_with("layers.0.self_attn.q_proj.lora_B.weight")).then(|| (k.to_string(), t)));
    let e = try_parse(&config, &missing_b, &limits).unwrap_err();
    assert!(matches!(&e, LoraError::MissingPair { key, .. } if key.contains("layers.0.self_attn.q_proj")), "{e}");

    let wrong_shape = rewrite_tensors(&weights, |k, t| {
        Some((k.to_string(), if k.contains("layers.1.self_attn.v_proj.lora_A") { t.narrow(1, 0, 32).unwrap() } else { t }))
    });
    let e = try_parse(&config, &wrong_shape, &limits).unwrap_err();
    assert!(matches!(&e, LoraError::ShapeMismatch { key, .. } if key.contains("layers.1.self_attn.v_proj.lora_A")), "{e}");

    let nan = rewrite_tensors(&weights, |k, t| {
        Some((k.to_string(), if k.contains("layers.2.self_attn.q_proj.lora_B") { (t * f64::NAN).unwrap() } else { t }))
    });
    assert!(matches!(try_parse(&config, &nan, &limits), Err(LoraError::NonFinite { key }) if key.contains("layers.2")));

    let out_of_range = rewrite_tensors(&weights, |k, t| Some((k.replace("layers.4.", "layers.9."), t)));
    assert!(matches!(try_parse(&config, &out_of_range, &limits), Err(LoraError::UnknownModule { key }) if key.contains("layers.9")));

    let lm_head = rewrite_tensors(&weights, |k, t| Some((k.replace("model.layers.0.self_attn.q_proj", "lm_head"), t)));
    assert!(matches!(try_parse(&config, &lm_head, &limits), Err(LoraError::Unsupported { .. })));

    let empty = rewrite_tensors(&weights, |_, _| None);
    assert!(matches!(try_parse(&config, &empty, &limits), Err(LoraError::NoWeights)));

    let int = rewrite_tensors(&weights, |k, t| Some((k.to_string(), if k.contains("layers.0.self_attn.v_proj.lora_A") { t.to_dtype(DType::U32).unwrap() } else { t })));
    assert!(matches!(try_parse(&config, &int, &limits), Err(LoraError::DtypeUnsupported { .. })));

    assert!(matches!(try_parse(&config, b"garbage", &limits), Err(LoraError::Safetensors(_))));
    // f16 weights are accepted (converted).
    let half = rewrite_tensors(&weights, |k, t| Some((k.to_string(), t.to_dtype(DType::F16).unwrap())));
    assert!(try_parse(&config, &half, &limits).is_ok());
}
