//! The embedded record of what the server said and what users thought of
//! it: the completion log and feedback (later: training jobs). A trait, so
//! a server-grade database can replace the default SQLite file.

pub mod sqlite;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use sqlite::SqliteStore;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Database(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
    #[error("{what} reached its limit of {limit}")]
    Limit { what: String, limit: usize },
}

/// What a deleted tenant left behind, removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Purged {
    pub completions: usize,
    pub feedback: usize,
    pub files: usize,
    pub examples: usize,
    pub jobs: usize,
    pub policies: usize,
}

/// Bytes a tenant keeps in the record store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StoredBytes {
    /// Fine-tuning files' contents.
    pub files: u64,
    /// Training examples as stored.
    pub examples: u64,
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Database(e.to_string())
    }
}

/// One logged completion: what was asked, of which adapter version, and
/// what each choice answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionRecord {
    /// The `id` the API returned (`cmpl-…` or `chatcmpl-…`).
    pub id: String,
    pub tenant: String,
    /// `None` for the base model.
    pub adapter: Option<String>,
    pub adapter_version: Option<u32>,
    /// `completion` or `chat`.
    pub kind: String,
    /// The prompt text, or the chat messages as sent.
    pub prompt: Value,
    /// Each prompt exactly as the model saw it (chat template applied);
    /// choice `i` answers prompt `i / n`.
    pub rendered_prompts: Vec<String>,
    /// Each prompt's token ids exactly as the model saw them (what training replays).
    #[serde(default)]
    pub prompt_ids: Vec<Vec<u32>>,
    /// Choices per prompt.
    pub n: u32,
    /// Each choice's text, by index.
    pub outputs: Vec<String>,
    /// Each choice's token ids as the model generated them (what training
    /// learns from: text does not always encode back to the same ids).
    #[serde(default)]
    pub output_ids: Vec<Vec<u32>>,
    /// Each choice's `finish_reason` (`stop` or `length`).
    #[serde(default)]
    pub finish_reasons: Vec<String>,
    /// Sampling settings as sent (temperature, top_p, max_tokens, ...).
    pub settings: Value,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
}

/// A user's judgement of one choice of a completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedbackRecord {
    /// `fb-…`.
    pub id: String,
    pub completion_id: String,
    pub tenant: String,
    /// The adapter that produced the completion (None: the base model).
    pub adapter: Option<String>,
    pub adapter_version: Option<u32>,
    pub choice_index: u32,
    /// +1, -1, or none (a correction alone).
    pub rating: Option<i8>,
    pub correction: Option<String>,
    pub comment: Option<String>,
    pub created_at: u64,
}

/// A learner run, served as OpenAI's `fine_tuning.job`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// `ftjob-…`.
    pub id: String,
    pub tenant: String,
    /// Which tenant of that name queued it (see `tenants::TenantRef`): a
    /// job of a deleted tenant writes nothing for its successor.
    #[serde(default)]
    pub tenant_incarnation: u64,
    /// The adapter trained.
    pub adapter: String,
    /// `queued`, `running`, `succeeded`, `failed` or `cancelled`.
    pub status: String,
    pub created_at: u64,
    pub finished_at: Option<u64>,
    /// Why it failed, or why its candidate was rejected.
    pub error: Option<String>,
    /// The version the run started from (None: a fresh adapter).
    pub parent_version: Option<u32>,
    /// The version it wrote (promoted or rejected).
    pub result_version: Option<u32>,
    /// The feedback it learned from.
    pub feedback_ids: Vec<String>,
    pub hyperparameters: Value,
    /// Training and evaluation figures.
    pub metrics: Value,
    /// A job started the OpenAI way trains on these uploaded files (and
    /// not on pending feedback).
    #[serde(default)]
    pub training_file: Option<String>,
    #[serde(default)]
    pub validation_file: Option<String>,
    /// `supervised` or `dpo` (a run on feedback with a corrected
    /// down-rating among it trains a preference).
    #[serde(default = "supervised")]
    pub method: String,
    /// The caller's labels, echoed as sent (OpenAI's `metadata`).
    #[serde(default)]
    pub metadata: Option<JobMetadata>,
}

