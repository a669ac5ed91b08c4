//! A frozen f32 weight stored pre-packed for our CPU matmul kernel.
//!
//! A general gemm packs its right-hand side on every call; for a decode
//! step of 32 rows that repacking of the weights costs a quarter of the
//! step (measured on the 110M shape). The base model's weights never
//! change, so they are packed once at load: panels of [`NR`] output rows,
//! interleaved along the input dimension, each panel 64-byte aligned. The
//! kernel then streams a panel straight into registers and broadcasts the
//! activations, accumulating every output in input order: one row's result
//! does not depend on which other rows share the batch.

use super::parallel::{for_ranges, DisjointOut};

/// Output rows per panel (two 8-lane vectors).
pub const NR: usize = 16;
/// Activation rows per register tile.
const MR: usize = 6;
/// Bytes of activations kept cache-resident per pass over the panels.
const X_BLOCK_BYTES: usize = 512 * 1024;

/// A `(rows, cols)` f32 weight (`[out, in]`) in panel layout.
#[derive(Debug, Clone)]
pub struct PackedMatrix {
    rows: usize,
    cols: usize,
    /// Panels back to back from `offset`; panel `p` holds element
    /// `(p·NR + j, k)` at `offset + (p·cols + k)·NR + j`, zero past `rows`.
    data: Vec<f32>,
    offset: usize,
}

impl PackedMatrix {
    /// Packs a row-major `[rows, cols]` weight.
    pub fn pack(w: &[f32], rows: usize, cols: usize) -> Option<Self> {
        if w.len() != rows.checked_mul(cols)? {
            return None;
        }
        let panels = rows.div_ceil(NR);
        let len = panels * cols * NR;
        // Over-allocate by one cache line to align the first panel.
        let mut data = vec![0f32; len + 16];
        let offset = (16 - (data.as_ptr() as usize / 4) % 16) % 16;
        for p in 0..panels {
            let base = offset + p * cols * NR;
            for j in 0..NR.min(rows - p * NR) {
                let src = &w[(p * NR + j) * cols..(p * NR + j + 1) * cols];
                for (k, &v) in src.iter().enumerate() {
                    data[base + k * NR + j] = v;
                }
            }
        }
        Some(PackedMatrix { rows, cols, data, offset })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held (the padding of the last panel included).
    pub fn bytes(&self) -> usize {
        self.data.len() * 4
    }

    fn panels(&self) -> &[f32] {
        &self.data[self.offset..]
    }

    /// Rows `start..start + len` back in row-major order (the learner's
    /// backward tiles, merges, tests).
    pub fn unpack_rows(&self, start: usize, len: usize) -> Option<Vec<f32>> {
        if start.checked_add(len)? > self.rows {
            return None;
        }
        let panels = self.panels();
        let mut out = vec![0f32; len * self.cols];
        for (i, row) in out.chunks_exact_mut(self.cols).enumerate() {
            let r = start + i;
            let base = (r / NR) * self.cols * NR + r % NR;
            for (k, v) in row.iter_mut().enumerate() {
                *v = panels[base + k * NR];
            }
        }
        Some(out)
    }

    /// Rows picked by id (an embedding lookup on a tied table).
    pub fn gather_rows(&self, ids: &[u32]) -> Option<Vec<f32>> {
        let mut out = Vec::with_capacity(ids.len() * self.cols);
        for &id in ids {
            out.extend(self.unpack_rows(id as usize, 1)?);
        }
        Some(out)
    }

    /// `y = x Wᵀ` for `x` of `m` rows (`[m, cols]` row-major): `[m, rows]`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.cols, "activation shape");
        let k = self.cols;
        let panels = self.panels();
        panel_matmul::<NR, MR>(m, self.rows, 4 * k, m * self.rows * k, |i, rows, p, tile| {
            tile_product(&x[i * k..(i + rows) * k], k, rows, &panels[p * k * NR..(p + 1) * k * NR], tile)
        })
    }
}

/// The loop both packed kernels share: `[m, n]` outputs computed as
/// register tiles of up to `TMR` rows × one `TNR`-row panel by
/// `tile(first row, rows, panel, out)`. Panels are split across threads
/// (each task owns its panels' output columns); activation rows go in
/// blocks of `x_row_bytes` each that stay cache-resident across panels.
pub(super) fn panel_matmul<const TNR: usize, const TMR: usize>(
    m: usize,
    n: usize,
    x_row_bytes: usize,
    work: usize,
    tile: impl Fn(usize, usize, usize, &mut [[f32; TNR]; TMR]) + Sync,
) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    if m == 0 || n == 0 {
        return y;
    }
    let block_rows = (X_BLOCK_BYTES / x_row_bytes.max(1)).max(TMR) / TMR * TMR;
    {
        let out = DisjointOut::new(&mut y);
        for_ranges(n.div_ceil(TNR), work, |range| {
            let mut m0 = 0;
            while m0 < m {
                let m1 = (m0 + block_rows).min(m);
                for p in range.clone() {
                    let cols = TNR.min(n - p * TNR);
                    let mut i = m0;
                    while i < m1 {
                        let rows = TMR.min(m1 - i);
                        let mut t = [[0f32; TNR]; TMR];
                        tile(i, rows, p, &mut t);
                        for (r, t) in t.iter().take(rows).enumerate() {
                            // SAFETY: columns p·TNR.. of every row belong to this task alone.
                            let dst = unsafe { out.piece((i + r) * n + p * TNR, cols) };
                            dst.copy_from_slice(&t[..cols]);
                        }
                        i += rows;
                    }
                }
                m0 = m1;
            }
        });
    }
    y
}

