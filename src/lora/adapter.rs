//! A loaded LoRA adapter: per (layer, module) the pair `Aᵀ` `[in, r]` and
//! `s·Bᵀ` `[r, out]`, laid out once at load so that a row's delta reads
//! both row by row, accumulating in the order a matmul does.

use std::collections::HashMap;

use candle_core::Tensor;

/// A place in the base model where an adapter may attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteSpec {
    pub layer: usize,
    /// PEFT module name: `q_proj`, ..., `down_proj`.
    pub module: String,
    pub in_features: usize,
    pub out_features: usize,
}

/// One adapted projection.
#[derive(Debug, Clone)]
pub struct LoraModule {
    /// `Aᵀ`, `[in, r]`, contiguous.
    pub a_t: Tensor,
    /// `scale · Bᵀ`, `[r, out]`, contiguous.
    pub b_t_scaled: Tensor,
    pub rank: usize,
    pub scale: f64,
}

impl LoraModule {
    /// `s · (x Aᵀ) Bᵀ` for rows `x` `[n, in]`, computed in the adapter's
    /// dtype and returned in `x`'s.
    pub fn delta(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.to_dtype(self.a_t.dtype())?
            .matmul(&self.a_t)?
            .matmul(&self.b_t_scaled)?
            .to_dtype(x.dtype())
    }
}

/// An adapter ready to serve. Immutable; shared by `Arc` between requests.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    modules: HashMap<(usize, String), LoraModule>,
    /// Largest rank across modules.
    pub max_rank: usize,
}

impl LoraAdapter {
    /// Wraps validated modules.
    pub fn new(modules: HashMap<(usize, String), LoraModule>) -> Self {
        let max_rank = modules.values().map(|m| m.rank).max().unwrap_or(0);
        LoraAdapter { modules, max_rank }
    }

    /// The module at `(layer, module)`, if the adapter touches it.
    pub fn module(&self, layer: usize, module: &str) -> Option<&LoraModule> {
        self.modules.get(&(layer, module.to_string()))
    }

    /// Every adapted `(layer, module)` with its weights, in no set order.
    pub fn modules(&self) -> impl Iterator<Item = (usize, &str, &LoraModule)> {
        self.modules.iter().map(|((l, m), v)| (*l, m.as_str(), v))
    }

    /// Module names the adapter touches (sorted, deduplicated).
    pub fn target_modules(&self) -> Vec<String> {
        let mut names: Vec<String> = self.modules.keys().map(|(_, m)| m.clone()).collect();
        names.sort();
        names.dedup();
        names
    }

    /// Number of adapted (layer, module) pairs.
    pub fn len(&self) -> usize {
        self.modules.len()
    }

    /// True when the adapter touches nothing.
    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }

    /// Bytes its tensors take.
    pub fn bytes(&self) -> usize {
        self.modules
            .values()
            .map(|m| (m.a_t.elem_count() + m.b_t_scaled.elem_count()) * m.a_t.dtype().size_in_bytes())
            .sum()
    }
}
