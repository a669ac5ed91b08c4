//! A frozen bf16 weight packed for the CPU's bf16 dot-product instruction
//! (AVX-512 BF16, `vdpbf16ps`).
//!
//! Most checkpoints ship in bf16. Widening them to f32 doubles their memory
//! and the bytes a decode step streams; running candle's bf16 ops on the CPU
//! is slower still. Where the CPU has bf16 dot products, the weights stay
//! bf16, each matmul's input rows are rounded to bf16 (round to nearest
//! even) and the products are summed in f32: one instruction does 32
//! multiply-adds, four times the f32 kernel's rate on this project's
//! machine. Everything between matmuls stays f32.
//!
//! Layout: panels of [`NR`] output rows; within a panel, input pairs
//! `(2p, 2p+1)` of every row sit side by side, so one 64-byte load feeds 16
//! rows' pairs, and an activation pair broadcasts as one 32-bit value.

use half::bf16;

use super::packed_matrix::panel_matmul;
use super::parallel::for_ranges;

/// Output rows per panel (two 16-lane vectors).
pub const NR: usize = 32;
/// Activation rows per register tile.
const MR: usize = 12;

/// Whether this CPU runs the bf16 kernel (AVX-512 F, BW and BF16).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A `(rows, cols)` bf16 weight (`[out, in]`) in panel layout.
#[derive(Debug, Clone)]
pub struct PackedBf16Matrix {
    rows: usize,
    cols: usize,
    /// Input pairs per row (`cols` rounded up to even, halved).
    pairs: usize,
    /// Panel `p`, pair `q`, row `j`: the two values at
    /// `offset + ((p·pairs + q)·NR + j)·2`, zero past `rows` and `cols`.
    data: Vec<u16>,
    offset: usize,
}

impl PackedBf16Matrix {
    /// Packs a row-major `[rows, cols]` bf16 weight.
    pub fn pack(w: &[bf16], rows: usize, cols: usize) -> Option<Self> {
        if w.len() != rows.checked_mul(cols)? {
            return None;
        }
        let pairs = cols.div_ceil(2);
        let panels = rows.div_ceil(NR);
        let len = panels * pairs * NR * 2;
        // Over-allocate by one cache line to align the first panel.
        let mut data = vec![0u16; len + 32];
        let offset = (32 - (data.as_ptr() as usize / 2) % 32) % 32;
        for r in 0..rows {
            let (p, j) = (r / NR, r % NR);
            for (k, v) in w[r * cols..(r + 1) * cols].iter().enumerate() {
                data[offset + ((p * pairs + k / 2) * NR + j) * 2 + k % 2] = v.to_bits();
            }
        }
        Some(PackedBf16Matrix { rows, cols, pairs, data, offset })
    }

    /// Packs the transpose of a row-major f32 `[len, cols]` tile, rounded
    /// to bf16: a `(cols, len)` matrix whose product with `g` `[T, len]` is
    /// `g · tile`. The learner's backward pass through a frozen projection
    /// (`dL/dx = dL/dy · W`) runs on the bf16 kernel this way, a tile of
    /// dequantized rows at a time, with no lasting copy of the weight.
    pub fn pack_transposed(tile: &[f32], len: usize, cols: usize) -> Option<Self> {
        if tile.len() != len.checked_mul(cols)? {
            return None;
        }
        Self::pack_transposed_with(len, cols, |start, end| Some(tile[start * cols..end * cols].to_vec()))
    }

