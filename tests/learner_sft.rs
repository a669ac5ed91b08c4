//! Training adapters on stories260K: the differentiable forward equals the
//! serving forward, every LoRA parameter receives a gradient, and
//! supervised fine-tuning teaches the model answers made of its own
//! vocabulary pieces (its byte-fallback embeddings cannot learn English).

mod common;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use lifelora::learner::sft::{self, Lesson, SftConfig, SftExample};
use lifelora::lora::init::{fresh_adapter, FreshSpec, InitB};
use lifelora::lora::peft::{load_dir, LoraLimits};
use lifelora::lora::trainable::TrainableLora;
use lifelora::lora::LoraAdapter;
use lifelora::model::llama::{argmax_rows, LogitsWanted, SequenceInput};
use lifelora::model::loader::load_hf_dir;
use lifelora::model::Llama;

const ALL: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

fn model() -> Llama {
    load_hf_dir(&common::stories_dir(), None, DType::F32, &Device::Cpu).unwrap().model
}

fn serving_logits(model: &Llama, tokens: &[u32], adapter: Option<Arc<LoraAdapter>>) -> Tensor {
    let mut cache = model.new_cache();
    model
        .forward_with_adapters(&mut [SequenceInput { tokens, cache: &mut cache, logits: LogitsWanted::All }], &[adapter])
        .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

fn greedy(model: &Llama, prompt: &[u32], adapter: &Arc<LoraAdapter>, n: usize) -> Vec<u32> {
    let mut cache = model.new_cache();
    let mut out = Vec::new();
    let mut input = prompt.to_vec();
    for _ in 0..n {
        let logits = model
            .forward_with_adapters(&mut [SequenceInput { tokens: &input, cache: &mut cache, logits: LogitsWanted::Last }], &[Some(adapter.clone())])
            .unwrap();
        let next = argmax_rows(&logits).unwrap()[0];
        out.push(next);
        input = vec![next];
    }
    out
}

#[test]
fn the_training_forward_equals_the_serving_forward() {
    let model = model();
    let tokens: Vec<u32> = vec![1, 482, 82, 508, 499, 496, 300, 12, 77];
    let fixture = common::fixtures_dir().join("adapters/all_linear_r4");
    let adapter = Arc::new(load_dir(&fixture, &model.lora_sites(), &LoraLimits { max_rank: 64, ..Default::default() }, DType::F32, &Device::Cpu).unwrap());
    let lora = TrainableLora::from_adapter(&adapter).unwrap();
    let train = model.forward_train(&tokens, &lora).unwrap();
    let serve = serving_logits(&model, &tokens, Some(adapter));
    assert!(max_diff(&train, &serve) < 1e-4, "{}", max_diff(&train, &serve));
    let served_back = Arc::new(lora.to_adapter().unwrap());
    assert!(max_diff(&serving_logits(&model, &tokens, Some(served_back)), &serve) < 1e-5);
}

#[test]
fn every_lora_parameter_receives_a_gradient() {
    let model = model();
    let spec = FreshSpec { targets: &ALL, rank: 4, alpha: 8.0, seed: 9, init_b: InitB::Random };
    let adapter = fresh_adapter(&model.lora_sites(), &spec, DType::F32, &Device::Cpu).unwrap();
    let lora = TrainableLora::from_adapter(&adapter).unwrap();
    let loss = sft::example_loss(&model, &lora, &SftExample { prompt: vec![1, 482, 82], answer: vec![508, 499, 496] }).unwrap();
    let grads = loss.backward().unwrap();
    let vars = lora.vars();
    assert_eq!(vars.len(), 5 * 7 * 2);
    for (i, v) in vars.iter().enumerate() {
        let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("parameter {i} has no gradient"));
        let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(norm > 0.0, "parameter {i} has a zero gradient");
    }
}

