//! Causal attention of one sequence over its KV cache.
//!
//! Decode steps (one new query per sequence) take a direct CPU kernel:
//! per-op overhead of a dozen small candle ops per sequence per layer
//! dominates a decode step at batch 8+, and the arithmetic is tiny. Prefill
//! chunks and non-f32/non-CPU tensors take the matmul path.

use candle_core::{DType, Device, Storage, Tensor};
use super::parallel::{for_ranges_on, for_ranges_rayon, DisjointOut, Pool};

/// Shapes shared by every call in a model.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// The pool the model's matmuls run on (see [`Pool`]).
    pub pool: Pool,
}

/// One decode query and where its keys and values live.
pub struct DecodeQuery<'a> {
    /// `[heads * head_dim]` of the query row, already rotated.
    pub q: &'a [f32],
    /// Cache tensors `[kv_heads, capacity, head_dim]` (contiguous) and the valid length.
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub len: usize,
}

/// Whether the direct kernel can read these tensors.
pub fn kernel_applies(t: &Tensor) -> bool {
    matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32
}

fn cpu_f32<'a>(storage: &'a Storage, t: &Tensor) -> Option<&'a [f32]> {
    match storage {
        Storage::Cpu(cpu) => cpu
            .as_slice::<f32>()
            .ok()
            .map(|s| &s[t.layout().start_offset()..]),
        _ => None,
    }
}

/// Attention for many single-token queries at once; returns
/// `[queries, heads * head_dim]` row-major, or `None` if a tensor is not CPU f32.
pub fn decode_batch(shape: AttentionShape, queries: &[DecodeQuery<'_>]) -> Option<Vec<f32>> {
    let AttentionShape { heads, kv_heads, head_dim, .. } = shape;
    let rep = heads / kv_heads;
    let width = heads * head_dim;
    let guards: Vec<_> = queries
        .iter()
        .map(|q| (q.k.storage_and_layout().0, q.v.storage_and_layout().0))
        .collect();
    let mut slices = Vec::with_capacity(queries.len());
    for (q, (ks, vs)) in queries.iter().zip(&guards) {
        let k = cpu_f32(ks, q.k)?;
        let v = cpu_f32(vs, q.v)?;
        let cap = q.k.dims()[1];
        slices.push((q.q, k, v, q.len, cap));
    }
    let scale = 1.0 / (head_dim as f32).sqrt();
    let mut out = vec![0f32; queries.len() * width];
    let work: usize = slices.iter().map(|s| s.3).sum::<usize>() * width;
    let one = |task: usize, dst: &mut [f32]| {
        let (qi, h) = (task / heads, task % heads);
        let (q, k, v, len, cap) = slices[qi];
        let kvh = h / rep;
        let qh = &q[h * head_dim..(h + 1) * head_dim];
        let base = kvh * cap * head_dim;
        let mut scores: Vec<f32> = (0..len)
            .map(|j| {
                let kj = &k[base + j * head_dim..base + (j + 1) * head_dim];
                dot(qh, kj) * scale
            })
            .collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0.0;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            total += *s;
        }
        dst.iter_mut().for_each(|d| *d = 0.0);
        for (j, p) in scores.iter().enumerate() {
            let w = p / total;
            let vj = &v[base + j * head_dim..base + (j + 1) * head_dim];
            dst.iter_mut().zip(vj).for_each(|(d, x)| *d += w * x);
        }
    };
    let tasks = queries.len() * heads;
    {
        let shared = DisjointOut::new(&mut out);
        for_ranges_on(shape.pool, tasks, work, |range| {
            for task in range {
                // SAFETY: each task owns its own head_dim slice.
                one(task, unsafe { shared.piece(task * head_dim, head_dim) });
            }
        });
    }
    Some(out)
}

/// Causal attention of `len` new queries `[len, heads, head_dim]` over
/// `past + len` keys/values `[kv_heads, past + len, head_dim]`, with candle
/// ops. Returns `[len, heads * head_dim]`.
pub fn prefill(
    shape: AttentionShape,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    past: usize,
) -> candle_core::Result<Tensor> {
    let AttentionShape { heads, kv_heads, head_dim, .. } = shape;
    let len = q.dim(0)?;
    let rep = heads / kv_heads;
    // [len, kvh, rep, hd] -> [kvh, rep * len, hd]: query head h reads kv head h / rep.
    let q = q
        .reshape((len, kv_heads, rep, head_dim))?
        .permute((1, 2, 0, 3))?
        .contiguous()?
        .reshape((kv_heads, rep * len, head_dim))?;
    let scale = 1.0 / (head_dim as f64).sqrt();
    let q = (q * scale)?;
    let scores = q.matmul(&k.t()?)?;
    let probs = if kernel_applies(&scores) && scores.is_contiguous() {
        scores.apply_op1_no_bwd(&CausalSoftmax { past, len })?
    } else {
        masked_softmax(scores, past, len, kv_heads, rep)?
    };
    let out = probs.matmul(&v.contiguous()?)?;
    out.reshape((kv_heads, rep, len, head_dim))?
        .permute((2, 0, 1, 3))?
        .contiguous()?
        .reshape((len, heads * head_dim))
}

/// `a · b` in eight running lanes (vectorized; a plain sequential sum is
/// not, and was a sixth of a decode step at batch 32).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    let quads = [lanes[0] + lanes[4], lanes[1] + lanes[5], lanes[2] + lanes[6], lanes[3] + lanes[7]];
    (quads[0] + quads[2]) + (quads[1] + quads[3]) + tail
}

