//! Supervised fine-tuning of a LoRA adapter: next-token cross-entropy on
//! the answer tokens of prompt → answer examples, AdamW on the adapter's
//! `A` and `B` only.

use candle_core::{Tensor, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::LearnError;
use crate::lora::trainable::TrainableLora;
use crate::model::llama::Llama;

/// One example: the model should answer `answer` to `prompt` (token ids).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SftExample {
    pub prompt: Vec<u32>,
    pub answer: Vec<u32>,
}

/// How to train.
#[derive(Debug, Clone)]
pub struct SftConfig {
    pub steps: usize,
    pub learning_rate: f64,
    /// Examples per optimizer step.
    pub batch_size: usize,
    /// Orders the examples, so a run is reproducible.
    pub seed: u64,
}

impl Default for SftConfig {
    fn default() -> Self {
        SftConfig { steps: 30, learning_rate: 1e-3, batch_size: 4, seed: 0 }
    }
}

/// Mean cross-entropy of `example.answer` given its prompt (a scalar tensor, differentiable).
pub fn example_loss(model: &Llama, lora: &TrainableLora, example: &SftExample) -> candle_core::Result<Tensor> {
    let tokens: Vec<u32> = example.prompt.iter().chain(&example.answer).copied().collect();
    let logits = model.forward_train(&tokens[..tokens.len() - 1], lora)?;
    let start = example.prompt.len() - 1;
    let logits = logits.narrow(0, start, example.answer.len())?;
    let targets = Tensor::from_vec(example.answer.clone(), example.answer.len(), logits.device())?;
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let picked = log_probs.gather(&targets.unsqueeze(1)?, 1)?;
    picked.mean_all()?.neg()
}

/// Trains `lora` in place; `on_step(step, loss)` sees each step's mean loss.
/// Returns the losses.
pub fn train(
    model: &Llama,
    lora: &TrainableLora,
    examples: &[SftExample],
    cfg: &SftConfig,
    mut on_step: impl FnMut(usize, f32),
) -> Result<Vec<f32>, LearnError> {
    if !model.trainable() {
        return Err(LearnError::NotTrainable("quantized or non-f32 weights; serve an f32 checkpoint to train".into()));
    }
    let usable: Vec<&SftExample> = examples.iter().filter(|e| !e.prompt.is_empty() && !e.answer.is_empty()).collect();
    if usable.is_empty() {
        return Err(LearnError::NoExamples("every example needs a prompt and an answer".into()));
    }
    let params = ParamsAdamW { lr: cfg.learning_rate, weight_decay: 0.0, ..Default::default() };
    let mut opt = AdamW::new(lora.vars(), params)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    let mut order: Vec<usize> = Vec::new();
    let mut losses = Vec::with_capacity(cfg.steps);
    for step in 0..cfg.steps {
        let mut batch_loss: Option<Tensor> = None;
        let n = cfg.batch_size.clamp(1, usable.len());
        for _ in 0..n {
            if order.is_empty() {
                order = (0..usable.len()).collect();
                order.shuffle(&mut rng);
            }
            let i = order.pop().unwrap_or(0);
            let l = example_loss(model, lora, usable[i])?;
            batch_loss = Some(match batch_loss {
                None => l,
                Some(acc) => (acc + l)?,
            });
        }
        let Some(total) = batch_loss else { break };
        let loss = (total / n as f64)?;
        let grads = loss.backward()?;
        opt.step(&grads)?;
        // The gradient store also holds the frozen weights' gradients: drop it now.
        drop(grads);
        let value = loss.to_scalar::<f32>()?;
        losses.push(value);
        on_step(step, value);
    }
    Ok(losses)
}
