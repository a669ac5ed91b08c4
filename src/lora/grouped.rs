//! The CPU kernel for a heterogeneous batch's LoRA delta. Each packed row
//! finds its segment's adapter and computes `u = xᵀ Aᵀ` then
//! `y += uᵀ (s·Bᵀ)`, both as scaled row additions (the summation order of
//! a matmul, which keeps us as close to PEFT's logits as candle's own
//! matmul was), straight into one output buffer. The cost is `r · (in + out)` per adapted row whatever the number
//! of distinct adapters: no per-adapter op launches, no gathers, no
//! concatenation of per-segment pieces. Rows without an adapter cost nothing.

use candle_core::{DType, Device, Storage, Tensor};

use super::adapter::LoraModule;
use super::batched::AdapterSegment;
use crate::model::parallel::{for_ranges_on, DisjointOut, Pool};

/// An adapter tensor's values: f32, or bf16 (as bits) over a bf16 base,
/// whose adapters are held in its precision (half the bytes a decode step
/// streams for each distinct adapter).
#[derive(Clone, Copy)]
enum Values<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

impl Values<'_> {
    fn len(&self) -> usize {
        match self {
            Values::F32(v) => v.len(),
            Values::Bf16(v) => v.len(),
        }
    }
}

/// One adapted module of one segment, borrowed as plain slices.
struct ModuleSlices<'a> {
    /// `Aᵀ`, `[in, r]`.
    a_t: Values<'a>,
    /// `s·Bᵀ`, `[r, out]`.
    b_t: Values<'a>,
    rank: usize,
    out: usize,
    /// Where the module's columns start in the delta.
    col: usize,
}

/// Whether the kernel can run: f32 activations on the CPU, and every
/// adapter tensor involved on the CPU in f32 or bf16.
pub fn applies(x: &Tensor, modules: &[&LoraModule]) -> bool {
    let cpu = |t: &Tensor, dtypes: &[DType]| matches!(t.device(), Device::Cpu) && dtypes.contains(&t.dtype());
    let weights = [DType::F32, DType::BF16];
    cpu(x, &[DType::F32]) && modules.iter().all(|m| cpu(&m.a_t, &weights) && cpu(&m.b_t_scaled, &weights))
}

