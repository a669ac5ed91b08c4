//! Heterogeneous batched application: a packed step's rows come in
//! contiguous segments, each with its own adapter (or none); every adapted
//! segment adds its own delta at its own rank, rows without one skip it.

use std::sync::Arc;

use candle_core::Tensor;

use super::adapter::LoraAdapter;
use super::grouped;
use crate::model::parallel::Pool;

/// A run of packed rows sharing one adapter.
#[derive(Debug, Clone)]
pub struct AdapterSegment {
    pub start: usize,
    pub len: usize,
    pub adapter: Option<Arc<LoraAdapter>>,
}

/// Whether any segment carries an adapter (the common no-LoRA step skips all work).
pub fn any_adapter(segments: &[AdapterSegment]) -> bool {
    segments.iter().any(|s| s.adapter.is_some())
}

/// The delta for output columns of one or more modules that share input `x`
/// `[T, in]`: `parts` lists `(module name, out width)` in column order (a
/// fused projection lists several). Returns `[T, Σ width]`, or `None` when
/// no segment adapts any of the modules. `pool` is where the CPU kernel
/// runs (the pool of the model's matmuls).
pub fn delta(
    x: &Tensor,
    layer: usize,
    parts: &[(&str, usize)],
    segments: &[AdapterSegment],
    pool: Pool,
) -> candle_core::Result<Option<Tensor>> {
    let modules: Vec<&super::LoraModule> = segments
        .iter()
        .filter_map(|s| s.adapter.as_deref())
        .flat_map(|a| parts.iter().filter_map(move |(m, _)| a.module(layer, m)))
        .collect();
    if modules.is_empty() {
        return Ok(None);
    }
    if grouped::applies(x, &modules) {
        return grouped::delta(x, layer, parts, segments, pool).map(Some);
    }
    per_segment_delta(x, layer, parts, segments).map(Some)
}

/// The portable path (any dtype or device): two matmuls per segment and
/// module, zero blocks for rows without one, concatenated.
pub fn per_segment_delta(
    x: &Tensor,
    layer: usize,
    parts: &[(&str, usize)],
    segments: &[AdapterSegment],
) -> candle_core::Result<Tensor> {
    let width: usize = parts.iter().map(|p| p.1).sum();
    let mut rows = Vec::with_capacity(segments.len());
    for seg in segments {
        let zeros = || Tensor::zeros((seg.len, width), x.dtype(), x.device());
        let Some(adapter) = &seg.adapter else {
            rows.push(zeros()?);
            continue;
        };
        if !parts.iter().any(|(m, _)| adapter.module(layer, m).is_some()) {
            rows.push(zeros()?);
            continue;
        }
        let xs = x.narrow(0, seg.start, seg.len)?;
        let mut cols = Vec::with_capacity(parts.len());
        for (module, w) in parts {
            cols.push(match adapter.module(layer, module) {
                Some(m) => m.delta(&xs)?,
                None => Tensor::zeros((seg.len, *w), x.dtype(), x.device())?,
            });
        }
        rows.push(if cols.len() == 1 { cols.remove(0) } else { Tensor::cat(&cols, 1)? });
    }
    if rows.len() == 1 {
        Ok(rows.remove(0))
    } else {
        Tensor::cat(&rows, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::init::{fresh_adapter, FreshSpec, InitB};
    use crate::lora::SiteSpec;
    use candle_core::{DType, Device};

    fn sites() -> Vec<SiteSpec> {
        ["q_proj", "k_proj", "v_proj"]
            .iter()
            .zip([24usize, 8, 8])
            .map(|(m, out)| SiteSpec { layer: 0, module: m.to_string(), in_features: 20, out_features: out })
            .collect()
    }

    #[test]
    fn grouped_kernel_equals_per_segment_matmuls_on_a_mixed_batch() {
        let dev = Device::Cpu;
        let sites = sites();
        let a1 = Arc::new(fresh_adapter(&sites, &FreshSpec { targets: &["q_proj", "v_proj"], rank: 4, alpha: 8.0, seed: 1, init_b: InitB::Random }, DType::F32, &dev).unwrap());
        let a2 = Arc::new(fresh_adapter(&sites, &FreshSpec { targets: &["k_proj"], rank: 16, alpha: 16.0, seed: 2, init_b: InitB::Random }, DType::F32, &dev).unwrap());
        let a3 = Arc::new(fresh_adapter(&sites, &FreshSpec { targets: &["q_proj", "k_proj", "v_proj"], rank: 2, alpha: 1.0, seed: 3, init_b: InitB::Random }, DType::F32, &dev).unwrap());
        let segments = vec![
            AdapterSegment { start: 0, len: 3, adapter: Some(a1) },
            AdapterSegment { start: 3, len: 2, adapter: None },
            AdapterSegment { start: 5, len: 1, adapter: Some(a2) },
            AdapterSegment { start: 6, len: 4, adapter: Some(a3) },
        ];
        let x = Tensor::randn(0f32, 1.0, (10, 20), &dev).unwrap();
        let parts = [("q_proj", 24), ("k_proj", 8), ("v_proj", 8)];
        let fast = grouped::delta(&x, 0, &parts, &segments, Pool::Rayon).unwrap();
        let slow = per_segment_delta(&x, 0, &parts, &segments).unwrap();
        assert_eq!(fast.dims(), &[10, 40]);
        let diff = (fast - &slow).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "max |diff| {diff}");
        let base_rows = slow.narrow(0, 3, 2).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(base_rows, 0.0);
    }

    #[test]
    fn a_fresh_adapter_with_zero_b_changes_nothing() {
        let dev = Device::Cpu;
        let a = Arc::new(fresh_adapter(&sites(), &FreshSpec { targets: &["q_proj"], rank: 8, alpha: 16.0, seed: 7, init_b: InitB::Zero }, DType::F32, &dev).unwrap());
        let x = Tensor::randn(0f32, 1.0, (2, 20), &dev).unwrap();
        let d = delta(&x, 0, &[("q_proj", 24)], &[AdapterSegment { start: 0, len: 2, adapter: Some(a) }], Pool::Barrier).unwrap().unwrap();
        assert_eq!(d.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }
}
