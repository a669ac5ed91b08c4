//! Fine-tuning a LoRA adapter from lessons, AdamW on the adapter's `A` and
//! `B` only: imitation (next-token cross-entropy on an answer), preference
//! (DPO against the starting adapter, plus imitation of the preferred
//! answer) and avoidance (unlikelihood of an answer users rated down).

use candle_core::{Tensor, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::LearnError;
use crate::lora::trainable::TrainableLora;
use crate::model::llama::{Llama, PackedSeq};

/// One example: the model should answer `answer` to `prompt` (token ids).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SftExample {
    pub prompt: Vec<u32>,
    pub answer: Vec<u32>,
}

/// What one piece of feedback teaches.
#[derive(Debug, Clone, PartialEq)]
pub enum Lesson {
    /// Say `answer` to `prompt`.
    Imitate(SftExample),
    /// Say `chosen` rather than `rejected`: DPO (Rafailov et al. 2023) with
    /// the run's starting adapter as the reference, plus imitation of
    /// `chosen` so the preferred text is learned, not only ranked.
    Prefer { prompt: Vec<u32>, chosen: Vec<u32>, rejected: Vec<u32> },
    /// Do not say `answer` (unlikelihood, Welleck et al. 2019): a down-rating
    /// with nothing better offered.
    Avoid(SftExample),
}

impl Lesson {
    /// The answer this lesson wants said, as an example (what held-out loss and exact match measure).
    pub fn target(&self) -> Option<SftExample> {
        match self {
            Lesson::Imitate(e) => Some(e.clone()),
            Lesson::Prefer { prompt, chosen, .. } => Some(SftExample { prompt: prompt.clone(), answer: chosen.clone() }),
            Lesson::Avoid(_) => None,
        }
    }

    /// The answer this lesson wants avoided.
    pub fn avoided(&self) -> Option<SftExample> {
        match self {
            Lesson::Imitate(_) => None,
            Lesson::Prefer { prompt, rejected, .. } => Some(SftExample { prompt: prompt.clone(), answer: rejected.clone() }),
            Lesson::Avoid(e) => Some(e.clone()),
        }
    }

    /// Tokens one pass over this lesson reads.
    pub fn tokens(&self) -> usize {
        match self {
            Lesson::Imitate(e) | Lesson::Avoid(e) => e.prompt.len() + e.answer.len(),
            Lesson::Prefer { prompt, chosen, rejected } => 2 * prompt.len() + chosen.len() + rejected.len(),
        }
    }

    fn usable(&self) -> bool {
        let ok = |p: &[u32], a: &[u32]| !p.is_empty() && !a.is_empty();
        match self {
            Lesson::Imitate(e) | Lesson::Avoid(e) => ok(&e.prompt, &e.answer),
            Lesson::Prefer { prompt, chosen, rejected } => ok(prompt, chosen) && ok(prompt, rejected),
        }
    }
}

/// DPO's inverse temperature: how far from the reference the policy may move per nat of preference.
pub const DPO_BETA: f64 = 0.1;

/// Learning without forgetting: sequences on which the adapted model's
/// next-token distributions are pulled toward the base model's,
/// `weight · KL(base ‖ adapted)` added to the loss on `per_step` of them
/// each step.
#[derive(Debug, Clone, Default)]
pub struct KlAnchors {
    pub anchors: Vec<KlAnchor>,
    pub weight: f64,
    pub per_step: usize,
}

/// How much harder a run pulls toward the base when its starting adapter
/// already drifts `parent_kl` nats from it, of a budget of `max_drift`:
/// drift is judged against the base, so every lesson after the first
/// spends what its parent left, and the pull grows as that shrinks, by
/// `1 / (1 - used share)` (at most 10×, for a parent at or beyond the budget).
pub fn drift_budget_factor(parent_kl: f64, max_drift: f64) -> f64 {
    if max_drift <= 0.0 || !parent_kl.is_finite() {
        return 1.0;
    }
    1.0 / (1.0 - (parent_kl / max_drift).clamp(0.0, 0.9))
}

/// Base tokens kept per position of an anchor: the KL is taken between
/// the two distributions coarsened to these tokens plus one bucket for the
/// rest (a lower bound of the full KL, and close to it when the base puts
/// little mass outside its top tokens). 64 instead of a whole vocabulary
/// keeps an anchor at kilobytes instead of megabytes.
pub const KL_TOP_TOKENS: usize = 64;

