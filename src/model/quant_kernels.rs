//! Quantized matrix × f32 activations for GGUF weights (Q4_0, Q4_1, Q8_0),
//! with llama.cpp's numerics: activations are quantized per 32-block to
//! Q8_0/Q8_1 exactly as ggml does (scale 127/amax, round half to even),
//! block dot products are exact integer sums scaled and accumulated in
//! the same order as ggml's AVX2 code. A small model amplifies tiny
//! rounding differences, so matching the reference server needs this.
//! Other quant types go through candle's quantized matmul.

use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;
use super::parallel::{for_ranges, DisjointOut};

/// Elements per block for every type here.
const QK: usize = 32;

/// The weight formats with native kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantKind {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl QuantKind {
    fn from_ggml(d: GgmlDType) -> Option<Self> {
        match d {
            GgmlDType::Q4_0 => Some(QuantKind::Q4_0),
            GgmlDType::Q4_1 => Some(QuantKind::Q4_1),
            GgmlDType::Q8_0 => Some(QuantKind::Q8_0),
            _ => None,
        }
    }

    /// Bytes per block in the GGUF layout.
    fn block_bytes(self) -> usize {
        match self {
            QuantKind::Q4_0 => 18,
            QuantKind::Q4_1 => 20,
            QuantKind::Q8_0 => 34,
        }
    }
}

/// A `(rows, cols)` weight matrix in GGUF block layout, rows contiguous.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    kind: QuantKind,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

/// Activations quantized per block: values, and per-block scale `d` and
/// (for Q8_1) `s = d · Σq`, both already rounded through f16 as ggml stores them.
struct QuantizedActivations {
    qs: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
    blocks_per_row: usize,
}

fn f16_bits(b: &[u8]) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
}

/// ggml's `quantize_row_q8_0` / `quantize_row_q8_1` (AVX2 variant).
fn quantize_activations(
    x: &[f32],
    rows: usize,
    cols: usize,
    with_sum: bool,
) -> QuantizedActivations {
    #[cfg(target_arch = "x86_64")]
    {
        if simd_available() {
            // SAFETY: features detected; the body is the portable code compiled for AVX2.
            return unsafe { quantize_activations_avx2(x, rows, cols, with_sum) };
        }
    }
    quantize_activations_portable(x, rows, cols, with_sum)
}

/// The portable code, compiled with AVX2 so rounding is one instruction.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_activations_avx2(
    x: &[f32],
    rows: usize,
    cols: usize,
    with_sum: bool,
) -> QuantizedActivations {
    quantize_activations_portable(x, rows, cols, with_sum)
}

#[inline(always)]
fn quantize_activations_portable(
    x: &[f32],
    rows: usize,
    cols: usize,
    with_sum: bool,
) -> QuantizedActivations {
    let nb = cols / QK;
    let mut qs = vec![0i8; rows * cols];
    let mut d = vec![0f32; rows * nb];
    let mut s = if with_sum {
        vec![0f32; rows * nb]
    } else {
        Vec::new()
    };
    for b in 0..rows * nb {
        let src = &x[b * QK..(b + 1) * QK];
        let amax = src.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in qs[b * QK..(b + 1) * QK].iter_mut().zip(src) {
            let r = (v * inv).round_ties_even() as i32;
            *q = r as i8;
            sum += r;
        }
        d[b] = f16::from_f32(scale).to_f32();
        if with_sum {
            s[b] = f16::from_f32(scale * sum as f32).to_f32();
        }
    }
    QuantizedActivations {
        qs,
        d,
        s,
        blocks_per_row: nb,
    }
}

impl QuantMatrix {
    /// Takes a GGUF tensor of a supported type; `None` for other types.
    pub fn from_qtensor(q: &QTensor) -> Option<Self> {
        let kind = QuantKind::from_ggml(q.dtype())?;
        let (rows, cols) = q.shape().dims2().ok()?;
        if cols % QK != 0 {
            return None;
        }
        let data = q.data().ok()?.into_owned();
        if data.len() != rows * cols / QK * kind.block_bytes() {
            return None;
        }
        Some(QuantMatrix {
            kind,
            rows,
            cols,
            data,
        })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// Dequantized `[rows, cols]` values (tests, reference paths).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        Self::dequantize_blocks(self.kind, &self.data, &mut out);
        out
    }

