//! Rotary position embedding tables (rotate-half layout, as Hugging Face
//! stores q/k), with Llama 3 frequency scaling.

use candle_core::{DType, Device, Tensor};

use super::config::ModelConfig;
use super::ggml_numerics;

/// Precomputed cos/sin, `[max_positions, head_dim / 2]`, gathered per token.
#[derive(Debug, Clone)]
pub struct RopeTable {
    cos: Tensor,
    sin: Tensor,
    /// llama.cpp's table (GGUF models) on the host, for the fused ggml pass.
    host: Option<std::sync::Arc<(Vec<f32>, Vec<f32>)>>,
}

impl RopeTable {
    /// Builds the table for every position the model accepts.
    pub fn new(cfg: &ModelConfig, dtype: DType, device: &Device) -> candle_core::Result<Self> {
        let half = cfg.head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| {
                let f = 1.0 / cfg.rope_theta.powf((2 * i) as f64 / cfg.head_dim as f64);
                let divisor = cfg
                    .rope_freq_factors
                    .as_ref()
                    .and_then(|v| v.get(i))
                    .copied()
                    .unwrap_or(1.0) as f64;
                (scale_frequency(cfg, f) / divisor) as f32
            })
            .collect();
        let n = cfg.max_position_embeddings;
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for p in 0..n {
            for f in &inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok(RopeTable {
            cos: Tensor::from_vec(cos, (n, half), device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, (n, half), device)?.to_dtype(dtype)?,
            host: None,
        })
    }

    /// The table as ggml caches it (angles accumulated in f32 per pair) and
    /// its fused rotation: what a GGUF model served by llama.cpp computes.
    pub fn ggml(cfg: &ModelConfig, device: &Device) -> candle_core::Result<Self> {
        let half = cfg.head_dim / 2;
        let n = cfg.max_position_embeddings;
        let (mut cos, mut sin) = (Vec::with_capacity(n * half), Vec::with_capacity(n * half));
        for p in 0..n {
            for (c, s) in ggml_numerics::rope_row(p, cfg.head_dim, cfg.rope_theta as f32, cfg.rope_freq_factors.as_deref()) {
                cos.push(c);
                sin.push(s);
            }
        }
        Ok(RopeTable {
            cos: Tensor::from_slice(&cos, (n, half), device)?,
            sin: Tensor::from_slice(&sin, (n, half), device)?,
            host: Some(std::sync::Arc::new((cos, sin))),
        })
    }

    /// Rotates `x` (`[T, heads, head_dim]`) with plain tensor ops, which
    /// (unlike the fused kernel) record a backward pass: the training path.
    pub fn apply_differentiable(&self, x: &Tensor, positions: &Tensor) -> candle_core::Result<Tensor> {
        let half = x.dim(2)? / 2;
        let cos = self.cos.index_select(positions, 0)?.unsqueeze(1)?;
        let sin = self.sin.index_select(positions, 0)?.unsqueeze(1)?;
        let x1 = x.narrow(2, 0, half)?;
        let x2 = x.narrow(2, half, half)?;
        let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
        let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
        Tensor::cat(&[r1, r2], 2)
    }

    /// Rotates `x` (`[T, heads, head_dim]`) at the given per-token positions.
    pub fn apply(&self, x: &Tensor, positions: &Tensor) -> candle_core::Result<Tensor> {
        let cos = self.cos.index_select(positions, 0)?;
        let sin = self.sin.index_select(positions, 0)?;
        let x4 = x.unsqueeze(0)?.contiguous()?;
        candle_nn::rotary_emb::rope_thd(&x4, &cos, &sin)?.squeeze(0)
    }
}

impl RopeTable {
    /// The `(cos, sin)` rows `[T, head_dim / 2]` of the given positions.
    pub fn rows(&self, positions: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((self.cos.index_select(positions, 0)?, self.sin.index_select(positions, 0)?))
    }

    /// Everything attention needs from a step's fused `[T, q | k | v]`
    /// projection under ggml's arithmetic, in one pass: Q and K rotated
    /// (fused, as ggml compiles it) and laid out in llama.cpp's interleaved
    /// element order, K and V rounded through f16 as its cache stores them.
    /// Returns `q [T, heads, hd]`, `k`, `v [T, kv_heads, hd]`.
    pub fn ggml_attention_inputs(
        &self,
        qkv: &Tensor,
        positions: &[u32],
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (t, width) = qkv.dims2()?;
        let half = head_dim / 2;
        let (qd, kvd) = (heads * head_dim, kv_heads * head_dim);
        if width != qd + 2 * kvd || positions.len() != t {
            candle_core::bail!("attention inputs: {t}x{width} projection for {heads}/{kv_heads} heads of {head_dim}");
        }
        let Some(host) = &self.host else {
            candle_core::bail!("attention inputs need a ggml rope table");
        };
        let (cos, sin) = (&host.0, &host.1);
        if positions.iter().any(|&p| (p as usize + 1) * half > cos.len()) {
            candle_core::bail!("position beyond the rope table");
        }
        let x = qkv.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let (mut q, mut k, mut v) = (vec![0f32; t * qd], vec![0f32; t * kvd], vec![0f32; t * kvd]);
        for (row, &p) in positions.iter().enumerate() {
            let src = &x[row * width..(row + 1) * width];
            let (c, s) = (&cos[p as usize * half..(p as usize + 1) * half], &sin[p as usize * half..(p as usize + 1) * half]);
            ggml_numerics::rotate_interleaved(&src[..qd], &mut q[row * qd..(row + 1) * qd], c, s, head_dim, false);
            ggml_numerics::rotate_interleaved(&src[qd..qd + kvd], &mut k[row * kvd..(row + 1) * kvd], c, s, head_dim, true);
            for (o, &i) in v[row * kvd..(row + 1) * kvd].iter_mut().zip(&src[qd + kvd..]) {
                *o = ggml_numerics::round_f16(i);
            }
        }
        let device = qkv.device();
        Ok((
            Tensor::from_vec(q, (t, heads, head_dim), device)?,
            Tensor::from_vec(k, (t, kv_heads, head_dim), device)?,
            Tensor::from_vec(v, (t, kv_heads, head_dim), device)?,
        ))
    }
}

/// Llama 3.1 scaling: long wavelengths divided by `factor`, short ones kept,
/// a smooth blend between.
fn scale_frequency(cfg: &ModelConfig, freq: f64) -> f64 {
    let Some(s) = &cfg.rope_scaling else {
        return freq;
    };
    let old = s.original_max_position_embeddings as f64;
    let low_wavelen = old / s.low_freq_factor;
    let high_wavelen = old / s.high_freq_factor;
    let wavelen = 2.0 * std::f64::consts::PI / freq;
    if wavelen < high_wavelen {
        freq
    } else if wavelen > low_wavelen {
        freq / s.factor
    } else {
        let smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        (1.0 - smooth) * freq / s.factor + smooth * freq
    }
}
