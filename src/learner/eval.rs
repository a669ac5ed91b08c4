//! The measurements the eval gate decides on, all teacher-forced in packed
//! passes of the training forward (for the base, bit-identical to serving;
//! adapter deltas differ from serving's batched kernel by float rounding
//! only): loss and exact match on examples, and drift from the base model
//! on general prompts (mean KL of next-token distributions over the base's
//! own answers, and top-1 agreement).


use candle_core::{Tensor, D};
use sha2::{Digest, Sha256};

use super::sft::{SftExample, KL_TOP_TOKENS};
use crate::model::chat::{ChatMessage, ChatTemplate};
use crate::lora::trainable::TrainableLora;
use crate::model::llama::{argmax_rows, Llama, LogitsWanted, PackedSeq, SequenceInput};
use crate::model::TextTokenizer;

/// General prompts for the drift measure: never trained on (the KL
/// anchors the learner trains against are other, sampled questions).
/// Sixty of them, so that the figure's standard error (reported with it)
/// is a fraction of the distances the gate decides on.
pub const GENERAL_PROMPTS: [&str; 60] = [
    "What is the capital of France?", "Give me a tip for learning a new language.", "Why is the sky blue?",
    "Write one sentence about the sea.", "What color is grass?", "How many legs does a spider have?",
    "Name a fruit that is yellow.", "What do bees make?", "Suggest a name for a pet cat.", "What is two plus three?",
    "Describe a rainy day in a few words.", "What is a good breakfast?",
    "What is the largest ocean on Earth?", "How do plants make food?", "Give me a quick dinner idea.", "What is the boiling point of water?",
    "Tell me a fun fact about dolphins.", "How can I sleep better?", "What is a synonym for happy?", "Why do leaves change color in autumn?",
    "Name three musical instruments.", "What is the opposite of cold?", "How many days are in a week?", "What does a doctor do?",
    "Write a short greeting for a birthday card.", "What is the moon made of?", "How do I make a cup of tea?", "What animal says moo?",
    "Give me a reason to exercise.", "What is the tallest mountain in the world?", "How do airplanes fly?", "What is your favorite season and why?",
    "Suggest a hobby for a rainy weekend.", "What is the color of the sun?", "How many hours are in a day?", "What is a noun?",
    "Describe a forest in one sentence.", "What do cows eat?", "How can I save money?", "What is the capital of Japan?",
    "Name a vegetable that is green.", "Why should we drink water?", "What is ten minus four?", "Write a sentence about winter.",
    "What is the main ingredient in bread?", "How do fish breathe?", "Give me a tip for studying.", "What is a planet?",
    "Name a famous painter.", "What is the freezing point of water?", "How do I tie my shoes?", "What is a good name for a dog?",
    "Why do birds migrate?", "Describe the taste of chocolate.", "What is the fastest land animal?", "How can I be more productive?",
    "What is a verb?", "Write one sentence about the city at night.", "What sound does a cat make?", "Give me an idea for a picnic.",
];

/// The general prompts a quick look reads (checkpoints between steps):
/// the first of [`GENERAL_PROMPTS`]. The full set decides.
pub const SCREEN_PROMPTS: usize = 16;

/// A general prompt with the base model's own greedy answer.
#[derive(Debug, Clone)]
pub struct Anchor {
    pub tokens: Vec<u32>,
    /// Where the answer starts in `tokens`.
    pub answer_start: usize,
}

