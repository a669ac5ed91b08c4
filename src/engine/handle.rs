//! The async face of the engine: submit a request, get a stream of events.
//! Dropping the stream cancels the sequence at the next step.

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
use super::waiting::WaitingCounts;
use super::worker::{self, Command};
use super::EngineError;

/// Cloneable handle used by HTTP handlers; never touches tensors.
#[derive(Clone)]
pub struct EngineHandle {
    tx: Sender<Command>,
    waiting: Arc<WaitingCounts>,
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
        let waiting = Arc::new(WaitingCounts::default());
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

    /// Queues a request. Refuses at once when the waiting queue is full
    /// (or the tenant holds half of a busy one).
    pub fn submit(
        &self,
        request: GenerationRequest,
    ) -> Result<UnboundedReceiver<Event>, EngineError> {
        Ok(self.submit_many(vec![request])?.remove(0))
    }

    /// Queues every sequence of one request (all of one tenant), or none.
    pub fn submit_many(&self, requests: Vec<GenerationRequest>) -> Result<Vec<UnboundedReceiver<Event>>, EngineError> {
        let Some(tenant) = requests.first().map(|r| r.tenant.clone()) else { return Ok(Vec::new()) };
        let n = requests.len();
        self.waiting.try_add(&tenant, n, self.max_waiting)?;
        let mut out = Vec::with_capacity(n);
        for (i, request) in requests.into_iter().enumerate() {
            let (tx, rx) = unbounded_channel();
            if self.tx.send(Command::Submit(Box::new(Sequence::new(request, tx)))).is_err() {
                // Those sent are dropped with their receivers; the rest never came.
                self.waiting.remove(&tenant, n - i);
                return Err(EngineError::Stopped);
            }
            out.push(rx);
        }
        Ok(out)
    }

    /// Requests waiting for admission.
    pub fn waiting(&self) -> usize {
        self.waiting.total()
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
