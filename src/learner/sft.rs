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

/// Learning without forgetting: sequences on which the adapted model's
/// next-token distributions are pulled toward the base model's,
/// `weight · KL(base ‖ adapted)` added to the loss on `per_step` of them
/// each step.
#[derive(Debug, Clone, Default)]
pub struct KlAnchors {
    /// `(tokens, answer_start, base log-probabilities [answer len, vocab])`.
    pub anchors: Vec<(Vec<u32>, usize, Tensor)>,
    pub weight: f64,
    pub per_step: usize,
}

impl KlAnchors {
    /// Builds the anchors' base log-probabilities once (a base model's
    /// property, so callers cache the result).
    pub fn new(model: &Llama, anchors: &[(Vec<u32>, usize)], weight: f64, per_step: usize) -> candle_core::Result<Self> {
        let mut out = Vec::with_capacity(anchors.len());
        let none = TrainableLora::empty();
        for (tokens, start) in anchors {
            let n = tokens.len() - start;
            if *start == 0 || n == 0 {
                continue;
            }
            let logits = model.forward_train_range(&tokens[..tokens.len() - 1], &none, start - 1, n)?;
            out.push((tokens.clone(), *start, candle_nn::ops::log_softmax(&logits, D::Minus1)?.detach()));
        }
        Ok(KlAnchors { anchors: out, weight, per_step })
    }

    /// `KL(base ‖ adapted)` per position on anchor `i` (differentiable).
    fn kl(&self, model: &Llama, lora: &TrainableLora, i: usize) -> candle_core::Result<Tensor> {
        let (tokens, start, base) = &self.anchors[i];
        let n = tokens.len() - start;
        let logits = model.forward_train_range(&tokens[..tokens.len() - 1], lora, start - 1, n)?;
        let lp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        (base.exp()? * (base - lp)?)?.sum_all()? / n as f64
    }
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
    let start = example.prompt.len() - 1;
    let logits = model.forward_train_range(&tokens[..tokens.len() - 1], lora, start, example.answer.len())?;
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
    train_until(model, lora, examples, cfg, |s, l| {
        on_step(s, l);
        true
    })
}

/// [`train`] that stops early when `on_step` returns false (cancellation).
pub fn train_until(
    model: &Llama,
    lora: &TrainableLora,
    examples: &[SftExample],
    cfg: &SftConfig,
    on_step: impl FnMut(usize, f32) -> bool,
) -> Result<Vec<f32>, LearnError> {
    train_regularized(model, lora, examples, cfg, None, on_step)
}

/// [`train_until`] with an optional KL pull toward the base on anchors.
/// The losses reported are the supervised part alone.
pub fn train_regularized(
    model: &Llama,
    lora: &TrainableLora,
    examples: &[SftExample],
    cfg: &SftConfig,
    anchors: Option<&KlAnchors>,
    mut on_step: impl FnMut(usize, f32) -> bool,
) -> Result<Vec<f32>, LearnError> {
    if !model.trainable() {
        return Err(LearnError::NotTrainable("activations are not f32; serve the model with dtype f32 to train".into()));
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
        let mut objective = loss.clone();
        if let Some(a) = anchors.filter(|a| !a.anchors.is_empty() && a.weight > 0.0 && a.per_step > 0) {
            for k in 0..a.per_step {
                let i = (step * a.per_step + k) % a.anchors.len();
                objective = (objective + (a.kl(model, lora, i)? * (a.weight / a.per_step as f64))?)?;
            }
        }
        let grads = objective.backward()?;
        opt.step(&grads)?;
        // The gradient store also holds the frozen weights' gradients: drop it now.
        drop(grads);
        let value = loss.to_scalar::<f32>()?;
        losses.push(value);
        if !on_step(step, value) {
            break;
        }
    }
    Ok(losses)
}
