//! A frozen linear projection of the base model (dense or quantized), and
//! the names of the sites where LoRA adapters attach.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QStorage, QTensor};
use candle_core::{Module, Tensor};

use super::packed_bf16::{self, PackedBf16Matrix};
use super::packed_matrix::PackedMatrix;
use super::quant_kernels::QuantMatrix;

/// The seven projections of a Llama block, in PEFT's module names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Site {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Site {
    /// Every site, in block order.
    pub const ALL: [Site; 7] = [
        Site::Q,
        Site::K,
        Site::V,
        Site::O,
        Site::Gate,
        Site::Up,
        Site::Down,
    ];

    /// The PEFT module name (`q_proj`, ...).
    pub fn module_name(self) -> &'static str {
        match self {
            Site::Q => "q_proj",
            Site::K => "k_proj",
            Site::V => "v_proj",
            Site::O => "o_proj",
            Site::Gate => "gate_proj",
            Site::Up => "up_proj",
            Site::Down => "down_proj",
        }
    }
}

/// How a projection's weight is held.
#[derive(Debug, Clone)]
enum Weight {
    /// `[out, in]` in the model's dtype.
    Dense(Tensor),
    /// GGUF blocks, multiplied without expanding (candle's quantized matmul).
    Quantized(Arc<QTensor>),
    /// GGUF blocks with our own CPU kernels (llama.cpp numerics).
    Native(Arc<QuantMatrix>),
    /// An f32 weight packed once for our CPU kernel (no repacking per call).
    Packed(Arc<PackedMatrix>),
    /// A bf16 weight packed for the CPU's bf16 dot products.
    PackedBf16(Arc<PackedBf16Matrix>),
    /// Parts that read the same input but could not be fused (mixed quant
    /// types); their outputs are concatenated.
    Stacked(Vec<Projection>),
}

/// `y = x Wᵀ (+ b)` over packed rows `[T, in]`; one type for dense and
/// quantized weights so everything above works the same on both.
#[derive(Debug, Clone)]
pub struct Projection {
    weight: Weight,
    bias: Option<Tensor>,
    in_features: usize,
    out_features: usize,
}