/// OpenAI's `metadata`: up to 16 string pairs.
pub type JobMetadata = std::collections::BTreeMap<String, String>;

impl JobRecord {
    /// The seed the run uses: the one sent, else the parent version's number.
    pub fn seed(&self) -> u64 {
        self.hyperparameters["seed"].as_u64().unwrap_or(self.parent_version.unwrap_or(0) as u64)
    }
}

fn supervised() -> String {
    "supervised".into()
}

/// One line of a job's history (`fine_tuning.job.event`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEvent {
    pub id: String,
    pub job_id: String,
    pub created_at: u64,
    /// `info` or `error`.
    pub level: String,
    pub message: String,
    pub data: Value,
}

/// A training example given directly (`POST /v1/adapters/{name}/examples`),
/// tokenized as serving tokenizes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExampleRecord {
    /// `ex-…`.
    pub id: String,
    pub tenant: String,
    pub adapter: String,
    pub prompt_ids: Vec<u32>,
    pub answer_ids: Vec<u32>,
    pub created_at: u64,
}

/// One line of the audit log: who changed what, and when. Admin actions
/// (tenants, keys, adapter versions) and the server's own (automatic
/// rollbacks) alike.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// `audit-…`.
    pub id: String,
    pub created_at: u64,
    /// `admin`, `tenant:NAME`, `open` (no keys configured) or `server`.
    pub actor: String,
    /// The tenant acted on.
    pub tenant: String,
    /// Such as `tenant.created`, `adapter.promoted`, `adapter.auto_rollback`.
    pub action: String,
    /// What was acted on (`NAME`, `NAME@vN`).
    pub target: String,
    pub detail: Value,
}

/// A file uploaded for fine-tuning (`POST /v1/files`), kept whole in the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileRecord {
    /// `file-…`.
    pub id: String,
    pub tenant: String,
    pub filename: String,
    pub purpose: String,
    pub bytes: usize,
    pub created_at: u64,
}

/// What a feedback listing may be narrowed to.
#[derive(Debug, Clone, Default)]
pub struct FeedbackQuery {
    /// Only feedback on completions of this adapter (`Some("")`: of the base model).
    pub adapter: Option<String>,
    /// Only items created after this id (cursor pagination).
    pub after: Option<String>,
    pub limit: usize,
}

/// Storage of the completion log and feedback. Implementations must make
/// every write durable before returning (an acknowledged write survives a
/// crash) and scope every read to one tenant.
pub trait RecordStore: Send + Sync {
    /// Logs a completion.
    fn log_completion(&self, record: &CompletionRecord) -> Result<(), StoreError>;
    /// A tenant's completion by id (another tenant's is `NotFound`).
    fn completion(&self, tenant: &str, id: &str) -> Result<CompletionRecord, StoreError>;
    /// Stores feedback; durable (committed) when this returns. With
    /// `max_per_completion` > 0, refuses (`Limit`) once the completion has
    /// that many items (counted and inserted as one step).
    fn add_feedback(&self, record: &FeedbackRecord, max_per_completion: usize) -> Result<(), StoreError>;
    /// A tenant's feedback, oldest first.
    fn feedback(&self, tenant: &str, query: &FeedbackQuery) -> Result<Vec<FeedbackRecord>, StoreError>;
    /// Deletes a tenant's completions (and their feedback) older than `before` (epoch seconds). Returns how many.
    fn prune_completions(&self, tenant: &str, before: u64) -> Result<usize, StoreError>;
    /// Every tenant with logged completions (for retention sweeps).
    fn tenants(&self) -> Result<Vec<String>, StoreError>;
    /// Feedback of a tenant's adapter not yet learned by a succeeded job.
    fn pending_feedback(&self, tenant: &str, adapter: &str) -> Result<Vec<FeedbackRecord>, StoreError>;
    /// Feedback of a tenant's adapter that succeeded jobs learned (the replay set).
    fn learned_feedback(&self, tenant: &str, adapter: &str) -> Result<Vec<FeedbackRecord>, StoreError>;