thread_local! {
    /// The learner thread's way to give the cores back to serving between
    /// pieces of evaluation work (set by [`with_pacer`]).
    static PACER: std::cell::RefCell<Option<Box<dyn FnMut()>>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` with `pacer` called after each forward pass of evaluation work
/// on this thread (anchor sampling, held-out losses, greedy decodes, drift),
/// so that work yields to serving as training steps do.
pub fn with_pacer<T>(pacer: Box<dyn FnMut()>, f: impl FnOnce() -> T) -> T {
    let previous = PACER.with(|p| p.borrow_mut().replace(pacer));
    let out = f();
    PACER.with(|p| *p.borrow_mut() = previous);
    out
}

/// Lets the pacer of this thread, if any, rest.
pub fn pace() {
    PACER.with(|p| {
        if let Ok(mut p) = p.try_borrow_mut() {
            if let Some(f) = p.as_mut() {
                f();
            }
        }
    });
}

/// Decodes up to `n` tokens after each of `prompts` with the base model,
/// all of them in one batched forward pass per token; `pick(i, logits)`
/// chooses sequence `i`'s next token from its `[1, vocab]` logits. A
/// sequence stops at an `eos` token (kept in its output when `keep_eos`)
/// or the context length.
fn decode_batch(
    model: &Llama,
    prompts: &[Vec<u32>],
    n: usize,
    eos: &[u32],
    keep_eos: bool,
    pick: impl FnMut(usize, &Tensor) -> candle_core::Result<u32>,
) -> candle_core::Result<Vec<Vec<u32>>> {
    let caches: Vec<_> = prompts.iter().map(|_| model.new_cache()).collect();
    decode_batch_from(model, caches, prompts, n, eos, keep_eos, pick)
}

/// [`decode_batch`] continuing sequences whose beginnings are already in
/// `caches` (one per prompt; see [`crate::model::kv_cache::KvCache::fork`]).
pub(crate) fn decode_batch_from(
    model: &Llama,
    mut caches: Vec<crate::model::kv_cache::KvCache>,
    prompts: &[Vec<u32>],
    n: usize,
    eos: &[u32],
    keep_eos: bool,
    mut pick: impl FnMut(usize, &Tensor) -> candle_core::Result<u32>,
) -> candle_core::Result<Vec<Vec<u32>>> {
    if caches.len() != prompts.len() {
        candle_core::bail!("{} caches for {} prompts", caches.len(), prompts.len());
    }
    let mut outs: Vec<Vec<u32>> = prompts.iter().map(|_| Vec::with_capacity(n)).collect();
    let mut inputs: Vec<Vec<u32>> = prompts.to_vec();
    let mut live: Vec<usize> = (0..prompts.len()).filter(|&i| !prompts[i].is_empty()).collect();
    for _ in 0..n {
        live.retain(|&i| caches[i].len() + inputs[i].len() < model.config.max_position_embeddings);
        if live.is_empty() {
            break;
        }
        let mut batch: Vec<SequenceInput<'_>> = Vec::with_capacity(live.len());
        let mut live_caches: Vec<&mut crate::model::kv_cache::KvCache> =
            caches.iter_mut().enumerate().filter(|(i, _)| live.contains(i)).map(|(_, c)| c).collect();
        for (k, cache) in live_caches.iter_mut().enumerate() {
            batch.push(SequenceInput { tokens: &inputs[live[k]], cache, logits: LogitsWanted::Last });
        }
        let logits = model.forward(&mut batch).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        drop(batch);
        let mut still = Vec::with_capacity(live.len());
        for (k, &i) in live.iter().enumerate() {
            let next = pick(i, &logits.narrow(0, k, 1)?)?;
            let stop = eos.contains(&next);
            if !stop || keep_eos {
                outs[i].push(next);
            }
            if !stop {
                inputs[i] = vec![next];
                still.push(i);
            }
        }
        live = still;
        pace();
    }
    Ok(outs)
}

/// Greedy continuations of `prompts` by the base model, `n` tokens each
/// (each stops early at `eos`, which it keeps).
pub fn greedy_batch(model: &Llama, prompts: &[Vec<u32>], n: usize, eos: &[u32]) -> candle_core::Result<Vec<Vec<u32>>> {
    decode_batch(model, prompts, n, eos, true, |_, logits| Ok(argmax_rows(logits)?[0]))
}

/// Samples `n` tokens of the base model after each of `prompts` at
/// `temperature` (each stops at `eos`, which it drops).
pub fn sample_batch(
    model: &Llama,
    prompts: &[Vec<u32>],
    n: usize,
    temperature: f64,
    rng: &mut impl rand::Rng,
    eos: &[u32],
) -> candle_core::Result<Vec<Vec<u32>>> {
    decode_batch(model, prompts, n, eos, false, |_, logits| sample_token(logits, temperature, rng))
}

/// A token drawn from `[1, vocab]` logits at `temperature`.
pub(crate) fn sample_token(logits: &Tensor, temperature: f64, rng: &mut impl rand::Rng) -> candle_core::Result<u32> {
    let probs = candle_nn::ops::softmax_last_dim(&(logits / temperature.max(1e-3))?)?.flatten_all()?.to_vec1::<f32>()?;
    let mut r: f32 = rng.gen();
    for (i, p) in probs.iter().enumerate() {
        r -= p;
        if r <= 0.0 {
            return Ok(i as u32);
        }
    }
    Ok(probs.len() as u32 - 1)
}

/// Examples per packed pass when measuring.
const MEASURE_CHUNK: usize = 8;

/// Calls `each` with every example's answer logits rows `[answer len, vocab]`
/// under `lora`, a few examples per packed pass (their shared beginnings
/// computed once; see [`Llama::forward_train_packed`]), no gradient kept.
fn answer_logits(
    model: &Llama,
    lora: &TrainableLora,
    examples: &[SftExample],
    mut each: impl FnMut(&SftExample, &Tensor) -> candle_core::Result<()>,
) -> candle_core::Result<()> {
    let usable: Vec<&SftExample> = examples.iter().filter(|e| !e.prompt.is_empty() && !e.answer.is_empty()).collect();
    for chunk in usable.chunks(MEASURE_CHUNK) {
        let inputs: Vec<Vec<u32>> =
            chunk.iter().map(|e| e.prompt.iter().chain(&e.answer[..e.answer.len() - 1]).copied().collect()).collect();
        let seqs: Vec<PackedSeq<'_>> =
            inputs.iter().zip(chunk).map(|(t, e)| PackedSeq { tokens: t, start: e.prompt.len() - 1, len: e.answer.len() }).collect();
        let logits = model.forward_train_packed(&seqs, lora)?;
        for (e, l) in chunk.iter().zip(&logits) {
            each(e, &l.detach())?;
        }
        pace();
    }
    Ok(())
}

/// Mean per-token cross-entropy of the examples' answers under `lora`.
pub fn mean_loss(model: &Llama, lora: &TrainableLora, examples: &[SftExample]) -> candle_core::Result<f64> {
    Ok(loss_and_match(model, lora, examples)?.0)
}

/// Mean per-token cross-entropy of the examples' answers under `lora`, and
/// the share whose greedy answer reproduces the expected one exactly
/// (teacher-forced, the top token at every answer position is the
/// expected one, which is what greedy decoding needs), from one pass.
pub fn loss_and_match(model: &Llama, lora: &TrainableLora, examples: &[SftExample]) -> candle_core::Result<(f64, f64)> {
    let (mut total, mut count, mut hits) = (0f64, 0usize, 0usize);
    answer_logits(model, lora, examples, |e, logits| {
        let lp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
        let targets = Tensor::from_vec(e.answer.clone(), (e.answer.len(), 1), lp.device())?;
        total -= lp.gather(&targets, 1)?.sum_all()?.to_scalar::<f32>()? as f64;
        count += e.answer.len();
        if argmax_rows(logits)? == e.answer {
            hits += 1;
        }
        Ok(())
    })?;
    let loss = if count == 0 { 0.0 } else { total / count as f64 };
    let matched = if examples.is_empty() { 0.0 } else { hits as f64 / examples.len() as f64 };
    Ok((loss, matched))
}

/// The general prompts the drift measure reads, with the base model's own
/// greedy answers and, over them, its most likely next tokens with their
/// log-probabilities (a base model's property: built once, then only
/// candidates are measured; kilobytes per prompt, not a vocabulary's worth).
#[derive(Debug, Clone, Default)]
pub struct DriftAnchors {
    pub anchors: Vec<Anchor>,
    /// Per anchor, the base's view of each answer position.
    base: Vec<BaseView>,
    /// Names these anchors and their base figures (see [`DriftAnchors::fingerprint`]).
    fingerprint: String,
}

/// The base's next-token distribution over one anchor's answer, coarsened
/// to its top [`KL_TOP_TOKENS`] tokens plus one bucket for the rest (the KL
/// over this partition is a lower bound of the full KL, and close to it:
/// the base puts little mass outside its top tokens).
#[derive(Debug, Clone)]
struct BaseView {
    /// `[answer len, k]`.
    top_ids: Tensor,
    top_log_probs: Tensor,
    /// `[answer len]`: the base's probability of every other token.
    rest: Tensor,
    /// The base's own top token per position (what agreement compares with).
    argmax: Vec<u32>,
}

/// What one drift measurement says: mean KL(base ‖ candidate) per answer
/// position and the share of positions where both pick the same top token,
/// each with its standard error (over prompts: positions of one answer are
/// not independent draws).
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct Drift {
    pub kl: f64,
    pub kl_se: f64,
    pub agreement: f64,
    pub agreement_se: f64,
    /// Answer positions and prompts measured.
    pub positions: usize,
    pub prompts: usize,
}

impl DriftAnchors {
    /// A digest of the anchors' tokens and of the base's log-probability of
    /// each answer token: a drift figure recorded with the same fingerprint
    /// was measured on these very anchors against this very base, so a
    /// version's recorded drift can stand in for measuring it again.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The first `n` anchors (a quick look; the fingerprint names the part).
    pub fn first(&self, n: usize) -> DriftAnchors {
        let n = n.min(self.anchors.len());
        DriftAnchors { anchors: self.anchors[..n].to_vec(), base: self.base[..n].to_vec(), fingerprint: format!("{}:{n}", self.fingerprint) }
    }

    fn examples(&self) -> Vec<SftExample> {
        self.anchors
            .iter()
            .map(|a| SftExample { prompt: a.tokens[..a.answer_start].to_vec(), answer: a.tokens[a.answer_start..].to_vec() })
            .collect()
    }
}

/// The general prompts with the base model's greedy answers (up to `answer_tokens`).
pub fn build_anchors(
    model: &Llama,
    tokenizer: &TextTokenizer,
    chat: &ChatTemplate,
    answer_tokens: usize,
) -> Result<DriftAnchors, crate::model::ModelError> {
    build_anchors_for(model, tokenizer, chat, &GENERAL_PROMPTS, answer_tokens)
}

/// [`build_anchors`] on prompts of the caller's choosing.
pub fn build_anchors_for(
    model: &Llama,
    tokenizer: &TextTokenizer,
    chat: &ChatTemplate,
    general_prompts: &[&str],
    answer_tokens: usize,
) -> Result<DriftAnchors, crate::model::ModelError> {
    let mut prompts = Vec::with_capacity(general_prompts.len());
    for &p in general_prompts {
        prompts.push(if chat.has_model_template() {
            let rendered = chat.render(&[ChatMessage { role: "user".into(), content: p.into() }])?;
            tokenizer.encode_chat(&rendered)?
        } else {
            tokenizer.encode_prompt(p)?
        });
    }
    let answers = greedy_batch(model, &prompts, answer_tokens, &tokenizer.eos_ids)?;
    let anchors: Vec<Anchor> = prompts
        .into_iter()
        .zip(answers)
        .filter(|(p, a)| !p.is_empty() && !a.is_empty())
        .map(|(prompt, answer)| Anchor { answer_start: prompt.len(), tokens: prompt.into_iter().chain(answer).collect() })
        .collect();
    let mut built = DriftAnchors { anchors, base: Vec::new(), fingerprint: String::new() };
    let mut base = Vec::with_capacity(built.anchors.len());
    let mut digest = Sha256::new();
    answer_logits(model, &TrainableLora::empty(), &built.examples(), |e, logits| {
        let lp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
        let targets = Tensor::from_vec(e.answer.clone(), (e.answer.len(), 1), lp.device())?;
        for token in e.prompt.iter().chain(&e.answer) {
            digest.update(token.to_le_bytes());
        }
        for value in lp.gather(&targets, 1)?.flatten_all()?.to_vec1::<f32>()? {
            digest.update(value.to_le_bytes());
        }
        digest.update((e.prompt.len() as u64).to_le_bytes());
        base.push(base_view(&lp)?);
        Ok(())
    })?;
    built.base = base;
    built.fingerprint = digest.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect();
    Ok(built)
}

/// The base's top tokens per row of log-probabilities `lp` `[n, vocab]`.
fn base_view(lp: &Tensor) -> candle_core::Result<BaseView> {
    let rows = lp.to_vec2::<f32>()?;
    let n = rows.len();
    let k = KL_TOP_TOKENS.min(rows.first().map_or(0, Vec::len)).max(1);
    let (mut ids, mut lps, mut rest) = (Vec::with_capacity(n * k), Vec::with_capacity(n * k), Vec::with_capacity(n));
    // Ties broken as the candidate's side breaks them.
    let argmax = argmax_rows(lp)?;
    for row in &rows {
        let mut order: Vec<u32> = (0..row.len() as u32).collect();
        order.select_nth_unstable_by(k - 1, |&a, &b| row[b as usize].total_cmp(&row[a as usize]));
        let top = &order[..k];
        rest.push((1.0 - top.iter().map(|&i| row[i as usize].exp()).sum::<f32>()).max(0.0));
        ids.extend_from_slice(top);
        lps.extend(top.iter().map(|&i| row[i as usize]));
    }
    let device = lp.device();
    Ok(BaseView {
        top_ids: Tensor::from_vec(ids, (n, k), device)?,
        top_log_probs: Tensor::from_vec(lps, (n, k), device)?,
        rest: Tensor::from_vec(rest, n, device)?,
        argmax,
    })
}

/// Mean and standard error of a ratio estimate `Σ x / Σ n` over clusters
/// (prompts): positions of one answer are not independent draws.
fn cluster_mean_se(clusters: &[(f64, f64)]) -> (f64, f64) {
    let n: f64 = clusters.iter().map(|c| c.1).sum();
    if n <= 0.0 {
        return (0.0, 0.0);
    }
    let mean = clusters.iter().map(|c| c.0).sum::<f64>() / n;
    let k = clusters.len() as f64;
    if k < 2.0 {
        return (mean, 0.0);
    }
    let var = clusters.iter().map(|(x, m)| (x - mean * m).powi(2)).sum::<f64>() * k / (k - 1.0) / (n * n);
    (mean, var.sqrt())
}

/// How far `lora` moves the model from the base on the anchors: mean
/// KL(base ‖ adapted) of the next-token distributions over the answer
/// positions (over the base's top tokens and a rest bucket), and the share
/// of positions where both pick the same top token, each with its standard error.
pub fn drift(model: &Llama, lora: &TrainableLora, anchors: &DriftAnchors) -> candle_core::Result<Drift> {
    let (mut kls, mut agrees) = (Vec::new(), Vec::new());
    let mut base = anchors.base.iter();
    answer_logits(model, lora, &anchors.examples(), |e, logits| {
        let Some(b) = base.next() else { candle_core::bail!("drift anchors without base figures") };
        let lp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
        let picked = lp.gather(&b.top_ids, 1)?;
        let top = (b.top_log_probs.exp()? * (&b.top_log_probs - &picked)?)?.sum_all()?.to_scalar::<f32>()? as f64;
        let q_rest = picked.exp()?.sum(1)?.affine(-1.0, 1.0)?.clamp(1e-6f32, 1.0f32)?;
        let p_rest = b.rest.clamp(1e-12f32, 1.0f32)?;
        let rest = (&p_rest * (p_rest.log()? - q_rest.log()?)?)?.sum_all()?.to_scalar::<f32>()? as f64;
        let n = e.answer.len() as f64;
        kls.push(((top + rest).max(0.0), n));
        let mine = argmax_rows(logits)?;
        agrees.push((b.argmax.iter().zip(&mine).filter(|(x, y)| x == y).count() as f64, n));
        Ok(())
    })?;
    let positions = kls.iter().map(|c| c.1).sum::<f64>() as usize;
    if positions == 0 {
        return Ok(Drift { agreement: 1.0, ..Default::default() });
    }
    let (kl, kl_se) = cluster_mean_se(&kls);
    let (agreement, agreement_se) = cluster_mean_se(&agrees);
    Ok(Drift { kl, kl_se, agreement, agreement_se, positions, prompts: kls.len() })
}

/// Anchors for learning without forgetting, drawn from the base model
/// itself: `count` short questions it samples (temperature 1), each with
/// its own greedy answer. Disjoint from [`GENERAL_PROMPTS`], which measure drift.
pub fn training_anchors(
    model: &Llama,
    tokenizer: &TextTokenizer,
    chat: &ChatTemplate,
    count: usize,
    seed: u64,
) -> Result<Vec<Anchor>, crate::model::ModelError> {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let eos = &tokenizer.eos_ids;
    let mut anchors = Vec::with_capacity(count);
    // Two rounds at most: a round's empty questions or answers are drawn again once.
    for _ in 0..2 {
        let want = count - anchors.len();
        if want == 0 {
            break;
        }
        let prompts: Vec<Vec<u32>> = if chat.has_model_template() {
            let ask = chat.render(&[ChatMessage { role: "user".into(), content: "Write one short question that a user might ask an assistant.".into() }])?;
            let ask = tokenizer.encode_chat(&ask)?;
            let questions = sample_batch(model, &vec![ask; want], 24, 1.0, &mut rng, eos)?;
            let mut prompts = Vec::with_capacity(want);
            for q in questions {
                let q = tokenizer.decode(&q)?;
                if !q.trim().is_empty() {
                    prompts.push(tokenizer.encode_chat(&chat.render(&[ChatMessage { role: "user".into(), content: q.trim().to_string() }])?)?);
                }
            }
            prompts
        } else {
            let start = tokenizer.encode_prompt("")?;
            let tails = sample_batch(model, &vec![start.clone(); want], 12, 1.0, &mut rng, eos)?;
            tails.into_iter().map(|t| start.iter().copied().chain(t).collect()).collect()
        };
        let prompts: Vec<Vec<u32>> = prompts.into_iter().filter(|p| !p.is_empty()).collect();
        let answers = greedy_batch(model, &prompts, 24, eos)?;
        for (prompt, answer) in prompts.into_iter().zip(answers) {
            if !answer.is_empty() {
                anchors.push(Anchor { answer_start: prompt.len(), tokens: prompt.into_iter().chain(answer).collect() });
            }
        }
    }
    Ok(anchors)
}
