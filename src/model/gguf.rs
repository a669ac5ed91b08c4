//! Loads a GGUF file (v2/v3, llama or qwen2 architecture): hyper-parameters
//! from the metadata, projection weights kept quantized (Q4_0 … Q8_0,
//! K-quants; F32/F16/BF16 become dense), the tokenizer and chat template
//! from the metadata.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};

use super::chat::ChatTemplate;
use super::config::ModelConfig;
use super::gguf_meta::GgufMeta;
use super::gguf_tokenizer;
use super::llama::{Block, Embedding, Llama};
use super::loader::LoadedModel;
use super::projection::Projection;
use super::quant_kernels::QuantMatrix;
use super::tokenizer::TextTokenizer;
use super::ModelError;

/// Reads the hyper-parameters of a GGUF model.
pub fn config_from_meta(meta: &GgufMeta<'_>, content: &Content) -> Result<ModelConfig, ModelError> {
    let arch = meta.str_opt("general.architecture")?.unwrap_or("llama");
    if !matches!(arch, "llama" | "qwen2") {
        return Err(ModelError::Unsupported(format!(
            "GGUF architecture {arch:?} (supported: llama, qwen2)"
        )));
    }
    let key = |k: &str| format!("{arch}.{k}");
    let hidden = meta.usize(&key("embedding_length"))?;
    let heads = meta.usize(&key("attention.head_count"))?;
    let kv_heads = meta
        .u64_opt(&key("attention.head_count_kv"))?
        .map_or(heads, |v| v as usize);
    if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
        return Err(ModelError::InvalidConfig(format!(
            "GGUF: {heads} heads are not a multiple of {kv_heads} kv heads"
        )));
    }
    let head_dim = meta
        .u64_opt(&key("attention.key_length"))?
        .map_or(hidden / heads, |v| v as usize);
    let vocab = match meta.u64_opt(&key("vocab_size"))? {
        Some(v) => v as usize,
        None => meta.strings("tokenizer.ggml.tokens")?.len(),
    };
    if let Some(kind) = meta.str_opt(&key("rope.scaling.type"))? {
        if kind != "none" {
            return Err(ModelError::Unsupported(format!(
                "GGUF rope scaling {kind:?}"
            )));
        }
    }
    let tied = !content.tensor_infos.contains_key("output.weight");
    Ok(ModelConfig {
        architecture: arch.to_string(),
        hidden_size: hidden,
        intermediate_size: meta.usize(&key("feed_forward_length"))?,
        num_hidden_layers: meta.usize(&key("block_count"))?,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        vocab_size: vocab,
        max_position_embeddings: meta
            .u64_opt(&key("context_length"))?
            .map_or(2048, |v| v as usize),
        rms_norm_eps: meta
            .f64_opt(&key("attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-5),
        rope_theta: meta.f64_opt(&key("rope.freq_base"))?.unwrap_or(10_000.0),
        rope_scaling: None,
        rope_freq_factors: None,
        tie_word_embeddings: tied,
        qkv_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        o_bias: content.tensor_infos.contains_key("blk.0.attn_output.bias"),
        mlp_bias: false,
        bos_token_id: meta
            .u64_opt("tokenizer.ggml.bos_token_id")?
            .map(|v| v as u32),
        eos_token_ids: meta
            .u64_opt("tokenizer.ggml.eos_token_id")?
            .map(|v| v as u32)
            .into_iter()
            .collect(),
    })
}

/// llama.cpp's converter interleaves the rotary halves of each head's q/k
/// rows; this returns the permutation back to Hugging Face's rotate-half
/// order (`hf_row -> gguf_row`), so one rope serves both formats.
fn unpermute_rows(heads: usize, head_dim: usize) -> Vec<usize> {
    let half = head_dim / 2;
    let mut perm = Vec::with_capacity(heads * head_dim);
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                perm.push(h * head_dim + 2 * i + j);
            }
        }
    }
    perm
}

