//! GGUF files of every weight type we claim (written here with candle's
//! GGUF writer, q/k rows permuted as llama.cpp's converter does) load into
//! a model that computes what the same weights compute densely; and both
//! GGUF tokenizer kinds (gpt2 byte-level BPE, llama SentencePiece) work.

mod common;

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use lifelora::model::builtin::random_weights;
use lifelora::model::gguf::load_gguf;
use lifelora::model::llama::{LogitsWanted, SequenceInput};
use lifelora::model::loader::build_llama;
use lifelora::model::{Llama, ModelConfig};

const CONFIG: &str = r#"{"model_type":"llama","hidden_size":256,"intermediate_size":512,"num_hidden_layers":2,
"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":258,"max_position_embeddings":128,
"rms_norm_eps":1e-5,"rope_theta":10000.0,"tie_word_embeddings":false}"#;

/// GPT-2's byte → printable-character map, as its byte-level BPE vocabularies use.
fn byte_chars() -> Vec<char> {
    let printable: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut extra = 0;
    (0..256u32)
        .map(|b| {
            if printable.contains(&b) {
                char::from_u32(b).unwrap()
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap()
            }
        })
        .collect()
}

fn gpt2_tokenizer_meta() -> Vec<(String, Value)> {
    let mut tokens: Vec<Value> = byte_chars().into_iter().map(|c| Value::String(c.to_string())).collect();
    tokens.push(Value::String("<|bos|>".into()));
    tokens.push(Value::String("<|eos|>".into()));
    let mut types = vec![Value::I32(1); 256];
    types.extend([Value::I32(3), Value::I32(3)]);
    vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.merges".into(), Value::Array(vec![])),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(256)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(257)),
        ("tokenizer.chat_template".into(), Value::String("{% for m in messages %}<|bos|>{{ m.content }}{% endfor %}".into())),
    ]
}

/// llama.cpp's converter order for q/k rows (inverse of our loader's).
fn llama_cpp_permute(rows: usize, heads: usize) -> Vec<usize> {
    let hd = rows / heads;
    let half = hd / 2;
    // gguf row (h, i, j) holds hf row (h, j, i)
    let mut perm = vec![0; rows];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                perm[h * hd + 2 * i + j] = h * hd + j * half + i;
            }
        }
    }
    perm
}

fn permute_rows(q: &QTensor, perm: &[usize]) -> QTensor {
    let (rows, cols) = q.shape().dims2().unwrap();
    let rb = cols / q.dtype().block_size() * q.dtype().type_size();
    let data = q.data().unwrap();
    let mut out = Vec::with_capacity(data.len());
    for &p in perm {
        out.extend_from_slice(&data[p * rb..(p + 1) * rb]);
    }
    let storage = candle_core::quantized::QStorage::from_data(std::borrow::Cow::Owned(out), &Device::Cpu, q.dtype()).unwrap();
    QTensor::new(storage, (rows, cols)).unwrap()
}

/// Writes a GGUF of `cfg` with projections in `dtype`; returns the dense
/// model of exactly the weights written (dequantized, in HF row order).
fn write_gguf(path: &std::path::Path, cfg: &ModelConfig, dtype: GgmlDType) -> Llama {
    let weights = random_weights(cfg, 11, &Device::Cpu).unwrap();
    let mut dense: HashMap<String, Tensor> = HashMap::new();
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let rename = |hf: &str| -> String {
        if hf == "model.embed_tokens.weight" {
            return "token_embd.weight".into();
        }
        if hf == "model.norm.weight" {
            return "output_norm.weight".into();
        }
        if hf == "lm_head.weight" {
            return "output.weight".into();
        }
        let rest = hf.strip_prefix("model.layers.").unwrap();
        let (layer, name) = rest.split_once('.').unwrap();
        let g = match name {
            "input_layernorm.weight" => "attn_norm.weight",
            "post_attention_layernorm.weight" => "ffn_norm.weight",
            "self_attn.q_proj.weight" => "attn_q.weight",
            "self_attn.k_proj.weight" => "attn_k.weight",
            "self_attn.v_proj.weight" => "attn_v.weight",
            "self_attn.o_proj.weight" => "attn_output.weight",
            "mlp.gate_proj.weight" => "ffn_gate.weight",
            "mlp.up_proj.weight" => "ffn_up.weight",
            "mlp.down_proj.weight" => "ffn_down.weight",
            other => panic!("unexpected {other}"),
        };
        format!("blk.{layer}.{g}")
    };
    for (name, t) in &weights {
        let is_norm = t.rank() == 1;
        let ty = if is_norm { GgmlDType::F32 } else { dtype };
        let q = QTensor::quantize(t, ty).unwrap();
        dense.insert(name.clone(), q.dequantize(&Device::Cpu).unwrap());
        let q = if name.ends_with("q_proj.weight") {
            permute_rows(&q, &llama_cpp_permute(q.shape().dims()[0], cfg.num_attention_heads))
        } else if name.ends_with("k_proj.weight") {
            permute_rows(&q, &llama_cpp_permute(q.shape().dims()[0], cfg.num_key_value_heads))
        } else {
            q
        };
        tensors.push((rename(name), q));
    }
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("llama.block_count".into(), Value::U32(cfg.num_hidden_layers as u32)),
        ("llama.context_length".into(), Value::U32(cfg.max_position_embeddings as u32)),
        ("llama.embedding_length".into(), Value::U32(cfg.hidden_size as u32)),
        ("llama.feed_forward_length".into(), Value::U32(cfg.intermediate_size as u32)),
        ("llama.attention.head_count".into(), Value::U32(cfg.num_attention_heads as u32)),
        ("llama.attention.head_count_kv".into(), Value::U32(cfg.num_key_value_heads as u32)),
        ("llama.rope.freq_base".into(), Value::F32(cfg.rope_theta as f32)),
        ("llama.attention.layer_norm_rms_epsilon".into(), Value::F32(cfg.rms_norm_eps as f32)),
    ];
    meta.extend(gpt2_tokenizer_meta());
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta_refs, &tensor_refs).unwrap();
    let get = |n: &str| Ok(dense.get(n).cloned());
    build_llama(cfg.clone(), &get).unwrap()
}

