//! The async face of the engine: submit a request, get a stream of events.
//! Dropping the stream cancels the sequence at the next step.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::config::EngineSettings;
use crate::metrics::Metrics;
use crate::model::LoadedModel;

use super::request::{Event, GenerationRequest};
use super::scheduler::{Scheduler, SchedulerLimits};
use super::sequence::Sequence;
use super::worker::{self, Command};
use super::EngineError;

/// Cloneable handle used by HTTP handlers; never touches tensors.
#[derive(Clone)]
pub struct EngineHandle {
    tx: Sender<Command>,
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
    thread: Arc<std::sync::Mutex<Option<JoinHandle<()>>>>,
}

impl EngineHandle {
    /// Starts the engine thread over `model`.
    pub fn start(
        model: Arc<LoadedModel>,
        settings: &EngineSettings,
        metrics: Metrics,
    ) -> Result<Self, EngineError> {
        let kv_per_token = model
            .model
            .config
            .kv_bytes_per_token(model.model.kv_dtype().size_in_bytes())
            as u64;
        metrics
            .kv_cache_capacity_bytes
            .set(settings.kv_cache_bytes as i64);
        let scheduler = Scheduler::new(SchedulerLimits {
            max_running: settings.max_running,
            max_tokens_per_step: settings.max_tokens_per_step,
            kv_budget_bytes: settings.kv_cache_bytes,
            kv_bytes_per_token: kv_per_token,
        });
        let (tx, rx) = mpsc::channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        let w = waiting.clone();
        let thread = std::thread::Builder::new()
            .name("lifelora-engine".into())
            .spawn(move || worker::run(model, scheduler, rx, w, metrics))
            .map_err(|e| EngineError::Start(e.to_string()))?;
        Ok(EngineHandle {
            tx,
            waiting,
            max_waiting: settings.max_waiting,
            thread: Arc::new(std::sync::Mutex::new(Some(thread))),
        })
    }

    /// Queues a request. Refuses at once when the waiting queue is full.
    pub fn submit(
        &self,
        request: GenerationRequest,
    ) -> Result<UnboundedReceiver<Event>, EngineError> {
        let prev = self.waiting.fetch_add(1, Ordering::SeqCst);
        if prev >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::QueueFull {
                max_waiting: self.max_waiting,
            });
        }
        let (tx, rx) = unbounded_channel();
        let seq = Sequence::new(request, tx);
        if self.tx.send(Command::Submit(Box::new(seq))).is_err() {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::Stopped);
        }
        Ok(rx)
    }

    /// Requests waiting for admission.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Stops the engine thread after its current step and waits for it.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown);
        if let Ok(mut guard) = self.thread.lock() {
            if let Some(t) = guard.take() {
                let _ = t.join();
            }
        }
    }
}