/// The portable path: an explicit mask, then softmax.
fn masked_softmax(
    mut scores: Tensor,
    past: usize,
    len: usize,
    kv_heads: usize,
    rep: usize,
) -> candle_core::Result<Tensor> {
    let total = past + len;
    if len > 1 {
        let mask: Vec<f32> = (0..len)
            .flat_map(|i| {
                (0..total).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 })
            })
            .collect();
        let mask =
            Tensor::from_vec(mask, (len, total), scores.device())?.to_dtype(scores.dtype())?;
        scores = scores
            .reshape((kv_heads, rep, len, total))?
            .broadcast_add(&mask)?
            .reshape((kv_heads, rep * len, total))?;
    }
    candle_nn::ops::softmax_last_dim(&scores)
}

/// Causal mask and softmax in one pass over `[groups, len, past + len]`
/// scores (rows cycle through the `len` queries): query `i` sees keys
/// `0..=past + i`, later keys get probability 0.
struct CausalSoftmax {
    past: usize,
    len: usize,
}

impl candle_core::CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let src = storage.as_slice::<f32>()?;
        let src = &src[layout.start_offset()..layout.start_offset() + layout.shape().elem_count()];
        let total = self.past + self.len;
        let mut dst = vec![0f32; src.len()];
        let rows = src.len() / total;
        let shared = DisjointOut::new(&mut dst);
        for_ranges_rayon(rows, src.len() * 4, |range| {
            for row in range {
                // SAFETY: each row is written by exactly one task.
                let d = unsafe { shared.piece(row * total, total) };
                let s = &src[row * total..(row + 1) * total];
                let visible = self.past + row % self.len + 1;
                let max = s[..visible]
                    .iter()
                    .copied()
                    .fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0;
                for (o, x) in d[..visible].iter_mut().zip(&s[..visible]) {
                    *o = (x - max).exp();
                    sum += *o;
                }
                let inv = 1.0 / sum;
                d[..visible].iter_mut().for_each(|o| *o *= inv);
            }
        });
        Ok((candle_core::CpuStorage::F32(dst), layout.shape().clone()))
    }
}

/// A CPU cache tensor's elements, f32 or f16.
enum CacheRows<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
}

impl<'a> CacheRows<'a> {
    fn of(storage: &'a Storage, t: &Tensor) -> Option<Self> {
        let Storage::Cpu(cpu) = storage else { return None };
        let start = t.layout().start_offset();
        match t.dtype() {
            DType::F32 => cpu.as_slice::<f32>().ok().map(|s| CacheRows::F32(&s[start..])),
            DType::F16 => cpu.as_slice::<half::f16>().ok().map(|s| CacheRows::F16(&s[start..])),
            _ => None,
        }
    }

    /// `out.len()` elements from `at`, as f32.
    #[inline(always)]
    fn read(&self, at: usize, out: &mut [f32]) {
        match self {
            CacheRows::F32(s) => out.copy_from_slice(&s[at..at + out.len()]),
            CacheRows::F16(s) => super::ggml_numerics::widen_f16(&s[at..at + out.len()], out),
        }
    }
}

/// One sequence's new query rows and its cache, for [`flash_batch`].
pub struct FlashSeq<'a> {
    /// `[len, heads * head_dim]` row-major, already rotated, each head in
    /// llama.cpp's element order.
    pub q: &'a [f32],
    /// Cache tensors `[kv_heads, capacity, head_dim]` holding f16-rounded
    /// values, keys in llama.cpp's element order.
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    /// Positions cached before these rows.
    pub past: usize,
    pub len: usize,
}

/// Causal attention with llama.cpp's flash-attention arithmetic
/// ([`ggml_numerics::flash_attention_row`]) for every new row of every
/// sequence: row `i` sees keys `0..=past + i`. Returns the rows in order,
/// `[Σ len, heads * head_dim]`, or `None` if a tensor is not CPU f32.
pub fn flash_batch(shape: AttentionShape, seqs: &[FlashSeq<'_>]) -> Option<Vec<f32>> {
    use super::ggml_numerics::flash_attention_row;
    let AttentionShape { heads, kv_heads, head_dim, .. } = shape;
    let rep = heads / kv_heads;
    let width = heads * head_dim;
    let guards: Vec<_> = seqs.iter().map(|s| (s.k.storage_and_layout().0, s.v.storage_and_layout().0)).collect();
    // (sequence, row within it) for every output row, and the cache slices.
    let mut rows = Vec::new();
    let mut slices = Vec::with_capacity(seqs.len());
    for (si, (s, (ks, vs))) in seqs.iter().zip(&guards).enumerate() {
        slices.push((CacheRows::of(ks, s.k)?, CacheRows::of(vs, s.v)?, s.k.dims()[1]));
        rows.extend((0..s.len).map(|r| (si, r)));
    }
    let scale = 1.0 / (head_dim as f32).sqrt();
    let mut out = vec![0f32; rows.len() * width];
    let work: usize = seqs.iter().map(|s| s.len * (s.past + s.len)).sum::<usize>() * width;
    let one = |task: usize, dst: &mut [f32]| {
        let (row, h) = (task / heads, task % heads);
        let (si, r) = rows[row];
        let s = &seqs[si];
        let (k, v, cap) = &slices[si];
        let base = (h / rep) * cap * head_dim;
        let q = &s.q[r * width + h * head_dim..r * width + (h + 1) * head_dim];
        let fill = |j: usize, kr: &mut [f32], vr: &mut [f32]| {
            k.read(base + j * head_dim, kr);
            v.read(base + j * head_dim, vr);
        };
        flash_attention_row(q, scale, s.past + r + 1, fill, dst);
    };
    {
        let shared = DisjointOut::new(&mut out);
        for_ranges_on(shape.pool, rows.len() * heads, work, |range| {
            for task in range {
                // SAFETY: each task owns its own head_dim slice.
                one(task, unsafe { shared.piece(task * head_dim, head_dim) });
            }
        });
    }
    Some(out)
}
