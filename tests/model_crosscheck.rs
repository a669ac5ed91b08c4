//! Our packed forward agrees with candle-transformers' llama on a random
//! model of another shape (GQA 6:2, untied head, llama3 rope scaling), and a
//! mixed packed batch gives each sequence the logits it gets alone.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::llama as reference;
use lifelora::model::builtin::random_weights;
use lifelora::model::llama::{LogitsWanted, SequenceInput};
use lifelora::model::loader::build_llama;
use lifelora::model::{Llama, ModelConfig};

const CONFIG: &str = r#"{"model_type":"llama","hidden_size":96,"intermediate_size":200,"num_hidden_layers":3,
"num_attention_heads":6,"num_key_value_heads":2,"vocab_size":300,"max_position_embeddings":256,
"rms_norm_eps":1e-5,"rope_theta":500000.0,"tie_word_embeddings":false,
"rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":64}}"#;

fn ours_and_reference() -> (Llama, reference::Llama, reference::Config) {
    let cfg = ModelConfig::from_hf_json(CONFIG).unwrap();
    let weights = random_weights(&cfg, 99, &Device::Cpu).unwrap();
    let get = |n: &str| Ok(weights.get(n).cloned());
    let ours = build_llama(cfg, &get).unwrap();
    let rcfg: reference::LlamaConfig = serde_json::from_str(CONFIG).unwrap();
    let rcfg = rcfg.into_config(false);
    let vb = VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu);
    (ours, reference::Llama::load(vb, &rcfg).unwrap(), rcfg)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn prefill_and_decode_logits_match_candle_transformers() {
    let (ours, theirs, rcfg) = ours_and_reference();
    let prompt: Vec<u32> = (0..40).map(|i| (i * 37 % 300) as u32).collect();
    let mut rcache = reference::Cache::new(true, DType::F32, &rcfg, &Device::Cpu).unwrap();
    let mut cache = ours.new_cache();
    let mut ids = prompt.clone();
    let mut pos = 0;
    for step in 0..8 {
        let input = if step == 0 {
            ids.clone()
        } else {
            vec![*ids.last().unwrap()]
        };
        let t = Tensor::new(input.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let want = theirs
            .forward(&t, pos, &mut rcache)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let got = ours
            .forward(&mut [SequenceInput {
                tokens: &input,
                cache: &mut cache,
                logits: LogitsWanted::Last,
            }])
            .unwrap()
            .squeeze(0)
            .unwrap();
        let d = max_diff(&got, &want);
        assert!(d < 1e-4, "step {step}: max abs diff {d}");
        pos += input.len();
        ids.push(want.argmax(0).unwrap().to_scalar::<u32>().unwrap());
    }
}

#[test]
fn a_packed_mixed_batch_equals_each_sequence_alone() {
    let (ours, _, _) = ours_and_reference();
    let a: Vec<u32> = (0..9).map(|i| i * 11 % 300).collect();
    let b: Vec<u32> = (0..23).map(|i| i * 7 % 300).collect();
    let alone = |tokens: &[u32]| {
        let mut c = ours.new_cache();
        ours.forward(&mut [SequenceInput {
            tokens,
            cache: &mut c,
            logits: LogitsWanted::All,
        }])
        .unwrap()
    };
    let (ra, rb) = (alone(&a), alone(&b));
    // a is decoding (its first 8 tokens cached), b prefills whole, in one step.
    let mut ca = ours.new_cache();
    ours.forward(&mut [SequenceInput {
        tokens: &a[..8],
        cache: &mut ca,
        logits: LogitsWanted::None,
    }])
    .unwrap();
    let mut cb = ours.new_cache();
    let mixed = ours
        .forward(&mut [
            SequenceInput {
                tokens: &a[8..],
                cache: &mut ca,
                logits: LogitsWanted::Last,
            },
            SequenceInput {
                tokens: &b,
                cache: &mut cb,
                logits: LogitsWanted::All,
            },
        ])
        .unwrap();
    assert_eq!(mixed.dims(), &[1 + 23, 300]);
    assert!(
        max_diff(
            &mixed.narrow(0, 0, 1).unwrap(),
            &ra.narrow(0, 8, 1).unwrap()
        ) < 1e-5
    );
    assert!(max_diff(&mixed.narrow(0, 1, 23).unwrap(), &rb) < 1e-5);
}

const QWEN2: &str = r#"{"model_type":"qwen2","hidden_size":64,"intermediate_size":160,"num_hidden_layers":2,
"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":200,"max_position_embeddings":128,
"sliding_window":128,"max_window_layers":2,"use_sliding_window":false,"hidden_act":"silu",
"rms_norm_eps":1e-6,"rope_theta":1000000.0,"tie_word_embeddings":true}"#;