    /// Appends the values of the quantized blocks in `data` to `out`.
    fn dequantize_blocks(kind: QuantKind, data: &[u8], out: &mut Vec<f32>) {
        let bb = kind.block_bytes();
        for blk in data.chunks_exact(bb) {
            match kind {
                QuantKind::Q4_0 => {
                    let d = f16_bits(&blk[0..2]);
                    let q = &blk[2..18];
                    out.extend(q.iter().map(|b| d * ((b & 0x0F) as i32 - 8) as f32));
                    out.extend(q.iter().map(|b| d * ((b >> 4) as i32 - 8) as f32));
                }
                QuantKind::Q4_1 => {
                    let (d, m) = (f16_bits(&blk[0..2]), f16_bits(&blk[2..4]));
                    let q = &blk[4..20];
                    out.extend(q.iter().map(|b| d * (b & 0x0F) as f32 + m));
                    out.extend(q.iter().map(|b| d * (b >> 4) as f32 + m));
                }
                QuantKind::Q8_0 => {
                    let d = f16_bits(&blk[0..2]);
                    out.extend(blk[2..34].iter().map(|&b| d * (b as i8) as f32));
                }
            }
        }
    }

    /// Rows `ids` dequantized, `[ids.len(), cols]` (embedding lookups,
    /// tiles of a training backward), straight from each row's blocks.
    pub fn dequantize_rows(&self, ids: &[u32]) -> Option<Vec<f32>> {
        let row_bytes = self.cols / QK * self.kind.block_bytes();
        let mut out = Vec::with_capacity(ids.len() * self.cols);
        for &id in ids {
            let id = id as usize;
            if id >= self.rows {
                return None;
            }
            Self::dequantize_blocks(self.kind, &self.data[id * row_bytes..(id + 1) * row_bytes], &mut out);
        }
        Some(out)
    }

    /// Stacks matrices of the same kind and width (fused projections).
    pub fn concat(parts: &[&QuantMatrix]) -> Option<QuantMatrix> {
        let first = parts.first()?;
        if parts
            .iter()
            .any(|p| p.kind != first.kind || p.cols != first.cols)
        {
            return None;
        }
        let mut data = Vec::with_capacity(parts.iter().map(|p| p.data.len()).sum());
        for p in parts {
            data.extend_from_slice(&p.data);
        }
        Some(QuantMatrix {
            kind: first.kind,
            rows: parts.iter().map(|p| p.rows).sum(),
            cols: first.cols,
            data,
        })
    }