/// One anchor: a sequence the base model wrote and its top next-token
/// log-probabilities over the answer.
#[derive(Debug, Clone)]
pub struct KlAnchor {
    pub tokens: Vec<u32>,
    /// Where the answer starts in `tokens`.
    pub answer_start: usize,
    /// `[answer len, KL_TOP_TOKENS]`: the base's most likely tokens per position.
    top_ids: Tensor,
    /// Their base log-probabilities, same shape.
    top_log_probs: Tensor,
    /// `[answer len]`: the base's probability of every other token.
    rest: Tensor,
}

impl KlAnchors {
    /// Builds the anchors' base log-probabilities once (a base model's
    /// property, so callers cache the result).
    pub fn new(model: &Llama, anchors: &[(Vec<u32>, usize)], weight: f64, per_step: usize) -> candle_core::Result<Self> {
        let mut out = Vec::with_capacity(anchors.len());
        let none = TrainableLora::empty();
        for (tokens, start) in anchors {
            let n = tokens.len().saturating_sub(*start);
            if *start == 0 || n == 0 {
                continue;
            }
            let logits = model.forward_train_range(&tokens[..tokens.len() - 1], &none, start - 1, n)?;
            let rows = candle_nn::ops::log_softmax(&logits.detach(), D::Minus1)?.to_vec2::<f32>()?;
            let k = KL_TOP_TOKENS.min(rows.first().map_or(0, Vec::len));
            let (mut ids, mut lps, mut rest) = (Vec::with_capacity(n * k), Vec::with_capacity(n * k), Vec::with_capacity(n));
            for row in &rows {
                let mut order: Vec<u32> = (0..row.len() as u32).collect();
                order.select_nth_unstable_by(k - 1, |&a, &b| row[b as usize].total_cmp(&row[a as usize]));
                let top = &order[..k];
                let kept: f32 = top.iter().map(|&i| row[i as usize].exp()).sum();
                ids.extend_from_slice(top);
                lps.extend(top.iter().map(|&i| row[i as usize]));
                rest.push((1.0 - kept).max(0.0));
            }
            let device = logits.device();
            out.push(KlAnchor {
                tokens: tokens.clone(),
                answer_start: *start,
                top_ids: Tensor::from_vec(ids, (n, k), device)?,
                top_log_probs: Tensor::from_vec(lps, (n, k), device)?,
                rest: Tensor::from_vec(rest, n, device)?,
            });
        }
        Ok(KlAnchors { anchors: out, weight, per_step })
    }

    /// The KL term of anchor `i` under `lora`, measured (no gradient kept).
    pub fn kl(&self, model: &Llama, lora: &TrainableLora, i: usize) -> candle_core::Result<f32> {
        let piece = self.piece(i);
        let logits = packed_logits(model, lora, &[&piece])?;
        self.kl_from_logits(i, &logits[0].detach())?.to_scalar::<f32>()
    }

    /// The sequence anchor `i`'s KL term reads.
    fn piece(&self, i: usize) -> Piece {
        let a = &self.anchors[i];
        Piece { tokens: a.tokens[..a.tokens.len() - 1].to_vec(), start: a.answer_start - 1, targets: a.tokens[a.answer_start..].to_vec() }
    }

