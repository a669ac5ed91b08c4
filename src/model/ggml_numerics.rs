//! llama.cpp's CPU arithmetic, op for op, for GGUF models.
//!
//! A small quantized model is chaotic under its own arithmetic: activations
//! are re-quantized to 8 bits before every matmul, so a last-bit difference
//! anywhere flips a rounding step somewhere downstream and grows into a
//! different next-token distribution (~0.1 nats on SmolLM2 Q4_1; llama.cpp
//! with and without its flash attention differ from each other that much).
//! Users who move a GGUF file from llama.cpp to us expect the same answers,
//! so GGUF models run these functions, which reproduce ggml's CPU kernels
//! bit for bit (checked against tensors dumped from llama.cpp): RMSNorm
//! summed in f64 and scaled by a reciprocal, SwiGLU with ggml's vectorised
//! `expf`, RoPE angles accumulated as ggml caches them, and flash attention
//! with an f16 KV cache, f16 queries and an f16 running output.
//!
//! Scalar code throughout: each SIMD lane of ggml's kernels is an
//! independent scalar computation, and the reductions are replayed in
//! ggml's order, so the results do not depend on the CPU we run on.

use candle_core::{DType, Device, Tensor};
use half::f16;

/// Which arithmetic a model's forward pass uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Numerics {
    /// Plain f32 kernels (Hugging Face checkpoints; the llama2.c goldens).
    #[default]
    Reference,
    /// llama.cpp's CPU arithmetic (GGUF files), on CPU f32 activations.
    Ggml,
}

/// Whether a tensor can take the scalar replays here.
pub fn applies(t: &Tensor) -> bool {
    matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32
}

/// [`rms_norm_row`] over every row of `x` (`[rows, dim]`).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    let (rows, dim) = x.dims2()?;
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    let ws = w.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let mut out = vec![0f32; xs.len()];
    for (o, r) in out.chunks_mut(dim).zip(xs.chunks(dim)) {
        rms_norm_row(r, &ws, eps, o);
    }
    Tensor::from_vec(out, (rows, dim), x.device())
}

/// [`swiglu_row`] over every row of `gate` and `up` (`[rows, dim]` each).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    let (rows, dim) = gate.dims2()?;
    let g = gate.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let u = up.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let mut out = vec![0f32; g.len()];
    for ((o, gr), ur) in out.chunks_mut(dim).zip(g.chunks(dim)).zip(u.chunks(dim)) {
        swiglu_row(gr, ur, o);
    }
    Tensor::from_vec(out, (rows, dim), gate.device())
}

/// Rounds every element through f16 (what storing K and V in ggml's f16
/// cache does to them).
pub fn round_tensor_f16(t: &Tensor) -> candle_core::Result<Tensor> {
    t.to_dtype(DType::F16)?.to_dtype(DType::F32)
}

/// Rotates `x` (`[T, heads, head_dim]`, Hugging Face's rotate-half layout,
/// so llama.cpp's pair `(2i, 2i+1)` is our `(i, i+half)`) with the
/// per-token `(cos, sin)` rows, as ggml's `rotate_pairs` compiles (fused).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, positions: &[u32]) -> candle_core::Result<Tensor> {
    let (t, heads, hd) = x.dims3()?;
    let half = hd / 2;
    let xs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let (cos, sin) = (cos.to_vec2::<f32>()?, sin.to_vec2::<f32>()?);
    let mut out = vec![0f32; xs.len()];
    for (row, &p) in positions.iter().enumerate().take(t) {
        let (c, s) = (&cos[p as usize], &sin[p as usize]);
        for h in 0..heads {
            let base = (row * heads + h) * hd;
            for i in 0..half {
                let (x0, x1) = (xs[base + i], xs[base + i + half]);
                out[base + i] = x0.mul_add(c[i], -(x1 * s[i]));
                out[base + i + half] = x0.mul_add(s[i], x1 * c[i]);
            }
        }
    }
    Tensor::from_vec(out, (t, heads, hd), x.device())
}

