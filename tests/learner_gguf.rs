//! Training over a quantized GGUF base (SmolLM2-135M-Instruct, Q4_1): the
//! training forward of the base equals serving exactly (alone or packed with sequences sharing its beginning), and gradients flow through the frozen
//! quantized projections (no dense copy) to every adapter parameter, down
//! to the first layer.

mod common;

use std::sync::Arc;

use candle_core::{DType, Device};
use lifelora::learner::sft::{self, SftExample};
use lifelora::lora::init::{fresh_adapter, FreshSpec, InitB};
use lifelora::lora::trainable::TrainableLora;
use lifelora::model::llama::{LogitsWanted, PackedSeq, SequenceInput};

#[test]
fn gradients_flow_through_quantized_projections_to_every_adapter_parameter() {
    let path = common::smollm2_gguf();
    let loaded = lifelora::model::gguf::load_gguf(&path, None, &Device::Cpu).unwrap();
    let model = &loaded.model;
    assert!(model.trainable());
    let spec = FreshSpec { targets: &["q_proj", "v_proj", "down_proj"], rank: 4, alpha: 8.0, seed: 5, init_b: InitB::Random };
    let adapter = Arc::new(fresh_adapter(&model.lora_sites(), &spec, DType::F32, &Device::Cpu).unwrap());
    let lora = TrainableLora::from_adapter(&adapter).unwrap();
    let tokens = loaded.tokenizer.encode_prompt("The capital of France is Paris.").unwrap();

    // The base part is bit-identical to serving: quantized matmuls re-quantize
    // their activations, so even last-bit differences upstream would show.
    let train = model.forward_train(&tokens, &TrainableLora::empty()).unwrap();
    let mut cache = model.new_cache();
    let serve = model
        .forward_with_adapters(&mut [SequenceInput { tokens: &tokens, cache: &mut cache, logits: LogitsWanted::All }], &[])
        .unwrap();
    let diff = (&train - &serve).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(diff, 0.0, "training and serving logits of the base differ");
    // Packed with a sequence sharing its beginning (one prefix tree), still exact.
    let other: Vec<u32> = tokens[..4].iter().copied().chain(loaded.tokenizer.encode_answer(" London.").unwrap()).collect();
    let seqs = [PackedSeq { tokens: &tokens, start: 0, len: tokens.len() }, PackedSeq { tokens: &other, start: 0, len: other.len() }];
    let packed = model.forward_train_packed(&seqs, &TrainableLora::empty()).unwrap();
    let diff = (&packed[0] - &serve).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(diff, 0.0, "a sequence packed with another that shares its beginning gets other logits");
    let alone = model.forward_train(&other, &TrainableLora::empty()).unwrap();
    let diff = (&packed[1] - &alone).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(diff, 0.0, "the sharing sequence gets other logits packed than alone");
    let _ = adapter;

    let loss = sft::example_loss(model, &lora, &SftExample { prompt: tokens[..4].to_vec(), answer: tokens[4..].to_vec() }).unwrap();
    let grads = loss.backward().unwrap();
    let vars = lora.vars();
    assert_eq!(vars.len(), 30 * 3 * 2);
    for (i, v) in vars.iter().enumerate() {
        let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("parameter {i} has no gradient"));
        let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(norm > 0.0 && norm.is_finite(), "parameter {i}: gradient norm {norm}");
    }
}

/// Training measures what serving will compute: the adapter's deltas use
/// serving's kernel, so even over re-quantized activations the logits agree to the bit.
#[test]
fn with_an_adapter_the_training_forward_equals_serving_exactly() {
    let path = common::smollm2_gguf();
    let loaded = lifelora::model::gguf::load_gguf(&path, None, &Device::Cpu).unwrap();
    let model = &loaded.model;
    let targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    let spec = FreshSpec { targets: &targets, rank: 8, alpha: 16.0, seed: 5, init_b: InitB::Random };
    let adapter = Arc::new(fresh_adapter(&model.lora_sites(), &spec, DType::F32, &Device::Cpu).unwrap());
    let lora = TrainableLora::from_adapter(&adapter).unwrap();
    let tokens = loaded.tokenizer.encode_prompt("The capital of France is Paris. The capital of Italy is Rome.").unwrap();
    let train = model.forward_train(&tokens, &lora).unwrap();
    let mut cache = model.new_cache();
    let serve = model
        .forward_with_adapters(&mut [SequenceInput { tokens: &tokens, cache: &mut cache, logits: LogitsWanted::All }], &[Some(adapter.clone())])
        .unwrap();
    let base = model.forward_train(&tokens, &TrainableLora::empty()).unwrap();
    let diff = (&train - &serve).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let effect = (&train - &base).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(effect > 1.0, "the adapter hardly moves the logits ({effect})");
    assert_eq!(diff, 0.0, "training and serving logits with an adapter differ by {diff}");
}