    /// `KL(base ‖ adapted)` per position on anchor `i`, over the base's top
    /// tokens and one bucket for the rest, from the adapted logits of its
    /// piece (differentiable).
    fn kl_from_logits(&self, i: usize, logits: &Tensor) -> candle_core::Result<Tensor> {
        let a = &self.anchors[i];
        let n = a.tokens.len() - a.answer_start;
        let lp = candle_nn::ops::log_softmax(logits, D::Minus1)?.gather(&a.top_ids, 1)?;
        let top = (a.top_log_probs.exp()? * (&a.top_log_probs - &lp)?)?.sum_all()?;
        // The rest bucket: p·(log p − log q) with q = 1 − Σ top q, kept off 0.
        let q_rest = lp.exp()?.sum(1)?.affine(-1.0, 1.0)?.clamp(1e-6f32, 1.0f32)?;
        let p_rest = a.rest.clamp(1e-12f32, 1.0f32)?;
        let rest = (&p_rest * (p_rest.log()? - q_rest.log()?)?)?.sum_all()?;
        (top + rest)? / n as f64
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
    /// Stop before `steps` once this share of the lessons is learned
    /// (greedy decoding gives each wanted answer, with a margin), taking
    /// unlearned lessons first into each batch; `None` runs every step.
    pub until_learned: Option<f64>,
}

impl Default for SftConfig {
    fn default() -> Self {
        SftConfig { steps: 30, learning_rate: 1e-3, batch_size: 4, seed: 0, until_learned: None }
    }
}

/// Mean cross-entropy of `example.answer` given its prompt (a scalar tensor, differentiable).
pub fn example_loss(model: &Llama, lora: &TrainableLora, example: &SftExample) -> candle_core::Result<Tensor> {
    answer_log_probs(model, lora, &example.prompt, &example.answer)?.mean_all()?.neg()
}

/// Log-probability of each answer token given the prompt and the answer so far: `[answer len]`.
fn answer_log_probs(model: &Llama, lora: &TrainableLora, prompt: &[u32], answer: &[u32]) -> candle_core::Result<Tensor> {
    let piece = Piece::answer(prompt, answer);
    let logits = packed_logits(model, lora, &[&piece])?;
    picked_log_probs(&logits[0], &piece.targets)
}

/// `softplus(z) = log(1 + e^z)`, computed without overflow.
fn softplus(z: &Tensor) -> candle_core::Result<Tensor> {
    let tail = (z.abs()?.neg()?.exp()? + 1.0)?.log()?;
    z.relu()? + tail
}

/// Unlikelihood of `example.answer`: mean of `-log(1 - p(token))` (differentiable).
pub fn avoid_loss(model: &Llama, lora: &TrainableLora, example: &SftExample) -> candle_core::Result<Tensor> {
    lesson_loss(model, lora, &Lesson::Avoid(example.clone()), None)
}

/// A sequence one loss reads: its input tokens, where the answer's logits
/// start, and the answer's tokens (the targets).
struct Piece {
    tokens: Vec<u32>,
    start: usize,
    targets: Vec<u32>,
}

impl Piece {
    fn answer(prompt: &[u32], answer: &[u32]) -> Piece {
        let mut tokens: Vec<u32> = prompt.iter().chain(answer).copied().collect();
        tokens.pop();
        Piece { tokens, start: prompt.len() - 1, targets: answer.to_vec() }
    }
}

/// The sequences a lesson's loss reads, in the order [`loss_from_logits`] takes them.
fn lesson_pieces(lesson: &Lesson) -> Vec<Piece> {
    match lesson {
        Lesson::Imitate(e) | Lesson::Avoid(e) => vec![Piece::answer(&e.prompt, &e.answer)],
        Lesson::Prefer { prompt, chosen, rejected } => vec![Piece::answer(prompt, chosen), Piece::answer(prompt, rejected)],
    }
}

/// Each target's log-probability, `[len]`, from logits rows `[len, vocab]`.
fn picked_log_probs(logits: &Tensor, targets: &[u32]) -> candle_core::Result<Tensor> {
    let t = Tensor::from_vec(targets.to_vec(), targets.len(), logits.device())?;
    candle_nn::ops::log_softmax(logits, D::Minus1)?.gather(&t.unsqueeze(1)?, 1)?.squeeze(1)
}

/// A lesson's loss from the logits of its pieces.
fn loss_from_logits(lesson: &Lesson, pieces: &[Piece], logits: &[Tensor], reference: Option<(f32, f32)>) -> candle_core::Result<Tensor> {
    match lesson {
        Lesson::Imitate(_) => picked_log_probs(&logits[0], &pieces[0].targets)?.mean_all()?.neg(),
        Lesson::Avoid(_) => {
            let lp = picked_log_probs(&logits[0], &pieces[0].targets)?;
            // 1 - p, kept away from 0 so a token already certain gives a finite, steep loss.
            let rest = lp.exp()?.affine(-1.0, 1.0)?.clamp(1e-6f32, 1.0f32)?;
            rest.log()?.mean_all()?.neg()
        }
        Lesson::Prefer { .. } => {
            let lc = picked_log_probs(&logits[0], &pieces[0].targets)?;
            let lr = picked_log_probs(&logits[1], &pieces[1].targets)?;
            let (ref_c, ref_r) = match reference {
                Some(r) => r,
                None => (lc.detach().sum_all()?.to_scalar::<f32>()?, lr.detach().sum_all()?.to_scalar::<f32>()?),
            };
            let margin = ((lc.sum_all()? - lr.sum_all()?)? - (ref_c - ref_r) as f64)?;
            let dpo = softplus(&(margin * -DPO_BETA)?)?;
            lc.mean_all()?.neg()? + dpo
        }
    }
}

/// One packed pass over `pieces`: their logits, in order.
fn packed_logits(model: &Llama, lora: &TrainableLora, pieces: &[&Piece]) -> candle_core::Result<Vec<Tensor>> {
    let seqs: Vec<PackedSeq<'_>> = pieces.iter().map(|p| PackedSeq { tokens: &p.tokens, start: p.start, len: p.targets.len() }).collect();
    model.forward_train_packed(&seqs, lora)
}

/// A lesson's loss. `reference` holds a preference's `(chosen, rejected)`
/// sequence log-probabilities under the starting adapter.
pub fn lesson_loss(model: &Llama, lora: &TrainableLora, lesson: &Lesson, reference: Option<(f32, f32)>) -> candle_core::Result<Tensor> {
    let pieces = lesson_pieces(lesson);
    let logits = packed_logits(model, lora, &pieces.iter().collect::<Vec<_>>())?;
    loss_from_logits(lesson, &pieces, &logits, reference)
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
    on_step: impl FnMut(usize, f32) -> bool,
) -> Result<Vec<f32>, LearnError> {
    let lessons: Vec<Lesson> = examples.iter().cloned().map(Lesson::Imitate).collect();
    train_lessons(model, lora, &lessons, cfg, anchors, on_step)
}

/// Trains `lora` in place on `lessons`, `batch_size` of them a step, with
/// an optional KL pull toward the base on anchors. Preferences are judged
/// against `lora` as it was when called. The losses reported are the
/// lessons' part alone (without the KL term).
pub fn train_lessons(
    model: &Llama,
    lora: &TrainableLora,
    lessons: &[Lesson],
    cfg: &SftConfig,
    anchors: Option<&KlAnchors>,
    on_step: impl FnMut(usize, f32) -> bool,
) -> Result<Vec<f32>, LearnError> {
    let mut on_step = on_step;
    let mut trainer = Trainer::new(model, lora, lessons, cfg.learning_rate, anchors)?;
    let all: Vec<usize> = (0..lessons.len()).collect();
    let run = train_lessons_on(&mut trainer, &all, cfg, &|step: &mut (dyn FnMut() + Send)| step(), |p| on_step(p.step, p.loss))?;
    Ok(run.losses)
}

/// Runs one training step's tensor work; lets a caller pick the thread pool per step.
pub type StepRunner<'a> = &'a (dyn Fn(&mut (dyn FnMut() + Send)) + Sync);

/// Where a run stands after a step.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// The step just taken, from 0.
    pub step: usize,
    /// Its mean lesson loss (without the KL term).
    pub loss: f32,
    /// Lessons learned as the steps' own logits last showed them.
    pub learned: usize,
    pub lessons: usize,
}