/// Reorders the rows of a `(rows, cols)` quantized matrix; rows are whole
/// runs of blocks, so this moves bytes and never requantizes.
fn permute_quantized_rows(q: &QTensor, perm: &[usize]) -> Result<QTensor, ModelError> {
    let (rows, cols) = q.shape().dims2()?;
    let dtype = q.dtype();
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
    let data = q.data()?;
    if data.len() != rows * row_bytes || perm.len() != rows {
        return Err(ModelError::Weights(format!(
            "cannot permute rows of a {dtype:?} tensor ({rows}x{cols})"
        )));
    }
    let mut out = Vec::with_capacity(data.len());
    for &src in perm {
        out.extend_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
    }
    let storage = QStorage::from_data(std::borrow::Cow::Owned(out), &q.device(), dtype)?;
    Ok(QTensor::new(storage, (rows, cols))?)
}

/// Reads GGUF tensors, checking shapes and keeping quantized ones packed.
/// Refuses a file too short for the tensors its header lists (a truncated
/// download), before anything is loaded.
fn check_complete(path: &Path, content: &Content, file_len: u64) -> Result<(), ModelError> {
    let needed = content
        .tensor_infos
        .iter()
        .map(|(name, t)| {
            let bytes = t.shape.elem_count() / t.ggml_dtype.block_size() * t.ggml_dtype.type_size();
            (content.tensor_data_offset + t.offset + bytes as u64, name)
        })
        .max();
    match needed {
        Some((end, name)) if end > file_len => Err(ModelError::InvalidConfig(format!(
            "{}: the GGUF file is truncated: it has {file_len} bytes but its tensors need {end} (tensor {name} ends past the end)",
            path.display()
        ))),
        _ => Ok(()),
    }
}

struct TensorReader<'a> {
    content: &'a Content,
    file: BufReader<File>,
    device: Device,
}

impl TensorReader<'_> {
    fn qtensor(&mut self, name: &str, shape: &[usize]) -> Result<QTensor, ModelError> {
        if !self.content.tensor_infos.contains_key(name) {
            return Err(ModelError::Weights(format!("GGUF: missing tensor {name}")));
        }
        let t = self
            .content
            .tensor(&mut self.file, name, &self.device)
            .map_err(|e| ModelError::Weights(format!("GGUF tensor {name}: {e}")))?;
        if t.shape().dims() != shape {
            return Err(ModelError::Weights(format!(
                "GGUF tensor {name}: shape {:?}, expected {shape:?}",
                t.shape().dims()
            )));
        }
        Ok(t)
    }

    fn has(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// A small tensor (norms, biases) as dense f32.
    fn dense(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        Ok(self
            .qtensor(name, shape)?
            .dequantize(&self.device)?
            .to_dtype(DType::F32)?)
    }

    /// A projection: quantized types stay packed; float types become dense f32.
    fn projection(
        &mut self,
        name: &str,
        out: usize,
        inp: usize,
        bias: bool,
        perm: Option<&[usize]>,
    ) -> Result<Projection, ModelError> {
        let mut q = self.qtensor(&format!("{name}.weight"), &[out, inp])?;
        let bias = if bias {
            let b = self.dense(&format!("{name}.bias"), &[out])?;
            Some(match perm {
                Some(p) => b.index_select(
                    &Tensor::from_vec(
                        p.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                        out,
                        &self.device,
                    )?,
                    0,
                )?,
                None => b,
            })
        } else {
            None
        };
        if matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
            let mut w = q.dequantize(&self.device)?.to_dtype(DType::F32)?;
            if let Some(p) = perm {
                w = w.index_select(
                    &Tensor::from_vec(
                        p.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                        out,
                        &self.device,
                    )?,
                    0,
                )?;
            }
            return Ok(Projection::new(w, bias));
        }
        if let Some(p) = perm {
            q = permute_quantized_rows(&q, p)?;
        }
        Ok(Projection::quantized(Arc::new(q), bias)?)
    }
}