impl Projection {
    /// Wraps a dense weight `[out, in]` and an optional bias `[out]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        let (out_features, in_features) = weight.dims2().unwrap_or((0, 0));
        Projection {
            weight: Weight::Dense(weight),
            bias,
            in_features,
            out_features,
        }
    }

    /// Wraps a quantized weight of shape `(out, in)`: our kernels on CPU
    /// for the types they cover, candle's quantized matmul otherwise.
    pub fn quantized(weight: Arc<QTensor>, bias: Option<Tensor>) -> candle_core::Result<Self> {
        let (out_features, in_features) = weight.shape().dims2()?;
        if weight.device().is_cpu() {
            if let Some(native) = QuantMatrix::from_qtensor(&weight) {
                return Ok(Self::native(Arc::new(native), bias));
            }
        }
        Ok(Projection {
            weight: Weight::Quantized(weight),
            bias,
            in_features,
            out_features,
        })
    }

    /// Wraps a matrix for our quantized kernels.
    pub fn native(weight: Arc<QuantMatrix>, bias: Option<Tensor>) -> Self {
        let (out_features, in_features) = (weight.rows(), weight.cols());
        Projection {
            weight: Weight::Native(weight),
            bias,
            in_features,
            out_features,
        }
    }

    /// The same projection with a CPU weight packed for our kernels: bf16
    /// stays bf16 where the CPU has bf16 dot products, f32 stays f32, and
    /// other float weights widen to f32 (exactly). Any other weight is
    /// returned as it is. Done once at load, after fusing, since a packed
    /// weight no longer concatenates.
    pub fn packed_for_cpu(self) -> candle_core::Result<Self> {
        use candle_core::DType;
        let Weight::Dense(w) = &self.weight else {
            return Ok(self);
        };
        if !w.device().is_cpu() {
            return Ok(self);
        }
        let (rows, cols) = (self.out_features, self.in_features);
        let shape_error = || candle_core::Error::Msg("weight shape does not match its features".into());
        let weight = match w.dtype() {
            DType::BF16 if packed_bf16::available() => {
                let values = w.flatten_all()?.to_vec1::<half::bf16>()?;
                Weight::PackedBf16(Arc::new(PackedBf16Matrix::pack(&values, rows, cols).ok_or_else(shape_error)?))
            }
            DType::F32 | DType::BF16 | DType::F16 => {
                let values = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                Weight::Packed(Arc::new(PackedMatrix::pack(&values, rows, cols).ok_or_else(shape_error)?))
            }
            _ => return Ok(self),
        };
        Ok(Projection { weight, ..self })
    }

    /// Whether the weight is packed for our CPU kernels (whose activations are f32).
    pub fn is_packed(&self) -> bool {
        matches!(self.weight, Weight::Packed(_) | Weight::PackedBf16(_))
    }

    /// Rows of a packed weight picked by id, as f32 (the lookup of a tied
    /// embedding table held once, as the output head).
    pub fn packed_rows(&self, ids: &[u32]) -> Option<Vec<f32>> {
        match &self.weight {
            Weight::Packed(p) => p.gather_rows(ids),
            Weight::PackedBf16(p) => p.gather_rows(ids),
            _ => None,
        }
    }

    /// Whether the matmul runs on our CPU kernels (candle's barrier
    /// pool) rather than candle's dense gemm (rayon's pool).
    pub fn uses_own_kernels(&self) -> bool {
        match &self.weight {
            Weight::Quantized(_) | Weight::Native(_) | Weight::Packed(_) | Weight::PackedBf16(_) => true,
            Weight::Dense(_) => false,
            Weight::Stacked(parts) => parts.iter().any(Projection::uses_own_kernels),
        }
    }

    /// Whether the weight stays quantized.
    pub fn is_quantized(&self) -> bool {
        match &self.weight {
            Weight::Quantized(_) | Weight::Native(_) => true,
            Weight::Dense(_) | Weight::Packed(_) | Weight::PackedBf16(_) => false,
            Weight::Stacked(parts) => parts.iter().any(Projection::is_quantized),
        }
    }

    /// Stacks projections that read the same input into one (rows
    /// concatenated): one matmul instead of several when the weights allow.
    pub fn concat(parts: &[&Projection]) -> candle_core::Result<Self> {
        let in_features = parts.first().map_or(0, |p| p.in_features);
        let out_features = parts.iter().map(|p| p.out_features).sum();
        let bias = Self::concat_bias(parts)?;
        let dense: Option<Vec<&Tensor>> = parts
            .iter()
            .map(|p| match &p.weight {
                Weight::Dense(w) => Some(w),
                _ => None,
            })
            .collect();
        if let Some(ws) = dense {
            return Ok(Projection {
                weight: Weight::Dense(Tensor::cat(&ws, 0)?),
                bias,
                in_features,
                out_features,
            });
        }
        let native: Option<Vec<&QuantMatrix>> = parts
            .iter()
            .map(|p| match &p.weight {
                Weight::Native(q) => Some(q.as_ref()),
                _ => None,
            })
            .collect();
        if let Some(fused) = native.and_then(|ms| QuantMatrix::concat(&ms)) {
            return Ok(Projection {
                weight: Weight::Native(Arc::new(fused)),
                bias,
                in_features,
                out_features,
            });
        }
        let quant: Option<Vec<&Arc<QTensor>>> = parts
            .iter()
            .map(|p| match &p.weight {
                Weight::Quantized(q) => Some(q),
                _ => None,
            })
            .collect();
        if let Some(qs) = quant {
            let dtype = qs[0].dtype();
            let device = qs[0].device();
            if qs.iter().all(|q| q.dtype() == dtype) && device.is_cpu() {
                // Rows of a GGUF matrix are contiguous runs of blocks: fusing is byte concatenation.
                let mut bytes = Vec::new();
                for q in &qs {
                    bytes.extend_from_slice(&q.data()?);
                }
                let storage = QStorage::from_data(std::borrow::Cow::Owned(bytes), &device, dtype)?;
                let fused = QTensor::new(storage, (out_features, in_features))?;
                return Ok(Projection {
                    weight: Weight::Quantized(Arc::new(fused)),
                    bias,
                    in_features,
                    out_features,
                });
            }
        }
        let stacked = parts
            .iter()
            .map(|p| Projection {
                bias: None,
                ..(*p).clone()
            })
            .collect();
        Ok(Projection {
            weight: Weight::Stacked(stacked),
            bias,
            in_features,
            out_features,
        })
    }

    fn concat_bias(parts: &[&Projection]) -> candle_core::Result<Option<Tensor>> {
        if parts.iter().all(|p| p.bias.is_none()) {
            return Ok(None);
        }
        let filled = parts
            .iter()
            .map(|p| match &p.bias {
                Some(b) => Ok(b.clone()),
                None => {
                    let dtype = parts
                        .iter()
                        .find_map(|q| q.bias.as_ref())
                        .map_or(candle_core::DType::F32, |b| b.dtype());
                    Tensor::zeros(p.out_features, dtype, p.bias_device())
                }
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Some(Tensor::cat(&filled, 0)?))
    }

    fn bias_device(&self) -> &candle_core::Device {
        match &self.weight {
            Weight::Dense(w) => w.device(),
            _ => self
                .bias
                .as_ref()
                .map_or(&candle_core::Device::Cpu, |b| b.device()),
        }
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// The weight `[out, in]` as a dense f32-or-model-dtype tensor (tests,
    /// merges, and the learner's reference; never the serving path).
    pub fn dense_weight(&self) -> candle_core::Result<Tensor> {
        match &self.weight {
            Weight::Dense(w) => Ok(w.clone()),
            Weight::Quantized(q) => q.dequantize(&q.device()),
            Weight::Native(q) => Tensor::from_vec(
                q.dequantize(),
                (q.rows(), q.cols()),
                &candle_core::Device::Cpu,
            ),
            Weight::Packed(p) => Tensor::from_vec(
                p.unpack_rows(0, p.rows()).unwrap_or_default(),
                (p.rows(), p.cols()),
                &candle_core::Device::Cpu,
            ),
            Weight::PackedBf16(p) => Tensor::from_vec(
                p.unpack_rows(0, p.rows()).unwrap_or_default(),
                (p.rows(), p.cols()),
                &candle_core::Device::Cpu,
            ),
            Weight::Stacked(parts) => {
                let ws = parts
                    .iter()
                    .map(Projection::dense_weight)
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&ws, 0)
            }
        }
    }

    /// Bytes the weight takes in memory.
    pub fn weight_bytes(&self) -> usize {
        match &self.weight {
            Weight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            Weight::Quantized(q) => q.storage_size_in_bytes(),
            Weight::Native(q) => q.bytes(),
            Weight::Packed(p) => p.bytes(),
            Weight::PackedBf16(p) => p.bytes(),
            Weight::Stacked(parts) => parts.iter().map(Projection::weight_bytes).sum(),
        }
    }
}