    /// [`Self::pack_transposed`] of a tile whose rows `start..end` come
    /// from `rows(start, end)` (dequantized on the fly), in parallel: each
    /// task takes whole input pairs, so no two write the same cache line.
    pub fn pack_transposed_with(
        len: usize,
        cols: usize,
        rows: impl Fn(usize, usize) -> Option<Vec<f32>> + Sync,
    ) -> Option<Self> {
        let (n, k) = (cols, len);
        let pairs = k.div_ceil(2);
        let panels = n.div_ceil(NR);
        let mut data = vec![0u16; panels * pairs * NR * 2 + 32];
        let offset = (32 - (data.as_ptr() as usize / 2) % 32) % 32;
        let failed = std::sync::atomic::AtomicBool::new(false);
        {
            let base = SharedU16(data[offset..].as_mut_ptr());
            for_ranges(pairs, k * n, |range| {
                let (start, end) = (2 * range.start, (2 * range.end).min(k));
                let Some(src) = rows(start, end).filter(|v| v.len() == (end - start) * n) else {
                    failed.store(true, std::sync::atomic::Ordering::Relaxed);
                    return;
                };
                for (i, row) in src.chunks_exact(n).enumerate() {
                    let kk = start + i;
                    for (r, v) in row.iter().enumerate() {
                        let (p, j) = (r / NR, r % NR);
                        // SAFETY: index within the panels; pair kk/2 belongs to this task alone.
                        unsafe { base.write(((p * pairs + kk / 2) * NR + j) * 2 + kk % 2, bf16::from_f32(*v).to_bits()) };
                    }
                }
            });
        }
        if failed.into_inner() {
            return None;
        }
        Some(PackedBf16Matrix { rows: n, cols: k, pairs, data, offset })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held (padding included).
    pub fn bytes(&self) -> usize {
        self.data.len() * 2
    }

    fn panels(&self) -> &[u16] {
        &self.data[self.offset..]
    }

    /// Rows `start..start + len` widened to f32, row-major (backward tiles,
    /// merges, embedding lookups of a tied table).
    pub fn unpack_rows(&self, start: usize, len: usize) -> Option<Vec<f32>> {
        if start.checked_add(len)? > self.rows {
            return None;
        }
        let panels = self.panels();
        let mut out = vec![0f32; len * self.cols];
        for (i, row) in out.chunks_exact_mut(self.cols).enumerate() {
            let r = start + i;
            let (p, j) = (r / NR, r % NR);
            for (k, v) in row.iter_mut().enumerate() {
                *v = bf16::from_bits(panels[((p * self.pairs + k / 2) * NR + j) * 2 + k % 2]).to_f32();
            }
        }
        Some(out)
    }

    /// Rows picked by id, widened to f32.
    pub fn gather_rows(&self, ids: &[u32]) -> Option<Vec<f32>> {
        let mut out = Vec::with_capacity(ids.len() * self.cols);
        for &id in ids {
            out.extend(self.unpack_rows(id as usize, 1)?);
        }
        Some(out)
    }

    /// `y = bf16(x) · Wᵀ` summed in f32, for `x` of `m` rows (`[m, cols]`).
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.cols, "activation shape");
        if m == 0 || self.rows == 0 {
            return vec![0f32; m * self.rows];
        }
        let q = self.pairs;
        let xb = to_bf16_pairs(x, m, self.cols, q);
        let panels = self.panels();
        panel_matmul::<NR, MR>(m, self.rows, 4 * q, m * self.rows * self.cols / 4, |i, rows, p, tile| {
            tile_product(&xb[i * q..(i + rows) * q], q, rows, &panels[p * q * NR * 2..(p + 1) * q * NR * 2], tile)
        })
    }
}

/// A u16 buffer tasks write at disjoint indices.
struct SharedU16(*mut u16);

// SAFETY: writers touch disjoint indices (see `pack_transposed_with`).
unsafe impl Sync for SharedU16 {}

impl SharedU16 {
    /// # Safety
    /// `i` is in bounds and no other task writes it.
    unsafe fn write(&self, i: usize, v: u16) {
        *self.0.add(i) = v;
    }
}

/// Rows of `x` rounded to bf16 (nearest even), each row padded to `pairs`
/// pairs, a pair as one u32 (even element in the low half).
fn to_bf16_pairs(x: &[f32], m: usize, cols: usize, pairs: usize) -> Vec<u32> {
    let mut out = vec![0u32; m * pairs];
    for (src, dst) in x.chunks_exact(cols).zip(out.chunks_exact_mut(pairs)) {
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if available() {
            // SAFETY: AVX-512 BF16 detected; both slices hold at least `done` values.
            done = unsafe { avx512::to_bf16(src, dst) };
        }
        for (k, v) in src.iter().enumerate().skip(done) {
            dst[k / 2] |= (bf16::from_f32(*v).to_bits() as u32) << (16 * (k % 2));
        }
    }
    out
}

