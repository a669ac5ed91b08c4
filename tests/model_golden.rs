//! Our forward pass reproduces the stories260K oracle: run.c's greedy
//! completions token for token, and transformers' logits within 1e-4.

mod common;

use candle_core::{DType, Device, Tensor};
use lifelora::model::llama::{argmax_rows, LogitsWanted, SequenceInput};
use lifelora::model::loader::load_hf_dir;
use lifelora::model::{KvCache, Llama};
use serde_json::Value;

fn golden_cases(dir: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("golden.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Greedy decoding one token per step, never stopping early.
fn greedy(model: &Llama, prompt: &[u32], steps: usize) -> Vec<u32> {
    let mut cache: KvCache = model.new_cache();
    let mut out = Vec::new();
    let mut input = prompt.to_vec();
    for _ in 0..steps {
        let logits = model
            .forward(&mut [SequenceInput {
                tokens: &input,
                cache: &mut cache,
                logits: LogitsWanted::Last,
            }])
            .unwrap();
        let next = argmax_rows(&logits).unwrap()[0];
        out.push(next);
        input = vec![next];
    }
    out
}

#[test]
fn greedy_completions_equal_run_c_token_for_token() {
    let dir = common::stories_dir();
    let loaded = load_hf_dir(&dir, None, DType::F32, &Device::Cpu).unwrap();
    let cases = golden_cases(&dir);
    assert!(cases.len() >= 10);
    for case in cases {
        let prompt = ids(&case["prompt_token_ids"]);
        let expected = match case.get("completion_token_ids_ignoring_bos_stop") {
            Some(v) => ids(v),
            None => ids(&case["completion_token_ids"]),
        };
        let got = greedy(&loaded.model, &prompt, expected.len());
        assert_eq!(got, expected, "prompt {:?}", case["prompt"]);
    }
}

#[test]
fn tokenizer_reproduces_golden_prompt_ids() {
    let dir = common::stories_dir();
    let loaded = load_hf_dir(&dir, None, DType::F32, &Device::Cpu).unwrap();
    for case in golden_cases(&dir) {
        let text = case["prompt"].as_str().unwrap();
        assert_eq!(
            loaded.tokenizer.encode_prompt(text).unwrap(),
            ids(&case["prompt_token_ids"]),
            "prompt {text:?}"
        );
    }
}

#[test]
fn full_logits_match_transformers_within_1e_4() {
    let dir = common::stories_dir();
    let loaded = load_hf_dir(&dir, None, DType::F32, &Device::Cpu).unwrap();
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference_logits.json")).unwrap())
            .unwrap();
    let refs =
        candle_core::safetensors::load(dir.join("reference_logits.safetensors"), &Device::Cpu)
            .unwrap();
    let tensors = meta["tensors"].as_object().unwrap();
    assert!(!tensors.is_empty());
    for (name, info) in tensors {
        let input = ids(&info["input_ids"]);
        // Feed in two chunks to exercise the cache as well as the prefill path.
        let split = info["num_prompt_tokens"].as_u64().unwrap() as usize;
        let mut cache = loaded.model.new_cache();
        let a = loaded
            .model
            .forward(&mut [SequenceInput {
                tokens: &input[..split],
                cache: &mut cache,
                logits: LogitsWanted::All,
            }])
            .unwrap();
        let b = loaded
            .model
            .forward(&mut [SequenceInput {
                tokens: &input[split..],
                cache: &mut cache,
                logits: LogitsWanted::All,
            }])
            .unwrap();
        let ours = Tensor::cat(&[a, b], 0).unwrap();
        let reference = &refs[name];
        assert_eq!(ours.dims(), reference.dims());
        let diff = (&ours - reference)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-4, "{name}: max abs diff {diff}");
    }
}
