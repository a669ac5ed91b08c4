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

/// One pair through ggml's `rotate_pairs` as GCC compiles it (fused).
#[inline(always)]
fn rotate_pair(x0: f32, x1: f32, c: f32, s: f32) -> (f32, f32) {
    (x0.mul_add(c, -(x1 * s)), x0.mul_add(s, x1 * c))
}

/// Rotates the heads of one token's Q or K row (`input`, Hugging Face's
/// rotate-half layout) with that position's `cos`/`sin`, as ggml's fused
/// `rotate_pairs` does, writing them in llama.cpp's interleaved element
/// order; `round` passes the results through f16 (K, for the cache).
pub fn rotate_interleaved(input: &[f32], out: &mut [f32], cos: &[f32], sin: &[f32], head_dim: usize, round: bool) {
    #[cfg(target_arch = "x86_64")]
    if has_fma() {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { rotate_interleaved_fma(input, out, cos, sin, head_dim, round) };
    }
    rotate_interleaved_body(input, out, cos, sin, head_dim, round)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rotate_interleaved_fma(input: &[f32], out: &mut [f32], cos: &[f32], sin: &[f32], head_dim: usize, round: bool) {
    rotate_interleaved_body(input, out, cos, sin, head_dim, round)
}

#[inline(always)]
fn rotate_interleaved_body(input: &[f32], out: &mut [f32], cos: &[f32], sin: &[f32], head_dim: usize, round: bool) {
    let half = head_dim / 2;
    for (h_in, h_out) in input.chunks(head_dim).zip(out.chunks_mut(head_dim)) {
        for i in 0..half {
            let (a, b) = rotate_pair(h_in[i], h_in[i + half], cos[i], sin[i]);
            h_out[2 * i] = if round { round_f16(a) } else { a };
            h_out[2 * i + 1] = if round { round_f16(b) } else { b };
        }
    }
}

/// [`swiglu_row`] over a fused `[rows, 2 · dim]` gate-and-up projection.
pub fn swiglu_fused(gate_up: &Tensor) -> candle_core::Result<Tensor> {
    let (rows, width) = gate_up.dims2()?;
    let dim = width / 2;
    let x = gate_up.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let mut out = vec![0f32; rows * dim];
    for (o, r) in out.chunks_mut(dim).zip(x.chunks(width)) {
        swiglu_row(&r[..dim], &r[dim..], o);
    }
    Tensor::from_vec(out, (rows, dim), gate_up.device())
}

/// f16 → f32 for a row, exactly, by integer arithmetic and one multiply by
/// 2¹¹² (which rebiases normals and scales subnormals), so it vectorises
/// wherever it is inlined.
#[inline(always)]
pub fn widen_f16(src: &[f16], dst: &mut [f32]) {
    for (d, h) in dst.iter_mut().zip(src) {
        let h = u32::from(h.to_bits());
        let sign = (h & 0x8000) << 16;
        let em = h & 0x7fff;
        let scaled = (f32::from_bits(em << 13) * f32::from_bits(0x7780_0000)).to_bits();
        let bits = if em >= 0x7c00 { (em << 13) | 0x7f80_0000 } else { scaled };
        *d = f32::from_bits(bits | sign);
    }
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
    #[cfg(target_arch = "x86_64")]
    if has_fma() {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { rope_fma(x, cos, sin, positions) };
    }
    rope_body(x, cos, sin, positions)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rope_fma(x: &Tensor, cos: &Tensor, sin: &Tensor, positions: &[u32]) -> candle_core::Result<Tensor> {
    rope_body(x, cos, sin, positions)
}

#[inline(always)]
fn rope_body(x: &Tensor, cos: &Tensor, sin: &Tensor, positions: &[u32]) -> candle_core::Result<Tensor> {
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
                (out[base + i], out[base + i + half]) = rotate_pair(xs[base + i], xs[base + i + half], c[i], s[i]);
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
    let n = x.len().min(y.len());
    let np = n - n % STEP;
    let mut acc = [[0f32; LANES]; 4];
    for (xc, yc) in x[..np].chunks_exact(STEP).zip(y[..np].chunks_exact(STEP)) {
        for (j, a) in acc.iter_mut().enumerate() {
            let xs: &[f32; LANES] = xc[j * LANES..(j + 1) * LANES].try_into().expect("16 lanes");
            let ys: &[f32; LANES] = yc[j * LANES..(j + 1) * LANES].try_into().expect("16 lanes");
            for l in 0..LANES {
                // x·y is exact (11-bit significands), so this is ggml's fma.
                a[l] += xs[l] * ys[l];
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
#[inline(always)]
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
/// with an f16 KV cache: `q` is rounded to f16; for each of the `n_keys`
/// visible keys in order, the score is the f16 dot product times `scale`,
/// the running maximum rescales the f16 output accumulator, and
/// `v · exp(s - max)` is added to it with one fused operation, rounded to
/// f16 each time. `row(j, key, value)` fills key `j`'s two rows (values
/// already f16); the query and keys must be in llama.cpp's element order
/// (the dot product's summation order depends on it; see
/// [`interleaved_order`]).
pub fn flash_attention_row(q: &[f32], scale: f32, n_keys: usize, row: impl FnMut(usize, &mut [f32], &mut [f32]), out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_fma() {
        if std::arch::is_x86_feature_detected!("f16c") && out.len().is_multiple_of(8) {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { f16c::flash_attention_row(q, scale, n_keys, row, out) };
        }
        // SAFETY: as above.
        return unsafe { flash_attention_row_fma(q, scale, n_keys, row, out) };
    }
    flash_attention_row_body(q, scale, n_keys, row, out, dot_f16, mad_f16)
}

/// The same row with the f16 roundings done by the F16C conversion
/// instructions (ggml's own on x86), eight lanes at a time.
#[cfg(target_arch = "x86_64")]
mod f16c {
    use super::{dot_f16, reduce_add_16, LANES};
    use std::arch::x86_64::*;

    /// [`dot_f16`] in registers: lane `l` of ggml's accumulator `j` is lane
    /// `l % 8` of register `2j + l / 8`; same sums in the same order.
    #[inline(always)]
    unsafe fn dot(x: &[f32], y: &[f32]) -> f32 {
        if !x.len().is_multiple_of(64) || x.len() != y.len() {
            return dot_f16(x, y);
        }
        let mut acc = [_mm256_setzero_ps(); 8];
        for i in (0..x.len()).step_by(64) {
            for (r, a) in acc.iter_mut().enumerate() {
                let at = i + r * 8;
                // The products are exact, so fused or not is the same sum.
                *a = _mm256_fmadd_ps(_mm256_loadu_ps(x.as_ptr().add(at)), _mm256_loadu_ps(y.as_ptr().add(at)), *a);
            }
        }
        // v = (acc0 + acc2) + (acc1 + acc3), per 16-lane half.
        let lo = _mm256_add_ps(_mm256_add_ps(acc[0], acc[4]), _mm256_add_ps(acc[2], acc[6]));
        let hi = _mm256_add_ps(_mm256_add_ps(acc[1], acc[5]), _mm256_add_ps(acc[3], acc[7]));
        let mut v = [0f32; LANES];
        _mm256_storeu_ps(v.as_mut_ptr(), lo);
        _mm256_storeu_ps(v.as_mut_ptr().add(8), hi);
        reduce_add_16(&v)
    }

    /// `acc = f16(x · w + acc)` (or `f16(acc · w)` without `x`), 8 lanes at a time.
    #[inline(always)]
    unsafe fn mad(acc: &mut [f32], x: Option<&[f32]>, w: f32) {
        let wv = _mm256_set1_ps(w);
        for i in (0..acc.len()).step_by(8) {
            let a = _mm256_loadu_ps(acc.as_ptr().add(i));
            let y = match x {
                Some(x) => _mm256_fmadd_ps(_mm256_loadu_ps(x.as_ptr().add(i)), wv, a),
                None => _mm256_mul_ps(a, wv),
            };
            let r = _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(y));
            _mm256_storeu_ps(acc.as_mut_ptr().add(i), r);
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn flash_attention_row(q: &[f32], scale: f32, n_keys: usize, row: impl FnMut(usize, &mut [f32], &mut [f32]), out: &mut [f32]) {
        // SAFETY (both closures): this function runs only where AVX2, FMA and F16C exist.
        super::flash_attention_row_body(q, scale, n_keys, row, out, |k, q| unsafe { dot(k, q) }, |acc, v, w| unsafe { mad(acc, v, w) })
    }
}

/// Whether fused multiply-add runs in hardware (then the replays here are
/// compiled with it and vectorised; elsewhere `mul_add` is a library call).
#[cfg(target_arch = "x86_64")]
fn has_fma() -> bool {
    std::arch::is_x86_feature_detected!("fma") && std::arch::is_x86_feature_detected!("avx2")
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn flash_attention_row_fma(q: &[f32], scale: f32, n_keys: usize, row: impl FnMut(usize, &mut [f32], &mut [f32]), out: &mut [f32]) {
    flash_attention_row_body(q, scale, n_keys, row, out, dot_f16, mad_f16)
}

/// The row's online softmax, with the f16 dot product and the rounding
/// accumulate of the caller's instruction set.
#[inline(always)]
fn flash_attention_row_body(
    q: &[f32],
    scale: f32,
    n_keys: usize,
    mut row: impl FnMut(usize, &mut [f32], &mut [f32]),
    out: &mut [f32],
    dot: impl Fn(&[f32], &[f32]) -> f32,
    mad: impl Fn(&mut [f32], Option<&[f32]>, f32),
) {
    let q16: Vec<f32> = q.iter().map(|&x| round_f16(x)).collect();
    let mut acc = vec![0f32; out.len()];
    let (mut k, mut v) = (vec![0f32; q.len()], vec![0f32; out.len()]);
    let (mut sum, mut max) = (0f32, f32::NEG_INFINITY);
    for j in 0..n_keys {
        row(j, &mut k, &mut v);
        let s = dot(&k, &q16) * scale;
        let (mut ms, mut vs) = (1.0f32, 1.0f32);
        if s > max {
            let old = max;
            max = s;
            ms = (old - max).exp();
            mad(&mut acc, None, ms);
        } else {
            vs = (s - max).exp();
        }
        mad(&mut acc, Some(&v), vs);
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
    fn widen_f16_is_exact_for_every_f16() {
        let all: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
        let mut out = vec![0f32; all.len()];
        widen_f16(&all, &mut out);
        for (h, o) in all.iter().zip(&out) {
            let want = h.to_f32();
            assert!(want.to_bits() == o.to_bits() || (want.is_nan() && o.is_nan()), "{h:?}: {o} vs {want}");
        }
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
        flash_attention_row(&[1.0; 64], 0.125, 1, |_, kr, vr| {
            kr.copy_from_slice(&k);
            vr.copy_from_slice(&v);
        }, &mut out);
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