/// What a training run did.
#[derive(Debug, Clone, Default)]
pub struct TrainRun {
    /// Each step's loss (the lessons' part).
    pub losses: Vec<f32>,
    /// Whether it stopped with every lesson learned (see [`SftConfig::until_learned`]).
    pub all_learned: bool,
}

/// Trains on the lessons of `trainer` that `active` names (its usable
/// ones), each step's work run through `run_step` (the learner runs a
/// step on all cores while serving is idle, on its own small pool
/// otherwise). Each batch takes lessons not yet learned first (as the
/// steps' own logits last showed), then the others in shuffled order, so
/// steps go where they teach something; with [`SftConfig::until_learned`]
/// it stops once a check confirms that share of the lessons learned. The trainer keeps
/// its optimizer state across calls: a later call on more lessons
/// continues the same run rather than jolting the adapter with a fresh
/// optimizer's first steps.
pub fn train_lessons_on(
    trainer: &mut Trainer<'_>,
    active: &[usize],
    cfg: &SftConfig,
    run_step: StepRunner<'_>,
    mut on_step: impl FnMut(&Progress) -> bool,
) -> Result<TrainRun, LearnError> {
    let active: Vec<usize> = active.iter().copied().filter(|&i| trainer.usable(i)).collect();
    let count = active.len();
    if count == 0 {
        return Err(LearnError::NoExamples("every example needs a prompt and an answer".into()));
    }
    // Aids (paraphrases) are trained on but never waited for.
    let required: Vec<usize> = (0..count).filter(|&k| !trainer.is_aid(active[k])).collect();
    let wanted = required.len();
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    let mut order: Vec<usize> = Vec::new();
    // Whether each active lesson was learned when a step last read it.
    let mut learned = vec![false; count];
    let mut run = TrainRun::default();
    // A check that fails (a lesson the step saw learned was undone by a
    // later update) costs a pass over every lesson; the next waits a few steps.
    let mut next_check = 0;
    for step in 0..cfg.steps {
        let n = cfg.batch_size.clamp(1, count);
        let mut picks: Vec<usize> = Vec::with_capacity(n);
        if cfg.until_learned.is_some() && wanted > 0 {
            // Unlearned lessons first, starting after the last one taken so
            // each gets its turn; with aids about, one place is left to them.
            let room = if wanted < count { n - n / 4 } else { n };
            let first = (step * n) % wanted;
            picks.extend((0..wanted).map(|j| required[(first + j) % wanted]).filter(|&k| !learned[k]).take(room));
        }
        while picks.len() < n {
            if order.is_empty() {
                order = (0..count).collect();
                order.shuffle(&mut rng);
            }
            let i = order.pop().unwrap_or(0);
            if !picks.contains(&i) {
                picks.push(i);
            }
        }
        let batch: Vec<usize> = picks.iter().map(|&k| active[k]).collect();
        let mut result: Option<Result<StepOutcome, LearnError>> = None;
        run_step(&mut || result = Some(trainer.step(&batch)));
        let outcome = result.unwrap_or_else(|| Err(LearnError::NoExamples("the step did not run".into())))?;
        for (&k, &l) in picks.iter().zip(&outcome.learned) {
            learned[k] = l;
        }
        run.losses.push(outcome.loss);
        let known = |learned: &[bool]| required.iter().filter(|&&k| learned[k]).count();
        let progress = Progress { step, loss: outcome.loss, learned: known(&learned), lessons: wanted };
        if !on_step(&progress) {
            break;
        }
        let needed = cfg.until_learned.map(|share| ((share.clamp(0.0, 1.0) * wanted as f64).ceil() as usize).max(1));
        if wanted > 0 && step >= next_check && needed.is_some_and(|n| progress.learned >= n) {
            // The flags come from before each lesson's last update: confirm with the adapter as it is now.
            let ids: Vec<usize> = required.iter().map(|&k| active[k]).collect();
            let mut check: Option<Result<Vec<bool>, LearnError>> = None;
            run_step(&mut || check = Some(trainer.learned(&ids)));
            let now = check.unwrap_or_else(|| Err(LearnError::NoExamples("the check did not run".into())))?;
            for (&k, l) in required.iter().zip(now) {
                learned[k] = l;
            }
            let confirmed = known(&learned);
            if needed.is_some_and(|n| confirmed >= n) {
                run.all_learned = confirmed == wanted;
                break;
            }
            next_check = step + 1 + CHECK_BACKOFF_STEPS;
        }
    }
    Ok(run)
}

