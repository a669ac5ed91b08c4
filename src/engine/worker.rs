//! The engine thread: takes submissions, plans each step with the
//! scheduler, runs one packed forward over every scheduled sequence, and
//! samples and streams one token per sequence that finished its input.

use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;

use crate::metrics::Metrics;
use crate::model::llama::{LogitsWanted, SequenceInput};
use crate::model::LoadedModel;

use super::request::{Event, FinishReason};
use super::scheduler::Scheduler;
use super::sequence::Sequence;
use super::waiting::{by_tenant, WaitingCounts};

/// Messages to the engine thread.
pub enum Command {
    Submit(Box<Sequence>),
    Shutdown,
}

/// Runs until the command channel closes or `Shutdown` arrives.
pub fn run(
    model: Arc<LoadedModel>,
    mut scheduler: Scheduler,
    rx: Receiver<Command>,
    waiting: Arc<WaitingCounts>,
    metrics: Metrics,
) {
    let eos = model.tokenizer.eos_ids.clone();
    let context = model.model.config.max_position_embeddings;
    loop {
        if scheduler.is_idle() {
            // Idle: the gauges say so before the thread sleeps (the learner
            // reads them to know when it may train at full speed).
            metrics.running_sequences.set(0);
            metrics.waiting_sequences.set(0);
            metrics.kv_cache_bytes.set(scheduler.kv_reserved() as i64);
            match rx.recv() {
                Ok(Command::Submit(seq)) => scheduler.waiting.push_back(*seq),
                Ok(Command::Shutdown) | Err(_) => return,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(Command::Submit(seq)) => scheduler.waiting.push_back(*seq),
                Ok(Command::Shutdown) | Err(TryRecvError::Disconnected) => return,
                Err(TryRecvError::Empty) => break,
            }
        }
        let waiting_before = by_tenant(scheduler.waiting.iter().map(|s| s.request.tenant.as_str()));
        let preempted_before = scheduler.preempted;
        scheduler.drop_abandoned();
        scheduler.group_by_adapter();
        let (plan, rejected) = scheduler.schedule();
        for (seq, why) in rejected {
            seq.send(Event::Error(why.0));
        }
        // Admitted and dropped ones leave; preempted ones come back.
        waiting.apply(&waiting_before, &by_tenant(scheduler.waiting.iter().map(|s| s.request.tenant.as_str())));
        metrics.preemptions.inc_by(scheduler.preempted - preempted_before);
        metrics
            .waiting_sequences
            .set(scheduler.waiting.len() as i64);
        metrics
            .running_sequences
            .set(scheduler.running.len() as i64);
        metrics.kv_cache_bytes.set(scheduler.kv_reserved() as i64);
        if plan.iter().all(|&n| n == 0) {
            if !scheduler.running.is_empty() || !scheduler.waiting.is_empty() {
                std::thread::yield_now();
            }
            continue;
        }
        step(&model, &mut scheduler, &plan, &eos, context, &metrics);
    }
}

fn step(
    model: &LoadedModel,
    scheduler: &mut Scheduler,
    plan: &[usize],
    eos: &[u32],
    context: usize,
    metrics: &Metrics,
) {
    // What each scheduled sequence wants back, and where its prompt chunk starts.
    let mut wants = Vec::with_capacity(plan.len());
    let mut inputs = Vec::with_capacity(plan.len());
    // Each scheduled sequence's adapter, in the same order as `inputs`.
    let adapters: Vec<_> = scheduler
        .running
        .iter()
        .zip(plan)
        .filter(|(_, &n)| n > 0)
        .map(|(s, _)| s.request.adapter.clone())
        .collect();
    let mut total = 0;
    for (seq, &n) in scheduler.running.iter_mut().zip(plan) {
        if n == 0 {
            wants.push((LogitsWanted::None, 0));
            continue;
        }
        let start = seq.fed;
        // Logits are wanted at the end of the input (to sample the next
        // token), and for every prompt position when its logprobs are asked.
        let reaches_end = start + n == seq.tokens.len();
        let want = if seq.request.prompt_logprobs.is_some() && !seq.prompt_reported && start < seq.prompt_len() {
            LogitsWanted::All
        } else if reaches_end {
            LogitsWanted::Last
        } else {
            LogitsWanted::None
        };
        wants.push((want, n));
        total += n;
        let reserve = (seq.prompt_len() + seq.request.max_tokens).min(model.model.config.max_position_embeddings);
        let cache = seq.cache.get_or_insert_with(|| {
            // One allocation of what admission reserved (prompt + max_tokens):
            // no regrowth copies, and memory in use equals the reservation.
            let mut cache = model.model.new_cache();
            if let Err(e) = cache.reserve(reserve) {
                tracing::warn!(error = %e, "KV reservation failed; the cache will grow on demand");
            }
            cache
        });
        inputs.push(SequenceInput {
            tokens: &seq.tokens[start..start + n],
            cache,
            logits: want,
        });
    }
    metrics.batch_size.observe(inputs.len() as f64);
    metrics.step_tokens.observe(total as f64);
    let result = model
        .model
        .forward_with_adapters(&mut inputs, &adapters)
        .and_then(|t| Ok(t.to_vec2::<f32>()?));
    drop(inputs);
    let rows = match result {
        Ok(rows) => rows,
        Err(e) => {
            tracing::error!(error = %e, "engine step failed; failing its sequences");
            for i in (0..plan.len()).rev() {
                if plan[i] > 0 {
                    let seq = scheduler.release(i);
                    seq.send(Event::Error(format!("engine step failed: {e}")));
                }
            }
            return;
        }
    };
    let mut rows = rows.into_iter();
    let mut finished = Vec::new();
    for (i, (want, n)) in wants.into_iter().enumerate() {
        if n == 0 {
            continue;
        }
        let seq = &mut scheduler.running[i];
        let start = seq.fed;
        seq.fed += n;
        if start < seq.prompt_len() && !seq.prompt_reported {
            metrics
                .prompt_tokens
                .inc_by(n.min(seq.prompt_len() - start) as u64);
        }
        let last = match want {
            LogitsWanted::None => continue,
            LogitsWanted::Last => rows.next(),
            LogitsWanted::All => {
                let mine: Vec<Vec<f32>> = rows.by_ref().take(n).collect();
                let top = seq.request.prompt_logprobs.unwrap_or(0);
                seq.record_prompt_logprobs(start, &mine, top);
                if seq.is_prefilling() {
                    None
                } else {
                    mine.into_iter().last()
                }
            }
        };
        let Some(logits) = last else { continue };
        if !seq.prompt_reported {
            // The prompt is fully read (the first time: a preempted
            // sequence recomputing its KV does not report it again).
            seq.prompt_reported = true;
            seq.send_prompt_logprobs();
            if seq.request.max_tokens == 0 {
                seq.finish(FinishReason::Length, String::new());
                finished.push(i);
                continue;
            }
            if seq.prompt_len() >= context {
                seq.finish(FinishReason::Length, String::new());
                finished.push(i);
                continue;
            }
            metrics
                .time_to_first_token
                .observe(seq.submitted.elapsed().as_secs_f64());
        }
        metrics.generated_tokens.inc();
        if seq
            .advance(logits, &model.tokenizer, eos, context)
            .is_some()
        {
            finished.push(i);
        }
    }
    finished.sort_unstable();
    for i in finished.into_iter().rev() {
        scheduler.release(i);
    }
}