    /// `y = x Wᵀ` for `x` of `m` rows: returns `[m, rows]`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let act = quantize_activations(x, m, self.cols, self.kind == QuantKind::Q4_1);
        let n = self.rows;
        // Each task computes whole weight rows (output columns) for every
        // activation row; columns of different tasks are disjoint.
        let mut y = vec![0f32; m * n];
        {
            let out = DisjointOut::new(&mut y);
            for_ranges(n, n * self.cols * m, |rows| self.matmul_rows(&act, m, rows.start, rows.end, &out));
        }
        y
    }

    /// Weight rows `start..end` against every activation row, written to
    /// columns `start..end` of the `[m, rows]` output.
    fn matmul_rows(&self, act: &QuantizedActivations, m: usize, start: usize, end: usize, y: &DisjointOut<'_>) {
        let n = self.rows;
        let mut first = start;
        #[cfg(target_arch = "x86_64")]
        {
            if m >= 4 && vnni_available() {
                first = self.matmul_tiles(act, m, start, end, y);
            }
        }
        for r in first..end {
            let mut i = 0;
            // Four activation rows share each weight block's unpacking.
            while i + 4 <= m {
                for (k, v) in self.dot_rows4(r, act, i).into_iter().enumerate() {
                    // SAFETY: column r belongs to this task alone.
                    unsafe { y.write((i + k) * n + r, v) };
                }
                i += 4;
            }
            for k in i..m {
                // SAFETY: as above.
                unsafe { y.write(k * n + r, self.dot_row(r, act, k)) };
            }
        }
    }

    /// Weight rows from `start` in tiles of 4 × 4 activation rows (the
    /// leftover activation rows one at a time), each result exactly
    /// [`Self::dot_row`]'s; returns the first weight row left undone.
    #[cfg(target_arch = "x86_64")]
    fn matmul_tiles(&self, act: &QuantizedActivations, m: usize, start: usize, end: usize, y: &DisjointOut<'_>) -> usize {
        let (n, bb, nb) = (self.rows, self.kind.block_bytes(), act.blocks_per_row);
        let row_bytes = nb * bb;
        let mut r = start;
        while r + 4 <= end {
            let rows = &self.data[r * row_bytes..(r + 4) * row_bytes];
            let mut i = 0;
            while i + 4 <= m {
                let xs = if act.s.is_empty() { &[][..] } else { &act.s[i * nb..(i + 4) * nb] };
                // SAFETY: features detected; slices hold 4 weight rows and 4 activation rows of nb blocks.
                let tile = unsafe {
                    vnni::dot4x4(self.kind, rows, bb, &act.qs[i * self.cols..(i + 4) * self.cols], &act.d[i * nb..(i + 4) * nb], xs, self.cols)
                };
                for (j, col) in tile.iter().enumerate() {
                    for (k, &v) in col.iter().enumerate() {
                        // SAFETY: columns r..r+4 belong to this task alone.
                        unsafe { y.write((i + k) * n + r + j, v) };
                    }
                }
                i += 4;
            }
            for k in i..m {
                for j in 0..4 {
                    // SAFETY: as above.
                    unsafe { y.write(k * n + r + j, self.dot_row(r + j, act, k)) };
                }
            }
            r += 4;
        }
        r
    }

    /// The row's quantized integers in element order (nibbles unsigned for
    /// Q4_1, offset by -8 for Q4_0, as ggml's dot products use them).
    fn unpack_row(&self, r: usize, out: &mut [i8]) {
        let bb = self.kind.block_bytes();
        let nb = self.cols / QK;
        let row = &self.data[r * nb * bb..(r + 1) * nb * bb];
        for (b, blk) in row.chunks_exact(bb).enumerate() {
            let dst = &mut out[b * QK..(b + 1) * QK];
            match self.kind {
                QuantKind::Q4_0 | QuantKind::Q4_1 => {
                    let q = if self.kind == QuantKind::Q4_0 {
                        &blk[2..18]
                    } else {
                        &blk[4..20]
                    };
                    let off = if self.kind == QuantKind::Q4_0 { 8 } else { 0 };
                    for j in 0..16 {
                        dst[j] = ((q[j] & 0x0F) as i32 - off) as i8;
                        dst[j + 16] = ((q[j] >> 4) as i32 - off) as i8;
                    }
                }
                QuantKind::Q8_0 => {
                    for (d, &s) in dst.iter_mut().zip(&blk[2..34]) {
                        *d = s as i8;
                    }
                }
            }
        }
    }

    /// Four consecutive activation rows `i..i+4` against weight row `r`;
    /// each result is computed exactly as [`Self::dot_row`] would.
    fn dot_rows4(&self, r: usize, act: &QuantizedActivations, i: usize) -> [f32; 4] {
        #[cfg(target_arch = "x86_64")]
        {
            if simd_available() {
                let bb = self.kind.block_bytes();
                let nb = act.blocks_per_row;
                let row = &self.data[r * nb * bb..(r + 1) * nb * bb];
                let xq = &act.qs[i * self.cols..(i + 4) * self.cols];
                let xd = &act.d[i * nb..(i + 4) * nb];
                let xs = if act.s.is_empty() {
                    &[][..]
                } else {
                    &act.s[i * nb..(i + 4) * nb]
                };
                // SAFETY: features detected; slices hold 4 rows of nb blocks.
                return unsafe { avx2::dot4(self.kind, row, bb, xq, xd, xs, self.cols) };
            }
        }
        [
            self.dot_row(r, act, i),
            self.dot_row(r, act, i + 1),
            self.dot_row(r, act, i + 2),
            self.dot_row(r, act, i + 3),
        ]
    }

    fn dot_row(&self, r: usize, act: &QuantizedActivations, i: usize) -> f32 {
        let bb = self.kind.block_bytes();
        let nb = act.blocks_per_row;
        let row = &self.data[r * nb * bb..(r + 1) * nb * bb];
        let xq = &act.qs[i * self.cols..(i + 1) * self.cols];
        let xd = &act.d[i * nb..(i + 1) * nb];
        #[cfg(target_arch = "x86_64")]
        {
            if simd_available() {
                // SAFETY: the features were detected at run time; slices have nb*32 elements.
                return unsafe {
                    avx2::dot(
                        self.kind,
                        row,
                        bb,
                        xq,
                        xd,
                        if act.s.is_empty() {
                            &[]
                        } else {
                            &act.s[i * nb..(i + 1) * nb]
                        },
                    )
                };
            }
        }
        let mut w = vec![0i8; self.cols];
        self.unpack_row(r, &mut w);
        scalar_dot(
            self.kind,
            row,
            bb,
            &w,
            xq,
            xd,
            if act.s.is_empty() {
                &[]
            } else {
                &act.s[i * nb..(i + 1) * nb]
            },
        )
    }
}

