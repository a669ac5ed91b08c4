//! OpenAI's fine-tuning objects (`fine_tuning.job`, `.job.event`,
//! `.job.checkpoint`) exactly as its schema types them, so the official
//! clients parse them without a warning; what only lifelora knows (the
//! adapter, its versions, the feedback learned, drift figures) rides in
//! extra fields, which those clients keep.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use crate::store::{JobEvent, JobRecord};

/// `"auto"` or a value: how OpenAI reports a hyperparameter left to the server.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(untagged)]
pub enum AutoOr<T> {
    Auto(Auto),
    Value(T),
}

/// The literal `"auto"`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Auto {
    Auto,
}

impl<T> From<Option<T>> for AutoOr<T> {
    fn from(v: Option<T>) -> Self {
        v.map_or(AutoOr::Auto(Auto::Auto), AutoOr::Value)
    }
}

/// A job's hyperparameters (OpenAI's three, then this server's two).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hyperparameters {
    pub n_epochs: AutoOr<u64>,
    pub batch_size: AutoOr<u64>,
    pub learning_rate_multiplier: AutoOr<f64>,
    /// Extension: optimizer steps of a feedback run (capped by `learning.max_steps`).
    pub n_steps: Option<u64>,
    /// Extension: the learning rate the run uses.
    pub learning_rate: Option<f64>,
}

/// `method.dpo.hyperparameters`: the supervised ones plus DPO's `beta`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DpoHyperparameters {
    #[serde(flatten)]
    pub common: Hyperparameters,
    pub beta: f64,
}

/// `method.supervised` / `method.dpo`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MethodBody<H> {
    pub hyperparameters: H,
}

/// `method`: which objective the run trains.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Method {
    Supervised { supervised: MethodBody<Hyperparameters> },
    Dpo { dpo: MethodBody<DpoHyperparameters> },
}

/// `error` of a failed job.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobError {
    pub code: &'static str,
    pub message: String,
    pub param: Option<String>,
}

/// `fine_tuning.job`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FineTuningJob {
    pub object: &'static str,
    pub id: String,
    pub created_at: u64,
    pub finished_at: Option<u64>,
    /// What the job starts from: the base model's id or `ADAPTER@vN`.
    pub model: String,
    /// `ADAPTER@vN` once succeeded.
    pub fine_tuned_model: Option<String>,
    /// The tenant.
    pub organization_id: String,
    pub status: String,
    pub hyperparameters: Hyperparameters,
    pub method: Method,
    /// The uploaded file it trains on; empty for a run on feedback (the
    /// schema requires a string; `feedback_ids` lists what it learned).
    pub training_file: String,
    pub validation_file: Option<String>,
    pub result_files: Vec<String>,
    pub trained_tokens: Option<u64>,
    pub error: Option<JobError>,
    /// The seed the run uses: the one sent, else the parent version's number.
    pub seed: u64,
    /// The caller's labels, as sent.
    pub metadata: Option<BTreeMap<String, String>>,
    pub estimated_finish: Option<u64>,
    /// Extension: the adapter trained.
    pub adapter: String,
    /// Extension: the version it started from.
    pub parent_version: Option<u32>,
    /// Extension: the version it wrote (promoted or rejected).
    pub result_version: Option<u32>,
    /// Extension: the feedback it learned from.
    pub feedback_ids: Vec<String>,
    /// Extension: training and evaluation figures.
    pub metrics: Value,
}

fn whole(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| v.as_f64().filter(|x| *x >= 0.0 && x.fract() == 0.0).map(|x| x as u64))
}

impl FineTuningJob {
    /// The object for a stored job.
    pub fn new(job: &JobRecord, base_model: &str) -> Self {
        let hp = &job.hyperparameters;
        let hyperparameters = Hyperparameters {
            n_epochs: whole(&hp["n_epochs"]).into(),
            batch_size: whole(&hp["batch_size"]).into(),
            learning_rate_multiplier: AutoOr::Value(hp["learning_rate_multiplier"].as_f64().unwrap_or(1.0)),
            n_steps: whole(&hp["n_steps"]),
            learning_rate: hp["learning_rate"].as_f64(),
        };
        let method = if job.method == "dpo" {
            Method::Dpo {
                dpo: MethodBody { hyperparameters: DpoHyperparameters { common: hyperparameters.clone(), beta: crate::learner::sft::DPO_BETA } },
            }
        } else {
            Method::Supervised { supervised: MethodBody { hyperparameters: hyperparameters.clone() } }
        };
        let version = |v: u32| format!("{}@v{v}", job.adapter);
        FineTuningJob {
            object: "fine_tuning.job",
            id: job.id.clone(),
            created_at: job.created_at,
            finished_at: job.finished_at,
            model: job.parent_version.map_or_else(|| base_model.to_string(), version),
            fine_tuned_model: if job.status == "succeeded" { job.result_version.map(version) } else { None },
            organization_id: job.tenant.clone(),
            status: job.status.clone(),
            hyperparameters,
            method,
            training_file: job.training_file.clone().unwrap_or_default(),
            validation_file: job.validation_file.clone(),
            result_files: Vec::new(),
            trained_tokens: whole(&job.metrics["trained_tokens"]),
            error: job.error.as_ref().map(|m| JobError { code: "training_failed", message: m.clone(), param: None }),
            seed: job.seed(),
            metadata: job.metadata.clone(),
            estimated_finish: None,
            adapter: job.adapter.clone(),
            parent_version: job.parent_version,
            result_version: job.result_version,
            feedback_ids: job.feedback_ids.clone(),
            metrics: job.metrics.clone(),
        }
    }
}

