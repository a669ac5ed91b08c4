//! The background learner: one thread, its tensor work confined to a
//! small rayon pool of its own (`learning.threads`) so serving keeps the
//! other cores. A run turns an adapter's pending feedback into examples,
//! trains a candidate from the current version with earlier examples
//! replayed, measures it, and either promotes it as a new version or keeps
//! it as a rejected one with the reasons. Every run is a job with events.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::DType;
use serde_json::{json, Value};

use super::eval::{self, Drift, DriftAnchors};
use super::phase_clock::PhaseClock;
use super::queue::{JobQueue, PushError};
use crate::model::chat::ChatMessage;
use super::sft::{self, KlAnchors, Lesson, SftConfig, SftExample};
use crate::adapter_store::Source;
use crate::config::LearningSettings;
use crate::lora::init::{fresh_adapter, FreshSpec, InitB};
use crate::lora::trainable::TrainableLora;
use crate::model::LoadedModel;
use crate::registry::Registry;
use crate::storage_quota::TenantStorage;
use crate::store::{ExampleRecord, FeedbackRecord, JobEvent, JobMetadata, JobRecord, RecordStore, StoreError};
use crate::tenants::{TenantError, TenantRef, Tenants};

/// Tokens of each general prompt's base answer used for the drift measure.
const ANCHOR_ANSWER_TOKENS: usize = 24;

/// With a held-out split, the first phase stops once this share of its
/// lessons is learned: the gate needs a candidate that has started to
/// learn (held-out loss falls with the answers' shared form), not a
/// finished one; the final phase then teaches every lesson, held-out ones
/// included, under drift checkpoints.
const FIRST_PHASE_LEARNED: f64 = 0.25;

/// Final-phase steps between drift checkpoints (each costs a drift
/// measure, about a step's time on SmolLM2): the fallback should a run end
/// beyond the bounds without learning everything (one that learned
/// everything settles instead).
const FINAL_CHECK_EVERY: usize = 20;

/// Steps a run may take to settle when its final phase learned every
/// lesson but ended beyond the drift bounds, and how many between
/// checkpoints: each lesson is held where it is and only the KL pull
/// teaches, so the adapter walks back toward the base keeping what it
/// learned (instead of the gate falling back to an early, half-learned checkpoint).
const SETTLE_STEPS: usize = 15;
const SETTLE_CHECK_EVERY: usize = 5;

/// The handle the API uses to queue and cancel runs.
#[derive(Clone)]
pub struct Learner {
    inner: Arc<Inner>,
}

struct Inner {
    model: Arc<LoadedModel>,
    registry: Arc<Registry>,
    records: Arc<dyn RecordStore>,
    settings: LearningSettings,
    /// Jobs asked to stop.
    cancelled: Mutex<HashSet<String>>,
    /// Adapters with an automatic run queued or running (one at a time each).
    triggered: Mutex<HashSet<(String, String)>>,
    /// The job running now, if any, and the tenant it writes for.
    current: Mutex<Option<(String, TenantRef)>>,
    /// Queued jobs, round-robin across tenants.
    queue: JobQueue,
    /// Who may still write (a deleted tenant's job writes nothing more).
    tenants: Arc<Tenants>,
    /// Per-tenant storage quota (new versions count against it).
    storage: Arc<TenantStorage>,
    /// Set at shutdown: no further job starts.
    stopping: AtomicBool,
    anchors: OnceLock<DriftAnchors>,
    kl_anchors: OnceLock<KlAnchors>,
    /// Set once the anchors are built (at start).
    prepared: AtomicBool,
    /// Whether the engine is serving requests right now.
    serving_busy: Arc<dyn Fn() -> bool + Send + Sync>,
    /// Where a training step runs while nothing is being served (None: the learner's own pool).
    idle_pool: Option<rayon::ThreadPool>,
    metrics: crate::metrics::Metrics,
}

/// A run on uploaded files: their ids (the tenant's) and the method.
#[derive(Debug, Clone)]
pub struct FileJob {
    pub training_file: String,
    pub validation_file: Option<String>,
    /// `supervised` or `dpo`.
    pub method: String,
}

