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

/// One adapted module of one segment, borrowed as plain slices.
struct ModuleSlices<'a> {
    /// `Aᵀ`, `[in, r]`.
    a_t: &'a [f32],
    /// `s·Bᵀ`, `[r, out]`.
    b_t: &'a [f32],
    rank: usize,
    out: usize,
    /// Where the module's columns start in the delta.
    col: usize,
}

/// Whether the kernel can run: f32 on the CPU for activations and every
/// adapter tensor involved.
pub fn applies(x: &Tensor, modules: &[&LoraModule]) -> bool {
    let cpu_f32 = |t: &Tensor| matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32;
    cpu_f32(x) && modules.iter().all(|m| cpu_f32(&m.a_t) && cpu_f32(&m.b_t_scaled))
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
        slices.push(&cpu.as_slice::<f32>()?[start..end]);
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
            for row in range {
                let Some(mods) = seg_modules.get(row_segment[row]) else { continue };
                let x_row = &xs[row * in_features..(row + 1) * in_features];
                for m in mods {
                    // SAFETY: each task owns whole rows, and rows are disjoint.
                    let y = unsafe { sink.piece(row * width + m.col, m.out) };
                    row_delta(x_row, m.a_t, m.b_t, m.rank, &mut u, y);
                }
            }
        });
    }
    drop(x_guard);
    Tensor::from_vec(out, (rows, width), &Device::Cpu)
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
    pub unsafe fn shrink(x: &[f32], a_t: &[f32], u: &mut [f32]) {
        let r = u.len();
        let lanes = r / 8;
        debug_assert!(r % 8 == 0 && lanes <= MAX_LANES && a_t.len() >= x.len() * r);
        let mut acc = [_mm256_setzero_ps(); MAX_LANES];
        let pa = a_t.as_ptr();
        for (i, &xi) in x.iter().enumerate() {
            let vx = _mm256_set1_ps(xi);
            let row = pa.add(i * r);
            for (j, a) in acc.iter_mut().enumerate().take(lanes) {
                *a = _mm256_fmadd_ps(vx, _mm256_loadu_ps(row.add(8 * j)), *a);
            }
        }
        for (j, a) in acc.iter().enumerate().take(lanes) {
            _mm256_storeu_ps(u.as_mut_ptr().add(8 * j), *a);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len().min(y.len());
        let (px, py) = (x.as_ptr(), y.as_mut_ptr());
        let va = _mm256_set1_ps(alpha);
        let mut i = 0;
        while i + 8 <= n {
            let v = _mm256_fmadd_ps(va, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i)));
            _mm256_storeu_ps(py.add(i), v);
            i += 8;
        }
        while i < n {
            *py.add(i) += alpha * *px.add(i);
            i += 1;
        }
    }
}