/// The delta `[T, width]` for `x` `[T, in]`: `parts` names the modules in
/// column order with their widths; `segments` cover the rows; `pool` is
/// where the rows are split across threads.
pub fn delta(
    x: &Tensor,
    layer: usize,
    parts: &[(&str, usize)],
    segments: &[AdapterSegment],
    pool: Pool,
) -> candle_core::Result<Tensor> {
    let (rows, in_features) = x.dims2()?;
    let width: usize = parts.iter().map(|p| p.1).sum();
    let x = x.contiguous()?;

    // Per segment, the modules it adapts (tensors kept borrowed via guards).
    let mut per_segment: Vec<Vec<(&LoraModule, usize, usize)>> = Vec::with_capacity(segments.len());
    for seg in segments {
        let mut list = Vec::new();
        if let Some(adapter) = &seg.adapter {
            let mut col = 0;
            for (module, w) in parts {
                if let Some(m) = adapter.module(layer, module) {
                    list.push((m, col, *w));
                }
                col += w;
            }
        }
        per_segment.push(list);
    }
    let tensors: Vec<&Tensor> = per_segment.iter().flatten().flat_map(|(m, _, _)| [&m.a_t, &m.b_t_scaled]).collect();
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(guards.len());
    for (guard, layout) in &guards {
        let Storage::Cpu(cpu) = &**guard else {
            candle_core::bail!("grouped LoRA kernel needs CPU tensors");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("grouped LoRA kernel needs contiguous adapter tensors");
        };
        slices.push(match cpu {
            candle_core::CpuStorage::BF16(v) => Values::Bf16(bf16_bits(&v[start..end])),
            _ => Values::F32(&cpu.as_slice::<f32>()?[start..end]),
        });
    }
    let mut next = slices.into_iter();
    let mut seg_modules: Vec<Vec<ModuleSlices>> = Vec::with_capacity(segments.len());
    for list in &per_segment {
        let mut mods = Vec::with_capacity(list.len());
        for (m, col, out) in list {
            let (Some(a_t), Some(b_t)) = (next.next(), next.next()) else {
                candle_core::bail!("grouped LoRA kernel: slice bookkeeping out of step");
            };
            if a_t.len() != m.rank * in_features || b_t.len() != m.rank * out {
                candle_core::bail!("LoRA module shape does not match the projection at layer {layer}");
            }
            mods.push(ModuleSlices { a_t, b_t, rank: m.rank, out: *out, col: *col });
        }
        seg_modules.push(mods);
    }

    // Row -> segment index.
    let mut row_segment = vec![usize::MAX; rows];
    for (i, seg) in segments.iter().enumerate() {
        if seg.start + seg.len > rows {
            candle_core::bail!("adapter segment {}..{} beyond {rows} rows", seg.start, seg.start + seg.len);
        }
        row_segment[seg.start..seg.start + seg.len].fill(i);
    }

    let (x_guard, x_layout) = x.storage_and_layout();
    let Storage::Cpu(x_cpu) = &*x_guard else {
        candle_core::bail!("grouped LoRA kernel needs CPU activations");
    };
    let Some((xs, xe)) = x_layout.contiguous_offsets() else {
        candle_core::bail!("activations not contiguous");
    };
    let xs = &x_cpu.as_slice::<f32>()?[xs..xe];

    let mut out = vec![0f32; rows * width];
    let work: usize = segments
        .iter()
        .zip(&seg_modules)
        .map(|(s, mods)| s.len * mods.iter().map(|m| m.rank * (in_features + m.out)).sum::<usize>())
        .sum();
    {
        let sink = DisjointOut::new(&mut out);
        for_ranges_on(pool, rows, work, |range| {
            let mut u = Vec::new();
            let mut row = range.start;
            while row < range.end {
                let seg = row_segment[row];
                let Some(mods) = seg_modules.get(seg) else {
                    row += 1;
                    continue;
                };
                // Four rows of one adapter share each weight load (a prefill's rows).
                if row + 4 <= range.end && row_segment[row..row + 4].iter().all(|&s| s == seg) {
                    let xs: [&[f32]; 4] = std::array::from_fn(|i| &xs[(row + i) * in_features..(row + i + 1) * in_features]);
                    for m in mods {
                        // SAFETY: each task owns whole rows, and rows are disjoint.
                        let mut ys: [&mut [f32]; 4] = std::array::from_fn(|i| unsafe { sink.piece((row + i) * width + m.col, m.out) });
                        if !rows4_delta(xs, m, &mut ys) {
                            for (x_row, y) in xs.iter().zip(ys.iter_mut()) {
                                module_row_delta(x_row, m, &mut u, y);
                            }
                        }
                    }
                    row += 4;
                    continue;
                }
                let x_row = &xs[row * in_features..(row + 1) * in_features];
                for m in mods {
                    // SAFETY: each task owns whole rows, and rows are disjoint.
                    let y = unsafe { sink.piece(row * width + m.col, m.out) };
                    module_row_delta(x_row, m, &mut u, y);
                }
                row += 1;
            }
        });
    }
    drop(x_guard);
    Tensor::from_vec(out, (rows, width), &Device::Cpu)
}

/// One row's delta for a module of either precision.
fn module_row_delta(x_row: &[f32], m: &ModuleSlices<'_>, u: &mut Vec<f32>, y: &mut [f32]) {
    match (m.a_t, m.b_t) {
        (Values::F32(a_t), Values::F32(b_t)) => row_delta(x_row, a_t, b_t, m.rank, u, y),
        (Values::Bf16(a_t), Values::Bf16(b_t)) => row_delta_bf16(x_row, a_t, b_t, m.rank, u, y),
        // Mixed precisions do not occur (both come from one dtype); widen to be safe.
        (a_t, b_t) => row_delta(x_row, &widen(a_t), &widen(b_t), m.rank, u, y),
    }
}