#[test]
fn supervised_training_teaches_answers_made_of_vocabulary_pieces() {
    let model = model();
    // Four "facts": a prompt and the answer it should get, all vocabulary pieces.
    let facts: Vec<SftExample> = [
        (vec![1, 482, 82, 508], vec![300, 301, 302]),
        (vec![1, 499, 496, 77], vec![410, 320, 288]),
        (vec![1, 350, 351, 352], vec![260, 390, 440]),
        (vec![1, 270, 271, 272], vec![333, 480, 301]),
    ]
    .into_iter()
    .map(|(prompt, answer)| SftExample { prompt, answer })
    .collect();
    let spec = FreshSpec { targets: &ALL, rank: 8, alpha: 16.0, seed: 1, init_b: InitB::Zero };
    let start = Arc::new(fresh_adapter(&model.lora_sites(), &spec, DType::F32, &Device::Cpu).unwrap());
    let before: Vec<Vec<u32>> = facts.iter().map(|f| greedy(&model, &f.prompt, &start, 3)).collect();
    assert!(facts.iter().zip(&before).all(|(f, b)| &f.answer != b), "the base already knows a fact");
    let lora = TrainableLora::from_adapter(&start).unwrap();
    let cfg = SftConfig { steps: 60, learning_rate: 1e-2, batch_size: 4, seed: 0, until_learned: None };
    let losses = sft::train(&model, &lora, &facts, &cfg, |_, _| {}).unwrap();
    assert!(losses.last().unwrap() < &(losses[0] * 0.1), "loss fell from {} to {}", losses[0], losses.last().unwrap());
    let learned = Arc::new(lora.to_adapter().unwrap());
    for f in &facts {
        assert_eq!(greedy(&model, &f.prompt, &learned, 3), f.answer, "fact {:?} not learned", f.prompt);
    }
    // The starting adapter (served copy) is untouched by training.
    assert_eq!(facts.iter().map(|f| greedy(&model, &f.prompt, &start, 3)).collect::<Vec<_>>(), before);
}

#[test]
fn gradients_match_finite_differences() {
    let model = model();
    let spec = FreshSpec { targets: &ALL, rank: 4, alpha: 8.0, seed: 11, init_b: InitB::Random };
    let adapter = fresh_adapter(&model.lora_sites(), &spec, DType::F32, &Device::Cpu).unwrap();
    let lora = TrainableLora::from_adapter(&adapter).unwrap();
    let example = SftExample { prompt: vec![1, 482, 82, 508, 499], answer: vec![496, 300, 12] };
    let loss = |l: &TrainableLora| sft::example_loss(&model, l, &example).unwrap().to_scalar::<f32>().unwrap() as f64;
    let grads = sft::example_loss(&model, &lora, &example).unwrap().backward().unwrap();
    let vars = lora.vars();
    // The first layer's q_proj A (gradient through every later layer) and a late B.
    for v in [&vars[0], &vars[vars.len() - 1]] {
        let g = grads.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let original = v.as_tensor().copy().unwrap();
        let flat = original.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let i = g.iter().enumerate().max_by(|a, b| a.1.abs().total_cmp(&b.1.abs())).unwrap().0;
        let eps = 1e-2f32;
        let mut plus = flat.clone();
        plus[i] += eps;
        v.set(&Tensor::from_vec(plus, original.shape(), &Device::Cpu).unwrap()).unwrap();
        let up = loss(&lora);
        let mut minus = flat.clone();
        minus[i] -= eps;
        v.set(&Tensor::from_vec(minus, original.shape(), &Device::Cpu).unwrap()).unwrap();
        let down = loss(&lora);
        v.set(&original).unwrap();
        let numeric = (up - down) / (2.0 * eps as f64);
        let analytic = g[i] as f64;
        assert!((numeric - analytic).abs() <= 0.05 * analytic.abs().max(1e-3), "numeric {numeric} vs analytic {analytic}");
    }
}