fn logits(m: &Llama, tokens: &[u32]) -> Tensor {
    let mut cache = m.new_cache();
    m.forward(&mut [SequenceInput { tokens, cache: &mut cache, logits: LogitsWanted::All }]).unwrap()
}

fn relative_error(a: &Tensor, b: &Tensor) -> f32 {
    let num = (a - b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
    let den = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
    num / den
}

#[test]
fn every_supported_weight_type_computes_what_its_weights_compute() {
    let cfg = ModelConfig::from_hf_json(CONFIG).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tokens: Vec<u32> = (0..20).map(|i| (i * 37 % 256) as u32).collect();
    for (dtype, tolerance) in [
        // GGUF models keep llama.cpp's f16 KV cache: 5e-5 even for f32 weights.
        (GgmlDType::F32, 2e-4),
        (GgmlDType::F16, 2e-4),
        (GgmlDType::Q8_0, 0.02),
        (GgmlDType::Q4_0, 0.05),
        (GgmlDType::Q4_1, 0.05),
        (GgmlDType::Q5_0, 0.05),
        (GgmlDType::Q5_1, 0.05),
        (GgmlDType::Q2K, 0.1),
        (GgmlDType::Q3K, 0.1),
        (GgmlDType::Q4K, 0.05),
        (GgmlDType::Q5K, 0.05),
        (GgmlDType::Q6K, 0.05),
    ] {
        let path = dir.path().join(format!("{dtype:?}.gguf"));
        let reference = write_gguf(&path, &cfg, dtype);
        let loaded = load_gguf(&path, None, &Device::Cpu).unwrap();
        let err = relative_error(&logits(&loaded.model, &tokens), &logits(&reference, &tokens));
        assert!(err < tolerance, "{dtype:?}: relative error {err}");
        // Quantized weights stay packed: far smaller than f32 for 4-bit types.
        if matches!(dtype, GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q4K) {
            let f32_bytes = reference.weight_bytes();
            assert!(loaded.model.weight_bytes() * 4 < f32_bytes, "{dtype:?} was expanded");
        }
    }
}

#[test]
fn a_gguf_model_keeps_llama_cpps_f16_kv_cache_at_half_the_memory() {
    let cfg = ModelConfig::from_hf_json(CONFIG).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q4_1.gguf");
    let reference = write_gguf(&path, &cfg, GgmlDType::Q4_1);
    let loaded = load_gguf(&path, None, &Device::Cpu).unwrap();
    assert_eq!(loaded.model.kv_dtype(), candle_core::DType::F16);
    let tokens: Vec<u32> = (0..20).collect();
    let (mut ours, mut theirs) = (loaded.model.new_cache(), reference.new_cache());
    loaded.model.forward(&mut [SequenceInput { tokens: &tokens, cache: &mut ours, logits: LogitsWanted::Last }]).unwrap();
    reference.forward(&mut [SequenceInput { tokens: &tokens, cache: &mut theirs, logits: LogitsWanted::Last }]).unwrap();
    assert_eq!(ours.allocated_bytes() * 2, theirs.allocated_bytes());
}

#[test]
fn gpt2_gguf_tokenizer_round_trips_and_names_its_specials() {
    let cfg = ModelConfig::from_hf_json(CONFIG).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    write_gguf(&path, &cfg, GgmlDType::Q8_0);
    let m = load_gguf(&path, Some("tiny"), &Device::Cpu).unwrap();
    assert_eq!(m.id, "tiny");
    let text = "héllo, wörld 123";
    let ids = m.tokenizer.encode_prompt(text).unwrap();
    assert_eq!(ids.len(), text.len(), "one byte-level token per byte without merges");
    assert_eq!(m.tokenizer.decode(&ids).unwrap(), text);
    assert_eq!(m.tokenizer.eos_ids, vec![257]);
    let rendered = m.chat.render(&[lifelora::model::chat::ChatMessage { role: "user".into(), content: "hi".into() }]).unwrap();
    assert_eq!(m.tokenizer.encode_chat(&rendered).unwrap()[0], 256, "special tokens in templates encode as their ids");
}

#[test]
fn a_llama_sentencepiece_gguf_tokenizer_reproduces_the_hf_tokenizer() {
    // The stories260K vocabulary as GGUF `llama` metadata: scores rank
    // merged tokens by their merge order, as SentencePiece scores do.
    let dir = common::stories_dir();
    let tj: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap()).unwrap();
    let vocab = tj["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); vocab.len()];
    for (t, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = t.clone();
    }
    let mut scores = vec![0f32; tokens.len()];
    for (rank, m) in tj["model"]["merges"].as_array().unwrap().iter().enumerate() {
        let merged = format!("{}{}", m[0].as_str().unwrap(), m[1].as_str().unwrap());
        if let Some(id) = vocab.get(&merged) {
            let id = id.as_u64().unwrap() as usize;
            if scores[id] == 0.0 {
                scores[id] = -(rank as f32) - 1.0;
            }
        }
    }
    let types: Vec<Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| Value::I32(if i == 0 { 2 } else if i < 3 { 3 } else if t.starts_with("<0x") { 6 } else { 1 }))
        .collect();
    let meta: Vec<(String, Value)> = vec![
        ("tokenizer.ggml.model".into(), Value::String("llama".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens.iter().map(|t| Value::String(t.clone())).collect())),
        ("tokenizer.ggml.scores".into(), Value::Array(scores.into_iter().map(Value::F32).collect())),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id".into(), Value::U32(0)),
    ];
    let content = gguf_file::Content {
        magic: gguf_file::VersionedMagic::GgufV3,
        metadata: meta.into_iter().collect(),
        tensor_infos: HashMap::new(),
        tensor_data_offset: 0,
    };
    let tok = lifelora::model::gguf_tokenizer::from_gguf(&lifelora::model::gguf_meta::GgufMeta::new(&content)).unwrap();
    assert!(tok.add_bos_token);
    let t = lifelora::model::TextTokenizer::new(tok.tokenizer, tok.bos_token, tok.eos_token, tok.add_bos_token, &tok.extra_eos_ids);
    for line in std::fs::read_to_string(dir.join("golden.jsonl")).unwrap().lines() {
        let case: serde_json::Value = serde_json::from_str(line).unwrap();
        let want: Vec<u32> = case["prompt_token_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(t.encode_prompt(case["prompt"].as_str().unwrap()).unwrap(), want, "{}", case["prompt"]);
    }
}

/// Where `needle` first occurs in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).position(|w| w == needle).expect("present")
}

