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