impl Projection {
    /// `x Wᵀ` for a training step: differentiable with respect to `x`
    /// only (the weight is frozen), through [`FrozenLinear`] on the CPU.
    pub fn forward_train(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if !x.device().is_cpu() {
            return self.forward(x);
        }
        let y = x.contiguous()?.apply_op1(super::frozen_linear::FrozenLinear { proj: self.clone() })?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// `dL/dx = dL/dy · W` for `dL/dy` `[T, out]`: quantized weights are
    /// dequantized a tile of rows at a time, never whole.
    pub fn input_grad(&self, grad: &Tensor) -> candle_core::Result<Tensor> {
        let grad = grad.to_dtype(candle_core::DType::F32)?;
        match &self.weight {
            Weight::Dense(w) => grad.matmul(&w.to_dtype(candle_core::DType::F32)?),
            Weight::Quantized(q) => grad.matmul(&q.dequantize(&q.device())?),
            Weight::Native(q) if packed_bf16::available() && grad.device().is_cpu() => {
                bf16_input_grad(&grad, q.rows(), q.cols(), |start, len| {
                    let ids: Vec<u32> = (start as u32..(start + len) as u32).collect();
                    q.dequantize_rows(&ids)
                })
            }
            Weight::Native(q) => tiled_input_grad(&grad, q.rows(), q.cols(), |start, len| {
                let ids: Vec<u32> = (start as u32..(start + len) as u32).collect();
                q.dequantize_rows(&ids)
            }),
            Weight::Packed(p) => tiled_input_grad(&grad, p.rows(), p.cols(), |start, len| p.unpack_rows(start, len)),
            Weight::PackedBf16(p) => tiled_input_grad(&grad, p.rows(), p.cols(), |start, len| p.unpack_rows(start, len)),
            Weight::Stacked(parts) => {
                let mut acc: Option<Tensor> = None;
                let mut col = 0;
                for p in parts {
                    let part = p.input_grad(&grad.narrow(1, col, p.out_features)?)?;
                    col += p.out_features;
                    acc = Some(match acc {
                        None => part,
                        Some(a) => (a + part)?,
                    });
                }
                acc.ok_or_else(|| candle_core::Error::Msg("empty weight".into()))
            }
        }
    }

    /// `x Wᵀ` without the bias.
    pub fn forward_weight(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.weight {
            Weight::Dense(w) => x.matmul(&w.t()?),
            Weight::Quantized(q) => QMatMul::QTensor(q.clone()).forward(x),
            Weight::Native(q) => {
                let m = x.dim(0)?;
                let xs = x
                    .to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                Tensor::from_vec(q.matmul(&xs, m), (m, q.rows()), x.device())?
                    .to_dtype(x.dtype())
            }
            Weight::Packed(p) => self.packed_matmul(x, PackedMatmul::F32(p.clone())),
            Weight::PackedBf16(p) => self.packed_matmul(x, PackedMatmul::Bf16(p.clone())),
            Weight::Stacked(parts) => {
                let ys = parts
                    .iter()
                    .map(|p| p.forward(x))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&ys, 1)
            }
        }
    }
}