/// Why a run could not be queued.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the learner has stopped")]
    Stopped,
    #[error(transparent)]
    Full(#[from] super::queue::QueueFull),
    #[error(transparent)]
    Tenant(#[from] TenantError),
}

/// The tenant a job writes for.
fn job_tenant(job: &JobRecord) -> TenantRef {
    TenantRef::from_parts(&job.tenant, job.tenant_incarnation)
}

impl Learner {
    /// Starts the learner thread. Jobs left queued or running by a previous
    /// process are marked failed first (their feedback stays pending).
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        model: Arc<LoadedModel>,
        registry: Arc<Registry>,
        records: Arc<dyn RecordStore>,
        tenants: Arc<Tenants>,
        storage: Arc<TenantStorage>,
        settings: LearningSettings,
        serving_busy: Box<dyn Fn() -> bool + Send + Sync>,
        metrics: crate::metrics::Metrics,
    ) -> Result<Self, StoreError> {
        for job in records.fail_unfinished_jobs("the server stopped during this job; its feedback is still pending")? {
            tracing::warn!(job = %job.id, tenant = %job.tenant, adapter = %job.adapter, "marked an interrupted training job failed");
        }
        let idle_threads = match settings.idle_threads {
            0 => num_cpus::get(),
            n => n,
        };
        let idle_pool = if idle_threads > settings.threads.max(1) {
            rayon::ThreadPoolBuilder::new().num_threads(idle_threads).thread_name(|i| format!("learner-idle-{i}")).build().ok()
        } else {
            None
        };
        let inner = Arc::new(Inner {
            model,
            registry,
            records,
            settings,
            cancelled: Mutex::new(HashSet::new()),
            current: Mutex::new(None),
            queue: JobQueue::new(),
            tenants,
            storage,
            triggered: Mutex::new(HashSet::new()),
            stopping: AtomicBool::new(false),
            anchors: OnceLock::new(),
            kl_anchors: OnceLock::new(),
            prepared: AtomicBool::new(false),
            serving_busy: Arc::from(serving_busy),
            idle_pool,
            metrics,
        });
        let worker = inner.clone();
        std::thread::Builder::new()
            .name("learner".into())
            .spawn(move || {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(worker.settings.threads.max(1)).build();
                // The base model's anchors (drift measure, KL pull) are
                // built now, resting for serving, rather than in the first run.
                let prepare = || {
                    if !worker.model.model.trainable() {
                        return;
                    }
                    eval::with_pacer(worker.pacer(), || {
                        worker.anchors();
                        worker.kl_anchors();
                    })
                };
                let started = std::time::Instant::now();
                match &pool {
                    Ok(pool) => pool.install(prepare),
                    Err(_) => prepare(),
                }
                worker.prepared.store(true, Ordering::SeqCst);
                tracing::info!(seconds = started.elapsed().as_secs_f64(), "learner: the base model's anchors are built");
                while let Some((_, job_id)) = worker.queue.next() {
                    match &pool {
                        Ok(pool) => pool.install(|| worker.run(&job_id)),
                        Err(_) => worker.run(&job_id),
                    }
                }
            })
            .map_err(|e| StoreError::Database(format!("cannot start the learner thread: {e}")))?;
        Ok(Learner { inner })
    }

    /// Whether the base model's anchors are built (runs queued before wait for them).
    pub fn prepared(&self) -> bool {
        self.inner.prepared.load(Ordering::SeqCst)
    }

    /// The settings runs use.
    pub fn settings(&self) -> &LearningSettings {
        &self.inner.settings
    }

    /// Queues a run for `adapter` of `tenant` on its pending feedback.
    /// `hyperparameters` may set `n_steps`, `learning_rate`, `batch_size`
    /// over the settings.
    pub fn submit(&self, tenant: &TenantRef, adapter: &str, hyperparameters: Value, metadata: Option<JobMetadata>) -> Result<JobRecord, QueueError> {
        self.submit_job(tenant, adapter, hyperparameters, None, metadata)
    }

    /// Queues a run on uploaded files instead of feedback (OpenAI's
    /// `POST /v1/fine_tuning/jobs`). `hyperparameters` may also set
    /// `n_epochs` (steps then cover that many passes over the file) and
    /// `learning_rate_multiplier` (of `learning.learning_rate`).
    pub fn submit_files(&self, tenant: &TenantRef, adapter: &str, hyperparameters: Value, files: FileJob, metadata: Option<JobMetadata>) -> Result<JobRecord, QueueError> {
        self.submit_job(tenant, adapter, hyperparameters, Some(files), metadata)
    }

    fn submit_job(&self, tenant: &TenantRef, adapter: &str, hyperparameters: Value, files: Option<FileJob>, metadata: Option<JobMetadata>) -> Result<JobRecord, QueueError> {
        let s = &self.inner.settings_for(tenant, adapter);
        let steps = hyperparameters.get("n_steps").and_then(Value::as_u64).unwrap_or(s.steps as u64).min(s.max_steps as u64);
        let multiplier = hyperparameters.get("learning_rate_multiplier").and_then(Value::as_f64).unwrap_or(1.0);
        let hp = json!({
            "n_steps": steps,
            "n_epochs": hyperparameters.get("n_epochs").and_then(Value::as_f64).map(|e| e.min(s.max_epochs as f64)),
            "learning_rate": hyperparameters.get("learning_rate").and_then(Value::as_f64).unwrap_or(s.learning_rate * multiplier),
            "learning_rate_multiplier": multiplier,
            "batch_size": hyperparameters.get("batch_size").and_then(Value::as_u64).unwrap_or(s.batch_size as u64),
            "seed": hyperparameters.get("seed").and_then(Value::as_u64),
        });
        let (training_file, validation_file, method) = match files {
            Some(f) => (Some(f.training_file), f.validation_file, f.method),
            // What the feedback waiting now trains; the run says again from what it gathers.
            None => (None, None, feedback_method(&self.inner.pending(tenant, adapter)?).to_string()),
        };
        let job = JobRecord {
            id: crate::store::new_id("ftjob"),
            tenant: tenant.to_string(),
            tenant_incarnation: tenant.incarnation(),
            adapter: adapter.to_string(),
            status: "queued".into(),
            created_at: crate::store::now(),
            finished_at: None,
            error: None,
            parent_version: self.inner.registry.current_version(tenant, adapter),
            result_version: None,
            feedback_ids: Vec::new(),
            hyperparameters: hp,
            metrics: Value::Null,
            training_file,
            validation_file,
            method,
            metadata,
        };
        let i = &self.inner;
        let record = || -> Result<(), QueueError> {
            i.tenants.write_as(tenant, || -> Result<(), StoreError> {
                i.records.save_job(&job)?;
                i.records.add_job_event(&queued_event(&job.id))
            })??;
            Ok(())
        };
        match i.queue.push(tenant, &job.id, i.settings.max_queued_jobs_per_tenant, record) {
            Ok(()) => Ok(job),
            Err(PushError::Full(full)) => Err(full.into()),
            Err(PushError::Closed) => Err(QueueError::Stopped),
            Err(PushError::Record(e)) => Err(e),
        }
    }

    /// Starts a run when enough new feedback waits on `adapter` and none is
    /// queued or running for it already.
    pub fn maybe_trigger(&self, tenant: &TenantRef, adapter: &str) {
        let min = self.inner.settings_for(tenant, adapter).min_new_feedback;
        if min == 0 {
            return;
        }
        let examples = self.inner.records.examples(tenant, adapter, false).map(|e| e.len()).unwrap_or(0);
        let pending = match self.inner.pending(tenant, adapter) {
            Ok(p) => p.len() + examples,
            Err(e) => return tracing::error!("learner: cannot count pending feedback: {e}"),
        };
        if pending < min {
            return;
        }
        // Check and queue as one step: feedback arrives concurrently.
        let key = (tenant.name().to_string(), adapter.to_string());
        let mut triggered = self.inner.triggered.lock().unwrap_or_else(|p| p.into_inner());
        if triggered.contains(&key) {
            return;
        }
        match self.inner.records.jobs(tenant, Some(adapter), None, 1) {
            Ok(jobs) if jobs.first().is_some_and(|j| j.status == "queued" || j.status == "running") => {}
            Ok(_) => match self.submit(tenant, adapter, Value::Null, None) {
                Ok(_) => {
                    triggered.insert(key);
                }
                Err(e @ (QueueError::Full(_) | QueueError::Tenant(_))) => tracing::info!("learner: no automatic run queued: {e}"),
                Err(e) => tracing::error!("learner: cannot queue a run: {e}"),
            },
            Err(e) => tracing::error!("learner: cannot list jobs: {e}"),
        }
    }

    /// Stops cleanly for a shutdown: no new job starts, the running one is
    /// cancelled at its next step (waiting at most `grace`), and queued ones
    /// are marked failed; their feedback stays pending for the next start.
    pub fn shutdown(&self, grace: std::time::Duration) {
        let i = &self.inner;
        i.stopping.store(true, Ordering::SeqCst);
        i.queue.close();
        let running = i.current.lock().unwrap_or_else(|p| p.into_inner()).clone().map(|(job, _)| job);
        if let Some(job) = &running {
            tracing::info!(job = %job, "shutdown: stopping the training job");
            i.cancelled.lock().unwrap_or_else(|p| p.into_inner()).insert(job.clone());
        }
        let until = std::time::Instant::now() + grace;
        while i.current.lock().unwrap_or_else(|p| p.into_inner()).is_some() && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        match i.records.fail_unfinished_jobs("the server shut down before this job finished; its feedback is still pending") {
            Ok(jobs) => {
                for job in jobs {
                    tracing::info!(job = %job.id, "shutdown: job marked failed");
                }
            }
            Err(e) => tracing::error!("shutdown: cannot mark unfinished jobs: {e}"),
        }
    }

    /// Judges a watched learner promotion once its first ratings are in
    /// (see [`super::watch`]); called after each rating of `version`.
    pub fn watch(&self, tenant: &str, adapter: &str, version: u32) {
        let i = &self.inner;
        let settings = i.settings_for(tenant, adapter);
        if let Err(e) = super::watch::check(&i.registry, i.records.as_ref(), &settings, &i.metrics, tenant, adapter, version) {
            tracing::error!(tenant, adapter, version, "learner: cannot judge a watched version: {e}");
        }
    }

    /// Asks a queued or running job to stop; it ends `cancelled` at its next
    /// step (a queued one at once, leaving the queue).
    pub fn cancel(&self, tenant: &TenantRef, job_id: &str) -> Result<JobRecord, QueueError> {
        let i = &self.inner;
        let mut job = i.records.job(tenant, job_id)?;
        if job.status == "queued" || job.status == "running" {
            // Out of the queue it never runs; otherwise it stops at its next step.
            if !i.queue.remove(job_id) {
                i.cancelled.lock().unwrap_or_else(|p| p.into_inner()).insert(job_id.to_string());
            }
            if job.status == "queued" {
                job.status = "cancelled".into();
                job.finished_at = Some(crate::store::now());
                i.tenants.write_as(tenant, || -> Result<(), StoreError> {
                    i.records.save_job(&job)?;
                    i.records.add_job_event(&new_event(job_id, "info", "Job cancelled", Value::Null))
                })??;
            }
        }
        Ok(job)
    }

    /// Forgets a tenant being deleted: its queued jobs leave the queue and
    /// its running job stops at its next step (writing nothing more: the
    /// tenant's writes are refused from now on). Returns the job ids dropped.
    pub fn forget_tenant(&self, tenant: &str) -> Vec<String> {
        let i = &self.inner;
        let mut dropped = i.queue.remove_tenant(tenant);
        if let Some((job, who)) = i.current.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            if who.name() == tenant {
                i.cancelled.lock().unwrap_or_else(|p| p.into_inner()).insert(job.clone());
                dropped.push(job);
            }
        }
        i.triggered.lock().unwrap_or_else(|p| p.into_inner()).retain(|(t, _)| t != tenant);
        dropped
    }

    /// Jobs a tenant has queued (not yet running).
    pub fn queued(&self, tenant: &str) -> usize {
        self.inner.queue.queued(tenant)
    }
}