/// Loads a GGUF model file for serving.
pub fn load_gguf(
    path: &Path,
    served_name: Option<&str>,
    device: &Device,
) -> Result<LoadedModel, ModelError> {
    let io = |e: std::io::Error| ModelError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let mut file = BufReader::new(File::open(path).map_err(io)?);
    let content = Content::read(&mut file).map_err(|e| {
        // candle's message (its first line: no backtrace), named plainly.
        let e = e.to_string();
        let first = e.lines().next().unwrap_or_default();
        let what = match first.strip_prefix("unknown dtype for tensor ") {
            Some(id) => format!("unknown quantization type {id} (a newer or foreign GGUF type this server cannot compute)"),
            None => first.to_string(),
        };
        ModelError::InvalidConfig(format!("{}: not a readable GGUF file: {what}", path.display()))
    })?;
    check_complete(path, &content, file.get_ref().metadata().map_err(io)?.len())?;
    let meta = GgufMeta::new(&content);
    let mut config = config_from_meta(&meta, &content)?;
    let tok = gguf_tokenizer::from_gguf(&meta)?;
    let mut reader = TensorReader {
        content: &content,
        file,
        device: device.clone(),
    };
    if reader.has("rope_freqs.weight") {
        let factors = reader
            .dense("rope_freqs.weight", &[config.head_dim / 2])?
            .to_vec1::<f32>()?;
        config.rope_freq_factors = Some(factors);
    }
    let (h, i) = (config.hidden_size, config.intermediate_size);
    let (heads, kvh, hd) = (
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    );
    // Only llama files are permuted by llama.cpp's converter; qwen2 keeps HF order.
    let (q_perm, k_perm) = if config.architecture == "llama" {
        (
            Some(unpermute_rows(heads, hd)),
            Some(unpermute_rows(kvh, hd)),
        )
    } else {
        (None, None)
    };
    let mut blocks = Vec::with_capacity(config.num_hidden_layers);
    let mut progress = crate::progress::Progress::items(&format!("loading {}: layers", path.display()), config.num_hidden_layers as u64);
    for l in 0..config.num_hidden_layers {
        let p = format!("blk.{l}");
        let qkv_bias = config.qkv_bias;
        blocks.push(Block::new(
            reader.dense(&format!("{p}.attn_norm.weight"), &[h])?,
            reader.dense(&format!("{p}.ffn_norm.weight"), &[h])?,
            reader.projection(
                &format!("{p}.attn_q"),
                heads * hd,
                h,
                qkv_bias,
                q_perm.as_deref(),
            )?,
            reader.projection(
                &format!("{p}.attn_k"),
                kvh * hd,
                h,
                qkv_bias,
                k_perm.as_deref(),
            )?,
            reader.projection(&format!("{p}.attn_v"), kvh * hd, h, qkv_bias, None)?,
            reader.projection(
                &format!("{p}.attn_output"),
                h,
                heads * hd,
                config.o_bias,
                None,
            )?,
            reader.projection(&format!("{p}.ffn_gate"), i, h, false, None)?,
            reader.projection(&format!("{p}.ffn_up"), i, h, false, None)?,
            reader.projection(&format!("{p}.ffn_down"), h, i, false, None)?,
        )?);
        progress.advance(1);
    }
    progress.finish();
    let embed_q = reader.qtensor("token_embd.weight", &[config.vocab_size, h])?;
    let embed = if matches!(
        embed_q.dtype(),
        GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
    ) {
        Embedding::Dense(embed_q.dequantize(device)?.to_dtype(DType::F32)?)
    } else if let (true, Some(native)) = (device.is_cpu(), QuantMatrix::from_qtensor(&embed_q)) {
        Embedding::Native(Arc::new(native))
    } else {
        Embedding::Quantized(Arc::new(embed_q))
    };
    let final_norm = reader.dense("output_norm.weight", &[h])?;
    let lm_head = if reader.has("output.weight") {
        Some(reader.projection("output", config.vocab_size, h, false, None)?)
    } else {
        None
    };
    let model = Llama::from_parts(config, embed, blocks, final_norm, lm_head)?.with_ggml_numerics()?;
    let tokenizer = TextTokenizer::new(
        tok.tokenizer,
        tok.bos_token.clone(),
        tok.eos_token.clone(),
        tok.add_bos_token,
        &tok.extra_eos_ids,
    );
    let chat = ChatTemplate::new(
        tok.chat_template.as_deref(),
        tok.bos_token.as_deref().unwrap_or(""),
        tok.eos_token.as_deref().unwrap_or(""),
    )?;
    let id = match served_name {
        Some(n) if !n.is_empty() => n.to_string(),
        _ => path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_interleaving() {
        // llama.cpp: gguf_row(h, i, j) = hf_row(h, j, i) with rows viewed as [heads, 2, half].
        let (heads, hd) = (2, 8);
        let perm = unpermute_rows(heads, hd);
        let half = hd / 2;
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..half {
                    assert_eq!(perm[h * hd + j * half + i], h * hd + 2 * i + j);
                }
            }
        }
    }
}