#[test]
fn qwen2_with_qkv_biases_matches_candle_transformers() {
    use candle_transformers::models::qwen2;
    let cfg = ModelConfig::from_hf_json(QWEN2).unwrap();
    assert!(cfg.qkv_bias);
    let weights = random_weights(&cfg, 5, &Device::Cpu).unwrap();
    assert!(weights.contains_key("model.layers.0.self_attn.q_proj.bias"));
    let get = |n: &str| Ok(weights.get(n).cloned());
    let ours = build_llama(cfg, &get).unwrap();
    let rcfg: qwen2::Config = serde_json::from_str(QWEN2).unwrap();
    let vb = VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu);
    let mut theirs = qwen2::ModelForCausalLM::new(&rcfg, vb).unwrap();
    let mut cache = ours.new_cache();
    let mut ids: Vec<u32> = (0..12).map(|i| (i * 13 % 200) as u32).collect();
    let mut pos = 0;
    for step in 0..5 {
        let input = if step == 0 {
            ids.clone()
        } else {
            vec![*ids.last().unwrap()]
        };
        let t = Tensor::new(input.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let want = theirs.forward(&t, pos).unwrap().flatten_all().unwrap();
        let got = ours
            .forward(&mut [SequenceInput {
                tokens: &input,
                cache: &mut cache,
                logits: LogitsWanted::Last,
            }])
            .unwrap()
            .flatten_all()
            .unwrap();
        let d = max_diff(&got, &want);
        assert!(d < 1e-4, "step {step}: max abs diff {d}");
        pos += input.len();
        ids.push(want.argmax(0).unwrap().to_scalar::<u32>().unwrap());
    }
}

#[test]
fn bf16_weights_load_and_track_f32_logits() {
    let cfg = ModelConfig::from_hf_json(CONFIG).unwrap();
    let weights = random_weights(&cfg, 99, &Device::Cpu).unwrap();
    let build = |dtype: DType| {
        let get = |n: &str| {
            weights
                .get(n)
                .map(|t| t.to_dtype(dtype))
                .transpose()
                .map_err(Into::into)
        };
        build_llama(cfg.clone(), &get).unwrap()
    };
    let (f32m, bf16m) = (build(DType::F32), build(DType::BF16));
    assert_eq!(bf16m.weight_dtype(), DType::BF16);
    let tokens: Vec<u32> = (0..10).collect();
    let run = |m: &Llama| {
        let mut c = m.new_cache();
        m.forward(&mut [SequenceInput {
            tokens: &tokens,
            cache: &mut c,
            logits: LogitsWanted::Last,
        }])
        .unwrap()
    };
    let (a, b) = (run(&f32m), run(&bf16m));
    assert_eq!(b.dtype(), DType::F32, "logits come back as f32");
    let scale = a
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        max_diff(&a, &b) < 0.05 * scale.max(1.0),
        "bf16 drifted: {}",
        max_diff(&a, &b)
    );
}

#[test]
fn bf16_weights_serve_adapters_in_bf16_and_track_f32_with_them() {
    use lifelora::lora::init::{fresh_adapter, FreshSpec, InitB};
    use std::sync::Arc;
    let cfg = ModelConfig::from_hf_json(CONFIG).unwrap();
    let weights = random_weights(&cfg, 7, &Device::Cpu).unwrap();
    let build = |dtype: DType| {
        let get = |n: &str| weights.get(n).map(|t| t.to_dtype(dtype)).transpose().map_err(Into::into);
        build_llama(cfg.clone(), &get).unwrap()
    };
    let (f32m, bf16m) = (build(DType::F32), build(DType::BF16));
    assert_eq!(bf16m.adapter_dtype(), DType::BF16, "adapters are held in the base's precision");
    assert_eq!(bf16m.dtype(), DType::F32, "activations stay f32 on the CPU");
    let spec = FreshSpec { targets: &["q_proj", "v_proj", "down_proj"], rank: 8, alpha: 16.0, seed: 5, init_b: InitB::Random };
    let adapter = |m: &Llama| Some(Arc::new(fresh_adapter(&m.lora_sites(), &spec, m.adapter_dtype(), &Device::Cpu).unwrap()));
    // Eight 5-token prompts: the adapted ones take the four-row kernel in prefill.
    let prompts: Vec<Vec<u32>> = (0..8u32).map(|i| (0..5).map(|j| (i * 7 + j * 3) % 50).collect()).collect();
    let run = |m: &Llama, adapters: &[Option<Arc<lifelora::lora::LoraAdapter>>]| {
        let mut caches: Vec<_> = prompts.iter().map(|_| m.new_cache()).collect();
        let mut batch: Vec<SequenceInput> = prompts
            .iter()
            .zip(caches.iter_mut())
            .map(|(p, cache)| SequenceInput { tokens: p, cache, logits: LogitsWanted::All })
            .collect();
        m.forward_with_adapters(&mut batch, adapters).unwrap()
    };
    let with = |m: &Llama| {
        let a = adapter(m);
        run(m, &[a.clone(), a.clone(), a.clone(), a, None, None, None, None])
    };
    let (a, b) = (with(&f32m), with(&bf16m));
    let base = run(&f32m, &[]);
    let scale = a.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1.0);
    assert!(max_diff(&a, &b) < 0.05 * scale, "bf16 with an adapter drifted: {}", max_diff(&a, &b));
    assert!(max_diff(&a, &base) > 0.2 * scale, "the adapter must change the logits for this to test anything");
}