impl Projection {
    /// Runs a packed kernel over `x` of any leading shape, in f32.
    fn packed_matmul(&self, x: &Tensor, op: PackedMatmul) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let rows: usize = dims[..dims.len().saturating_sub(1)].iter().product();
        let y = x
            .to_dtype(candle_core::DType::F32)?
            .reshape((rows, self.in_features))?
            .contiguous()?
            .apply_op1_no_bwd(&op)?;
        let mut out_dims = dims;
        if let Some(last) = out_dims.last_mut() {
            *last = self.out_features;
        }
        y.reshape(out_dims)?.to_dtype(x.dtype())
    }
}

/// `dL/dx = dL/dy · W` with `W` produced a tile of rows at a time by `rows(start, len)`.
fn tiled_input_grad(
    grad: &Tensor,
    out_features: usize,
    in_features: usize,
    rows: impl Fn(usize, usize) -> Option<Vec<f32>>,
) -> candle_core::Result<Tensor> {
    let mut acc: Option<Tensor> = None;
    let mut start = 0;
    while start < out_features {
        let len = super::frozen_linear::TILE_ROWS.min(out_features - start);
        let tile = rows(start, len).ok_or_else(|| candle_core::Error::Msg("tile out of range".into()))?;
        let tile = Tensor::from_vec(tile, (len, in_features), grad.device())?;
        let part = grad.narrow(1, start, len)?.matmul(&tile)?;
        acc = Some(match acc {
            None => part,
            Some(a) => (a + part)?,
        });
        start += len;
    }
    acc.ok_or_else(|| candle_core::Error::Msg("empty weight".into()))
}