/// `ggml_compute_forward_rms_norm_f32` followed by the weight multiply
/// (one row): `x · (1 / sqrt(mean(x²) + eps)) · w`, the sum in f64.
pub fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let sum: f64 = x.iter().map(|&v| f64::from(v * v)).sum();
    let mean = (sum / x.len() as f64) as f32;
    let scale = 1.0f32 / (mean + eps).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = v * scale * g;
    }
}

/// ggml's AVX-512 `ggml_v_expf` for one lane (ARM's optimized-routines
/// polynomial, max error ~1.5 ulp), replayed with the same fused operations.
#[inline(always)]
pub fn v_expf(x: f32) -> f32 {
    let r = f32::from_bits(0x4b40_0000); // 0x1.8p23
    let z = x.mul_add(f32::from_bits(0x3fb8_aa3b), r);
    let n = z - r;
    let b = (-n).mul_add(f32::from_bits(0x35bf_be8e), (-n).mul_add(f32::from_bits(0x3f31_7200), x));
    let u = b * b;
    let j = f32::from_bits(0x3c07_2010)
        .mul_add(b, f32::from_bits(0x3d2b_9f17))
        .mul_add(u, f32::from_bits(0x3e2a_af33).mul_add(b, f32::from_bits(0x3eff_fedb)))
        .mul_add(u, f32::from_bits(0x3f7f_fff6).mul_add(b, 1.0));
    if n.abs() > 192.0 {
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    // _mm512_scalef_ps: j · 2ⁿ with one rounding (exact in f64, then rounded).
    (f64::from(j) * f64::from_bits(((n as i64 + 1023) as u64) << 52)) as f32
}

/// ggml's lanes of 16: elements past the last full group take libm's `expf`.
const LANES: usize = 16;

/// `ggml_vec_swiglu_f32` (one row): `silu(gate) · up`.
pub fn swiglu_row(gate: &[f32], up: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_fma() {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { swiglu_row_fma(gate, up, out) };
    }
    swiglu_row_body(gate, up, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn swiglu_row_fma(gate: &[f32], up: &[f32], out: &mut [f32]) {
    swiglu_row_body(gate, up, out)
}

#[inline(always)]
fn swiglu_row_body(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let simd = gate.len() - gate.len() % LANES;
    for (i, ((o, &g), &u)) in out.iter_mut().zip(gate).zip(up).enumerate() {
        let e = if i < simd { v_expf(0.0 - g) } else { (-g).exp() };
        *o = g / (1.0 + e) * u;
    }
}

/// `ggml_rope_cache_init` for one position: the angle starts at the
/// position and is multiplied by `freq_base^(-2/n_dims)` per pair (f32),
/// each pair taking `cosf`/`sinf` of it. Returns `(cos, sin)` per pair.
pub fn rope_row(position: usize, n_dims: usize, freq_base: f32, freq_factors: Option<&[f32]>) -> Vec<(f32, f32)> {
    let theta_scale = freq_base.powf(-2.0f32 / n_dims as f32);
    let mut theta = position as f32;
    (0..n_dims / 2)
        .map(|i| {
            let t = theta / freq_factors.and_then(|f| f.get(i)).copied().unwrap_or(1.0);
            theta *= theta_scale;
            (t.cos(), t.sin())
        })
        .collect()
}

/// `ggml_vec_dot_f16` as built for AVX-512 without FP16 arithmetic: four
/// accumulators of 16 lanes over steps of 64 (products of f16 values are
/// exact in f32, so only the additions round; `x` and `y` must hold f16
/// values), reduced pairwise, then
/// across lanes as GCC's `_mm512_reduce_add_ps` does; leftovers in f64.
#[inline(always)]
pub fn dot_f16(x: &[f32], y: &[f32]) -> f32 {
    const STEP: usize = 64;
    let n = x.len();
    let np = n - n % STEP;
    let mut acc = [[0f32; LANES]; 4];
    for i in (0..np).step_by(STEP) {
        for (j, a) in acc.iter_mut().enumerate() {
            for (l, s) in a.iter_mut().enumerate() {
                let k = i + j * LANES + l;
                // x·y is exact (11-bit significands), so this is ggml's fma.
                *s += x[k] * y[k];
            }
        }
    }
    let mut v = [0f32; LANES];
    for l in 0..LANES {
        v[l] = (acc[0][l] + acc[2][l]) + (acc[1][l] + acc[3][l]);
    }
    let mut sum = f64::from(reduce_add_16(&v));
    for k in np..n {
        sum += f64::from(x[k] * y[k]);
    }
    sum as f32
}

/// GCC's `_mm512_reduce_add_ps`: halves, quarters, then a swap of pairs.
fn reduce_add_16(v: &[f32; LANES]) -> f32 {
    let t3: [f32; 8] = std::array::from_fn(|i| v[i + 8] + v[i]);
    let t6: [f32; 4] = std::array::from_fn(|i| t3[i + 4] + t3[i]);
    (t6[0] + t6[2]) + (t6[1] + t6[3])
}

/// Rounds through f16 (round to nearest even), as ggml stores K, V and Q.
pub fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// [`round_f16`] by bit arithmetic, vectorisable; `None` outside the range
/// where it is exact (f16 subnormals, overflow, NaN), which take the slow way.
#[inline(always)]
fn round_f16_normal(x: f32) -> Option<f32> {
    let bits = x.to_bits();
    let abs = bits & 0x7fff_ffff;
    // [2^-14, 65520): f16 normals, and values that round to at most 65504.
    if !(0x3880_0000..0x477f_f000).contains(&abs) {
        return None;
    }
    Some(f32::from_bits((bits + 0x0fff + ((bits >> 13) & 1)) & !0x1fff))
}

/// `acc[i] = f16(v[i] · w + acc[i])` with one rounding before the f16 one
/// (ggml_vec_mad_f16), or `acc[i] = f16(acc[i] · w)` when `v` is `None`
/// (ggml_vec_scale_f16). Branch-free over the common range so it
/// vectorises; rare lanes outside it are redone exactly.
#[inline(always)]
fn mad_f16(acc: &mut [f32], v: Option<&[f32]>, w: f32) {
    let mut special = 0u32;
    let mut lane = |a: &mut f32, y: f32| {
        let bits = y.to_bits();
        let abs = bits & 0x7fff_ffff;
        let normal = abs.wrapping_sub(0x3880_0000) < (0x477f_f000 - 0x3880_0000);
        let r = f32::from_bits((bits + 0x0fff + ((bits >> 13) & 1)) & !0x1fff);
        special |= u32::from(!normal);
        *a = if normal { r } else { y };
    };
    match v {
        Some(v) => acc.iter_mut().zip(v).for_each(|(a, &x)| lane(a, x.mul_add(w, *a))),
        None => acc.iter_mut().for_each(|a| lane(a, *a * w)),
    }
    if special != 0 {
        // Unrounded lanes hold the f32 result: round them the slow, exact way.
        acc.iter_mut().filter(|a| round_f16_normal(**a).is_none()).for_each(|a| *a = round_f16(*a));
    }
}

/// One query row of `ggml_compute_forward_flash_attn_ext_f16_one_chunk`
/// with an f16 KV cache: `q` is rounded to f16; for each visible key in
/// order, the score is the f16 dot product times `scale`, the running
/// maximum rescales the f16 output accumulator, and `v · exp(s - max)` is
/// added to it with one fused operation, rounded to f16 each time. `keys`
/// and `values` yield rows already rounded to f16; the query and keys must
/// be in llama.cpp's element order (the dot product's summation order
/// depends on it; see [`interleaved_order`]).
pub fn flash_attention_row<'a>(
    q: &[f32],
    scale: f32,
    keys_values: impl Iterator<Item = (&'a [f32], &'a [f32])>,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if has_fma() {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { flash_attention_row_fma(q, scale, keys_values, out) };
    }
    flash_attention_row_body(q, scale, keys_values, out)
}

/// Whether fused multiply-add runs in hardware (then the replays here are
/// compiled with it and vectorised; elsewhere `mul_add` is a library call).
#[cfg(target_arch = "x86_64")]
fn has_fma() -> bool {
    std::arch::is_x86_feature_detected!("fma") && std::arch::is_x86_feature_detected!("avx2")
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn flash_attention_row_fma<'a>(
    q: &[f32],
    scale: f32,
    keys_values: impl Iterator<Item = (&'a [f32], &'a [f32])>,
    out: &mut [f32],
) {
    flash_attention_row_body(q, scale, keys_values, out)
}

#[inline(always)]
fn flash_attention_row_body<'a>(
    q: &[f32],
    scale: f32,
    keys_values: impl Iterator<Item = (&'a [f32], &'a [f32])>,
    out: &mut [f32],
) {
    let q16: Vec<f32> = q.iter().map(|&x| round_f16(x)).collect();
    let mut acc = vec![0f32; out.len()];
    let (mut sum, mut max) = (0f32, f32::NEG_INFINITY);
    for (k, v) in keys_values {
        let s = dot_f16(k, &q16) * scale;
        let (mut ms, mut vs) = (1.0f32, 1.0f32);
        if s > max {
            let old = max;
            max = s;
            ms = (old - max).exp();
            mad_f16(&mut acc, None, ms);
        } else {
            vs = (s - max).exp();
        }
        mad_f16(&mut acc, Some(v), vs);
        sum = sum.mul_add(ms, vs);
    }
    let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
    for (o, a) in out.iter_mut().zip(&acc) {
        *o = a * inv;
    }
}

/// Where llama.cpp's element `e` of a query/key head sits in ours: GGUF
/// files store Q and K rows interleaved for rotating adjacent pairs, and we
/// un-permute them to Hugging Face's rotate-half layout (pair `(i, i+half)`).
pub fn interleaved_order(head_dim: usize) -> Vec<usize> {
    (0..head_dim).map(|e| e / 2 + (e % 2) * (head_dim / 2)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v_expf_is_close_to_exp_and_saturates_like_ggml() {
        for &x in &[-20.0f32, -1.5, -0.1, 0.0, 0.3, 1.0, 7.25, 80.0] {
            let (ours, exact) = (v_expf(x), x.exp());
            assert!(((ours - exact) / exact).abs() < 4e-7, "{x}: {ours} vs {exact}");
        }
        assert_eq!(v_expf(-200.0), 0.0);
        assert_eq!(v_expf(200.0), f32::INFINITY);
    }

    #[test]
    fn f16_dot_is_exact_on_small_integers() {
        let x: Vec<f32> = (0..70).map(|i| (i % 7) as f32).collect();
        let y: Vec<f32> = (0..70).map(|i| (i % 5) as f32 - 2.0).collect();
        let exact: f32 = x.iter().zip(&y).map(|(a, b)| a * b).sum();
        assert_eq!(dot_f16(&x, &y), exact);
    }

    #[test]
    fn flash_attention_of_one_key_returns_its_value() {
        let k = [0.5f32; 64];
        let v: Vec<f32> = (0..64).map(|i| round_f16(i as f32 * 0.1)).collect();
        let mut out = [0f32; 64];
        flash_attention_row(&[1.0; 64], 0.125, std::iter::once((&k[..], &v[..])), &mut out);
        assert_eq!(&out[..], &v[..]);
    }

    #[test]
    fn rms_norm_row_has_unit_mean_square() {
        let x = [3.0f32, -4.0, 0.0, 5.0];
        let mut out = [0f32; 4];
        rms_norm_row(&x, &[1.0; 4], 0.0, &mut out);
        let ms: f32 = out.iter().map(|v| v * v).sum::<f32>() / 4.0;
        assert!((ms - 1.0).abs() < 1e-6);
    }
}
