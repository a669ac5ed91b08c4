//! Data parallelism for our CPU kernels on candle's own worker pool (the
//! spinning barrier pool its ops use), so a decode step's hundreds of small
//! parallel calls neither wake a second pool nor put the caller to sleep.

use std::marker::PhantomData;
use std::ops::Range;

/// Runs `f` over `0..n` split into ranges across candle's CPU workers;
/// inline when `work` (a rough op count) is too small to be worth it.
pub fn for_ranges(n: usize, work: usize, f: impl Fn(Range<usize>) + Sync) {
    if n == 0 {
        return;
    }
    if work < 1 << 15 || n == 1 {
        f(0..n);
        return;
    }
    candle_core::utils::barrier_pool().execute_chunked(n, f);
}

/// Which worker pool a kernel runs on. Candle's dense matmuls (gemm) run
/// on rayon's global pool, its quantized matmuls and our quantized kernels
/// on its barrier pool; a kernel placed between matmuls should use the
/// same pool as they do, or on few cores the idle pool's spinning workers
/// take turns with the busy one (measured: 10-20% of a decode step).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    Barrier,
    Rayon,
}

/// [`for_ranges`] on the pool `pool` names.
pub fn for_ranges_on(pool: Pool, n: usize, work: usize, f: impl Fn(Range<usize>) + Sync) {
    match pool {
        Pool::Barrier => for_ranges(n, work, f),
        Pool::Rayon => for_ranges_rayon(n, work, f),
    }
}

/// [`for_ranges`] on rayon's global pool.
pub fn for_ranges_rayon(n: usize, work: usize, f: impl Fn(Range<usize>) + Sync) {
    if n == 0 {
        return;
    }
    let threads = rayon::current_num_threads().min(n);
    if work < 1 << 15 || threads <= 1 {
        f(0..n);
        return;
    }
    let chunk = n.div_ceil(threads);
    rayon::scope(|scope| {
        let f = &f;
        for start in (chunk..n).step_by(chunk) {
            scope.spawn(move |_| f(start..(start + chunk).min(n)));
        }
        f(0..chunk.min(n));
    });
}

/// A mutable output that parallel tasks write in disjoint pieces.
pub struct DisjointOut<'a> {
    ptr: *mut f32,
    len: usize,
    _borrow: PhantomData<&'a mut [f32]>,
}

// SAFETY: tasks only write through `piece`, whose callers guarantee the
// pieces of concurrent tasks never overlap.
unsafe impl Sync for DisjointOut<'_> {}

impl<'a> DisjointOut<'a> {
    /// Wraps `out` for the duration of a parallel call.
    pub fn new(out: &'a mut [f32]) -> Self {
        DisjointOut { ptr: out.as_mut_ptr(), len: out.len(), _borrow: PhantomData }
    }

    /// Writes one element.
    ///
    /// # Safety
    /// No other task may write index `i` at the same time.
    #[inline]
    pub unsafe fn write(&self, i: usize, value: f32) {
        debug_assert!(i < self.len);
        *self.ptr.add(i) = value;
    }

    /// The piece `start..start + len`.
    ///
    /// # Safety
    /// No other task may hold an overlapping piece at the same time.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn piece(&self, start: usize, len: usize) -> &mut [f32] {
        assert!(start + len <= self.len, "piece out of bounds");
        std::slice::from_raw_parts_mut(self.ptr.add(start), len)
    }
}