/// Mean log-probability of `answer` after `prompt` under `adapter`.
fn mean_log_prob(model: &Llama, adapter: &Arc<LoraAdapter>, prompt: &[u32], answer: &[u32]) -> f32 {
    let lora = TrainableLora::from_adapter(adapter).unwrap();
    -sft::example_loss(model, &lora, &SftExample { prompt: prompt.to_vec(), answer: answer.to_vec() }).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn a_preference_teaches_the_chosen_answer_over_the_rejected_one() {
    let model = model();
    let spec = FreshSpec { targets: &ALL, rank: 8, alpha: 16.0, seed: 2, init_b: InitB::Zero };
    let start = Arc::new(fresh_adapter(&model.lora_sites(), &spec, DType::F32, &Device::Cpu).unwrap());
    let prompt = vec![1, 482, 82, 508];
    // The rejected answer is what the model says now; the chosen one is new to it.
    let rejected = greedy(&model, &prompt, &start, 3);
    let chosen = vec![300, 301, 302];
    let lesson = Lesson::Prefer { prompt: prompt.clone(), chosen: chosen.clone(), rejected: rejected.clone() };
    let lora = TrainableLora::from_adapter(&start).unwrap();
    // At the start the policy is its own reference: the DPO term is log 2.
    let at_start = sft::lesson_loss(&model, &lora, &lesson, None).unwrap().to_scalar::<f32>().unwrap();
    let nll = -mean_log_prob(&model, &start, &prompt, &chosen);
    assert!((at_start - nll - std::f32::consts::LN_2).abs() < 1e-4, "{at_start} vs {nll} + ln 2");
    let cfg = SftConfig { steps: 40, learning_rate: 1e-2, batch_size: 1, seed: 0, until_learned: None };
    sft::train_lessons(&model, &lora, &[lesson], &cfg, None, |_, _| true).unwrap();
    let learned = Arc::new(lora.to_adapter().unwrap());
    assert_eq!(greedy(&model, &prompt, &learned, 3), chosen);
    let margin = |a: &Arc<LoraAdapter>| mean_log_prob(&model, a, &prompt, &chosen) - mean_log_prob(&model, a, &prompt, &rejected);
    assert!(margin(&learned) > margin(&start) + 2.0, "margin {} -> {}", margin(&start), margin(&learned));
}

#[test]
fn a_down_rating_alone_makes_the_rated_answer_less_likely() {
    let model = model();
    let spec = FreshSpec { targets: &ALL, rank: 8, alpha: 16.0, seed: 3, init_b: InitB::Zero };
    let start = Arc::new(fresh_adapter(&model.lora_sites(), &spec, DType::F32, &Device::Cpu).unwrap());
    let prompt = vec![1, 499, 496, 77];
    let said = greedy(&model, &prompt, &start, 4);
    let lora = TrainableLora::from_adapter(&start).unwrap();
    let cfg = SftConfig { steps: 20, learning_rate: 1e-2, batch_size: 1, seed: 0, until_learned: None };
    let lesson = Lesson::Avoid(SftExample { prompt: prompt.clone(), answer: said.clone() });
    let losses = sft::train_lessons(&model, &lora, &[lesson], &cfg, None, |_, _| true).unwrap();
    assert!(losses.last().unwrap() < &losses[0], "unlikelihood loss {} -> {}", losses[0], losses.last().unwrap());
    let learned = Arc::new(lora.to_adapter().unwrap());
    let (before, after) = (mean_log_prob(&model, &start, &prompt, &said), mean_log_prob(&model, &learned, &prompt, &said));
    assert!(after < before - 1.0, "log-probability of the rated answer {before} -> {after}");
    assert_ne!(greedy(&model, &prompt, &learned, 4), said);
}

#[test]
fn sequences_packed_in_one_pass_share_their_beginnings_and_get_the_logits_and_gradients_they_get_alone() {
    use lifelora::model::llama::PackedSeq;
    let model = model();
    let fixture = common::fixtures_dir().join("adapters/all_linear_r4");
    let adapter = Arc::new(load_dir(&fixture, &model.lora_sites(), &LoraLimits { max_rank: 64, ..Default::default() }, DType::F32, &Device::Cpu).unwrap());
    let lora = TrainableLora::from_adapter(&adapter).unwrap();
    // Two share five tokens, one repeats another whole, one shares only the first.
    let seqs: [&[u32]; 4] =
        [&[1, 482, 82, 508, 499, 496], &[1, 482, 82, 508, 499, 300, 12], &[1, 300, 12], &[1, 482, 82, 508, 499, 496]];
    let packed: Vec<PackedSeq> = seqs.iter().map(|t| PackedSeq { tokens: t, start: 1, len: t.len() - 1 }).collect();
    let together = model.forward_train_packed(&packed, &lora).unwrap();
    let mut alone_sum: Option<Tensor> = None;
    for (t, got) in seqs.iter().zip(&together) {
        let alone = model.forward_train_range(t, &lora, 1, t.len() - 1).unwrap();
        // Float summation order differs with the number of rows; nothing more.
        assert!(max_diff(got, &alone) < 1e-4, "{t:?}: {}", max_diff(got, &alone));
        let s = alone.sqr().unwrap().mean_all().unwrap();
        alone_sum = Some(match alone_sum { None => s, Some(a) => (a + s).unwrap() });
    }
    // A shared token's gradient is the sum over the sequences that read it.
    let packed_sum = together.iter().map(|l| l.sqr().unwrap().mean_all().unwrap()).reduce(|a, b| (a + b).unwrap()).unwrap();
    let (g_packed, g_alone) = (packed_sum.backward().unwrap(), alone_sum.unwrap().backward().unwrap());
    for (i, v) in lora.vars().iter().enumerate() {
        let (a, b) = (g_packed.get(v.as_tensor()).unwrap(), g_alone.get(v.as_tensor()).unwrap());
        let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-6);
        assert!(max_diff(a, b) < 1e-3 * scale, "parameter {i}: {} vs scale {scale}", max_diff(a, b));
    }
}

