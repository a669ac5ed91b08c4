//! Builds a `tokenizers::Tokenizer` from GGUF metadata: byte-level BPE
//! (`tokenizer.ggml.model = gpt2`, with the pre-tokenizer named by
//! `tokenizer.ggml.pre`) and SentencePiece BPE (`llama`: tokens, scores,
//! token types, byte fallback). Written as tokenizer.json so it matches
//! what Hugging Face ships for the same models.

use std::collections::HashMap;

use serde_json::{json, Value};
use tokenizers::Tokenizer;

use super::gguf_meta::GgufMeta;
use super::ModelError;

/// `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
const TYPE_NORMAL: u64 = 1;
const TYPE_CONTROL: u64 = 3;
const TYPE_USER_DEFINED: u64 = 4;
const TYPE_BYTE: u64 = 6;

const REGEX_LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const REGEX_QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The tokenizer and its special-token conventions, read from GGUF.
pub struct GgufTokenizer {
    pub tokenizer: Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub add_bos_token: bool,
    pub extra_eos_ids: Vec<u32>,
    pub chat_template: Option<String>,
}

fn byte_level(add_prefix_space: bool, use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": true, "use_regex": use_regex})
}

fn split_then_bytes(regex: &str) -> Value {
    json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
        byte_level(false, false),
    ]})
}

/// Normalizer and pre-tokenizer for a `tokenizer.ggml.pre` name, as the
/// models' own tokenizer.json files have them.
fn gpt2_pipeline(pre: &str) -> (Value, Value) {
    match pre {
        "smollm" => (
            Value::Null,
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(false, true),
            ]}),
        ),
        "llama3" | "llama-bpe" | "smaug-bpe" | "falcon3" => {
            (Value::Null, split_then_bytes(REGEX_LLAMA3))
        }
        "qwen2" | "deepseek-r1-qwen" => (json!({"type": "NFC"}), split_then_bytes(REGEX_QWEN2)),
        other => {
            if !matches!(other, "gpt2" | "default" | "gpt-2") {
                tracing::warn!(
                    pre = other,
                    "unknown tokenizer.ggml.pre; using GPT-2 pre-tokenization"
                );
            }
            (Value::Null, byte_level(false, true))
        }
    }
}

/// SentencePiece merges from scores: every split of a normal token into
/// two vocabulary pieces is a merge, ranked by the merged token's score
/// (as transformers' SentencePieceExtractor does).
fn spm_merges(tokens: &[&str], scores: &[f64], types: &[u64]) -> Vec<String> {
    let index: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (*t, i)).collect();
    let mut merges: Vec<(f64, usize, usize, String)> = Vec::new();
    for (id, tok) in tokens.iter().enumerate() {
        if types.get(id).copied().unwrap_or(TYPE_NORMAL) != TYPE_NORMAL {
            continue;
        }
        for (split, _) in tok.char_indices().skip(1) {
            let (l, r) = tok.split_at(split);
            if let (Some(&li), Some(&ri)) = (index.get(l), index.get(r)) {
                merges.push((
                    scores.get(id).copied().unwrap_or(0.0),
                    li,
                    ri,
                    format!("{l} {r}"),
                ));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    merges.into_iter().map(|m| m.3).collect()
}

fn added_tokens(tokens: &[&str], types: &[u64]) -> Vec<Value> {
    types
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == TYPE_CONTROL || t == TYPE_USER_DEFINED)
        .filter_map(|(id, &t)| {
            tokens.get(id).map(|content| {
                json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
                    "normalized": false, "special": t == TYPE_CONTROL})
            })
        })
        .collect()
}

