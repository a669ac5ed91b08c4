//! Per-sequence key/value cache: contiguous per layer, grown in chunks.
//!
//! Lives beside the model (not in `engine/`) because the forward pass writes
//! it; the engine owns one per sequence and frees it by dropping it.

use candle_core::{DType, Device, Tensor};

/// Positions added at a time when the cache grows.
const GROW_CHUNK: usize = 128;

/// Keys and values of one sequence, `[kv_heads, capacity, head_dim]` per layer.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
    capacity: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    device: Device,
}

impl KvCache {
    /// An empty cache; memory is taken on first append.
    pub fn new(
        num_layers: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Self {
        KvCache {
            layers: Vec::with_capacity(num_layers),
            len: 0,
            capacity: 0,
            kv_heads,
            head_dim,
            dtype,
            device: device.clone(),
        }
        .with_layers(num_layers)
    }

    fn with_layers(mut self, n: usize) -> Self {
        self.layers = (0..n)
            .map(|_| {
                let e = Tensor::zeros((self.kv_heads, 0, self.head_dim), self.dtype, &self.device)
                    .expect("empty tensor allocation cannot fail");
                (e.clone(), e)
            })
            .collect();
        self
    }

    /// A deep copy: a prefix computed once, continued several ways (the
    /// forward pass writes caches in place, so sharing storage would not do).
    pub fn fork(&self) -> candle_core::Result<KvCache> {
        let layers = self.layers.iter().map(|(k, v)| Ok((k.copy()?, v.copy()?))).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(KvCache { layers, device: self.device.clone(), ..*self })
    }

    /// Tokens cached so far (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before the first token is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Drops the last `n` positions' worth of length (their memory is reused).
    pub fn truncate(&mut self, new_len: usize) {
        self.len = self.len.min(new_len);
    }

    /// Makes room for `extra` more positions, growing every layer in chunks.
    pub fn reserve(&mut self, extra: usize) -> candle_core::Result<()> {
        let need = self.len + extra;
        if need <= self.capacity {
            return Ok(());
        }
        let new_cap = if self.capacity == 0 { need } else { need.div_ceil(GROW_CHUNK) * GROW_CHUNK };
        for (k, v) in self.layers.iter_mut() {
            for t in [k, v] {
                let grown = Tensor::zeros(
                    (self.kv_heads, new_cap, self.head_dim),
                    self.dtype,
                    &self.device,
                )?;
                if self.len > 0 {
                    grown.slice_set(&t.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                }
                *t = grown;
            }
        }
        self.capacity = new_cap;
        Ok(())
    }

    /// Writes `k`, `v` (`[new, kv_heads, head_dim]`) for `layer` at the current
    /// end and returns the whole history `[kv_heads, len + new, head_dim]`.
    /// The length advances only through [`KvCache::advance`], once per step.
    pub fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let new = k.dim(0)?;
        self.reserve(new)?;
        // An f16 cache under f32 activations (values already rounded to f16).
        let (k, v) = (&k.to_dtype(self.dtype)?, &v.to_dtype(self.dtype)?);
        let (kc, vc) = &self.layers[layer];
        kc.slice_set(&k.transpose(0, 1)?.contiguous()?, 1, self.len)?;
        vc.slice_set(&v.transpose(0, 1)?.contiguous()?, 1, self.len)?;
        Ok((
            kc.narrow(1, 0, self.len + new)?,
            vc.narrow(1, 0, self.len + new)?,
        ))
    }

    /// The full cache tensors of `layer`, `[kv_heads, capacity, head_dim]`;
    /// positions past `len()` plus the uncommitted ones are garbage.
    pub fn layer(&self, layer: usize) -> (&Tensor, &Tensor) {
        let (k, v) = &self.layers[layer];
        (k, v)
    }

    /// Commits `n` appended positions after every layer has written them.
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// Bytes currently allocated.
    pub fn allocated_bytes(&self) -> usize {
        2 * self.layers.len()
            * self.kv_heads
            * self.capacity
            * self.head_dim
            * self.dtype.size_in_bytes()
    }
}