/// Steps a failed learned-check waits before the next one.
const CHECK_BACKOFF_STEPS: usize = 2;

/// How far the wanted token's logit must lead every other, at each
/// position of an answer, for the answer to count as learned (serving
/// computes the same logits, so the margin is room to spare, not a
/// guard against rounding).
pub const LEARNED_MARGIN: f32 = 0.1;

/// One optimizer step's result.
#[derive(Debug, Clone)]
pub struct StepOutcome {
    /// The batch's mean lesson loss (without the KL term).
    pub loss: f32,
    /// Per lesson of the batch: whether it was already learned before the
    /// step (from the step's own logits; see [`Lesson::learned_from`]).
    pub learned: Vec<bool>,
}

/// Trains one adapter on a fixed set of lessons, a batch at a time: the
/// optimizer state, each preference's reference log-probabilities and the
/// KL anchors live here.
pub struct Trainer<'a> {
    model: &'a Llama,
    lora: &'a TrainableLora,
    lessons: &'a [Lesson],
    /// A taught preference's `(chosen, rejected)` log-probabilities under
    /// the starting adapter; measured at the first step (`None` before).
    reference: Option<Vec<Option<(f32, f32)>>>,
    anchors: Option<&'a KlAnchors>,
    opt: AdamW,
    steps: usize,
    /// Lessons trained on but not waited for (see [`Trainer::set_aids`]).
    aids: Vec<bool>,
    /// Per lesson held rather than taught (see [`Trainer::hold`]): the
    /// log-probabilities its answer's tokens are held at.
    held_at: Vec<Option<Tensor>>,
    /// The KL pull as it is now (see [`Trainer::set_pull`]).
    pull: PullDial,
}

/// A handle on a trainer's KL pull that a run can turn between steps (from
/// a step callback, while the trainer is busy): the anchors' weight times
/// a scale, on a number of anchors a step.
#[derive(Debug, Clone, Default)]
pub struct PullDial(std::sync::Arc<std::sync::Mutex<Option<(f64, usize)>>>);

impl PullDial {
    /// Pulls `scale` times as hard as the anchors say, on `per_step` anchors a step.
    pub fn set(&self, scale: f64, per_step: usize) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some((scale.max(0.0), per_step.max(1)));
    }

    fn get(&self) -> Option<(f64, usize)> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Lessons per packed pass when measuring without gradients.
const CHECK_CHUNK: usize = 16;

/// Logits of one packed pass: each lesson's pieces with their logits, then `extra`'s logits.
struct LessonLogits {
    pieces: Vec<Vec<Piece>>,
    per_lesson: Vec<Vec<Tensor>>,
    extra: Vec<Tensor>,
}