#[test]
fn kl_anchors_keep_the_base_top_tokens_and_bound_the_full_kl_from_below() {
    use lifelora::learner::sft::KlAnchors;
    let model = model();
    let fixture = common::fixtures_dir().join("adapters/all_linear_r4");
    let adapter = Arc::new(load_dir(&fixture, &model.lora_sites(), &LoraLimits { max_rank: 64, ..Default::default() }, DType::F32, &Device::Cpu).unwrap());
    let lora = TrainableLora::from_adapter(&adapter).unwrap();
    let tokens: Vec<u32> = vec![1, 482, 82, 508, 499, 496, 300, 12, 77, 260, 390];
    let start = 4;
    let anchors = KlAnchors::new(&model, &[(tokens.clone(), start)], 1.0, 1).unwrap();
    // The base measured against itself: nothing to pull.
    assert!(anchors.kl(&model, &TrainableLora::empty(), 0).unwrap().abs() < 1e-5);
    // An adapter: the coarsened KL is positive, at most the full KL, and most of it.
    let coarse = anchors.kl(&model, &lora, 0).unwrap();
    let n = tokens.len() - start;
    let lp = |l: &TrainableLora| {
        let logits = model.forward_train_range(&tokens[..tokens.len() - 1], l, start - 1, n).unwrap();
        candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1).unwrap()
    };
    let (base, adapted) = (lp(&TrainableLora::empty()), lp(&lora));
    let full = (base.exp().unwrap() * (&base - &adapted).unwrap()).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() / n as f32;
    assert!(coarse > 0.0 && coarse <= full + 1e-5 && coarse >= 0.5 * full, "coarse KL {coarse}, full KL {full}");
}