/// AVX2 + FMA + F16C, detected once.
#[cfg(target_arch = "x86_64")]
fn simd_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    })
}

/// AVX-512 VNNI on 256-bit vectors (with AVX2, FMA, F16C), detected once:
/// one `vpdpbusd` gives the four-byte lane sums `vpmaddubsw` + `vpmaddwd`
/// give (no pair sum here comes near `i16` saturation), so results are
/// bit-identical and the 32 vector registers hold a 4 × 4 tile.
#[cfg(target_arch = "x86_64")]
fn vnni_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        simd_available()
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    })
}

/// Portable version of the same arithmetic (lane order as AVX2's).
fn scalar_dot(
    kind: QuantKind,
    row: &[u8],
    bb: usize,
    w: &[i8],
    xq: &[i8],
    xd: &[f32],
    xs: &[f32],
) -> f32 {
    let mut lanes = [0f32; 8];
    let mut summs = 0f32;
    for (b, blk) in row.chunks_exact(bb).enumerate() {
        let dw = f16_bits(&blk[0..2]);
        let scale = dw * xd[b];
        if kind == QuantKind::Q4_1 {
            summs += f16_bits(&blk[2..4]) * xs[b];
        }
        for (l, lane) in lanes.iter_mut().enumerate() {
            let mut acc = 0i32;
            for k in 0..4 {
                let e = b * QK + l * 4 + k;
                acc += w[e] as i32 * xq[e] as i32;
            }
            *lane = scale.mul_add(acc as f32, *lane);
        }
    }
    hsum8(&lanes) + summs
}

