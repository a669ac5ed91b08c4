//! The differentiable forward pass for training adapters: one sequence,
//! full causal attention, every op one that candle can differentiate
//! (plain RMSNorm, softmax and RoPE instead of the fused kernels, which
//! record no backward), LoRA deltas from a [`TrainableLora`]. The frozen
//! base weights are the serving model's own tensors, never copied.

use candle_core::{DType, Module, Tensor, D};

use super::Llama;
use crate::lora::trainable::TrainableLora;

impl Llama {
    /// Whether [`Llama::forward_train`] can run on this model: gradients
    /// must flow through the base projections, which our quantized kernels
    /// do not record.
    pub fn trainable(&self) -> bool {
        self.dtype == DType::F32
            && !self.lm_head.is_quantized()
            && self.blocks.iter().all(|b| [&b.qkv, &b.o, &b.gate_up, &b.down].iter().all(|p| !p.is_quantized()))
    }

    /// Logits `[T, vocab]` for every position of `tokens`, differentiable
    /// with respect to `lora`'s variables.
    pub fn forward_train(&self, tokens: &[u32], lora: &TrainableLora) -> candle_core::Result<Tensor> {
        if !self.trainable() {
            candle_core::bail!("training needs an f32 model with dense weights (quantized bases are not trainable yet)");
        }
        let cfg = &self.config;
        let t = tokens.len();
        let ids = Tensor::from_vec(tokens.to_vec(), t, &self.device)?;
        let positions = Tensor::from_vec((0..t as u32).collect::<Vec<_>>(), t, &self.device)?;
        let mask = causal_mask(t, &self.device)?;
        let mut x = self.embed.lookup(&ids)?.to_dtype(DType::F32)?;
        for (layer, b) in self.blocks.iter().enumerate() {
            let h = rms_norm(&x, &b.input_norm, cfg.rms_norm_eps)?;
            let qkv = add_delta(b.qkv.forward(&h)?, lora, layer, &[("q_proj", b.q_dim), ("k_proj", b.kv_dim), ("v_proj", b.kv_dim)], &h)?;
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
            let o = add_delta(b.o.forward(&attn)?, lora, layer, &[("o_proj", cfg.hidden_size)], &attn)?;
            x = (x + o)?;
            let h = rms_norm(&x, &b.post_attention_norm, cfg.rms_norm_eps)?;
            let gu = add_delta(b.gate_up.forward(&h)?, lora, layer, &[("gate_proj", b.intermediate), ("up_proj", b.intermediate)], &h)?;
            let act = (candle_nn::ops::silu(&gu.narrow(1, 0, b.intermediate)?)? * gu.narrow(1, b.intermediate, b.intermediate)?)?;
            let down = add_delta(b.down.forward(&act)?, lora, layer, &[("down_proj", cfg.hidden_size)], &act)?;
            x = (x + down)?;
        }
        let x = rms_norm(&x, &self.final_norm, cfg.rms_norm_eps)?;
        self.lm_head.forward(&x)
    }
}

/// `x / sqrt(mean(x²) + eps) · w`, from differentiable ops.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
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