/// `tile[r][j] = Σ_q x[r][q] · panel[q][j]` over bf16 pairs, for `rows ≤ MR`.
fn tile_product(xb: &[u32], q: usize, rows: usize, panel: &[u16], tile: &mut [[f32; NR]; MR]) {
    #[cfg(target_arch = "x86_64")]
    {
        if available() {
            // SAFETY: AVX-512 BF16 detected; slices hold rows·q pairs and q·NR pairs.
            unsafe {
                match rows {
                    12 => avx512::tile::<12>(xb, q, panel, tile),
                    11 => avx512::tile::<11>(xb, q, panel, tile),
                    10 => avx512::tile::<10>(xb, q, panel, tile),
                    9 => avx512::tile::<9>(xb, q, panel, tile),
                    8 => avx512::tile::<8>(xb, q, panel, tile),
                    7 => avx512::tile::<7>(xb, q, panel, tile),
                    6 => avx512::tile::<6>(xb, q, panel, tile),
                    5 => avx512::tile::<5>(xb, q, panel, tile),
                    4 => avx512::tile::<4>(xb, q, panel, tile),
                    3 => avx512::tile::<3>(xb, q, panel, tile),
                    2 => avx512::tile::<2>(xb, q, panel, tile),
                    _ => avx512::tile::<1>(xb, q, panel, tile),
                }
            }
            return;
        }
    }
    tile_portable(xb, q, rows, panel, tile);
}