/// Four rows' deltas in one pass over the module's weights, the same bits
/// as four [`row_delta`] calls; false where the shape has no such kernel
/// (ranks 8 and 16, widths a multiple of 8, AVX2 and FMA).
fn rows4_delta(xs: [&[f32]; 4], m: &ModuleSlices<'_>, ys: &mut [&mut [f32]; 4]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if simd::available() && m.out % 8 == 0 {
        // SAFETY: AVX2 and FMA detected; the caller checked the slices' shapes.
        unsafe {
            match (m.a_t, m.b_t, m.rank) {
                (Values::F32(a), Values::F32(b), 8) => simd::rows4::<f32, 1>(xs, a, b, ys),
                (Values::F32(a), Values::F32(b), 16) => simd::rows4::<f32, 2>(xs, a, b, ys),
                (Values::Bf16(a), Values::Bf16(b), 8) => simd::rows4::<u16, 1>(xs, a, b, ys),
                (Values::Bf16(a), Values::Bf16(b), 16) => simd::rows4::<u16, 2>(xs, a, b, ys),
                _ => return false,
            }
        }
        return true;
    }
    let _ = (xs, m, ys);
    false
}

/// bf16 values as their bits (the layout is the same: a u16 each).
fn bf16_bits(v: &[half::bf16]) -> &[u16] {
    // SAFETY: bf16 is a transparent u16.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u16, v.len()) }
}

fn widen(v: Values<'_>) -> Vec<f32> {
    match v {
        Values::F32(v) => v.to_vec(),
        Values::Bf16(v) => v.iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect(),
    }
}

/// [`row_delta`] with bf16 adapter weights, widened as they are read.
pub fn row_delta_bf16(x_row: &[f32], a_t: &[u16], b_t: &[u16], rank: usize, u: &mut Vec<f32>, y: &mut [f32]) {
    let out = y.len();
    u.clear();
    u.resize(rank, 0.0);
    #[cfg(target_arch = "x86_64")]
    if simd::available() && rank % 8 == 0 && rank <= 8 * simd::MAX_LANES {
        // SAFETY: the CPU has AVX2 and FMA (checked just above); shapes checked by the caller.
        unsafe {
            simd::shrink(x_row, a_t, u);
            for (k, &uk) in u.iter().enumerate() {
                simd::axpy(uk, &b_t[k * out..(k + 1) * out], y);
            }
        }
        return;
    }
    let w = |b: u16| half::bf16::from_bits(b).to_f32();
    for (i, &xi) in x_row.iter().enumerate() {
        for (uj, &a) in u.iter_mut().zip(&a_t[i * rank..(i + 1) * rank]) {
            *uj = xi.mul_add(w(a), *uj);
        }
    }
    for (k, &uk) in u.iter().enumerate() {
        for (yi, &b) in y.iter_mut().zip(&b_t[k * out..(k + 1) * out]) {
            *yi = uk.mul_add(w(b), *yi);
        }
    }
}

/// One row's delta, `y += (xᵀ Aᵀ) (s·Bᵀ)` for `Aᵀ` `[in, rank]` and
/// `s·Bᵀ` `[rank, y.len()]`; `u` is scratch. Serving and training both
/// compute deltas here, so an adapter's logits in training are serving's
/// to the bit.
#[inline]
pub fn row_delta(x_row: &[f32], a_t: &[f32], b_t: &[f32], rank: usize, u: &mut Vec<f32>, y: &mut [f32]) {
    let out = y.len();
    u.clear();
    u.resize(rank, 0.0);
    shrink(x_row, a_t, u);
    for (k, &uk) in u.iter().enumerate() {
        axpy(uk, &b_t[k * out..(k + 1) * out], y);
    }
}