#[test]
fn loading_refuses_other_architectures_truncated_files_and_unknown_quantization_types() {
    let cfg = ModelConfig::from_hf_json(CONFIG).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.gguf");
    write_gguf(&good, &cfg, GgmlDType::Q4_0);
    let bytes = std::fs::read(&good).unwrap();
    let refused = |name: &str, data: &[u8]| -> String {
        let path = dir.path().join(name);
        std::fs::write(&path, data).unwrap();
        match load_gguf(&path, None, &Device::Cpu) {
            Ok(_) => panic!("{name} was loaded"),
            Err(e) => e.to_string(),
        }
    };

    // general.architecture = "bloom": key, type (u32), length (u64), value.
    let mut other = bytes.clone();
    let at = find(&other, b"general.architecture") + "general.architecture".len() + 4 + 8;
    other[at..at + 5].copy_from_slice(b"bloom");
    let message = refused("bloom.gguf", &other);
    assert!(message.contains("bloom") && message.contains("architecture"), "{message}");

    // Cut in the middle of the tensor data.
    let message = refused("truncated.gguf", &bytes[..bytes.len() * 3 / 5]);
    assert!(message.contains("is truncated"), "{message}");

    // The first tensor's type id (after its name, rank and two dimensions) set to 99.
    let mut unknown = bytes.clone();
    let at = find(&unknown, b"token_embd.weight") + "token_embd.weight".len() + 4 + 16;
    unknown[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
    let message = refused("unknown_type.gguf", &unknown);
    assert!(message.contains("unknown quantization type 99"), "{message}");
}
