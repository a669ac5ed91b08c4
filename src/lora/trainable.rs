//! An adapter being trained: `Aᵀ` and `Bᵀ` as candle `Var`s (the only
//! trainable parameters), the scale fixed. Published to serving as a deep
//! copy, never sharing storage with the optimizer's in-place updates.

use std::collections::HashMap;

use candle_core::{Tensor, Var};

use super::adapter::{LoraAdapter, LoraModule};

/// One trainable module.
#[derive(Debug)]
pub struct TrainableModule {
    /// `Aᵀ`, `[in, r]`.
    pub a_t: Var,
    /// `Bᵀ` (unscaled, as PEFT stores B), `[r, out]`.
    pub b_t: Var,
    pub rank: usize,
    pub scale: f64,
}

/// All trainable modules of one adapter, by `(layer, module)`.
#[derive(Debug)]
pub struct TrainableLora {
    modules: HashMap<(usize, String), TrainableModule>,
}

impl TrainableLora {
    /// Starts from `adapter`'s weights (copied, in f32).
    pub fn from_adapter(adapter: &LoraAdapter) -> candle_core::Result<Self> {
        let mut modules = HashMap::new();
        for (layer, module, m) in adapter.modules() {
            let a_t = Var::from_tensor(&m.a_t.to_dtype(candle_core::DType::F32)?.copy()?)?;
            let b_t = Var::from_tensor(&(m.b_t_scaled.to_dtype(candle_core::DType::F64)? / m.scale)?.to_dtype(candle_core::DType::F32)?)?;
            modules.insert((layer, module.to_string()), TrainableModule { a_t, b_t, rank: m.rank, scale: m.scale });
        }
        Ok(TrainableLora { modules })
    }

    /// No modules: the base model alone.
    pub fn empty() -> Self {
        TrainableLora { modules: HashMap::new() }
    }

    /// Every trainable variable (for the optimizer).
    pub fn vars(&self) -> Vec<Var> {
        let mut keys: Vec<&(usize, String)> = self.modules.keys().collect();
        keys.sort();
        keys.into_iter().flat_map(|k| [self.modules[k].a_t.clone(), self.modules[k].b_t.clone()]).collect()
    }

    /// `s · (x Aᵀ) Bᵀ` for `x` `[T, in]`, if the adapter has this module.
    pub fn delta(&self, layer: usize, module: &str, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let Some(m) = self.modules.get(&(layer, module.to_string())) else { return Ok(None) };
        let d = x.matmul(m.a_t.as_tensor())?.matmul(m.b_t.as_tensor())?;
        Ok(Some((d * m.scale)?))
    }

    /// A servable adapter holding a deep copy of the current weights.
    pub fn to_adapter(&self) -> candle_core::Result<LoraAdapter> {
        let mut modules = HashMap::new();
        for ((layer, module), m) in &self.modules {
            let a_t = m.a_t.as_tensor().copy()?;
            let b_t_scaled = (m.b_t.as_tensor() * m.scale)?.contiguous()?;
            modules.insert((*layer, module.clone()), LoraModule { a_t, b_t_scaled, rank: m.rank, scale: m.scale });
        }
        Ok(LoraAdapter::new(modules))
    }
}