fn lesson_logits(model: &Llama, lora: &TrainableLora, lessons: &[&Lesson], extra: &[Piece]) -> candle_core::Result<LessonLogits> {
    let pieces: Vec<Vec<Piece>> = lessons.iter().map(|l| lesson_pieces(l)).collect();
    let all: Vec<&Piece> = pieces.iter().flatten().chain(extra).collect();
    let mut logits = packed_logits(model, lora, &all)?.into_iter();
    let per_lesson = pieces.iter().map(|p| logits.by_ref().take(p.len()).collect()).collect();
    Ok(LessonLogits { pieces, per_lesson, extra: logits.collect() })
}

impl<'a> Trainer<'a> {
    /// A trainer over `lessons` (batches index them; those without a
    /// prompt or an answer are never trained on). The preferences'
    /// reference log-probabilities are measured at the first step, under
    /// the adapter as it is then (the run's start), and only for lessons
    /// that are taught rather than held (see [`Trainer::hold`]).
    pub fn new(
        model: &'a Llama,
        lora: &'a TrainableLora,
        lessons: &'a [Lesson],
        learning_rate: f64,
        anchors: Option<&'a KlAnchors>,
    ) -> Result<Self, LearnError> {
        if !model.trainable() {
            return Err(LearnError::NotTrainable("activations are not f32; serve the model with dtype f32 to train".into()));
        }
        if !lessons.iter().any(|l| l.usable()) {
            return Err(LearnError::NoExamples("every example needs a prompt and an answer".into()));
        }
        let params = ParamsAdamW { lr: learning_rate, weight_decay: 0.0, ..Default::default() };
        let opt = AdamW::new(lora.vars(), params)?;
        let aids = vec![false; lessons.len()];
        let held_at = vec![None; lessons.len()];
        Ok(Trainer { model, lora, lessons, reference: None, anchors, opt, steps: 0, aids, held_at, pull: PullDial::default() })
    }

    /// The taught preferences' `(chosen, rejected)` log-probabilities under
    /// the adapter as it is now, a few lessons per packed pass.
    fn measure_references(&self) -> candle_core::Result<Vec<Option<(f32, f32)>>> {
        let lessons = self.lessons;
        let mut reference = vec![None; lessons.len()];
        let prefs: Vec<usize> = (0..lessons.len())
            .filter(|&i| lessons[i].usable() && self.held_at[i].is_none() && matches!(lessons[i], Lesson::Prefer { .. }))
            .collect();
        for chunk in prefs.chunks(CHECK_CHUNK) {
            let chunk_lessons: Vec<&Lesson> = chunk.iter().map(|&i| &lessons[i]).collect();
            let out = lesson_logits(self.model, self.lora, &chunk_lessons, &[])?;
            for (k, &i) in chunk.iter().enumerate() {
                let sum = |j: usize| -> candle_core::Result<f32> {
                    picked_log_probs(&out.per_lesson[k][j].detach(), &out.pieces[k][j].targets)?.sum_all()?.to_scalar::<f32>()
                };
                reference[i] = Some((sum(0)?, sum(1)?));
            }
            super::eval::pace();
        }
        Ok(reference)
    }

    fn check_ids(&self, ids: &[usize]) -> Result<(), LearnError> {
        match ids.iter().find(|&&i| !self.usable(i)) {
            Some(i) => Err(LearnError::NoExamples(format!("lesson {i} does not exist or has no prompt or answer"))),
            None => Ok(()),
        }
    }

    /// Makes lessons `ids` the aids (earlier marks cleared): trained on,
    /// but a run that stops once its lessons are learned does not wait for
    /// them (paraphrases of a question help it generalize; the question
    /// itself must be learned).
    pub fn set_aids(&mut self, ids: &[usize]) {
        self.aids.iter_mut().for_each(|a| *a = false);
        for &i in ids {
            if let Some(a) = self.aids.get_mut(i) {
                *a = true;
            }
        }
    }

    /// Holds lessons `ids` where the adapter has them now instead of
    /// teaching them further: from here on, each of their wanted tokens is
    /// pulled back only once its log-probability falls more than
    /// [`HOLD_SLACK`] below what it is now (a preference keeps its chosen
    /// answer this way; its DPO term is dropped, and held before the first
    /// step its DPO reference is never measured), and an avoided answer's
    /// tokens only once theirs rise more than that above it.
    ///
    /// Replayed lessons, learned by an earlier version, are held: teaching
    /// them again would sharpen answers already given, which moves the
    /// model on everything else for nothing (drift from the base), while
    /// holding them still catches what the new lessons disturb.
    pub fn hold(&mut self, ids: &[usize]) -> Result<(), LearnError> {
        self.check_ids(ids)?;
        for chunk in ids.chunks(CHECK_CHUNK) {
            let forms: Vec<Lesson> = chunk.iter().map(|&i| held_form(&self.lessons[i])).collect();
            let refs: Vec<&Lesson> = forms.iter().collect();
            let measured = lesson_logits(self.model, self.lora, &refs, &[])?;
            for ((&i, pieces), logits) in chunk.iter().zip(&measured.pieces).zip(&measured.per_lesson) {
                let now = picked_log_probs(&logits[0].detach(), &pieces[0].targets)?;
                self.held_at[i] = Some(now);
            }
            super::eval::pace();
        }
        Ok(())
    }

