//! Heterogeneous batched application: a packed step's rows come in
//! contiguous segments, each with its own adapter (or none); every adapted
//! segment adds its own delta at its own rank, rows without one skip it.

use std::sync::Arc;

use candle_core::Tensor;

use super::adapter::LoraAdapter;

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
/// no segment adapts any of the modules.
pub fn delta(
    x: &Tensor,
    layer: usize,
    parts: &[(&str, usize)],
    segments: &[AdapterSegment],
) -> candle_core::Result<Option<Tensor>> {
    let touched = segments.iter().any(|s| {
        s.adapter.as_ref().is_some_and(|a| parts.iter().any(|(m, _)| a.module(layer, m).is_some()))
    });
    if !touched {
        return Ok(None);
    }
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
    Ok(Some(if rows.len() == 1 { rows.remove(0) } else { Tensor::cat(&rows, 0)? }))
}