/// How a run ended short of a candidate.
enum RunError {
    Failed(String),
    Cancelled,
    /// The tenant was deleted: nothing more is written for it.
    TenantGone,
}

/// OpenAI's name for what feedback trains: `dpo` when a corrected
/// down-rating is among it (a preference), else `supervised`.
fn feedback_method(items: &[FeedbackRecord]) -> &'static str {
    if items.iter().any(|f| f.rating == Some(-1) && f.correction.is_some()) {
        "dpo"
    } else {
        "supervised"
    }
}

fn new_event(job_id: &str, level: &str, message: &str, data: Value) -> JobEvent {
    JobEvent {
        id: crate::store::new_id("ftevent"),
        job_id: job_id.to_string(),
        created_at: crate::store::now(),
        level: level.into(),
        message: message.into(),
        data,
    }
}

fn queued_event(job_id: &str) -> JobEvent {
    new_event(job_id, "info", "Job queued", Value::Null)
}

impl<E: std::fmt::Display> From<E> for RunError {
    fn from(e: E) -> Self {
        RunError::Failed(e.to_string())
    }
}

impl Inner {
    /// Records an event of the running job (nothing once its tenant is deleted).
    fn event(&self, job_id: &str, level: &str, message: &str, data: Value) {
        let e = new_event(job_id, level, message, data);
        let who = self.current.lock().unwrap_or_else(|p| p.into_inner()).as_ref().filter(|(id, _)| id == job_id).map(|(_, who)| who.clone());
        let written = match &who {
            Some(who) => self.tenants.write_as(who, || self.records.add_job_event(&e)),
            None => Ok(self.records.add_job_event(&e)),
        };
        match written {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::error!(job = job_id, "cannot record a job event: {err}"),
            Err(gone) => tracing::debug!(job = job_id, "job event not recorded: {gone}"),
        }
    }