    /// The wanted answer's per-token log-probabilities lesson `i` is held
    /// at (a preference's chosen answer), if it is held (an avoided
    /// answer's are those it must not rise above).
    pub fn held_log_probs(&self, i: usize) -> Option<&Tensor> {
        self.held_at.get(i).and_then(Option::as_ref)
    }

    /// Pulls toward the base `scale` times as hard as the anchors say, on
    /// `per_step` anchors a step: how a run holds drift to its bound (the
    /// pull is raised while a checkpoint is beyond it).
    pub fn set_pull(&mut self, scale: f64, per_step: usize) {
        self.pull.set(scale, per_step);
    }

    /// A handle that turns this trainer's pull from elsewhere (a step callback).
    pub fn pull_dial(&self) -> PullDial {
        self.pull.clone()
    }

    /// The KL pull now: the weight and the anchors a step.
    pub fn pull(&self) -> (f64, usize) {
        match (self.anchors, self.pull.get()) {
            (Some(a), Some((scale, per_step))) => (a.weight * scale, per_step),
            (Some(a), None) => (a.weight, a.per_step),
            (None, _) => (0.0, 0),
        }
    }

    /// Whether lesson `i` is an aid.
    pub fn is_aid(&self, i: usize) -> bool {
        self.aids.get(i).copied().unwrap_or(false)
    }

    /// Whether lesson `i` can be trained on (a prompt and an answer).
    pub fn usable(&self, i: usize) -> bool {
        self.lessons.get(i).is_some_and(|l| l.usable())
    }

    /// One optimizer step on the lessons `batch` names, every sequence of
    /// the step (lessons, then anchors) in one packed pass.
    pub fn step(&mut self, batch: &[usize]) -> Result<StepOutcome, LearnError> {
        if batch.is_empty() {
            return Err(LearnError::NoExamples("empty batch".into()));
        }
        self.check_ids(batch)?;
        if self.reference.is_none() {
            self.reference = Some(self.measure_references()?);
        }
        let (weight, per_step) = self.pull();
        let active = self.anchors.filter(|a| !a.anchors.is_empty() && weight > 0.0 && per_step > 0);
        let per_step = per_step.min(active.map_or(0, |a| a.anchors.len()));
        let anchor_ids: Vec<usize> = match active {
            Some(a) => (0..per_step).map(|k| (self.steps * per_step + k) % a.anchors.len()).collect(),
            None => Vec::new(),
        };
        let anchor_pieces: Vec<Piece> = match active {
            Some(a) => anchor_ids.iter().map(|&i| a.piece(i)).collect(),
            None => Vec::new(),
        };
        let forms: Vec<std::borrow::Cow<'_, Lesson>> = batch
            .iter()
            .map(|&i| match self.held_at[i] {
                Some(_) => std::borrow::Cow::Owned(held_form(&self.lessons[i])),
                None => std::borrow::Cow::Borrowed(&self.lessons[i]),
            })
            .collect();
        let chosen: Vec<&Lesson> = forms.iter().map(|f| f.as_ref()).collect();
        let out = lesson_logits(self.model, self.lora, &chosen, &anchor_pieces)?;
        let mut total: Option<Tensor> = None;
        let mut learned = Vec::with_capacity(batch.len());
        for (k, &i) in batch.iter().enumerate() {
            let own = &out.per_lesson[k];
            learned.push(chosen[k].learned_from(own)?);
            let l = match &self.held_at[i] {
                Some(held) => hold_loss(chosen[k], &own[0], &out.pieces[k][0].targets, held)?,
                None => loss_from_logits(&self.lessons[i], &out.pieces[k], own, self.reference.as_ref().and_then(|r| r[i]))?,
            };
            total = Some(match total {
                None => l,
                Some(acc) => (acc + l)?,
            });
        }
        let Some(total) = total else { return Err(LearnError::NoExamples("empty batch".into())) };
        let loss = (total / batch.len() as f64)?;
        let mut objective = loss.clone();
        if let Some(a) = active {
            for (k, &i) in anchor_ids.iter().enumerate() {
                let kl = a.kl_from_logits(i, &out.extra[k])?;
                objective = (objective + (kl * (weight / per_step as f64))?)?;
            }
        }
        let grads = objective.backward()?;
        self.opt.step(&grads)?;
        // The gradient store holds every intermediate's gradient too: drop it now.
        drop(grads);
        self.steps += 1;
        Ok(StepOutcome { loss: loss.to_scalar::<f32>()?, learned })
    }

