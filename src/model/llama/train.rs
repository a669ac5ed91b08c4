//! The differentiable forward pass for training adapters: one sequence,
//! full causal attention, every op one that candle can differentiate
//! (plain RMSNorm, softmax and RoPE instead of the fused kernels, which
//! record no backward), LoRA deltas from a [`TrainableLora`]. The frozen
//! base weights are the serving model's own tensors, never copied.

use candle_core::{DType, Tensor, D};

use super::Llama;
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
        let x = self.hidden_train(tokens, lora)?;
        self.lm_head.forward_train(&x.narrow(0, start, len)?)
    }

    /// Final hidden states `[T, hidden]` (after the last norm).
    fn hidden_train(&self, tokens: &[u32], lora: &TrainableLora) -> candle_core::Result<Tensor> {
        if !self.trainable() {
            candle_core::bail!("training needs f32 activations: serve the model with dtype f32 to train it");
        }
        let cfg = &self.config;
        let t = tokens.len();
        let ids = Tensor::from_vec(tokens.to_vec(), t, &self.device)?;
        let positions = Tensor::from_vec((0..t as u32).collect::<Vec<_>>(), t, &self.device)?;
        let mask = causal_mask(t, &self.device)?;
        let mut x = self.embed.lookup(&ids)?.to_dtype(DType::F32)?;
        for (layer, b) in self.blocks.iter().enumerate() {
            let h = rms_norm(&x, &b.input_norm, cfg.rms_norm_eps)?;
            let qkv = add_delta(b.qkv.forward_train(&h)?, lora, layer, &[("q_proj", b.q_dim), ("k_proj", b.kv_dim), ("v_proj", b.kv_dim)], &h)?;
            let (heads, kv_heads, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
            let q = qkv.narrow(1, 0, b.q_dim)?.reshape((t, heads, hd))?;
            let k = qkv.narrow(1, b.q_dim, b.kv_dim)?.reshape((t, kv_heads, hd))?;
            let v = qkv.narrow(1, b.q_dim + b.kv_dim, b.kv_dim)?.reshape((t, kv_heads, hd))?;
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
            let attn = probs.matmul(&v)?.transpose(0, 1)?.reshape((t, heads * hd))?;
            let o = add_delta(b.o.forward_train(&attn)?, lora, layer, &[("o_proj", cfg.hidden_size)], &attn)?;
            x = (x + o)?;
            let h = rms_norm(&x, &b.post_attention_norm, cfg.rms_norm_eps)?;
            let gu = add_delta(b.gate_up.forward_train(&h)?, lora, layer, &[("gate_proj", b.intermediate), ("up_proj", b.intermediate)], &h)?;
            let act = (candle_nn::ops::silu(&gu.narrow(1, 0, b.intermediate)?)? * gu.narrow(1, b.intermediate, b.intermediate)?)?;
            let down = add_delta(b.down.forward_train(&act)?, lora, layer, &[("down_proj", cfg.hidden_size)], &act)?;
            x = (x + down)?;
        }
        rms_norm(&x, &self.final_norm, cfg.rms_norm_eps)
    }
}

/// `x / sqrt(mean(x²) + eps) · w` with the serving kernel's exact forward
/// (quantized matmuls after it amplify even last-bit differences) and an
/// analytic backward for `x` (the norm weight is frozen).
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    if !x.device().is_cpu() {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        return x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w);
    }
    x.contiguous()?.apply_op1(FrozenRmsNorm { weight: w.clone(), eps })
}

struct FrozenRmsNorm {
    weight: Tensor,
    eps: f64,
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
        let y = candle_nn::ops::rms_norm(&x, &self.weight, self.eps as f32)?;
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

/// `[T, T]`: 0 on and below the diagonal, -inf above.
fn causal_mask(t: usize, device: &candle_core::Device) -> candle_core::Result<Tensor> {
    let m: Vec<f32> = (0..t).flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Tensor::from_vec(m, (t, t), device)
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