    /// Runs a write of `job`'s while its tenant still exists.
    fn write_for<T, E: std::fmt::Display>(&self, job: &JobRecord, write: impl FnOnce() -> Result<T, E>) -> Result<T, RunError> {
        match self.tenants.write_as(&job_tenant(job), write) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(RunError::Failed(e.to_string())),
            Err(_) => Err(RunError::TenantGone),
        }
    }

    /// After a training step that took `spent`: while requests are being
    /// served, rest `serving_priority` times as long (in short naps, so a
    /// quiet engine or a cancellation ends the rest early).
    fn yield_to_serving(&self, spent: std::time::Duration, job_id: &str) {
        let rest = spent.mul_f64(self.settings.serving_priority.max(0.0));
        let until = std::time::Instant::now() + rest;
        while std::time::Instant::now() < until && (self.serving_busy)() && !self.is_cancelled(job_id) {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// The learning settings of one adapter: the server's, with the
    /// adapter's policy overrides applied (a bad stored policy is logged and ignored).
    fn settings_for(&self, tenant: &str, adapter: &str) -> LearningSettings {
        match self.records.policy(tenant, adapter) {
            Ok(Some(overrides)) => super::policy::apply(&self.settings, &overrides).unwrap_or_else(|e| {
                tracing::error!(tenant, adapter, "ignoring a stored learning policy: {e}");
                self.settings.clone()
            }),
            Ok(None) => self.settings.clone(),
            Err(e) => {
                tracing::error!(tenant, adapter, "cannot read the learning policy: {e}");
                self.settings.clone()
            }
        }
    }

    /// Runs one training step on all cores when no request is being
    /// served, on the learner's own small pool otherwise.
    /// Runs tensor work (evaluation, anchors) where [`Self::run_step`] would.
    fn work<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        match &self.idle_pool {
            Some(pool) if !(self.serving_busy)() => pool.install(f),
            _ => f(),
        }
    }

    fn run_step(&self, step: &mut (dyn FnMut() + Send)) {
        self.work(step)
    }

    fn is_cancelled(&self, job_id: &str) -> bool {
        self.cancelled.lock().unwrap_or_else(|p| p.into_inner()).contains(job_id)
    }

    /// Feedback an adapter learns from: its own, plus the base model's for the default adapter.
    fn pending(&self, tenant: &str, adapter: &str) -> Result<Vec<FeedbackRecord>, StoreError> {
        let mut items = self.records.pending_feedback(tenant, adapter)?;
        if adapter == self.settings.default_adapter {
            items.extend(self.records.pending_feedback(tenant, "")?);
        }
        Ok(items)
    }

    fn learned(&self, tenant: &str, adapter: &str) -> Result<Vec<FeedbackRecord>, StoreError> {
        let mut items = self.records.learned_feedback(tenant, adapter)?;
        if adapter == self.settings.default_adapter {
            items.extend(self.records.learned_feedback(tenant, "")?);
        }
        Ok(items)
    }

    /// Lessons from feedback: a correction of a down-rated answer is a
    /// preference (the correction over what was said); any other correction
    /// teaches the correction; an up-rating teaches the model's own answer;
    /// a down-rating alone teaches avoiding that answer.
    /// Also returns, per lesson, the chat it answered when that chat ends
    /// with a user's message in plain text (what paraphrases can reword).
    fn lessons(&self, tenant: &str, items: &[FeedbackRecord]) -> Result<FeedbackLessons, RunError> {
        let tok = &self.model.tokenizer;
        let (mut lessons, mut used, mut chats) = (Vec::new(), Vec::new(), Vec::new());
        for f in items {
            let c = match self.records.completion(tenant, &f.completion_id) {
                Ok(c) => c,
                Err(StoreError::NotFound(_)) => continue,
                Err(e) => return Err(e.into()),
            };
            let prompt_index = (f.choice_index / c.n.max(1)) as usize;
            let Some(rendered) = c.rendered_prompts.get(prompt_index) else { continue };
            let prompt = match c.prompt_ids.get(prompt_index) {
                Some(ids) if !ids.is_empty() => ids.clone(),
                _ if c.kind == "chat" => tok.encode_chat(rendered)?,
                _ => tok.encode_prompt(rendered)?,
            };
            let choice = f.choice_index as usize;
            let said = c.outputs.get(choice).filter(|o| !o.trim().is_empty());
            // What the model said as it generated it; text for records logged before ids were.
            let said_ids = |output: &str| -> Result<Vec<u32>, RunError> {
                match c.output_ids.get(choice).filter(|ids| !ids.is_empty()) {
                    Some(ids) => Ok(ids.clone()),
                    None => Ok(tok.encode_continuation(output)?),
                }
            };
            let fits = |answer: &[u32]| !answer.is_empty() && prompt.len() + answer.len() <= super::dataset::MAX_EXAMPLE_TOKENS;
            let lesson = match (&f.correction, f.rating, said) {
                (Some(text), Some(-1), Some(output)) if text.trim() != output.trim() => {
                    let (chosen, rejected) = (tok.encode_answer(text)?, said_ids(output)?);
                    if !fits(&chosen) || !fits(&rejected) {
                        continue;
                    }
                    Lesson::Prefer { prompt: prompt.clone(), chosen, rejected }
                }
                (Some(text), _, _) => Lesson::Imitate(SftExample { prompt: prompt.clone(), answer: tok.encode_answer(text)? }),
                (None, Some(1), Some(output)) => {
                    // Its own answer as it said it, ended where it ended.
                    let mut answer = said_ids(output)?;
                    let eos = tok.eos_ids.first().copied();
                    let stopped = c.finish_reasons.get(choice).is_none_or(|r| r == "stop");
                    if let (Some(eos), true) = (eos, stopped) {
                        if answer.last() != Some(&eos) {
                            answer.push(eos);
                        }
                    }
                    Lesson::Imitate(SftExample { prompt: prompt.clone(), answer })
                }
                (None, Some(-1), Some(output)) => Lesson::Avoid(SftExample { prompt: prompt.clone(), answer: said_ids(output)? }),
                _ => continue,
            };
            if let Lesson::Imitate(e) | Lesson::Avoid(e) = &lesson {
                if prompt.is_empty() || !fits(&e.answer) {
                    continue;
                }
            }
            lessons.push(lesson);
            used.push(f.id.clone());
            chats.push(if c.kind == "chat" { chat_messages(&c.prompt) } else { None });
        }
        Ok((lessons, used, chats))
    }

    /// Lessons that ask each new lesson's question in other words (up to
    /// `per_question` paraphrases by the base model) and want the same
    /// answer; split like the lessons (every fifth held out) when `split`.
    fn reworded_lessons(
        &self,
        job_id: &str,
        lessons: &[Lesson],
        sources: &[Option<Vec<ChatMessage>>],
        split: bool,
        per_question: usize,
    ) -> Result<(Vec<Lesson>, Vec<Lesson>), RunError> {
        let mut asked = Vec::new();
        for (i, (lesson, chat)) in lessons.iter().zip(sources).enumerate() {
            let (Some(target), Some(chat)) = (lesson.target(), chat) else { continue };
            if let Some(last) = chat.last() {
                asked.push((i, target.answer, chat.clone(), last.content.clone()));
            }
        }
        if asked.is_empty() || per_question == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        let m = &self.model;
        let questions: Vec<String> = asked.iter().map(|a| a.3.clone()).collect();
        let written = self.work(|| super::paraphrase::paraphrases(&m.model, &m.tokenizer, &questions, per_question, 0))?;
        let (mut train, mut held, mut shown) = (Vec::new(), Vec::new(), Vec::new());
        for ((i, answer, chat, question), versions) in asked.into_iter().zip(written) {
            for text in versions {
                let mut reworded = chat.clone();
                if let Some(last) = reworded.last_mut() {
                    last.content = text.clone();
                }
                let prompt = m.tokenizer.encode_chat(&m.chat.render(&reworded)?)?;
                let lesson = Lesson::Imitate(SftExample { prompt, answer: answer.clone() });
                if split && i % 5 == 4 { held.push(lesson) } else { train.push(lesson) }
                shown.push(json!({"question": question, "paraphrase": text}));
            }
        }
        self.event(
            job_id,
            "info",
            &format!("Paraphrased {} questions: {} paraphrases kept", questions.len(), shown.len()),
            json!({"paraphrases": shown}),
        );
        Ok((train, held))
    }

    /// Lessons of an uploaded file; a file with bad lines fails the run, naming them.
    fn file_lessons(&self, tenant: &str, file: &str, method: super::dataset::Method) -> Result<Vec<Lesson>, RunError> {
        let bytes = self.records.file_content(tenant, file)?;
        let text = String::from_utf8(bytes).map_err(|_| RunError::Failed(format!("file {file} is not UTF-8 text")))?;
        let (lessons, errors) = super::dataset::parse_lessons(&text, method, &self.model.tokenizer, &self.model.chat);
        if let Some(first) = errors.first() {
            return Err(RunError::Failed(format!("file {file}: {} bad line(s), the first: {first}", errors.len())));
        }
        if lessons.is_empty() {
            return Err(RunError::Failed(format!("file {file} holds no examples")));
        }
        Ok(lessons)
    }

    /// The drift from the base that version `version` recorded when the
    /// learner made it, if measured on the anchors this server has (same
    /// fingerprint): the same figure measuring would give, without the pass.
    fn recorded_drift(&self, tenant: &str, adapter: &str, version: u32) -> Option<f64> {
        let info = self.registry.info(tenant, adapter).ok()?;
        let manifest = info.versions.iter().find(|m| m.version == version)?;
        let metrics = &manifest.metrics;
        (metrics["drift_anchors"].as_str() == Some(self.anchors().fingerprint())).then(|| metrics["base_kl"].as_f64()).flatten()
    }

    fn anchors(&self) -> &DriftAnchors {
        self.anchors.get_or_init(|| {
            self.work(|| eval::build_anchors(&self.model.model, &self.model.tokenizer, &self.model.chat, ANCHOR_ANSWER_TOKENS)).unwrap_or_else(|e| {
                tracing::error!("learner: cannot build drift anchors: {e}");
                DriftAnchors::default()
            })
        })
    }

    /// The base model's own sequences and log-probabilities for the KL term (built once).
    fn kl_anchors(&self) -> &KlAnchors {
        self.kl_anchors.get_or_init(|| {
            let s = &self.settings;
            if s.kl_anchor_count == 0 {
                return KlAnchors::default();
            }
            let m = &self.model;
            let built = self
                .work(|| eval::training_anchors(&m.model, &m.tokenizer, &m.chat, s.kl_anchor_count, 7))
                .map_err(|e| e.to_string())
                .and_then(|a| {
                    let pairs: Vec<(Vec<u32>, usize)> = a.into_iter().map(|a| (a.tokens, a.answer_start)).collect();
                    KlAnchors::new(&m.model, &pairs, s.kl_weight, s.kl_anchors_per_step).map_err(|e| e.to_string())
                });
            built.unwrap_or_else(|e| {
                tracing::error!("learner: cannot build KL anchors: {e}");
                KlAnchors::default()
            })
        })
    }

    /// Rests `serving_priority` times the length of each piece of work
    /// since the last call while requests are served.
    fn pacer(&self) -> Box<dyn FnMut()> {
        let busy = self.serving_busy.clone();
        let priority = self.settings.serving_priority.max(0.0);
        let mut last = std::time::Instant::now();
        Box::new(move || {
            // One forward pass of evaluation is well under 2 s; longer
            // means training ran in between (it rests on its own).
            let rest = last.elapsed().min(std::time::Duration::from_secs(2)).mul_f64(priority);
            let until = std::time::Instant::now() + rest;
            while std::time::Instant::now() < until && busy() {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            last = std::time::Instant::now();
        })
    }

    fn run(&self, job_id: &str) {
        let job = match self.records.job_by_id(job_id) {
            Ok(j) => j,
            Err(e) => return tracing::error!(job = job_id, "learner: queued job not found: {e}"),
        };
        let key = (job.tenant.clone(), job.adapter.clone());
        if job.status == "queued" && !self.stopping.load(Ordering::SeqCst) && !self.is_cancelled(job_id) {
            *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some((job_id.to_string(), job_tenant(&job)));
            // Evaluation and anchor sampling rest for serving as training steps do.
            let pacer = self.pacer();
            eval::with_pacer(pacer, || self.run_job(job));
            *self.current.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        // Cancelled while queued, or done: the adapter may be triggered again.
        self.triggered.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
        // What the run allocated is freed; give it back rather than keep the peak.
        crate::cpu::release_free_memory();
        self.cancelled.lock().unwrap_or_else(|p| p.into_inner()).remove(job_id);
    }

    fn run_job(&self, job: JobRecord) {
        let job_id = job.id.clone();
        let job_id = job_id.as_str();
        let mut job = job;
        job.status = "running".into();
        match self.write_for(&job, || self.records.save_job(&job)) {
            Ok(()) => {}
            Err(RunError::TenantGone) => return tracing::info!(job = job_id, "learner: the job's tenant was deleted; not started"),
            Err(_) => return tracing::error!(job = job_id, "learner: cannot record the job's start"),
        }
        self.event(job_id, "info", "Fine-tuning job started", Value::Null);
        let outcome = self.train_and_gate(&mut job);
        job.finished_at = Some(crate::store::now());
        match outcome {
            Ok(true) => {
                job.status = "succeeded".into();
                self.event(job_id, "info", "The job has successfully completed", json!({"version": job.result_version}));
            }
            Ok(false) => {
                job.status = "failed".into();
                self.event(job_id, "error", job.error.as_deref().unwrap_or("candidate rejected"), job.metrics.clone());
            }
            Err(RunError::Cancelled) => {
                job.status = "cancelled".into();
                self.event(job_id, "info", "Job cancelled", Value::Null);
            }
            Err(RunError::Failed(message)) => {
                job.status = "failed".into();
                job.error = Some(message.clone());
                self.event(job_id, "error", &message, Value::Null);
            }
            Err(RunError::TenantGone) => {
                tracing::info!(job = job_id, tenant = %job.tenant, "learner: the job's tenant was deleted; it wrote nothing more");
                self.metrics.learner_jobs.with_label_values(&["cancelled"]).inc();
                self.cancelled.lock().unwrap_or_else(|p| p.into_inner()).remove(job_id);
                return;
            }
        }
        match self.write_for(&job, || self.records.save_job(&job)) {
            Ok(()) | Err(RunError::TenantGone) => {}
            Err(_) => tracing::error!(job = job_id, "learner: cannot record the outcome"),
        }
        let outcome = if job.status == "failed" && job.result_version.is_some() { "rejected" } else { job.status.as_str() };
        self.metrics.learner_jobs.with_label_values(&[outcome]).inc();
        if job.status == "succeeded" {
            self.metrics.adapter_promotions.with_label_values(&["learner"]).inc();
        }
        if let Some(tps) = job.metrics.get("train_tokens_per_second").and_then(Value::as_f64) {
            self.metrics.learner_train_tokens_per_second.set(tps);
        }
        for figure in ["valid_loss", "base_kl", "base_top1_agreement"] {
            if let Some(v) = job.metrics.get(figure).and_then(Value::as_f64) {
                self.metrics.adapter_eval.with_label_values(&[self.metrics.tenant_label(&job.tenant), self.metrics.tenant_label(&job.adapter), figure]).set(v);
            }
        }
        self.cancelled.lock().unwrap_or_else(|p| p.into_inner()).remove(job_id);
    }


    /// Returns whether the candidate passed the gate (and was promoted).
    fn train_and_gate(&self, job: &mut JobRecord) -> Result<bool, RunError> {
        let model = &self.model.model;
        if !model.trainable() {
            return Err(RunError::Failed("this base model runs in bf16/f16; serve it with model.dtype = \"f32\" to train adapters".into()));
        }
        let s = &self.settings_for(&job.tenant, &job.adapter);
        let mut clock = PhaseClock::start();
        // Per new lesson from feedback, the chat it answered (for paraphrases).
        let mut sources: Vec<Option<Vec<ChatMessage>>> = Vec::new();
        let (new_lessons, validation) = match &job.training_file {
            Some(file) => {
                let method = super::dataset::Method::parse(&job.method).unwrap_or(super::dataset::Method::Supervised);
                let validation = job.validation_file.as_deref().map(|f| self.file_lessons(&job.tenant, f, method)).transpose()?;
                (self.file_lessons(&job.tenant, file, method)?, validation)
            }
            None => {
                let pending = self.pending(&job.tenant, &job.adapter)?;
                let (mut new_lessons, mut used, chats) = self.lessons(&job.tenant, &pending)?;
                sources = chats;
                // Examples given directly count as new until a run learns them.
                for e in self.records.examples(&job.tenant, &job.adapter, false)? {
                    new_lessons.push(Lesson::Imitate(SftExample { prompt: e.prompt_ids, answer: e.answer_ids }));
                    used.push(e.id);
                    sources.push(None);
                }
                if new_lessons.is_empty() {
                    return Err(RunError::Failed(format!("no trainable feedback on {} ({} items pending)", job.adapter, pending.len())));
                }
                job.feedback_ids = used;
                job.method = if new_lessons.iter().any(|l| matches!(l, Lesson::Prefer { .. })) { "dpo" } else { "supervised" }.into();
                (new_lessons, None)
            }
        };
        // Held out: the validation file; else every fifth new lesson when
        // there are at least five; otherwise the gate measures on the
        // training lessons themselves.
        let split = validation.is_none() && new_lessons.len() >= 5;
        let (train_new, held_out): (Vec<Lesson>, Vec<Lesson>) = if let Some(v) = validation {
            (new_lessons.clone(), v)
        } else if new_lessons.len() >= 5 {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for (i, e) in new_lessons.iter().enumerate() {
                if i % 5 == 4 { b.push(e.clone()) } else { a.push(e.clone()) }
            }
            (a, b)
        } else {
            (new_lessons.clone(), new_lessons.clone())
        };
        // What the gate measures: answers wanted (loss must fall) and answers
        // rated down with nothing better offered (their loss must rise).
        let held_targets: Vec<SftExample> = held_out.iter().filter_map(Lesson::target).collect();
        let held_avoided: Vec<SftExample> =
            held_out.iter().filter(|l| matches!(l, Lesson::Avoid(_))).filter_map(Lesson::avoided).collect();
        let learned = self.learned(&job.tenant, &job.adapter)?;
        let (mut replay, _, _) = self.lessons(&job.tenant, &learned)?;
        replay.extend(
            self.records
                .examples(&job.tenant, &job.adapter, true)?
                .into_iter()
                .map(|e| Lesson::Imitate(SftExample { prompt: e.prompt_ids, answer: e.answer_ids })),
        );
        replay.truncate(s.max_replay);
        let replay_targets: Vec<SftExample> = replay.iter().filter_map(Lesson::target).collect();

        let parent = match job.parent_version {
            Some(v) => Some(self.registry.load(&job.tenant, &job.adapter, v)?),
            None => None,
        };
        let start = match &parent {
            Some(p) => (**p).clone(),
            None => {
                let targets: Vec<&str> = s.targets.iter().map(String::as_str).collect();
                let spec = FreshSpec { targets: &targets, rank: s.rank, alpha: s.alpha, seed: 0, init_b: InitB::Zero };
                fresh_adapter(&model.lora_sites(), &spec, DType::F32, model.device())?
            }
        };
        let lora = TrainableLora::from_adapter(&start)?;
        let loss_on = |set: &[SftExample]| -> Result<f64, RunError> {
            Ok(if set.is_empty() { 0.0 } else { self.work(|| eval::mean_loss(model, &lora, set))? })
        };
        let loss_and_match_on = |set: &[SftExample]| -> Result<(f64, f64), RunError> {
            Ok(if set.is_empty() { (0.0, 0.0) } else { self.work(|| eval::loss_and_match(model, &lora, set))? })
        };
        clock.lap("prepare");
        // A parent's own drift from the base is spent budget: the pull
        // toward the base grows with it. A parent this learner made on the
        // same anchors recorded it; others are measured.
        let parent_kl = match job.parent_version {
            Some(v) if s.kl_weight > 0.0 => match self.recorded_drift(&job.tenant, &job.adapter, v) {
                Some(kl) => Some(kl),
                None => Some(self.work(|| eval::drift(model, &lora, self.anchors()))?.kl),
            },
            _ => None,
        };
        // Both a heavier KL weight and more anchors a step (a finer
        // estimate of the drift it pulls against): on SmolLM2's second
        // lesson either alone still ended below the top-1 bound.
        let factor = parent_kl.map_or(1.0, |kl| sft::drift_budget_factor(kl, s.max_base_drift));
        let (kl_weight, anchors_per_step) = (s.kl_weight * factor, (s.kl_anchors_per_step as f64 * factor).ceil() as usize);
        if let Some(kl) = parent_kl {
            self.event(
                &job.id,
                "info",
                &format!(
                    "The parent drifts {kl:.4} nats from the base (budget {}): KL weight {kl_weight:.2} on {anchors_per_step} anchors a step",
                    s.max_base_drift
                ),
                json!({"parent_base_kl": kl, "kl_weight": kl_weight, "kl_anchors_per_step": anchors_per_step}),
            );
        }
        clock.lap("parent_drift");
        let (before_loss, before_match) = loss_and_match_on(&held_targets)?;
        let before_avoided = loss_on(&held_avoided)?;
        clock.lap("evaluate_before");

        // Every lesson of the run; the first phase trains on `train_set`,
        // the final one (after a passed gate) on the held-out lessons too.
        // Paraphrases of corrected questions, taught alongside them (those
        // of held-out lessons only in the final phase, after the gate).
        let (train_reworded, held_reworded) = self.reworded_lessons(&job.id, &new_lessons, &sources, split, s.paraphrases)?;
        let mut train_set = train_new.clone();
        let mut aids: Vec<usize> = (train_set.len()..train_set.len() + train_reworded.len()).collect();
        train_set.extend(train_reworded);
        train_set.extend(replay.iter().cloned());
        let first_phase: Vec<usize> = (0..train_set.len()).collect();
        let mut every = train_set.clone();
        if split {
            every.extend(held_out.iter().cloned());
            aids.extend(every.len()..every.len() + held_reworded.len());
            every.extend(held_reworded);
        }
        let hp = &job.hyperparameters;
        let batch = hp["batch_size"].as_u64().unwrap_or(s.batch_size as u64).max(1) as usize;
        // However many epochs over however large a file: at most max_steps.
        let steps = match hp["n_epochs"].as_f64() {
            Some(epochs) => ((epochs.min(s.max_epochs as f64) * train_set.len() as f64) / batch as f64).ceil().max(1.0) as usize,
            None => hp["n_steps"].as_u64().unwrap_or(s.steps as u64) as usize,
        }
        .min(s.max_steps.max(1));
        let cfg = SftConfig {
            steps,
            learning_rate: hp["learning_rate"].as_f64().unwrap_or(s.learning_rate),
            batch_size: hp["batch_size"].as_u64().unwrap_or(s.batch_size as u64) as usize,
            seed: job.seed(),
            // Feedback and "auto" epochs stop once enough lessons are
            // learned: with a held-out split, the share the gate needs to
            // judge (the final phase teaches the rest), otherwise all.
            until_learned: match hp["n_epochs"].as_f64() {
                Some(_) => None,
                None if split => Some(FIRST_PHASE_LEARNED),
                None => Some(1.0),
            },
        };
        clock.lap("paraphrase");
        let started = std::time::Instant::now();
        let cancelled = AtomicBool::new(false);
        let tokens_per_step: usize = train_set.iter().map(Lesson::tokens).sum::<usize>() * cfg.batch_size.max(1) / train_set.len().max(1);
        // The anchors are the base model's (built once); how hard they pull is the adapter's policy.
        let anchors = &if s.kl_weight > 0.0 && s.kl_anchors_per_step > 0 {
            KlAnchors { anchors: self.kl_anchors().anchors.clone(), weight: kl_weight, per_step: anchors_per_step }
        } else {
            KlAnchors::default()
        };
        let run_step = |step: &mut (dyn FnMut() + Send)| self.run_step(step);
        let mut trainer = {
            let mut made = None;
            run_step(&mut || made = Some(sft::Trainer::new(model, &lora, &every, cfg.learning_rate, Some(anchors))));
            made.unwrap_or_else(|| Err(super::LearnError::NoExamples("the trainer was not built".into())))?
        };
        // The first phase stops on the new lessons alone: replayed ones are
        // learned already, and counting them would end it before the gate
        // has anything new to judge. The final phase waits for them too.
        let replayed: Vec<usize> = (train_set.len() - replay.len()..train_set.len()).collect();
        trainer.set_aids(&[aids.as_slice(), replayed.as_slice()].concat());
        // Replayed lessons are held where the parent has them, not taught again.
        let mut held: Option<Result<(), super::LearnError>> = None;
        run_step(&mut || held = Some(trainer.hold(&replayed)));
        held.unwrap_or(Ok(()))?;
        // The replay loss before: read off the hold's own pass (the same
        // forward under the same adapter), the answers wanted only.
        let before_replay = held_answer_loss(&trainer, replayed.iter().copied().filter(|&i| every[i].target().is_some()))?;
        clock.lap("trainer_setup");
        let mut step_started = std::time::Instant::now();
        let first = sft::train_lessons_on(&mut trainer, &first_phase, &cfg, &run_step, |p| {
            self.yield_to_serving(step_started.elapsed(), &job.id);
            step_started = std::time::Instant::now();
            if p.step % 5 == 4 || p.step + 1 == cfg.steps {
                let message = format!("Step {}/{}: training loss={:.4}, examples learned {}/{}", p.step + 1, cfg.steps, p.loss, p.learned, p.lessons);
                self.event(&job.id, "info", &message, json!({"step": p.step + 1, "train_loss": p.loss, "learned": p.learned}));
            }
            if self.is_cancelled(&job.id) {
                cancelled.store(true, Ordering::Relaxed);
                return false;
            }
            true
        })?;
        if cancelled.load(Ordering::Relaxed) {
            return Err(RunError::Cancelled);
        }
        let losses = first.losses;
        let train_secs = started.elapsed().as_secs_f64();
        clock.lap("first_phase_steps");
        let (after_loss, after_match) = loss_and_match_on(&held_targets)?;
        let after_avoided = loss_on(&held_avoided)?;
        // With a held-out split, replay is judged on what would be promoted, measured below.
        let mut after_replay = if split { 0.0 } else { loss_on(&replay_targets)? };
        // A quick look at drift (the screen); the full set decides below.
        let screen = self.anchors().first(eval::SCREEN_PROMPTS);
        let first_look = self.work(|| eval::drift(model, &lora, &screen))?;
        let candidate = Arc::new(lora.to_adapter()?);
        clock.lap("gate_evaluation");

        let mut reasons = Vec::new();
        if !held_targets.is_empty() && after_loss >= before_loss {
            reasons.push(format!("held-out loss did not improve ({before_loss:.4} -> {after_loss:.4})"));
        }
        if !held_avoided.is_empty() && after_avoided <= before_avoided {
            reasons.push(format!("answers rated down did not become less likely (loss {before_avoided:.4} -> {after_avoided:.4})"));
        }
        // Replay, like drift, is judged on what would be promoted: with a
        // held-out split that is the final phase's candidate, which trains
        // on the replayed lessons until they are learned again (mid-run,
        // new lessons disturb old ones before the replay restores them).
        let replay_reason = |after: f64| {
            (!replay_targets.is_empty() && after > before_replay + s.max_regression)
                .then(|| format!("replay loss regressed by {:.4} (limit {})", after - before_replay, s.max_regression))
        };
        if !split {
            reasons.extend(replay_reason(after_replay));
        }
        let within = |d: &Drift| d.kl <= s.max_base_drift && d.agreement >= s.min_base_agreement;
        let learning_passed = reasons.is_empty();
        // The drift bounds are constraints, not a lottery: while a look
        // finds the adapter beyond them, the KL pull toward the base is
        // raised (dual ascent on its weight, and more anchors a step), and
        // a run that has learned its lessons keeps going, each lesson held
        // where it is, until it is within them or its budget is spent.
        let mut pull = Pull::new(anchors.weight, anchors.per_step);
        let mut chosen = Chosen {
            candidate,
            drift: first_look,
            full: false,
            final_steps: 0,
            all_learned: first.all_learned && !split,
            within: within(&first_look),
        };
        let mut settle_steps = 0;
        let mut final_steps = 0;
        if learning_passed && split {
            let all: Vec<usize> = (0..every.len()).collect();
            let extra = SftConfig { until_learned: cfg.until_learned.map(|_| 1.0), ..cfg.clone() };
            let mut step_started = std::time::Instant::now();
            let mut checkpoint_error = None;
            let check = |steps: usize, learned_all: bool, chosen: &mut Chosen, pull: &mut Pull| -> Result<bool, RunError> {
                let d = self.work(|| eval::drift(model, &lora, &screen))?;
                let keep = within(&d);
                self.event(
                    &job.id,
                    "info",
                    &format!(
                        "Checkpoint after {steps} final steps {} (base KL {:.4}, top-1 agreement {:.3}, on {} prompts)",
                        if keep { "within the drift bounds" } else { "beyond the drift bounds" },
                        d.kl,
                        d.agreement,
                        d.prompts
                    ),
                    json!({"base_kl": d.kl, "base_top1_agreement": d.agreement, "steps": steps, "kept": keep}),
                );
                if keep || !chosen.within {
                    // Within the bounds, or the best guess yet: the latest.
                    *chosen = Chosen { candidate: Arc::new(lora.to_adapter()?), drift: d, full: false, final_steps: steps, all_learned: learned_all, within: keep };
                }
                if !keep {
                    pull.raise(1.5);
                }
                Ok(keep)
            };
            trainer.set_aids(&aids);
            let dial = trainer.pull_dial();
            let more = sft::train_lessons_on(&mut trainer, &all, &extra, &run_step, |p| {
                self.yield_to_serving(step_started.elapsed(), &job.id);
                if p.step % 5 == 4 {
                    let message = format!("Final step {}/{}: training loss={:.4}, examples learned {}/{}", p.step + 1, extra.steps, p.loss, p.learned, p.lessons);
                    self.event(&job.id, "info", &message, json!({"train_loss": p.loss, "learned": p.learned}));
                }
                if p.step % FINAL_CHECK_EVERY == FINAL_CHECK_EVERY - 1 && p.step + 1 < extra.steps {
                    clock.lap("final_phase_steps");
                    let before = pull;
                    let checked = check(p.step + 1, false, &mut chosen, &mut pull);
                    clock.lap("checkpoints");
                    if let Err(e) = checked {
                        checkpoint_error = Some(e);
                        return false;
                    }
                    if pull != before {
                        dial.set(pull.scale, pull.per_step);
                        self.event(&job.id, "info", &pull.describe(), json!({"kl_weight": pull.weight(), "kl_anchors_per_step": pull.per_step}));
                    }
                }
                step_started = std::time::Instant::now();
                !self.is_cancelled(&job.id)
            })?;
            if let Some(e) = checkpoint_error {
                return Err(e);
            }
            if self.is_cancelled(&job.id) {
                return Err(RunError::Cancelled);
            }
            clock.lap("final_phase_steps");
            final_steps = more.losses.len();
            // The latest adapter, unless a checkpoint at this very step already looked at it.
            let n = final_steps;
            let checked_here = n > 0 && n % FINAL_CHECK_EVERY == 0 && n < extra.steps;
            if !checked_here {
                check(n, more.all_learned, &mut chosen, &mut pull)?;
            } else if chosen.final_steps == n {
                chosen.all_learned = more.all_learned;
            }
            clock.lap("checkpoints");
            if more.all_learned {
                chosen.all_learned = true;
                chosen.final_steps = n;
            }
        }
        // Everything learned: hold it and settle within the bounds (the
        // full set of prompts confirms), or say precisely why not.
        if learning_passed && chosen.all_learned {
            let all: Vec<usize> = (0..every.len()).collect();
            let unheld: Vec<usize> = all.iter().copied().filter(|i| !replayed.contains(i)).collect();
            let required: Vec<usize> = all.iter().copied().filter(|&i| !trainer.is_aid(i)).collect();
            let budget = SETTLE_STEPS.max(s.steps / 2);
            let mut held_all = false;
            let mut round = 0u64;
            loop {
                // Confirm on every prompt what the screen (or the last step) saw.
                let current_full = if chosen.within || settle_steps > 0 || !split {
                    let d = self.work(|| eval::drift(model, &lora, self.anchors()))?;
                    clock.lap("confirm");
                    Some(d)
                } else {
                    None
                };
                if let Some(d) = current_full {
                    let ok = within(&d);
                    chosen = Chosen { candidate: Arc::new(lora.to_adapter()?), drift: d, full: true, final_steps: final_steps + settle_steps, all_learned: true, within: ok };
                    if ok {
                        break;
                    }
                }
                if settle_steps >= budget {
                    break;
                }
                if !held_all {
                    self.event(
                        &job.id,
                        "info",
                        &format!("Every example learned, beyond the drift bounds: settling for up to {budget} steps (each example held, the KL pull raised until within)"),
                        json!({"settle_budget": budget}),
                    );
                    let mut held: Option<Result<(), super::LearnError>> = None;
                    run_step(&mut || held = Some(trainer.hold(&unheld)));
                    held.unwrap_or(Ok(()))?;
                    held_all = true;
                }
                pull.raise(2.0);
                trainer.set_pull(pull.scale, pull.per_step);
                self.event(&job.id, "info", &pull.describe(), json!({"kl_weight": pull.weight(), "kl_anchors_per_step": pull.per_step}));
                // Settle in short rounds, looking (quickly) after each.
                loop {
                    let rest = SETTLE_CHECK_EVERY.min(budget - settle_steps);
                    let settle = SftConfig { steps: rest, until_learned: None, seed: cfg.seed + 1 + round, ..cfg.clone() };
                    round += 1;
                    let mut step_started = std::time::Instant::now();
                    let ran = sft::train_lessons_on(&mut trainer, &all, &settle, &run_step, |_| {
                        self.yield_to_serving(step_started.elapsed(), &job.id);
                        step_started = std::time::Instant::now();
                        !self.is_cancelled(&job.id)
                    })?;
                    if self.is_cancelled(&job.id) {
                        return Err(RunError::Cancelled);
                    }
                    settle_steps += ran.losses.len();
                    clock.lap("settle_steps");
                    let look = self.work(|| eval::drift(model, &lora, &screen))?;
                    clock.lap("checkpoints");
                    if within(&look) || settle_steps >= budget {
                        break;
                    }
                    pull.raise(2.0);
                    trainer.set_pull(pull.scale, pull.per_step);
                }
                // Settling holds each lesson near where it was; confirm none was lost.
                let mut learned: Option<Result<Vec<bool>, super::LearnError>> = None;
                run_step(&mut || learned = Some(trainer.learned(&required)));
                let learned = learned.unwrap_or_else(|| Err(super::LearnError::NoExamples("the check did not run".into())))?;
                if !learned.iter().all(|&l| l) {
                    self.event(&job.id, "info", "Settling lost an example: stopping here", Value::Null);
                    chosen.all_learned = false;
                    break;
                }
            }
        } else if !chosen.full {
            // What would be promoted is measured on every prompt before it is.
            let adapter = TrainableLora::from_adapter(&chosen.candidate)?;
            chosen.drift = self.work(|| eval::drift(model, &adapter, self.anchors()))?;
            chosen.full = true;
            chosen.within = within(&chosen.drift);
            clock.lap("confirm");
        }
        let Chosen { candidate, drift, final_steps, all_learned, .. } = chosen;
        let (kl, agreement) = (drift.kl, drift.agreement);
        if split {
            // Measured once, on the checkpoint that became the candidate.
            if !replay_targets.is_empty() {
                let chosen = TrainableLora::from_adapter(&candidate)?;
                after_replay = self.work(|| eval::mean_loss(model, &chosen, &replay_targets))?;
                clock.lap("replay_evaluation");
            }
            reasons.extend(replay_reason(after_replay));
        }
        let drift_reasons = drift_reasons(&drift, s.max_base_drift, s.min_base_agreement);
        if !drift_reasons.is_empty() {
            let how = format!(
                "after {} final and {settle_steps} settling steps with the KL pull at {:.2} on {} anchors a step{}",
                final_steps,
                pull.weight(),
                pull.per_step,
                if all_learned { "" } else { ", not every example learned" }
            );
            reasons.extend(drift_reasons.into_iter().map(|r| format!("{r} ({how}); raising kl_weight or kl_anchors_per_step, relaxing max_base_drift or min_base_agreement, or teaching fewer examples per run (min_new_feedback) would change this")));
        }
        let passed = reasons.is_empty();
        let train_secs_total = started.elapsed().as_secs_f64();
        job.metrics = json!({
            "final_steps_on_all_examples": final_steps,
            "settle_steps": settle_steps,
            "all_examples_learned": all_learned,
            "train_seconds_with_final_steps": train_secs_total,
            "train_loss": losses.last(),
            "first_train_loss": losses.first(),
            "valid_loss": after_loss,
            "valid_loss_before": before_loss,
            "valid_mean_token_accuracy": after_match,
            "valid_exact_match_before": before_match,
            "valid_avoided_loss": after_avoided,
            "valid_avoided_loss_before": before_avoided,
            "preference_pairs": new_lessons.iter().filter(|l| matches!(l, Lesson::Prefer { .. })).count(),
            "avoided_answers": new_lessons.iter().filter(|l| matches!(l, Lesson::Avoid(_))).count(),
            "replay_loss": after_replay,
            "replay_loss_before": before_replay,
            "replay_examples": replay.len(),
            "kl_weight": kl_weight,
            "kl_anchors_per_step": anchors_per_step,
            "kl_weight_final": pull.weight(),
            "kl_anchors_per_step_final": pull.per_step,
            "parent_base_kl": parent_kl,
            "base_kl": kl,
            "base_kl_se": drift.kl_se,
            "base_top1_agreement": agreement,
            "base_top1_agreement_se": drift.agreement_se,
            "drift_prompts": drift.prompts,
            "drift_positions": drift.positions,
            "drift_anchors": self.anchors().fingerprint(),
            "train_examples": train_new.len(),
            "held_out_examples": held_out.len(),
            "steps": losses.len(),
            "train_seconds": train_secs,
            "train_tokens_per_second": (tokens_per_step * losses.len()) as f64 / train_secs.max(1e-9),
            "trained_tokens": tokens_per_step * losses.len(),
            "feedback_ids": job.feedback_ids,
            "job_id": job.id,
            "status": if passed { "promoted" } else { "rejected" },
            "reasons": reasons,
            "phase_seconds": clock.to_json(),
        });
        self.event(&job.id, "info", "Evaluated the candidate", job.metrics.clone());
        let (config, weights) = crate::lora::peft_writer::to_peft_files(&candidate, &self.model.id)?;
        let rejected = (!passed).then(|| reasons.clone());
        let written = self.write_for(job, || {
            self.storage.within(&job.tenant, (config.len() + weights.len()) as u64, || {
                self.registry.add_version(&job.tenant, &job.adapter, &config, &weights, Source::Learner, job.parent_version, job.metrics.clone(), rejected, passed)
                    .map_err(crate::storage_quota::StorageError::from)
            })
        })?;
        let manifest = written.manifest;
        if !written.pruned.is_empty() {
            self.event(
                &job.id,
                "info",
                &format!("Removed version(s) {:?} to stay within limits.max_versions_per_adapter", written.pruned),
                json!({"pruned_versions": written.pruned}),
            );
        }
        job.result_version = Some(manifest.version);
        if passed && job.training_file.is_some() {
            // What a file taught is replayed by later runs, like learned feedback.
            let learned: Vec<ExampleRecord> = new_lessons
                .iter()
                .filter_map(Lesson::target)
                .map(|e| ExampleRecord {
                    id: crate::store::new_id("ex"),
                    tenant: job.tenant.clone(),
                    adapter: job.adapter.clone(),
                    prompt_ids: e.prompt,
                    answer_ids: e.answer,
                    created_at: crate::store::now(),
                })
                .collect();
            self.write_for(job, || self.records.add_examples(&learned))?;
            job.feedback_ids.extend(learned.into_iter().map(|e| e.id));
        }
        let audit = crate::store::AuditRecord {
            id: crate::store::new_id("audit"),
            created_at: crate::store::now(),
            actor: "server".into(),
            tenant: job.tenant.clone(),
            action: if passed { "adapter.learned" } else { "adapter.rejected" }.into(),
            target: format!("{}@v{}", job.adapter, manifest.version),
            detail: json!({"job_id": job.id, "parent_version": job.parent_version, "promoted": passed, "reasons": reasons}),
        };
        if let Err(RunError::Failed(e)) = self.write_for(job, || self.records.add_audit(&audit)) {
            tracing::error!(job = %job.id, "cannot write the audit log: {e}");
        }
        if !passed {
            job.error = Some(format!("candidate v{} rejected: {}", manifest.version, reasons.join("; ")));
        }
        Ok(passed)
    }
}

/// Mean per-token loss of the wanted answers of held lessons `ids`, from
/// the log-probabilities they are held at (what `eval::mean_loss` gives
/// on the same answers under the adapter the hold began with); 0 for none.
fn held_answer_loss(trainer: &sft::Trainer<'_>, ids: impl Iterator<Item = usize>) -> Result<f64, RunError> {
    let (mut total, mut count) = (0f64, 0usize);
    for i in ids {
        let Some(lp) = trainer.held_log_probs(i) else { continue };
        total -= lp.sum_all()?.to_scalar::<f32>()? as f64;
        count += lp.dim(0)?;
    }
    Ok(if count == 0 { 0.0 } else { total / count as f64 })
}

/// What a run would promote: the latest checkpoint within the drift
/// bounds (or, while none is, the latest), with its figures.
struct Chosen {
    candidate: Arc<crate::lora::LoraAdapter>,
    drift: Drift,
    /// Whether `drift` was measured on every general prompt (only such a
    /// figure promotes).
    full: bool,
    /// Final-phase steps (settling included) it had taken.
    final_steps: usize,
    all_learned: bool,
    within: bool,
}

/// The KL pull of a run as it is raised: a multiple of the adapter's
/// weight, and anchors a step.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Pull {
    base_weight: f64,
    scale: f64,
    per_step: usize,
}

/// How far a run may raise its pull: the weight's multiple, anchors a step.
const MAX_PULL_SCALE: f64 = 32.0;
const MAX_PULL_ANCHORS: usize = 6;

impl Pull {
    fn new(weight: f64, per_step: usize) -> Self {
        Pull { base_weight: weight, scale: 1.0, per_step: per_step.max(1) }
    }

    fn weight(&self) -> f64 {
        self.base_weight * self.scale
    }

    /// Dual ascent on the weight, one more anchor a step (both capped).
    fn raise(&mut self, factor: f64) {
        self.scale = (self.scale * factor).min(MAX_PULL_SCALE);
        self.per_step = (self.per_step + 1).min(MAX_PULL_ANCHORS.max(self.per_step));
    }

    fn describe(&self) -> String {
        format!("Beyond the drift bounds: the KL pull raised to {:.2} on {} anchors a step", self.weight(), self.per_step)
    }
}

/// Which bound a drift figure breaks, and by how much (with its standard error).
fn drift_reasons(d: &Drift, max_base_drift: f64, min_base_agreement: f64) -> Vec<String> {
    let mut out = Vec::new();
    if d.kl > max_base_drift {
        out.push(format!(
            "drift from the base {:.4} nats (±{:.4}) exceeds max_base_drift {max_base_drift} by {:.4}",
            d.kl,
            d.kl_se,
            d.kl - max_base_drift
        ));
    }
    if d.agreement < min_base_agreement {
        out.push(format!(
            "top-1 agreement with the base {:.3} (±{:.3}) is below min_base_agreement {min_base_agreement} by {:.3}",
            d.agreement,
            d.agreement_se,
            min_base_agreement - d.agreement
        ));
    }
    out
}

/// Lessons from feedback, the feedback ids they came from, and per lesson
/// the chat it answered (when paraphrases can reword it).
type FeedbackLessons = (Vec<Lesson>, Vec<String>, Vec<Option<Vec<ChatMessage>>>);

/// The messages of a logged chat request when its last message is a
/// user's, in plain text (content given as parts is left alone).
fn chat_messages(prompt: &Value) -> Option<Vec<ChatMessage>> {
    let list = prompt.as_array()?;
    let mut out = Vec::with_capacity(list.len());
    for m in list {
        let role = m.get("role")?.as_str()?.to_string();
        let content = m.get("content").and_then(Value::as_str).unwrap_or("").to_string();
        out.push(ChatMessage { role, content });
    }
    let last = out.last()?;
    (last.role == "user" && !last.content.trim().is_empty()).then_some(out)
}