    /// Whether each lesson `ids` names is learned by the adapter as it is now.
    pub fn learned(&self, ids: &[usize]) -> Result<Vec<bool>, LearnError> {
        self.check_ids(ids)?;
        let mut out = Vec::with_capacity(ids.len());
        // Whether a preference is learned reads its chosen answer alone:
        // the check measures that, not the rejected one too.
        for chunk in ids.chunks(CHECK_CHUNK) {
            let forms: Vec<Lesson> = chunk.iter().map(|&i| held_form(&self.lessons[i])).collect();
            let chunk_lessons: Vec<&Lesson> = forms.iter().collect();
            let measured = lesson_logits(self.model, self.lora, &chunk_lessons, &[])?;
            for (lesson, own) in chunk_lessons.iter().zip(&measured.per_lesson) {
                let own: Vec<Tensor> = own.iter().map(Tensor::detach).collect();
                out.push(lesson.learned_from(&own)?);
            }
        }
        Ok(out)
    }
}

/// How far (nats) a held lesson's wanted token may fall below its
/// log-probability when the hold began before it is pulled back. Small
/// enough that replay loss stays well within `learning.max_regression`.
pub const HOLD_SLACK: f64 = 0.05;

/// A lesson as it is held or checked: a preference by its chosen answer alone.
fn held_form(lesson: &Lesson) -> Lesson {
    match lesson {
        Lesson::Prefer { prompt, chosen, .. } => Lesson::Imitate(SftExample { prompt: prompt.clone(), answer: chosen.clone() }),
        other => other.clone(),
    }
}

/// A held lesson's loss: the mean distance of its answer's tokens'
/// log-probabilities beyond [`HOLD_SLACK`] of where they were held, below
/// for a wanted answer, above for an avoided one (zero while none strays).
fn hold_loss(lesson: &Lesson, logits: &Tensor, targets: &[u32], held: &Tensor) -> candle_core::Result<Tensor> {
    let lp = picked_log_probs(logits, targets)?;
    let strayed = match lesson {
        Lesson::Avoid(_) => ((lp - held)? - HOLD_SLACK)?,
        _ => ((held - lp)? - HOLD_SLACK)?,
    };
    strayed.relu()?.mean_all()
}

/// Per position, the target's logit minus the largest other logit.
fn target_leads(logits: &Tensor, targets: &[u32]) -> candle_core::Result<Vec<f32>> {
    let rows = logits.detach().to_vec2::<f32>()?;
    Ok(rows
        .iter()
        .zip(targets)
        .map(|(row, &t)| {
            let wanted = row.get(t as usize).copied().unwrap_or(f32::NEG_INFINITY);
            let best_other = row.iter().enumerate().filter(|(j, _)| *j != t as usize).map(|(_, &v)| v).fold(f32::NEG_INFINITY, f32::max);
            wanted - best_other
        })
        .collect())
}

impl Lesson {
    /// Whether the logits of this lesson's pieces show it learned: greedy
    /// decoding says the wanted answer with [`LEARNED_MARGIN`] to spare at
    /// every token, or, for an answer to avoid, would leave it somewhere.
    fn learned_from(&self, logits: &[Tensor]) -> candle_core::Result<bool> {
        let pieces = lesson_pieces(self);
        Ok(match self {
            Lesson::Imitate(_) | Lesson::Prefer { .. } => target_leads(&logits[0], &pieces[0].targets)?.iter().all(|&d| d >= LEARNED_MARGIN),
            Lesson::Avoid(_) => target_leads(&logits[0], &pieces[0].targets)?.iter().any(|&d| d < 0.0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::drift_budget_factor;

    #[test]
    fn the_pull_grows_as_the_parent_spends_the_drift_budget() {
        assert_eq!(drift_budget_factor(0.0, 0.1), 1.0, "a parent at the base pulls as a first lesson does");
        assert!((drift_budget_factor(0.05, 0.1) - 2.0).abs() < 1e-12, "half the budget spent: twice the pull");
        assert!((drift_budget_factor(0.1, 0.1) - 10.0).abs() < 1e-9, "at the budget: the most");
        assert!((drift_budget_factor(0.5, 0.1) - 10.0).abs() < 1e-9, "beyond it: no more than the most");
        assert_eq!(drift_budget_factor(f64::NAN, 0.1), 1.0);
        assert_eq!(drift_budget_factor(0.05, 0.0), 1.0, "no budget set: nothing to size the pull by");
    }
}
