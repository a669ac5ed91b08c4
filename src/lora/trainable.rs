//! An adapter being trained: `Aᵀ` and `Bᵀ` as candle `Var`s (the only
//! trainable parameters), the scale fixed. Published to serving as a deep
//! copy, never sharing storage with the optimizer's in-place updates.

use std::collections::HashMap;

use candle_core::{CpuStorage, DType, Layout, Shape, Tensor, Var};

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
    /// On the CPU in f32 the forward is serving's own kernel (see
    /// [`super::grouped::row_delta`]), so what training measures is what
    /// serving computes: over a quantized base, whose activations are
    /// re-quantized at every matmul, even last-bit differences would grow
    /// into visibly different logits.
    pub fn delta(&self, layer: usize, module: &str, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let Some(m) = self.modules.get(&(layer, module.to_string())) else { return Ok(None) };
        // `s·Bᵀ` as `to_adapter` gives it to serving.
        let b_t_scaled = (m.b_t.as_tensor() * m.scale)?;
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            return Ok(Some(x.contiguous()?.apply_op3(&m.a_t.as_tensor().contiguous()?, &b_t_scaled.contiguous()?, DeltaOp)?));
        }
        Ok(Some(x.matmul(m.a_t.as_tensor())?.matmul(&b_t_scaled)?))
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

/// `(x Aᵀ)(s·Bᵀ)` for `x` `[T, in]`, `Aᵀ` `[in, r]`, `s·Bᵀ` `[r, out]`:
/// serving's row kernel forward, the matmul derivatives backward.
struct DeltaOp;

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let Some((start, end)) = l.contiguous_offsets() else { candle_core::bail!("lora delta needs contiguous operands") };
    match s {
        CpuStorage::F32(v) => Ok(&v[start..end]),
        _ => candle_core::bail!("lora delta runs in f32"),
    }
}

impl candle_core::CustomOp3 for DeltaOp {
    fn name(&self) -> &'static str {
        "lora-delta"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, a_t, b_t) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?, f32_slice(s3, l3)?);
        let (rows, in_features) = l1.shape().dims2()?;
        let (a_in, rank) = l2.shape().dims2()?;
        let (b_rank, out) = l3.shape().dims2()?;
        if a_in != in_features || b_rank != rank {
            candle_core::bail!("lora delta shapes: x [{rows}, {in_features}], Aᵀ [{a_in}, {rank}], Bᵀ [{b_rank}, {out}]");
        }
        let mut y = vec![0f32; rows * out];
        {
            let sink = crate::model::parallel::DisjointOut::new(&mut y);
            crate::model::parallel::for_ranges(rows, rows * rank * (in_features + out), |range| {
                let mut u = Vec::with_capacity(rank);
                for row in range {
                    // SAFETY: each task owns whole rows, and rows are disjoint.
                    let y_row = unsafe { sink.piece(row * out, out) };
                    super::grouped::row_delta(&x[row * in_features..(row + 1) * in_features], a_t, b_t, rank, &mut u, y_row);
                }
            });
        }
        Ok((CpuStorage::F32(y), Shape::from((rows, out))))
    }

    fn bwd(&self, x: &Tensor, a_t: &Tensor, b_t: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let u = x.matmul(a_t)?;
        let du = grad.matmul(&b_t.t()?)?;
        Ok((Some(du.matmul(&a_t.t()?)?), Some(x.t()?.matmul(&du)?), Some(u.t()?.matmul(grad)?)))
    }
}