/// `fine_tuning.job.event`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FineTuningJobEvent {
    pub object: &'static str,
    pub id: String,
    pub created_at: u64,
    /// `info`, `warn` or `error`.
    pub level: String,
    pub message: String,
    pub data: Value,
    /// `metrics` for a training step's figures, else `message`.
    #[serde(rename = "type")]
    pub kind: &'static str,
}

impl From<&JobEvent> for FineTuningJobEvent {
    fn from(e: &JobEvent) -> Self {
        FineTuningJobEvent {
            object: "fine_tuning.job.event",
            id: e.id.clone(),
            created_at: e.created_at,
            level: e.level.clone(),
            message: e.message.clone(),
            data: e.data.clone(),
            kind: if e.data.get("train_loss").is_some() { "metrics" } else { "message" },
        }
    }
}

/// `metrics` of a checkpoint: OpenAI's figures, then the drift from the base.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckpointMetrics {
    pub step: Option<f64>,
    pub train_loss: Option<f64>,
    pub valid_loss: Option<f64>,
    pub valid_mean_token_accuracy: Option<f64>,
    /// Extension: KL from the base model on general prompts.
    pub base_kl: Option<f64>,
    /// Extension: top-1 agreement with the base model on general prompts.
    pub base_top1_agreement: Option<f64>,
}

/// `fine_tuning.job.checkpoint`: the version a job wrote.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FineTuningJobCheckpoint {
    pub object: &'static str,
    pub id: String,
    pub created_at: u64,
    pub fine_tuning_job_id: String,
    /// `ADAPTER@vN`: usable as `model`.
    pub fine_tuned_model_checkpoint: String,
    pub step_number: u64,
    pub metrics: CheckpointMetrics,
    /// Extension: the version's state (`promoted`, `rejected`, ...).
    pub status: Value,
}

impl FineTuningJobCheckpoint {
    /// The checkpoint of a job that wrote a version.
    pub fn of(job: &JobRecord) -> Option<Self> {
        let v = job.result_version?;
        let m = &job.metrics;
        let steps = whole(&m["steps"]).unwrap_or(0);
        Some(FineTuningJobCheckpoint {
            object: "fine_tuning.job.checkpoint",
            id: format!("ftckpt-{}-v{v}", job.id),
            created_at: job.finished_at.unwrap_or(job.created_at),
            fine_tuning_job_id: job.id.clone(),
            fine_tuned_model_checkpoint: format!("{}@v{v}", job.adapter),
            step_number: steps,
            metrics: CheckpointMetrics {
                step: Some(steps as f64),
                train_loss: m["train_loss"].as_f64(),
                valid_loss: m["valid_loss"].as_f64(),
                valid_mean_token_accuracy: m["valid_mean_token_accuracy"].as_f64(),
                base_kl: m["base_kl"].as_f64(),
                base_top1_agreement: m["base_top1_agreement"].as_f64(),
            },
            status: m["status"].clone(),
        })
    }
}

/// A page of a list (`object: list`).
#[derive(Debug, Clone, Serialize)]
pub struct Page<T> {
    pub object: &'static str,
    pub data: Vec<T>,
    pub has_more: bool,
}

impl<T> Page<T> {
    /// A page of `data`; `has_more` when more follow.
    pub fn new(data: Vec<T>, has_more: bool) -> Self {
        Page { object: "list", data, has_more }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn job(method: &str, hp: Value) -> JobRecord {
        JobRecord {
            id: "ftjob-1".into(),
            tenant: "acme".into(),
            tenant_incarnation: 1,
            adapter: "support".into(),
            status: "succeeded".into(),
            created_at: 100,
            finished_at: Some(160),
            error: None,
            parent_version: Some(2),
            result_version: Some(3),
            feedback_ids: vec!["fb-1".into()],
            hyperparameters: hp,
            metrics: json!({"trained_tokens": 1234.0, "steps": 30, "train_loss": 0.5}),
            training_file: None,
            validation_file: None,
            method: method.into(),
            metadata: Some([("team".to_string(), "search".to_string())].into()),
        }
    }

    #[test]
    fn whole_numbers_serialize_as_integers_and_absent_ones_as_auto() {
        let v = serde_json::to_value(FineTuningJob::new(&job("supervised", json!({"n_epochs": 3.0, "batch_size": null, "learning_rate_multiplier": 2.0})), "base")).unwrap();
        assert_eq!(v["hyperparameters"]["n_epochs"], json!(3));
        assert_eq!(v["hyperparameters"]["batch_size"], json!("auto"));
        assert_eq!(v["trained_tokens"], json!(1234));
        assert_eq!(v["method"], json!({"type": "supervised", "supervised": {"hyperparameters": v["hyperparameters"]}}));
        assert_eq!(v["training_file"], json!(""));
        assert_eq!(v["metadata"], json!({"team": "search"}));
        assert_eq!(v["model"], json!("support@v2"));
        assert_eq!(v["fine_tuned_model"], json!("support@v3"));
    }

    #[test]
    fn the_seed_is_the_one_sent_else_the_parent_version() {
        assert_eq!(FineTuningJob::new(&job("supervised", json!({"seed": 42})), "base").seed, 42);
        assert_eq!(FineTuningJob::new(&job("supervised", json!({})), "base").seed, 2);
    }

    #[test]
    fn a_preference_run_reports_dpo_with_its_beta() {
        let v = serde_json::to_value(FineTuningJob::new(&job("dpo", json!({})), "base")).unwrap();
        assert_eq!(v["method"]["type"], "dpo");
        assert_eq!(v["method"]["dpo"]["hyperparameters"]["beta"], json!(crate::learner::sft::DPO_BETA));
    }
}