/// Mean log-probability of `answer` after `prompt` under a trainable adapter as it is now.
fn mean_log_prob_now(model: &Llama, lora: &TrainableLora, prompt: &[u32], answer: &[u32]) -> f32 {
    -sft::example_loss(model, lora, &SftExample { prompt: prompt.to_vec(), answer: answer.to_vec() }).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn a_held_lesson_is_kept_where_it_was_and_not_taught_further() {
    use lifelora::learner::sft::{Trainer, HOLD_SLACK};
    let model = model();
    let spec = FreshSpec { targets: &ALL, rank: 8, alpha: 16.0, seed: 4, init_b: InitB::Zero };
    let fresh = Arc::new(fresh_adapter(&model.lora_sites(), &spec, DType::F32, &Device::Cpu).unwrap());
    // An earlier version taught `old`; the new lesson asks something close to it.
    let (old_prompt, old_answer) = (vec![1, 482, 82, 508], vec![300, 301, 302]);
    let (new_prompt, new_answer) = (vec![1, 482, 499, 496], vec![310, 311, 312]);
    let old = Lesson::Imitate(SftExample { prompt: old_prompt.clone(), answer: old_answer.clone() });
    let new = Lesson::Imitate(SftExample { prompt: new_prompt.clone(), answer: new_answer.clone() });
    let lora = TrainableLora::from_adapter(&fresh).unwrap();
    let cfg = SftConfig { steps: 40, learning_rate: 1e-2, batch_size: 1, seed: 0, until_learned: None };
    sft::train_lessons(&model, &lora, &[old.clone()], &cfg, None, |_, _| true).unwrap();
    let parent = Arc::new(lora.to_adapter().unwrap());
    let held_at = mean_log_prob(&model, &parent, &old_prompt, &old_answer);

    // Held where it is, the old lesson alone teaches nothing: not one weight moves.
    let lora = TrainableLora::from_adapter(&parent).unwrap();
    let lessons = [old.clone(), new.clone()];
    let mut trainer = Trainer::new(&model, &lora, &lessons, 1e-2, None).unwrap();
    trainer.hold(&[0]).unwrap();
    // What it is held at is what the evaluation measures on the same answer.
    let held = trainer.held_log_probs(0).unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
    let measured = lifelora::learner::eval::mean_loss(&model, &lora, &[SftExample { prompt: old_prompt.clone(), answer: old_answer.clone() }]).unwrap();
    assert!((-held as f64 - measured).abs() < 1e-6, "held at {held}, measured loss {measured}");
    assert!(trainer.held_log_probs(1).is_none());
    for _ in 0..3 {
        trainer.step(&[0]).unwrap();
    }
    assert_eq!(mean_log_prob_now(&model, &lora, &old_prompt, &old_answer), held_at);

    // Teaching the new lesson alone wipes the old answer out; held beside
    // it, the old answer is pulled back whenever it falls below its hold,
    // and both answers are said.
    let run = |hold: bool| {
        let lora = TrainableLora::from_adapter(&parent).unwrap();
        let mut trainer = Trainer::new(&model, &lora, &lessons, 1e-2, None).unwrap();
        if hold {
            trainer.hold(&[0]).unwrap();
        }
        for _ in 0..60 {
            trainer.step(if hold { &[0, 1] } else { &[1] }).unwrap();
        }
        let adapter = Arc::new(lora.to_adapter().unwrap());
        let said = (greedy(&model, &old_prompt, &adapter, 3), greedy(&model, &new_prompt, &adapter, 3));
        (mean_log_prob(&model, &adapter, &old_prompt, &old_answer), said)
    };
    let (unheld, (_, taught_alone)) = run(false);
    let (held, (kept, taught_beside)) = run(true);
    assert_eq!(taught_alone, new_answer);
    assert!(unheld < held_at - 5.0, "teaching the new lesson alone: {held_at} -> {unheld} nats a token");
    assert_eq!((kept, taught_beside), (old_answer, new_answer));
    assert!(held > held_at - 5.0 * HOLD_SLACK as f32, "held: {held_at} -> {held} nats a token");
}

#[test]
fn settling_with_every_lesson_held_walks_back_toward_the_base_and_keeps_the_lessons() {
    use lifelora::learner::sft::{KlAnchors, Trainer};
    let model = model();
    let spec = FreshSpec { targets: &ALL, rank: 8, alpha: 16.0, seed: 5, init_b: InitB::Zero };
    let fresh = Arc::new(fresh_adapter(&model.lora_sites(), &spec, DType::F32, &Device::Cpu).unwrap());
    let facts = [(vec![1, 482, 82, 508], vec![300, 301, 302]), (vec![1, 482, 499, 496], vec![310, 311, 312])];
    let lessons: Vec<Lesson> = facts.iter().map(|(p, a)| Lesson::Imitate(SftExample { prompt: p.clone(), answer: a.clone() })).collect();
    // General text: the base's own greedy continuations (the fresh adapter changes nothing yet).
    let anchor_seqs: Vec<(Vec<u32>, usize)> = [vec![1, 400, 401], vec![1, 350, 412, 63], vec![1, 250, 251]]
        .into_iter()
        .map(|p| {
            let answer = greedy(&model, &p, &fresh, 8);
            (p.iter().chain(&answer).copied().collect(), p.len())
        })
        .collect();
    let anchors = KlAnchors::new(&model, &anchor_seqs, 20.0, 3).unwrap();
    let drift = |lora: &TrainableLora| (0..3).map(|i| anchors.kl(&model, lora, i).unwrap()).sum::<f32>() / 3.0;

    // Taught hard with no pull toward the base: the facts are said, general text drifts.
    let lora = TrainableLora::from_adapter(&fresh).unwrap();
    let cfg = SftConfig { steps: 40, learning_rate: 1e-2, batch_size: 2, seed: 0, until_learned: None };
    sft::train_lessons(&model, &lora, &lessons, &cfg, None, |_, _| true).unwrap();
    let taught = Arc::new(lora.to_adapter().unwrap());
    for (p, a) in &facts {
        assert_eq!(&greedy(&model, p, &taught, 3), a);
    }
    let drifted = drift(&lora);
    assert!(drifted > 0.05, "the hard lesson drifted only {drifted} nats");

    // Settling: both lessons held where they are, steps of the KL pull alone.
    let mut trainer = Trainer::new(&model, &lora, &lessons, 1e-2, Some(&anchors)).unwrap();
    trainer.hold(&[0, 1]).unwrap();
    for _ in 0..20 {
        trainer.step(&[0, 1]).unwrap();
    }
    let settled = drift(&lora);
    let adapter = Arc::new(lora.to_adapter().unwrap());
    assert!(settled < 0.5 * drifted, "settling: drift {drifted} -> {settled} nats");
    assert_eq!(trainer.learned(&[0, 1]).unwrap(), vec![true, true]);
    for (p, a) in &facts {
        assert_eq!(&greedy(&model, p, &adapter, 3), a, "a fact settling lost");
    }
}
