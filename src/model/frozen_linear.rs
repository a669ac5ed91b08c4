//! A frozen projection as a candle op with a backward pass: the forward is
//! the serving kernel (quantized or dense), the backward gives only the
//! input's gradient, `dL/dx = dL/dy · W`, with `W` dequantized a tile of
//! rows at a time. Gradients so flow through a GGUF base to the adapters
//! without a dense copy of the model, and no gradient of the frozen weight
//! is ever computed (candle's matmul backward would compute both).

use candle_core::{CpuStorage, Layout, Shape, Tensor};

use super::projection::Projection;

/// Rows of a quantized weight dequantized at once in the backward pass.
pub const TILE_ROWS: usize = 1024;

/// `x Wᵀ` (no bias) with a backward for `x` alone.
pub struct FrozenLinear {
    pub proj: Projection,
}

impl candle_core::CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("frozen-linear needs a contiguous input");
        };
        let x = match storage {
            CpuStorage::F32(v) => Tensor::from_slice(&v[start..end], layout.shape(), &candle_core::Device::Cpu)?,
            _ => candle_core::bail!("frozen-linear runs in f32"),
        };
        let y = self.proj.forward_weight(&x)?.contiguous()?;
        let shape = y.shape().clone();
        Ok((CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?), shape))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        self.proj.input_grad(grad_res).map(Some)
    }
}