/// Reads the tokenizer of a GGUF file.
pub fn from_gguf(meta: &GgufMeta<'_>) -> Result<GgufTokenizer, ModelError> {
    let model = meta.str_opt("tokenizer.ggml.model")?.ok_or_else(|| {
        ModelError::Tokenizer(
            "GGUF has no tokenizer.ggml.model; this file carries no tokenizer".into(),
        )
    })?;
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let types: Vec<u64> = meta
        .f64s_opt("tokenizer.ggml.token_type")?
        .map(|v| v.into_iter().map(|x| x as u64).collect())
        .unwrap_or_else(|| vec![TYPE_NORMAL; tokens.len()]);
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| ((*t).to_string(), json!(i)))
        .collect();
    let id_token = |key: &str| -> Result<Option<(u32, String)>, ModelError> {
        Ok(meta.u64_opt(key)?.and_then(|id| {
            tokens
                .get(id as usize)
                .map(|t| (id as u32, (*t).to_string()))
        }))
    };
    let bos = id_token("tokenizer.ggml.bos_token_id")?;
    let eos = id_token("tokenizer.ggml.eos_token_id")?;
    let eot = id_token("tokenizer.ggml.eot_token_id")?;
    let unk = id_token("tokenizer.ggml.unknown_token_id")?;
    let (json, default_add_bos) = match model {
        "gpt2" => {
            let merges = meta.strings("tokenizer.ggml.merges")?;
            let pre = meta.str_opt("tokenizer.ggml.pre")?.unwrap_or("gpt2");
            let (normalizer, pre_tokenizer) = gpt2_pipeline(pre);
            let tokenizer = json!({
                "version": "1.0", "truncation": null, "padding": null,
                "added_tokens": added_tokens(&tokens, &types),
                "normalizer": normalizer,
                "pre_tokenizer": pre_tokenizer,
                "post_processor": null,
                "decoder": byte_level(true, true),
                "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                    "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                    "vocab": vocab, "merges": merges},
            });
            (tokenizer, false)
        }
        "llama" => {
            let scores = meta.f64s_opt("tokenizer.ggml.scores")?.ok_or_else(|| {
                ModelError::Tokenizer("GGUF llama tokenizer without tokenizer.ggml.scores".into())
            })?;
            let space_prefix = meta
                .bool_opt("tokenizer.ggml.add_space_prefix")?
                .unwrap_or(true);
            let mut normalizers = vec![];
            if space_prefix {
                normalizers.push(json!({"type": "Prepend", "prepend": "\u{2581}"}));
            }
            normalizers.push(
                json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}),
            );
            let mut decoders = vec![
                json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
                json!({"type": "ByteFallback"}),
                json!({"type": "Fuse"}),
            ];
            if space_prefix {
                decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            }
            let byte_tokens = types.iter().filter(|&&t| t == TYPE_BYTE).count();
            let tokenizer = json!({
                "version": "1.0", "truncation": null, "padding": null,
                "added_tokens": added_tokens(&tokens, &types),
                "normalizer": {"type": "Sequence", "normalizers": normalizers},
                "pre_tokenizer": null,
                "post_processor": null,
                "decoder": {"type": "Sequence", "decoders": decoders},
                "model": {"type": "BPE", "dropout": null, "unk_token": unk.as_ref().map(|u| u.1.clone()),
                    "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
                    "byte_fallback": byte_tokens >= 256, "ignore_merges": false,
                    "vocab": vocab, "merges": spm_merges(&tokens, &scores, &types)},
            });
            (tokenizer, true)
        }
        other => {
            return Err(ModelError::Unsupported(format!(
                "GGUF tokenizer model {other:?} (supported: gpt2, llama)"
            )))
        }
    };
    let tokenizer: Tokenizer = json
        .to_string()
        .parse()
        .map_err(|e| ModelError::Tokenizer(format!("GGUF tokenizer: {e}")))?;
    Ok(GgufTokenizer {
        tokenizer,
        bos_token: bos.map(|b| b.1),
        eos_token: eos.as_ref().map(|e| e.1.clone()),
        add_bos_token: meta
            .bool_opt("tokenizer.ggml.add_bos_token")?
            .unwrap_or(default_add_bos),
        extra_eos_ids: eos.iter().chain(eot.iter()).map(|t| t.0).collect(),
        chat_template: meta.str_opt("tokenizer.chat_template")?.map(str::to_string),
    })
}