/// `u = xᵀ Aᵀ` for `Aᵀ` `[x.len(), u.len()]`, summed over `x` in order.
#[inline]
fn shrink(x: &[f32], a_t: &[f32], u: &mut [f32]) {
    let r = u.len();
    #[cfg(target_arch = "x86_64")]
    if simd::available() && r % 8 == 0 && r <= 8 * simd::MAX_LANES {
        // SAFETY: the CPU has AVX2 and FMA (checked just above); shapes checked by the caller.
        return unsafe { simd::shrink(x, a_t, u) };
    }
    for (i, &xi) in x.iter().enumerate() {
        axpy(xi, &a_t[i * r..(i + 1) * r], u);
    }
}

/// `y += alpha · x`.
#[inline]
fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd::available() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { simd::axpy(alpha, x, y) };
    }
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

/// AVX2 + FMA versions, chosen at run time so one binary serves any x86-64.
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    pub fn available() -> bool {
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        *AVAILABLE.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }

    /// Registers of eight accumulators [`shrink`] keeps live: ranks up to 64.
    pub const MAX_LANES: usize = 8;

    /// `u = xᵀ Aᵀ` with `u` held in registers; the same per-output order
    /// (sequential FMA over `x`) as the portable loop, so results agree.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn shrink<E: Lanes>(x: &[f32], a_t: &[E], u: &mut [f32]) {
        let r = u.len();
        let lanes = r / 8;
        debug_assert!(r % 8 == 0 && lanes <= MAX_LANES && a_t.len() >= x.len() * r);
        let mut acc = [_mm256_setzero_ps(); MAX_LANES];
        let pa = a_t.as_ptr();
        for (i, &xi) in x.iter().enumerate() {
            let vx = _mm256_set1_ps(xi);
            let row = pa.add(i * r);
            for (j, a) in acc.iter_mut().enumerate().take(lanes) {
                *a = _mm256_fmadd_ps(vx, E::load8(row.add(8 * j)), *a);
            }
        }
        for (j, a) in acc.iter().enumerate().take(lanes) {
            _mm256_storeu_ps(u.as_mut_ptr().add(8 * j), *a);
        }
    }

    /// Eight values of an adapter tensor, as f32.
    pub trait Lanes: Copy {
        /// # Safety
        /// Eight values must be readable at `p`, and the CPU must have AVX2.
        unsafe fn load8(p: *const Self) -> __m256;

        /// `y + alpha · x` for one value past the last full vector.
        fn tail(alpha: f32, x: Self, y: f32) -> f32;
    }

    impl Lanes for f32 {
        #[inline(always)]
        unsafe fn load8(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }

        fn tail(alpha: f32, x: f32, y: f32) -> f32 {
            y + alpha * x
        }
    }

    impl Lanes for u16 {
        #[inline(always)]
        unsafe fn load8(p: *const u16) -> __m256 {
            load_bf16(p)
        }

        fn tail(alpha: f32, x: u16, y: f32) -> f32 {
            alpha.mul_add(half::bf16::from_bits(x).to_f32(), y)
        }
    }

    /// Four rows through a rank-`8·L` module: `Aᵀ` rows loaded once for
    /// the four shrinks, `s·Bᵀ` rows once for the four expansions; each
    /// output's FMAs in [`shrink`]'s and [`axpy`]'s order.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn rows4<E: Lanes, const L: usize>(xs: [&[f32]; 4], a_t: &[E], b_t: &[E], ys: &mut [&mut [f32]; 4]) {
        let rank = 8 * L;
        let (n_in, out) = (xs[0].len(), ys[0].len());
        debug_assert!(a_t.len() >= n_in * rank && b_t.len() >= rank * out && out % 8 == 0);
        let mut acc = [[_mm256_setzero_ps(); L]; 4];
        let pa = a_t.as_ptr();
        for i in 0..n_in {
            let row = pa.add(i * rank);
            let a: [__m256; L] = std::array::from_fn(|j| E::load8(row.add(8 * j)));
            for r in 0..4 {
                let vx = _mm256_set1_ps(*xs[r].get_unchecked(i));
                for j in 0..L {
                    acc[r][j] = _mm256_fmadd_ps(vx, a[j], acc[r][j]);
                }
            }
        }
        let mut u = [[0f32; 16]; 4];
        for r in 0..4 {
            for j in 0..L {
                _mm256_storeu_ps(u[r].as_mut_ptr().add(8 * j), acc[r][j]);
            }
        }
        let pb = b_t.as_ptr();
        let mut c = 0;
        while c < out {
            let mut y: [__m256; 4] = std::array::from_fn(|r| _mm256_loadu_ps(ys[r].as_ptr().add(c)));
            for k in 0..rank {
                let b = E::load8(pb.add(k * out + c));
                for r in 0..4 {
                    y[r] = _mm256_fmadd_ps(_mm256_set1_ps(u[r][k]), b, y[r]);
                }
            }
            for r in 0..4 {
                _mm256_storeu_ps(ys[r].as_mut_ptr().add(c), y[r]);
            }
            c += 8;
        }
    }

    /// Eight bf16 values widened to f32.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load_bf16(p: *const u16) -> __m256 {
        let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
        _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16))
    }

    /// `y += alpha · x`, eight lanes at a time.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy<E: Lanes>(alpha: f32, x: &[E], y: &mut [f32]) {
        let n = x.len().min(y.len());
        let (px, py) = (x.as_ptr(), y.as_mut_ptr());
        let va = _mm256_set1_ps(alpha);
        let mut i = 0;
        while i + 8 <= n {
            let v = _mm256_fmadd_ps(va, E::load8(px.add(i)), _mm256_loadu_ps(py.add(i)));
            _mm256_storeu_ps(py.add(i), v);
            i += 8;
        }
        while i < n {
            *py.add(i) = E::tail(alpha, *px.add(i), *py.add(i));
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| (((i * 7919 + seed * 104729) % 2001) as f32 - 1000.0) / 1500.0).collect()
    }

    #[test]
    fn four_rows_at_once_give_the_bits_of_four_single_rows() {
        let (n_in, out) = (40, 24);
        for rank in [8, 16] {
            let (a32, b32) = (values(n_in * rank, 1), values(rank * out, 2));
            let (a16, b16): (Vec<u16>, Vec<u16>) = (
                a32.iter().map(|v| half::bf16::from_f32(*v).to_bits()).collect(),
                b32.iter().map(|v| half::bf16::from_f32(*v).to_bits()).collect(),
            );
            for (a_t, b_t) in [(Values::F32(&a32), Values::F32(&b32)), (Values::Bf16(&a16), Values::Bf16(&b16))] {
                let m = ModuleSlices { a_t, b_t, rank, out, col: 0 };
                let x = values(4 * n_in, 3);
                let xs: [&[f32]; 4] = std::array::from_fn(|i| &x[i * n_in..(i + 1) * n_in]);
                let start = values(4 * out, 4);
                let mut together = start.clone();
                let (mut u, mut alone) = (Vec::new(), start);
                for (i, x_row) in xs.iter().enumerate() {
                    module_row_delta(x_row, &m, &mut u, &mut alone[i * out..(i + 1) * out]);
                }
                let mut ys: Vec<&mut [f32]> = together.chunks_exact_mut(out).collect();
                let mut ys: [&mut [f32]; 4] = std::array::from_fn(|_| ys.remove(0));
                let ran = rows4_delta(xs, &m, &mut ys);
                #[cfg(target_arch = "x86_64")]
                assert!(ran || !simd::available(), "the four-row kernel runs wherever AVX2 does");
                if ran {
                    assert_eq!(together, alone, "rank {rank}");
                }
            }
        }
    }
}