/// ggml's `hsum_float_8` order: high half + low half, then pairs, then the last two.
fn hsum8(l: &[f32; 8]) -> f32 {
    let r = [l[4] + l[0], l[5] + l[1], l[6] + l[2], l[7] + l[3]];
    let r = [r[0] + r[2], r[1] + r[3]];
    r[0] + r[1]
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{QuantKind, QK};
    use std::arch::x86_64::*;

    /// 32 nibbles as bytes: low nibbles are elements 0..16, high 16..32.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn bytes_from_nibbles_32(p: *const u8) -> __m256i {
        let tmp = _mm_loadu_si128(p as *const __m128i);
        let bytes = _mm256_set_m128i(_mm_srli_epi16(tmp, 4), tmp);
        _mm256_and_si256(_mm256_set1_epi8(0x0F), bytes)
    }

    #[inline]
    #[target_feature(enable = "f16c")]
    pub(super) unsafe fn half(p: *const u8) -> f32 {
        let bits = u16::from_le_bytes([*p, *p.add(1)]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn hsum(acc: __m256) -> f32 {
        let hi = _mm256_extractf128_ps(acc, 1);
        let mut r = _mm_add_ps(hi, _mm256_castps256_ps128(acc));
        r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        r = _mm_add_ss(r, _mm_movehdup_ps(r));
        _mm_cvtss_f32(r)
    }

    /// [`dot`] for four activation rows at once (rows `cols` apart).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot4(
        kind: QuantKind,
        row: &[u8],
        bb: usize,
        xq: &[i8],
        xd: &[f32],
        xs: &[f32],
        cols: usize,
    ) -> [f32; 4] {
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut summs = [0f32; 4];
        let ones = _mm256_set1_epi16(1);
        let nb = row.len() / bb;
        let base = row.as_ptr();
        for b in 0..nb {
            let blk = base.add(b * bb);
            let dw = half(blk);
            let (qx, unsigned) = match kind {
                QuantKind::Q4_1 => (bytes_from_nibbles_32(blk.add(4)), true),
                QuantKind::Q4_0 => (
                    _mm256_sub_epi8(bytes_from_nibbles_32(blk.add(2)), _mm256_set1_epi8(8)),
                    false,
                ),
                QuantKind::Q8_0 => (_mm256_loadu_si256(blk.add(2) as *const __m256i), false),
            };
            let ax = _mm256_sign_epi8(qx, qx);
            let m = if unsigned { half(blk.add(2)) } else { 0.0 };
            for k in 0..4 {
                let qy = _mm256_loadu_si256(xq.as_ptr().add(k * cols + b * QK) as *const __m256i);
                let prod = if unsigned {
                    summs[k] += m * *xs.get_unchecked(k * nb + b);
                    _mm256_maddubs_epi16(qx, qy)
                } else {
                    _mm256_maddubs_epi16(ax, _mm256_sign_epi8(qy, qx))
                };
                let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(prod, ones));
                let d = _mm256_set1_ps(dw * *xd.get_unchecked(k * nb + b));
                acc[k] = _mm256_fmadd_ps(d, sums, acc[k]);
            }
        }
        [
            hsum(acc[0]) + summs[0],
            hsum(acc[1]) + summs[1],
            hsum(acc[2]) + summs[2],
            hsum(acc[3]) + summs[3],
        ]
    }

    /// One weight row (raw GGUF blocks) · one quantized activation row, as
    /// ggml's AVX2 `vec_dot_q4_0_q8_0` / `q4_1_q8_1` / `q8_0_q8_0`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot(
        kind: QuantKind,
        row: &[u8],
        bb: usize,
        xq: &[i8],
        xd: &[f32],
        xs: &[f32],
    ) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut summs = 0f32;
        let ones = _mm256_set1_epi16(1);
        let nb = row.len() / bb;
        let base = row.as_ptr();
        for b in 0..nb {
            let blk = base.add(b * bb);
            let dw = half(blk);
            let qy = _mm256_loadu_si256(xq.as_ptr().add(b * QK) as *const __m256i);
            let prod = match kind {
                QuantKind::Q4_1 => {
                    summs += half(blk.add(2)) * *xs.get_unchecked(b);
                    _mm256_maddubs_epi16(bytes_from_nibbles_32(blk.add(4)), qy)
                }
                QuantKind::Q4_0 => {
                    let qx =
                        _mm256_sub_epi8(bytes_from_nibbles_32(blk.add(2)), _mm256_set1_epi8(8));
                    _mm256_maddubs_epi16(_mm256_sign_epi8(qx, qx), _mm256_sign_epi8(qy, qx))
                }
                QuantKind::Q8_0 => {
                    let qx = _mm256_loadu_si256(blk.add(2) as *const __m256i);
                    _mm256_maddubs_epi16(_mm256_sign_epi8(qx, qx), _mm256_sign_epi8(qy, qx))
                }
            };
            let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(prod, ones));
            let d = _mm256_set1_ps(dw * *xd.get_unchecked(b));
            acc = _mm256_fmadd_ps(d, sums, acc);
        }
        let hi = _mm256_extractf128_ps(acc, 1);
        let mut r = _mm_add_ps(hi, _mm256_castps256_ps128(acc));
        r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        r = _mm_add_ss(r, _mm_movehdup_ps(r));
        _mm_cvtss_f32(r) + summs
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::avx2::{bytes_from_nibbles_32, half, hsum};
    use super::{QuantKind, QK};
    use std::arch::x86_64::*;

    /// Expands `$body` four times with `$i` a constant 0, 1, 2, 3: the
    /// tile's loops unrolled, so its 16 accumulators stay in registers.
    macro_rules! unroll4 {
        ($i:ident, $body:block) => {{
            { const $i: usize = 0; $body }
            { const $i: usize = 1; $body }
            { const $i: usize = 2; $body }
            { const $i: usize = 3; $body }
        }};
    }

    /// Four weight rows (contiguous in `rows`, `bb` bytes a block) against
    /// four activation rows (`cols` apart): `out[j][k]` is weight row `j` ·
    /// activation row `k`, the same arithmetic in the same order as the
    /// AVX2 `dot` (per block: exact integer lane sums, scaled and
    /// accumulated by FMA; Q4_1's offset term summed apart, then added).
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    pub unsafe fn dot4x4(
        kind: QuantKind,
        rows: &[u8],
        bb: usize,
        xq: &[i8],
        xd: &[f32],
        xs: &[f32],
        cols: usize,
    ) -> [[f32; 4]; 4] {
        match kind {
            QuantKind::Q4_1 => tile::<1>(rows, bb, xq, xd, xs, cols),
            QuantKind::Q4_0 => tile::<0>(rows, bb, xq, xd, xs, cols),
            QuantKind::Q8_0 => tile::<8>(rows, bb, xq, xd, xs, cols),
        }
    }

    /// [`dot4x4`] for one kind: `K` 1 is Q4_1, 0 Q4_0, 8 Q8_0.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    unsafe fn tile<const K: u8>(rows: &[u8], bb: usize, xq: &[i8], xd: &[f32], xs: &[f32], cols: usize) -> [[f32; 4]; 4] {
        let nb = rows.len() / (4 * bb);
        let row_bytes = nb * bb;
        let base = rows.as_ptr();
        let mut acc = [[_mm256_setzero_ps(); 4]; 4];
        let mut summs = [[0f32; 4]; 4];
        for b in 0..nb {
            let mut qy = [_mm256_setzero_si256(); 4];
            let mut dx = [0f32; 4];
            let mut sx = [0f32; 4];
            unroll4!(KK, {
                qy[KK] = _mm256_loadu_si256(xq.as_ptr().add(KK * cols + b * QK) as *const __m256i);
                dx[KK] = *xd.get_unchecked(KK * nb + b);
                if K == 1 {
                    sx[KK] = *xs.get_unchecked(KK * nb + b);
                }
            });
            unroll4!(J, {
                let blk = base.add(J * row_bytes + b * bb);
                let dw = half(blk);
                if K == 1 {
                    let qx = bytes_from_nibbles_32(blk.add(4));
                    let m = half(blk.add(2));
                    unroll4!(KK, {
                        summs[J][KK] += m * sx[KK];
                        let sums = _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), qx, qy[KK]));
                        acc[J][KK] = _mm256_fmadd_ps(_mm256_set1_ps(dw * dx[KK]), sums, acc[J][KK]);
                    });
                } else {
                    let qx = if K == 0 {
                        _mm256_sub_epi8(bytes_from_nibbles_32(blk.add(2)), _mm256_set1_epi8(8))
                    } else {
                        _mm256_loadu_si256(blk.add(2) as *const __m256i)
                    };
                    let ax = _mm256_sign_epi8(qx, qx);
                    unroll4!(KK, {
                        let sums = _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, _mm256_sign_epi8(qy[KK], qx)));
                        acc[J][KK] = _mm256_fmadd_ps(_mm256_set1_ps(dw * dx[KK]), sums, acc[J][KK]);
                    });
                }
            });
        }
        let mut out = [[0f32; 4]; 4];
        unroll4!(J, {
            unroll4!(KK, {
                out[J][KK] = hsum(acc[J][KK]) + summs[J][KK];
            });
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn matrix(dtype: GgmlDType) -> (QuantMatrix, Vec<f32>) {
        let (rows, cols) = (50, 128);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.3)
            .collect();
        let t = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, dtype).unwrap();
        let m = QuantMatrix::from_qtensor(&q).unwrap();
        let deq = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        (m, deq)
    }

    #[test]
    fn dequantize_matches_candle_and_matmul_tracks_the_exact_product() {
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (m, deq) = matrix(dtype);
            assert_eq!(m.dequantize(), deq, "{dtype:?}");
            let x: Vec<f32> = (0..3 * m.cols())
                .map(|i| (i * 31 % 97) as f32 / 48.0 - 1.0)
                .collect();
            let y = m.matmul(&x, 3);
            for i in 0..3 {
                for r in 0..m.rows() {
                    let exact: f32 = (0..m.cols())
                        .map(|c| x[i * m.cols() + c] * deq[r * m.cols() + c])
                        .sum();
                    let got = y[i * m.rows() + r];
                    assert!(
                        (got - exact).abs() < 0.02 * (1.0 + exact.abs()),
                        "{dtype:?} row {r}: {got} vs {exact}"
                    );
                }
            }
        }
    }

    #[test]
    fn simd_and_scalar_paths_agree_exactly() {
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (m, _) = matrix(dtype);
            let x: Vec<f32> = (0..m.cols()).map(|i| (i as f32 * 0.37).sin()).collect();
            let act = quantize_activations(&x, 1, m.cols(), m.kind == QuantKind::Q4_1);
            let mut w = vec![0i8; m.cols()];
            for r in 0..m.rows() {
                m.unpack_row(r, &mut w);
                let nb = m.cols() / QK;
                let bb = m.kind.block_bytes();
                let row = &m.data[r * nb * bb..(r + 1) * nb * bb];
                let s = scalar_dot(m.kind, row, bb, &w, &act.qs, &act.d, &act.s);
                assert_eq!(s, m.dot_row(r, &act, 0), "{dtype:?} row {r}");
            }
            // Whole matmuls (tiles of 4 × 4 where the CPU has VNNI, odd
            // rows and columns left over) give every single-row result exactly.
            for rows in [4, 7] {
                let x: Vec<f32> = (0..rows * m.cols()).map(|i| (i as f32 * 0.23).sin() * 2.0).collect();
                let act = quantize_activations(&x, rows, m.cols(), m.kind == QuantKind::Q4_1);
                let y = m.matmul(&x, rows);
                for r in 0..m.rows() {
                    for k in 0..rows {
                        assert_eq!(y[k * m.rows() + r], m.dot_row(r, &act, k), "{dtype:?} weight row {r}, activation row {k}");
                    }
                }
            }
            // Four rows at once give each row's single-row result exactly.
            let x4: Vec<f32> = (0..4 * m.cols()).map(|i| (i as f32 * 0.11).cos()).collect();
            let act4 = quantize_activations(&x4, 4, m.cols(), m.kind == QuantKind::Q4_1);
            for r in 0..m.rows() {
                let four = m.dot_rows4(r, &act4, 0);
                for k in 0..4 {
                    assert_eq!(
                        four[k],
                        m.dot_row(r, &act4, k),
                        "{dtype:?} row {r} lane {k}"
                    );
                }
            }
        }
    }
}
