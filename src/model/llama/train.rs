//! The differentiable forward pass for training adapters: one sequence or
//! several packed as a prefix tree, causal attention along each, every op one that candle can differentiate
//! (plain RMSNorm, softmax and RoPE instead of the fused kernels, which
//! record no backward), LoRA deltas from a [`TrainableLora`]. The frozen
//! base weights are the serving model's own tensors, never copied.

use candle_core::{DType, Tensor, D};

use super::prefix_tree::PrefixTree;
use super::{train_ggml, Llama};
use crate::model::ggml_numerics;
use crate::lora::trainable::TrainableLora;

impl Llama {
    /// Whether [`Llama::forward_train`] can run on this model: f32
    /// activations (f32 checkpoints and GGUF files; gradients flow through
    /// quantized projections by [`crate::model::frozen_linear`]).
    pub fn trainable(&self) -> bool {
        self.dtype == DType::F32
    }

    /// Logits `[T, vocab]` for every position of `tokens`, differentiable
    /// with respect to `lora`'s variables.
    pub fn forward_train(&self, tokens: &[u32], lora: &TrainableLora) -> candle_core::Result<Tensor> {
        let t = tokens.len();
        self.forward_train_range(tokens, lora, 0, t)
    }

    /// Logits for positions `start..start + len` only: the output head (the
    /// largest matmul of a small model) runs on the rows a loss reads.
    pub fn forward_train_range(&self, tokens: &[u32], lora: &TrainableLora, start: usize, len: usize) -> candle_core::Result<Tensor> {
        let (tree, _) = PrefixTree::build(&[tokens]);
        let x = self.hidden_train(&tree, lora)?;
        self.lm_head.forward_train(&x.narrow(0, start, len)?)
    }

    /// Several sequences in one pass, packed as a prefix tree (see
    /// [`super::prefix_tree`]): each frozen projection runs once over all
    /// their tokens, so its backward (which dequantizes a quantized weight
    /// tile by tile) is paid once per step instead of once per sequence,
    /// and beginnings they share (a system prompt, a preference's prompt)
    /// are computed once. Returns each sequence's logits rows `start..start + len`.
    pub fn forward_train_packed(&self, seqs: &[PackedSeq<'_>], lora: &TrainableLora) -> candle_core::Result<Vec<Tensor>> {
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let token_lists: Vec<&[u32]> = seqs.iter().map(|s| s.tokens).collect();
        let (tree, paths) = PrefixTree::build(&token_lists);
        let x = self.hidden_train(&tree, lora)?;
        let mut rows = Vec::new();
        for (s, path) in seqs.iter().zip(&paths) {
            if s.start + s.len > s.tokens.len() {
                candle_core::bail!("logits rows {}..{} are outside a sequence of {}", s.start, s.start + s.len, s.tokens.len());
            }
            rows.extend(path[s.start..s.start + s.len].iter().map(|&i| i as u32));
        }
        let n = rows.len();
        let rows = Tensor::from_vec(rows, n, &self.device)?;
        let logits = self.lm_head.forward_train(&x.index_select(&rows, 0)?)?;
        let mut out = Vec::with_capacity(seqs.len());
        let mut at = 0;
        for s in seqs {
            out.push(logits.narrow(0, at, s.len)?);
            at += s.len;
        }
        Ok(out)
    }

    /// Final hidden states `[T, hidden]` (after the last norm) of the
    /// tokens of `tree`, each attending to its ancestors.
    fn hidden_train(&self, tree: &PrefixTree, lora: &TrainableLora) -> candle_core::Result<Tensor> {
        if !self.trainable() {
            candle_core::bail!("training needs f32 activations: serve the model with dtype f32 to train it");
        }
        let cfg = &self.config;
        let t = tree.len();
        let ids = Tensor::from_vec(tree.tokens.clone(), t, &self.device)?;
        let positions = Tensor::from_vec(tree.positions.clone(), t, &self.device)?;
        let mask = tree.mask(&self.device)?;
        let keys: Vec<Vec<usize>> = (0..t).map(|i| tree.visible(i)).collect();
        let mut x = self.embed.lookup(&ids)?.to_dtype(DType::F32)?;
        let ggml = self.ggml(&x);
        let rms_norm = |x: &Tensor, w: &Tensor, eps: f64| rms_norm(x, w, eps, ggml);
        let (cos, sin) = self.rope.rows(&positions)?;
        let order = Tensor::from_vec(
            ggml_numerics::interleaved_order(cfg.head_dim).into_iter().map(|i| i as u32).collect::<Vec<_>>(),
            cfg.head_dim,
            &self.device,
        )?;
        for (layer, b) in self.blocks.iter().enumerate() {
            let h = rms_norm(&x, &b.input_norm, cfg.rms_norm_eps)?;
            let qkv = add_delta(b.qkv.forward_train(&h)?, lora, layer, &[("q_proj", b.q_dim), ("k_proj", b.kv_dim), ("v_proj", b.kv_dim)], &h)?;
            let (heads, kv_heads, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
            let q = qkv.narrow(1, 0, b.q_dim)?.reshape((t, heads, hd))?;
            let k = qkv.narrow(1, b.q_dim, b.kv_dim)?.reshape((t, kv_heads, hd))?;
            let v = qkv.narrow(1, b.q_dim + b.kv_dim, b.kv_dim)?.reshape((t, kv_heads, hd))?;
            let attn = if ggml {
                // Serving's arithmetic (see `ggml_numerics`), differentiably.
                let rope = |m: &Tensor| m.contiguous()?.apply_op1(train_ggml::Rope { cos: cos.clone(), sin: sin.clone() })?.index_select(&order, 2);
                let (q, k) = (rope(&q)?, rope(&k)?);
                let (k, v) = (ggml_numerics::round_tensor_f16(&k)?, ggml_numerics::round_tensor_f16(&v)?);
                q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, train_ggml::FlashAttention { keys: keys.clone(), mask: mask.clone() })?
            } else {
            let q = self.rope.apply_differentiable(&q, &positions)?.transpose(0, 1)?.contiguous()?;
            let k = self.rope.apply_differentiable(&k, &positions)?.transpose(0, 1)?.contiguous()?;
            let v = v.transpose(0, 1)?.contiguous()?;
            let rep = heads / kv_heads;
            let (k, v) = if rep == 1 {
                (k, v)
            } else {
                let expand = |m: Tensor| -> candle_core::Result<Tensor> {
                    m.unsqueeze(1)?.expand((kv_heads, rep, t, hd))?.reshape((heads, t, hd))
                };
                (expand(k)?, expand(v)?)
            };
            let scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?.broadcast_add(&mask)?;
            let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
            probs.matmul(&v)?.transpose(0, 1)?.reshape((t, heads * hd))?
            };
            let o = add_delta(b.o.forward_train(&attn)?, lora, layer, &[("o_proj", cfg.hidden_size)], &attn)?;
            x = (x + o)?;
            let h = rms_norm(&x, &b.post_attention_norm, cfg.rms_norm_eps)?;
            let gu = add_delta(b.gate_up.forward_train(&h)?, lora, layer, &[("gate_proj", b.intermediate), ("up_proj", b.intermediate)], &h)?;
            let (gate, up) = (gu.narrow(1, 0, b.intermediate)?, gu.narrow(1, b.intermediate, b.intermediate)?);
            let act = if ggml { gate.contiguous()?.apply_op2(&up.contiguous()?, train_ggml::SwiGlu)? } else { (candle_nn::ops::silu(&gate)? * up)? };
            let down = add_delta(b.down.forward_train(&act)?, lora, layer, &[("down_proj", cfg.hidden_size)], &act)?;
            x = (x + down)?;
        }
        rms_norm(&x, &self.final_norm, cfg.rms_norm_eps)
    }
}

/// `x / sqrt(mean(x²) + eps) · w` with the serving kernel's exact forward
/// (quantized matmuls after it amplify even last-bit differences) and an
/// analytic backward for `x` (the norm weight is frozen).
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, ggml: bool) -> candle_core::Result<Tensor> {
    if !x.device().is_cpu() {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        return x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w);
    }
    x.contiguous()?.apply_op1(FrozenRmsNorm { weight: w.clone(), eps, ggml })
}