/// `tile[r][j] = Σ_k x[r][k] · panel[k][j]` for `rows ≤ MR` activation rows.
fn tile_product(x: &[f32], k: usize, rows: usize, panel: &[f32], tile: &mut [[f32; NR]; MR]) {
    #[cfg(target_arch = "x86_64")]
    {
        if simd_available() {
            // SAFETY: AVX2 and FMA detected; slices hold rows·k and k·NR values.
            unsafe {
                match rows {
                    6 => avx2::tile::<6>(x, k, panel, tile),
                    5 => avx2::tile::<5>(x, k, panel, tile),
                    4 => avx2::tile::<4>(x, k, panel, tile),
                    3 => avx2::tile::<3>(x, k, panel, tile),
                    2 => avx2::tile::<2>(x, k, panel, tile),
                    _ => avx2::tile::<1>(x, k, panel, tile),
                }
            }
            return;
        }
    }
    for (r, out) in tile.iter_mut().take(rows).enumerate() {
        let xr = &x[r * k..(r + 1) * k];
        for (kk, &a) in xr.iter().enumerate() {
            let b = &panel[kk * NR..(kk + 1) * NR];
            for (o, &w) in out.iter_mut().zip(b) {
                *o = a.mul_add(w, *o);
            }
        }
    }
}

/// AVX2 and FMA, detected once.
#[cfg(target_arch = "x86_64")]
fn simd_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    })
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// The register tile: `R` rows × 16 columns in `2·R` accumulators,
    /// one FMA per (row, half-panel) per input element.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile<const R: usize>(x: &[f32], k: usize, panel: &[f32], tile: &mut [[f32; NR]; MR]) {
        debug_assert!(x.len() >= R * k && panel.len() >= k * NR);
        let mut lo = [_mm256_setzero_ps(); R];
        let mut hi = [_mm256_setzero_ps(); R];
        let xp = x.as_ptr();
        let bp = panel.as_ptr();
        for kk in 0..k {
            let b0 = _mm256_loadu_ps(bp.add(kk * NR));
            let b1 = _mm256_loadu_ps(bp.add(kk * NR + 8));
            for r in 0..R {
                let a = _mm256_broadcast_ss(&*xp.add(r * k + kk));
                lo[r] = _mm256_fmadd_ps(a, b0, lo[r]);
                hi[r] = _mm256_fmadd_ps(a, b1, hi[r]);
            }
        }
        for r in 0..R {
            _mm256_storeu_ps(tile[r].as_mut_ptr(), lo[r]);
            _mm256_storeu_ps(tile[r].as_mut_ptr().add(8), hi[r]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(rows: usize, cols: usize) -> Vec<f32> {
        (0..rows * cols).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 997.0).collect()
    }

    fn reference(w: &[f32], x: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0f32;
                for kk in 0..k {
                    acc = x[i * k + kk].mul_add(w[j * k + kk], acc);
                }
                y[i * n + j] = acc;
            }
        }
        y
    }

    #[test]
    fn the_product_is_each_output_summed_in_input_order_whatever_the_shape() {
        for &(m, n, k) in &[(1, 1, 1), (7, 19, 33), (32, 48, 64), (13, 16, 300), (200, 35, 70)] {
            let w = weights(n, k);
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 31 % 97) as f32 - 48.0) / 50.0).collect();
            let packed = PackedMatrix::pack(&w, n, k).expect("pack");
            assert_eq!(packed.matmul(&x, m), reference(&w, &x, m, n, k), "m={m} n={n} k={k}");
        }
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_or_in_a_batch() {
        let (n, k) = (40, 96);
        let packed = PackedMatrix::pack(&weights(n, k), n, k).expect("pack");
        let x: Vec<f32> = (0..9 * k).map(|i| (i as f32).sin()).collect();
        let batch = packed.matmul(&x, 9);
        for i in 0..9 {
            assert_eq!(packed.matmul(&x[i * k..(i + 1) * k], 1), batch[i * n..(i + 1) * n]);
        }
    }

    #[test]
    fn unpacking_and_gathering_give_back_the_rows() {
        let (n, k) = (37, 11);
        let w = weights(n, k);
        let packed = PackedMatrix::pack(&w, n, k).expect("pack");
        assert_eq!(packed.unpack_rows(0, n).expect("all"), w);
        assert_eq!(packed.gather_rows(&[36, 3]).expect("ids"), [&w[36 * k..], &w[3 * k..4 * k]].concat());
        assert!(packed.unpack_rows(30, 8).is_none());
        assert!(packed.gather_rows(&[37]).is_none());
        assert!(PackedMatrix::pack(&w, n, k + 1).is_none());
    }
}