/// [`tiled_input_grad`] on the bf16 kernel: each tile of rows is packed
/// transposed (bf16) and multiplied from the left by its columns of the
/// gradient, rounded to bf16; sums in f32. About four times the f32
/// gemm's rate, for gradients accurate to bf16's 3 significant digits.
fn bf16_input_grad(
    grad: &Tensor,
    out_features: usize,
    in_features: usize,
    rows: impl Fn(usize, usize) -> Option<Vec<f32>> + Sync,
) -> candle_core::Result<Tensor> {
    let (t, out) = grad.dims2()?;
    if out != out_features {
        candle_core::bail!("gradient has {out} columns, the weight {out_features} rows");
    }
    let g = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let mut acc = vec![0f32; t * in_features];
    let mut start = 0;
    while start < out_features {
        let len = super::frozen_linear::TILE_ROWS.min(out_features - start);
        let packed = PackedBf16Matrix::pack_transposed_with(len, in_features, |a, b| rows(start + a, b - a))
            .ok_or_else(|| candle_core::Error::Msg("tile out of range".into()))?;
        let g_tile: Vec<f32> = g.chunks_exact(out).flat_map(|row| &row[start..start + len]).copied().collect();
        for (a, v) in acc.iter_mut().zip(packed.matmul(&g_tile, t)) {
            *a += v;
        }
        start += len;
    }
    Tensor::from_vec(acc, (t, in_features), grad.device())
}

/// `x Wᵀ` with a packed weight, reading candle's storage in place.
enum PackedMatmul {
    F32(Arc<PackedMatrix>),
    Bf16(Arc<PackedBf16Matrix>),
}

impl candle_core::CustomOp1 for PackedMatmul {
    fn name(&self) -> &'static str {
        "packed-matmul"
    }

    fn cpu_fwd(&self, storage: &candle_core::CpuStorage, layout: &candle_core::Layout) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("packed-matmul needs a contiguous input");
        };
        let candle_core::CpuStorage::F32(v) = storage else {
            candle_core::bail!("packed-matmul runs in f32");
        };
        let (m, k) = layout.shape().dims2()?;
        let (rows, cols) = match self {
            PackedMatmul::F32(p) => (p.rows(), p.cols()),
            PackedMatmul::Bf16(p) => (p.rows(), p.cols()),
        };
        if k != cols {
            candle_core::bail!("packed-matmul: input has {k} features, the weight {cols}");
        }
        let x = &v[start..end];
        let y = match self {
            PackedMatmul::F32(p) => p.matmul(x, m),
            PackedMatmul::Bf16(p) => p.matmul(x, m),
        };
        Ok((candle_core::CpuStorage::F32(y), (m, rows).into()))
    }
}

impl Module for Projection {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.forward_weight(x)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;
    use candle_core::{DType, Device};

    #[test]
    fn the_input_gradient_through_a_quantized_weight_is_grad_times_the_dequantized_weight() {
        let dev = Device::Cpu;
        let (out, inp, t) = (2100, 64, 5); // more rows than one backward tile
        let w = Tensor::randn(0f32, 1.0, (out, inp), &dev).unwrap();
        let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0).unwrap());
        let proj = Projection::quantized(q, None).unwrap();
        let grad = Tensor::randn(0f32, 1.0, (t, out), &dev).unwrap();
        let want = grad.matmul(&proj.dense_weight().unwrap()).unwrap();
        let got = proj.input_grad(&grad).unwrap();
        let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let diff = (want - &got).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        // bf16 gradients (where the CPU has bf16 dot products) keep ~3 significant digits.
        assert!(diff <= 1e-2 * scale, "diff {diff} of scale {scale}");
        assert_eq!(got.dtype(), DType::F32);
    }
}