struct FrozenRmsNorm {
    weight: Tensor,
    eps: f64,
    /// Forward with llama.cpp's arithmetic (GGUF bases), as serving does.
    ggml: bool,
}

impl candle_core::CustomOp1 for FrozenRmsNorm {
    fn name(&self) -> &'static str {
        "frozen-rms-norm"
    }

    fn cpu_fwd(&self, storage: &candle_core::CpuStorage, layout: &candle_core::Layout) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("frozen-rms-norm needs a contiguous input");
        };
        let x = match storage {
            candle_core::CpuStorage::F32(v) => Tensor::from_slice(&v[start..end], layout.shape(), &candle_core::Device::Cpu)?,
            _ => candle_core::bail!("frozen-rms-norm runs in f32"),
        };
        let y = if self.ggml {
            ggml_numerics::rms_norm(&x, &self.weight, self.eps as f32)?
        } else {
            candle_nn::ops::rms_norm(&x, &self.weight, self.eps as f32)?
        };
        let shape = y.shape().clone();
        Ok((candle_core::CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?), shape))
    }

    /// `dx = u / r - x · Σ(u·x) / (n r³)` with `u = g · w`, `r = sqrt(mean(x²) + eps)`.
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let n = x.dim(D::Minus1)? as f64;
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?;
        let u = grad.broadcast_mul(&self.weight)?;
        let dot = (&u * x)?.sum_keepdim(D::Minus1)?;
        let first = u.broadcast_div(&r)?;
        let second = x.broadcast_mul(&dot.broadcast_div(&(r.powf(3.0)? * n)?)?)?;
        Ok(Some((first - second)?))
    }
}

/// One sequence of a packed training pass and the logits rows its loss reads.
#[derive(Debug, Clone, Copy)]
pub struct PackedSeq<'a> {
    pub tokens: &'a [u32],
    pub start: usize,
    pub len: usize,
}

/// `y` plus the LoRA deltas of the modules `parts` lays out in its columns.
fn add_delta(y: Tensor, lora: &TrainableLora, layer: usize, parts: &[(&str, usize)], x: &Tensor) -> candle_core::Result<Tensor> {
    let mut cols = Vec::with_capacity(parts.len());
    let mut any = false;
    for (module, width) in parts {
        match lora.delta(layer, module, x)? {
            Some(d) => {
                any = true;
                cols.push(d);
            }
            None => cols.push(Tensor::zeros((x.dim(0)?, *width), DType::F32, x.device())?),
        }
    }
    if !any {
        return Ok(y);
    }
    let d = if cols.len() == 1 { cols.remove(0) } else { Tensor::cat(&cols, 1)? };
    y + d
}