/// The instruction's arithmetic without it: exact bf16 products, the odd
/// element's added first, each addition rounded to f32.
fn tile_portable(xb: &[u32], q: usize, rows: usize, panel: &[u16], tile: &mut [[f32; NR]; MR]) {
    let widen = |b: u16| bf16::from_bits(b).to_f32();
    for (r, out) in tile.iter_mut().take(rows).enumerate() {
        for (qq, &pair) in xb[r * q..(r + 1) * q].iter().enumerate() {
            let (x0, x1) = (widen(pair as u16), widen((pair >> 16) as u16));
            let w = &panel[qq * NR * 2..(qq + 1) * NR * 2];
            for (j, o) in out.iter_mut().enumerate() {
                *o += x1 * widen(w[2 * j + 1]);
                *o += x0 * widen(w[2 * j]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// Rounds the leading multiple of 32 values of `src` to bf16 pairs in
    /// `dst` (nearest even, branch-free); returns how many it did.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn to_bf16(src: &[f32], dst: &mut [u32]) -> usize {
        let n = src.len() / 32 * 32;
        debug_assert!(dst.len() * 2 >= n);
        let (ps, pd) = (src.as_ptr(), dst.as_mut_ptr());
        let mut i = 0;
        while i < n {
            let lo = _mm512_loadu_ps(ps.add(i));
            let hi = _mm512_loadu_ps(ps.add(i + 16));
            // The second operand fills the low half: element order is kept.
            let packed: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(pd.add(i / 2) as *mut _, packed);
            i += 32;
        }
        n
    }

    /// The register tile: `R` rows × 32 columns in `2·R` accumulators.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn tile<const R: usize>(xb: &[u32], q: usize, panel: &[u16], tile: &mut [[f32; NR]; MR]) {
        debug_assert!(xb.len() >= R * q && panel.len() >= q * NR * 2);
        let mut lo = [_mm512_setzero_ps(); R];
        let mut hi = [_mm512_setzero_ps(); R];
        let xp = xb.as_ptr();
        let bp = panel.as_ptr();
        for qq in 0..q {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(qq * NR * 2) as *const _));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(qq * NR * 2 + NR) as *const _));
            for r in 0..R {
                let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(*xp.add(r * q + qq) as i32));
                lo[r] = _mm512_dpbf16_ps(lo[r], a, b0);
                hi[r] = _mm512_dpbf16_ps(hi[r], a, b1);
            }
        }
        for r in 0..R {
            _mm512_storeu_ps(tile[r].as_mut_ptr(), lo[r]);
            _mm512_storeu_ps(tile[r].as_mut_ptr().add(16), hi[r]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(rows: usize, cols: usize) -> Vec<bf16> {
        (0..rows * cols)
            .map(|i| bf16::from_f32(((i * 7919 % 1000) as f32 - 500.0) / 997.0))
            .collect()
    }

    /// bf16-rounded inputs times bf16 weights, summed in f64.
    fn reference(w: &[bf16], x: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k)
                    .map(|kk| bf16::from_f32(x[i * k + kk]).to_f64() * w[j * k + kk].to_f64())
                    .sum();
            }
        }
        y
    }

    #[test]
    fn the_product_rounds_inputs_to_bf16_and_sums_in_f32_whatever_the_shape() {
        for &(m, n, k) in &[(1, 1, 1), (7, 19, 33), (32, 64, 64), (13, 40, 301), (30, 35, 70)] {
            let w = weights(n, k);
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 31 % 97) as f32 - 48.0) / 50.0).collect();
            let packed = PackedBf16Matrix::pack(&w, n, k).expect("pack");
            let y = packed.matmul(&x, m);
            for (a, b) in y.iter().zip(reference(&w, &x, m, n, k)) {
                assert!((*a as f64 - b).abs() <= 1e-5 * (k as f64).sqrt() * b.abs().max(1.0), "m={m} n={n} k={k}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn the_portable_arithmetic_is_the_instruction_s() {
        let (n, k) = (NR, 200);
        let packed = PackedBf16Matrix::pack(&weights(n, k), n, k).expect("pack");
        let x: Vec<f32> = (0..MR * k).map(|i| (i as f32 * 0.37).cos() * 3.0).collect();
        let xb = to_bf16_pairs(&x, MR, k, packed.pairs);
        let (mut fast, mut portable) = ([[0f32; NR]; MR], [[0f32; NR]; MR]);
        tile_product(&xb, packed.pairs, MR, packed.panels(), &mut fast);
        tile_portable(&xb, packed.pairs, MR, packed.panels(), &mut portable);
        for (a, b) in fast.iter().flatten().zip(portable.iter().flatten()) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
        }
    }

    #[test]
    fn inputs_round_to_the_nearest_even_bf16_in_pairs() {
        let cols = 75; // two vector blocks and a scalar tail
        let x: Vec<f32> = (0..2 * cols).map(|i| (i as f32 * 1.7).sin() * 10f32.powi(i as i32 % 7 - 3)).collect();
        let pairs = to_bf16_pairs(&x, 2, cols, cols.div_ceil(2));
        for (r, row) in x.chunks_exact(cols).enumerate() {
            for (k, v) in row.iter().enumerate() {
                let got = (pairs[r * cols.div_ceil(2) + k / 2] >> (16 * (k % 2))) as u16;
                assert_eq!(got, bf16::from_f32(*v).to_bits(), "row {r} col {k}");
            }
        }
        assert_eq!(pairs[cols.div_ceil(2) - 1] >> 16, 0, "the odd column's pair is padded with zero");
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_or_in_a_batch() {
        let (n, k) = (40, 96);
        let packed = PackedBf16Matrix::pack(&weights(n, k), n, k).expect("pack");
        let x: Vec<f32> = (0..25 * k).map(|i| (i as f32).sin()).collect();
        let batch = packed.matmul(&x, 25);
        for i in 0..25 {
            assert_eq!(packed.matmul(&x[i * k..(i + 1) * k], 1), batch[i * n..(i + 1) * n]);
        }
    }

    #[test]
    fn a_transposed_tile_multiplies_from_the_left() {
        let (len, cols, t) = (45, 70, 9);
        let w: Vec<f32> = weights(len, cols).iter().map(|v| v.to_f32()).collect();
        let packed = PackedBf16Matrix::pack_transposed(&w, len, cols).expect("pack");
        assert_eq!((packed.rows(), packed.cols()), (cols, len));
        let g: Vec<f32> = (0..t * len).map(|i| (i as f32 * 0.3).sin()).collect();
        let y = packed.matmul(&g, t);
        for i in 0..t {
            for c in 0..cols {
                let want: f64 = (0..len).map(|k| bf16::from_f32(g[i * len + k]).to_f64() * w[k * cols + c] as f64).sum();
                assert!((y[i * cols + c] as f64 - want).abs() < 1e-4 * want.abs().max(1.0), "{i},{c}");
            }
        }
    }

    #[test]
    fn unpacking_and_gathering_give_back_the_rows() {
        let (n, k) = (37, 11);
        let w = weights(n, k);
        let wide: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
        let packed = PackedBf16Matrix::pack(&w, n, k).expect("pack");
        assert_eq!(packed.unpack_rows(0, n).expect("all"), wide);
        assert_eq!(packed.gather_rows(&[36, 3]).expect("ids"), [&wide[36 * k..], &wide[3 * k..4 * k]].concat());
        assert!(packed.unpack_rows(30, 8).is_none());
        assert!(PackedBf16Matrix::pack(&w, n, k + 1).is_none());
    }
}
