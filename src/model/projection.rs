//! A frozen linear projection of the base model, and the names of the sites
//! where LoRA adapters attach.

use candle_core::{Module, Tensor};

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
    pub const ALL: [Site; 7] = [Site::Q, Site::K, Site::V, Site::O, Site::Gate, Site::Up, Site::Down];

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

/// `y = x Wᵀ (+ b)` over packed rows `[T, in]`.
#[derive(Debug, Clone)]
pub struct Projection {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Projection {
    /// Wraps a weight `[out, in]` and an optional bias `[out]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Projection { weight, bias }
    }

    /// Stacks projections that read the same input into one (rows concatenated).
    pub fn concat(parts: &[&Projection]) -> candle_core::Result<Self> {
        let weights: Vec<&Tensor> = parts.iter().map(|p| &p.weight).collect();
        let weight = Tensor::cat(&weights, 0)?;
        let bias = if parts.iter().all(|p| p.bias.is_some()) {
            let biases: Vec<&Tensor> = parts.iter().filter_map(|p| p.bias.as_ref()).collect();
            Some(Tensor::cat(&biases, 0)?)
        } else if parts.iter().any(|p| p.bias.is_some()) {
            let filled = parts
                .iter()
                .map(|p| match &p.bias {
                    Some(b) => Ok(b.clone()),
                    None => Tensor::zeros(p.out_features(), p.weight.dtype(), p.weight.device()),
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            Some(Tensor::cat(&filled, 0)?)
        } else {
            None
        };
        Ok(Projection { weight, bias })
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    /// The weight `[out, in]` (used by tests and merges).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Module for Projection {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = x.matmul(&self.weight.t()?)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}