    /// Stores examples, all or none (one transaction).
    fn add_examples(&self, examples: &[ExampleRecord]) -> Result<(), StoreError>;
    /// A tenant adapter's examples not yet learned by a succeeded job, or (`learned`) those already learned.
    fn examples(&self, tenant: &str, adapter: &str, learned: bool) -> Result<Vec<ExampleRecord>, StoreError>;

    /// Inserts or replaces a job (by id).
    fn save_job(&self, job: &JobRecord) -> Result<(), StoreError>;
    /// A job by id alone (the learner's lookup; the API always scopes by tenant).
    fn job_by_id(&self, id: &str) -> Result<JobRecord, StoreError>;
    /// A tenant's job (another tenant's is `NotFound`).
    fn job(&self, tenant: &str, id: &str) -> Result<JobRecord, StoreError>;
    /// A tenant's jobs, newest first, optionally of one adapter, after a cursor.
    fn jobs(&self, tenant: &str, adapter: Option<&str>, after: Option<&str>, limit: usize) -> Result<Vec<JobRecord>, StoreError>;
    /// Appends an event to a job's history.
    fn add_job_event(&self, event: &JobEvent) -> Result<(), StoreError>;
    /// A job's events, newest first.
    fn job_events(&self, job_id: &str, limit: usize) -> Result<Vec<JobEvent>, StoreError>;
    /// Among the first `first` rated feedback items on completions of one
    /// adapter version (`None`, `None`: the base model), how many were
    /// rated and how many of those down.
    fn rating_counts(&self, tenant: &str, adapter: Option<&str>, version: Option<u32>, first: usize) -> Result<(usize, usize), StoreError>;

    /// An adapter's learning-policy overrides (a JSON object), if any.
    fn policy(&self, tenant: &str, adapter: &str) -> Result<Option<Value>, StoreError>;
    /// Replaces an adapter's overrides; `None` removes them.
    fn set_policy(&self, tenant: &str, adapter: &str, overrides: Option<&Value>) -> Result<(), StoreError>;

    /// Stores an uploaded file (durable when this returns).
    fn add_file(&self, record: &FileRecord, content: &[u8]) -> Result<(), StoreError>;
    /// A tenant's file (another tenant's is `NotFound`).
    fn file(&self, tenant: &str, id: &str) -> Result<FileRecord, StoreError>;
    /// A tenant's file's content.
    fn file_content(&self, tenant: &str, id: &str) -> Result<Vec<u8>, StoreError>;
    /// A tenant's files, newest first, optionally of one purpose.
    fn files(&self, tenant: &str, purpose: Option<&str>, limit: usize) -> Result<Vec<FileRecord>, StoreError>;
    /// Deletes a tenant's file; `NotFound` if it has none by that id.
    fn delete_file(&self, tenant: &str, id: &str) -> Result<(), StoreError>;

    /// Appends to the audit log (durable when this returns).
    fn add_audit(&self, record: &AuditRecord) -> Result<(), StoreError>;
    /// Audit entries oldest first, optionally of one tenant or action, after a cursor.
    fn audit(&self, tenant: Option<&str>, action: Option<&str>, after: Option<&str>, limit: usize) -> Result<Vec<AuditRecord>, StoreError>;
    /// Whether any of `actions` was recorded on `target` of `tenant` (of
    /// this tenant: entries from before its name was last deleted do not count).
    fn audited(&self, tenant: &str, actions: &[&str], target: &str) -> Result<bool, StoreError>;

    /// Bytes a tenant keeps here (files and examples).
    fn stored_bytes(&self, tenant: &str) -> Result<StoredBytes, StoreError>;
    /// Removes every record of a tenant but the audit log, in one
    /// transaction (all or nothing, so a retried deletion finishes it).
    fn delete_tenant(&self, tenant: &str) -> Result<Purged, StoreError>;

    /// Marks every queued or running job failed with `reason` (at start:
    /// nothing runs before the learner does). Returns them.
    fn fail_unfinished_jobs(&self, reason: &str) -> Result<Vec<JobRecord>, StoreError>;
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A random id such as `fb-3f9a…` (128 bits).
pub fn new_id(prefix: &str) -> String {
    use rand::Rng;
    let n: u128 = rand::thread_rng().gen();
    format!("{prefix}-{n:032x}")
}
