//! Learner runs in OpenAI's fine-tuning shape: `POST /v1/adapters/{name}/train`
//! starts one on an adapter's pending feedback; `POST /v1/fine_tuning/jobs`
//! starts one the OpenAI way, on uploaded files; `/v1/fine_tuning/jobs`
//! lists them (cursor pagination), shows one, its events and checkpoints
//! (the versions it produced), and cancels.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::store::{JobMetadata, JobRecord};

use super::fine_tuning_objects::{FineTuningJob, FineTuningJobCheckpoint, FineTuningJobEvent, Page};

use super::blocking::blocking;
use super::body::read_limited;
use super::error::ApiError;
use super::state::AppState;
use super::tenant::tenant_for;

/// The job as OpenAI's `fine_tuning.job` object.
pub fn job_json(job: &JobRecord, base_model: &str) -> FineTuningJob {
    FineTuningJob::new(job, base_model)
}

/// OpenAI's `metadata`: at most 16 pairs, keys up to 64 characters, values up to 512, all strings.
pub fn parse_metadata(v: Option<&Value>) -> Result<Option<JobMetadata>, ApiError> {
    let bad = |m: String| ApiError::invalid(m, Some("metadata"));
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(map)) => {
            if map.len() > 16 {
                return Err(bad(format!("'metadata' may hold at most 16 keys, got {}", map.len())));
            }
            map.iter()
                .map(|(k, v)| match v {
                    Value::String(s) if k.chars().count() <= 64 && s.chars().count() <= 512 => Ok((k.clone(), s.clone())),
                    Value::String(_) => Err(bad(format!("'metadata' keys are at most 64 characters and values at most 512 ('{}')", k.chars().take(64).collect::<String>()))),
                    _ => Err(ApiError::invalid(format!("'metadata.{k}' must be a string"), Some(&format!("metadata.{k}")))),
                })
                .collect::<Result<_, _>>()
                .map(Some)
        }
        Some(_) => Err(bad("'metadata' must be an object of strings".into())),
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TrainIn {
    hyperparameters: Option<Value>,
    metadata: Option<Value>,
    tenant: Option<String>,
}

/// A `POST /v1/adapters/{name}/train` body, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainRequest {
    /// `n_steps`, `batch_size`, `learning_rate`, `seed` as given (null for defaults).
    pub hyperparameters: Value,
    /// The caller's labels for the job.
    pub metadata: Option<JobMetadata>,
    /// Admin only: the tenant acted for.
    pub tenant: Option<String>,
}

/// Parses and checks a train body (empty means defaults) without touching
/// any state.
pub fn parse_train_request(body: &[u8]) -> Result<TrainRequest, ApiError> {
    let input: TrainIn = if body.iter().all(u8::is_ascii_whitespace) { TrainIn::default() } else { super::body::parse_json(body)? };
    let hp = input.hyperparameters.unwrap_or(Value::Null);
    if !hp.is_null() && !hp.is_object() {
        return Err(ApiError::invalid("'hyperparameters' must be an object", Some("hyperparameters")));
    }
    if let Some(key) = hp.as_object().and_then(|m| m.keys().find(|k| !["n_steps", "batch_size", "learning_rate", "seed"].contains(&k.as_str()))) {
        return Err(ApiError::invalid(
            format!("'hyperparameters.{key}' is not a hyperparameter of a feedback run (n_steps, batch_size, learning_rate, seed)"),
            Some(&format!("hyperparameters.{key}")),
        ));
    }
    if let Some(seed) = hp.get("seed").filter(|v| !v.is_null()) {
        if seed.as_u64().is_none() {
            return Err(ApiError::invalid("'hyperparameters.seed' must be a non-negative integer", Some("hyperparameters.seed")));
        }
    }
    for (key, max) in [("n_steps", 10_000.0), ("batch_size", 256.0), ("learning_rate", 1.0)] {
        if let Some(v) = hp.get(key).filter(|v| !v.is_null() && v.as_str() != Some("auto")) {
            let ok = v.as_f64().is_some_and(|x| x > 0.0 && x <= max && (key == "learning_rate" || x.fract() == 0.0));
            if !ok {
                return Err(ApiError::invalid(format!("'hyperparameters.{key}' must be a positive number up to {max}, or \"auto\""), Some(&format!("hyperparameters.{key}"))));
            }
        }
    }
    let metadata = parse_metadata(input.metadata.as_ref())?;
    Ok(TrainRequest { hyperparameters: hp, metadata, tenant: input.tenant })
}

/// Refuses `n_steps` past `learning.max_steps`.
fn check_steps(hp: &Value, param: &str, max_steps: usize) -> Result<(), ApiError> {
    match hp.get("n_steps").and_then(Value::as_f64) {
        Some(n) if n > max_steps as f64 => {
            let param = format!("{param}.n_steps");
            Err(ApiError::invalid(format!("'{param}' is {n}; a run takes at most {max_steps} steps (learning.max_steps)"), Some(&param)))
        }
        _ => Ok(()),
    }
}

/// `POST /v1/adapters/{name}/train`.
pub async fn train(state: web::Data<AppState>, req: HttpRequest, path: web::Path<String>, payload: web::Payload) -> Result<HttpResponse, ApiError> {
    let name = path.into_inner();
    let body = read_limited(&req, payload, state.settings.server.max_body_bytes).await?;
    let TrainRequest { hyperparameters: hp, metadata, tenant } = parse_train_request(&body)?;
    let tenant = tenant_for(&req, &state, tenant.as_deref())?;
    crate::adapter_store::validate_name(&name).map_err(|e| ApiError::invalid(e.to_string(), Some("name")))?;
    check_steps(&hp, "hyperparameters", state.settings.learning.max_steps)?;
    let (learner, registry, default_adapter) = (state.learner.clone(), state.registry.clone(), state.learner.settings().default_adapter.clone());
    let job = blocking(move || -> Result<_, ApiError> {
        if name != default_adapter {
            registry.info(&tenant, &name)?;
        }
        Ok(learner.submit(&tenant, &name, hp, metadata)?)
    })
    .await?;
    Ok(HttpResponse::Ok().json(job_json(&job, &state.model.id)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateIn {
    model: Value,
    training_file: Value,
    validation_file: Option<Value>,
    hyperparameters: Option<Value>,
    method: Option<Value>,
    suffix: Option<Value>,
    seed: Option<Value>,
    metadata: Option<Value>,
    integrations: Option<Value>,
    tenant: Option<String>,
}

/// One hyperparameter: absent, "auto", or a number in `(0, max]` (whole when `integer`).
fn hyperparameter(hp: &Value, key: &str, max: f64, integer: bool, param: &str) -> Result<Option<f64>, ApiError> {
    match hp.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s == "auto" => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if x > 0.0 && x <= max && (!integer || x.fract() == 0.0) => Ok(Some(x)),
            _ => Err(ApiError::invalid(
                format!("'{param}.{key}' must be \"auto\" or a {} in (0, {max}], got {v}", if integer { "whole number" } else { "number" }),
                Some(&format!("{param}.{key}")),
            )),
        },
    }
}

fn file_id(v: &Value, param: &str) -> Result<String, ApiError> {
    v.as_str()
        .filter(|s| !s.is_empty() && s.len() <= 128)
        .map(str::to_string)
        .ok_or_else(|| ApiError::invalid(format!("'{param}' must be a file id such as \"file-abc123\""), Some(param)))
}

/// Where a job starts: a new adapter grown from the base model, or an
/// existing adapter's current version.
#[derive(Debug, Clone, PartialEq)]
pub enum JobStart {
    /// `model` was the base model id; the adapter is `suffix` or the default.
    Base(String),
    /// `model` named one of the tenant's adapters (checked by the handler).
    Adapter(String),
}

/// A `POST /v1/fine_tuning/jobs` body, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRequest {
    pub start: JobStart,
    /// `supervised` or `dpo`.
    pub method: String,
    /// Normalised: `n_epochs`, `batch_size`, `learning_rate_multiplier`, `seed`.
    pub hyperparameters: Value,
    pub training_file: String,
    pub validation_file: Option<String>,
    /// The caller's labels for the job.
    pub metadata: Option<JobMetadata>,
    /// Admin only: the tenant acted for.
    pub tenant: Option<String>,
}

/// Parses and checks a job body without touching any state: everything but
/// whether the named adapter and files exist and are the caller's.
pub fn parse_job_request(body: &[u8], base_model: &str, default_adapter: &str) -> Result<JobRequest, ApiError> {
    let input: CreateIn = super::body::parse_json(body)?;
    let model = input.model.as_str().ok_or_else(|| ApiError::invalid("'model' must be a string", Some("model")))?;
    let suffix = match &input.suffix {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(ApiError::invalid("'suffix' must be a string", Some("suffix"))),
    };
    let start = if model == base_model {
        let name = suffix.unwrap_or_else(|| default_adapter.to_string());
        crate::adapter_store::validate_name(&name).map_err(|e| ApiError::invalid(format!("'suffix': {e}"), Some("suffix")))?;
        JobStart::Base(name)
    } else {
        if model.contains('@') {
            return Err(ApiError::invalid("a job starts from an adapter's current version: name the adapter without @vN", Some("model")));
        }
        if suffix.is_some() {
            return Err(ApiError::invalid("'suffix' names a new adapter and only goes with the base model", Some("suffix")));
        }
        JobStart::Adapter(model.to_string())
    };
    let (method, mut hp) = match &input.method {
        None | Some(Value::Null) => ("supervised".to_string(), input.hyperparameters.clone().unwrap_or(Value::Null)),
        Some(m) => {
            let kind = m.get("type").and_then(Value::as_str).unwrap_or("");
            if crate::learner::dataset::Method::parse(kind).is_none() {
                return Err(ApiError::invalid(format!("'method.type' must be \"supervised\" or \"dpo\", got {:?}", m.get("type")), Some("method.type")));
            }
            let hp = m.get(kind).and_then(|k| k.get("hyperparameters")).cloned();
            (kind.to_string(), hp.or_else(|| input.hyperparameters.clone()).unwrap_or(Value::Null))
        }
    };
    if !hp.is_null() && !hp.is_object() {
        return Err(ApiError::invalid("'hyperparameters' must be an object", Some("hyperparameters")));
    }
    let param = if input.method.is_some() { format!("method.{method}.hyperparameters") } else { "hyperparameters".into() };
    let n_epochs = hyperparameter(&hp, "n_epochs", 50.0, true, &param)?;
    let batch_size = hyperparameter(&hp, "batch_size", 256.0, true, &param)?;
    let multiplier = hyperparameter(&hp, "learning_rate_multiplier", 10.0, false, &param)?;
    if let Some(beta) = hp.get("beta").filter(|b| !b.is_null() && b.as_str() != Some("auto")) {
        if beta.as_f64() != Some(crate::learner::sft::DPO_BETA) {
            return Err(ApiError::invalid(format!("'{param}.beta' is fixed at {} on this server (send \"auto\")", crate::learner::sft::DPO_BETA), Some(&format!("{param}.beta"))));
        }
    }
    if let Some(Value::Array(list)) = &input.integrations {
        if !list.is_empty() {
            return Err(ApiError::invalid("integrations are not supported", Some("integrations")));
        }
    }
    let metadata = parse_metadata(input.metadata.as_ref())?;
    let seed = match &input.seed {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| ApiError::invalid("'seed' must be a non-negative integer", Some("seed")))?),
    };
    hp = json!({
        "n_epochs": n_epochs,
        "batch_size": batch_size.map(|b| b as u64),
        "learning_rate_multiplier": multiplier,
        "seed": seed,
    });
    let training_file = file_id(&input.training_file, "training_file")?;
    let validation_file = input.validation_file.as_ref().filter(|v| !v.is_null()).map(|v| file_id(v, "validation_file")).transpose()?;
    Ok(JobRequest { start, method, hyperparameters: hp, training_file, validation_file, metadata, tenant: input.tenant })
}

/// `POST /v1/fine_tuning/jobs`: OpenAI's way to start a job, on a file
/// uploaded with purpose `fine-tune`. `model` is the base model id (the
/// result is the adapter named by `suffix`, or `learning.default_adapter`)
/// or one of the tenant's adapters (the result is its next version).
pub async fn create(state: web::Data<AppState>, req: HttpRequest, payload: web::Payload) -> Result<HttpResponse, ApiError> {
    let body = read_limited(&req, payload, state.settings.server.max_body_bytes).await?;
    let JobRequest { start, method, hyperparameters: hp, training_file, validation_file, metadata, tenant } =
        parse_job_request(&body, &state.model.id, &state.learner.settings().default_adapter)?;
    let tenant = tenant_for(&req, &state, tenant.as_deref())?;
    let max_epochs = state.settings.learning.max_epochs as f64;
    if let Some(epochs) = hp["n_epochs"].as_f64().filter(|&e| e > max_epochs) {
        let param = if method == "supervised" { "hyperparameters.n_epochs".to_string() } else { format!("method.{method}.hyperparameters.n_epochs") };
        return Err(ApiError::invalid(format!("'{param}' is {epochs}; this server runs at most {max_epochs} epochs (learning.max_epochs)"), Some(&param)));
    }
    let adapter = match start {
        JobStart::Base(name) => name,
        JobStart::Adapter(name) => {
            // The job starts from the adapter's current version, which must exist.
            let (registry, t, n) = (state.registry.clone(), tenant.clone(), name.clone());
            let current = blocking(move || registry.info(&t, &n)).await.map_err(|_| ApiError::model_not_found(&name))?.current;
            if current.is_none() {
                return Err(ApiError::model_not_found(&name));
            }
            name
        }
    };

    // The files must be the tenant's fine-tuning files and parse for the method.
    let (records, model_state) = (state.records.clone(), state.model.clone());
    let method_name = method.clone();
    let (t, m) = (tenant.clone(), crate::learner::dataset::Method::parse(&method).unwrap_or(crate::learner::dataset::Method::Supervised));
    let files = [(training_file.clone(), "training_file"), ]
        .into_iter()
        .chain(validation_file.clone().map(|v| (v, "validation_file")))
        .collect::<Vec<_>>();
    blocking(move || -> Result<(), ApiError> {
        for (id, param) in files {
            let f = records.file(&t, &id).map_err(|_| ApiError::invalid(format!("file {id} does not exist or you do not have access to it"), Some(param)).with_code("invalid_file"))?;
            if f.purpose != super::files::FINE_TUNE {
                return Err(ApiError::invalid(format!("file {id} has purpose {:?}, not \"fine-tune\"", f.purpose), Some(param)).with_code("invalid_file"));
            }
            let text = String::from_utf8(records.file_content(&t, &id)?).map_err(|_| ApiError::invalid(format!("file {id} is not UTF-8"), Some(param)))?;
            let (lessons, errors) = crate::learner::dataset::parse_lessons(&text, m, &model_state.tokenizer, &model_state.chat);
            if !errors.is_empty() {
                let shown: Vec<String> = errors.iter().take(5).map(|e| e.to_string()).collect();
                return Err(ApiError::invalid(
                    format!("file {id} has {} line(s) that are not {method_name} examples: {}", errors.len(), shown.join("; ")),
                    Some(param),
                )
                .with_code("invalid_file"));
            }
            if lessons.is_empty() {
                return Err(ApiError::invalid(format!("file {id} holds no examples"), Some(param)).with_code("invalid_file"));
            }
        }
        Ok(())
    })
    .await?;

    let learner = state.learner.clone();
    let files = crate::learner::FileJob { training_file, validation_file, method: method.clone() };
    let job = blocking(move || learner.submit_files(&tenant, &adapter, hp, files, metadata)).await?;
    Ok(HttpResponse::Ok().json(job_json(&job, &state.model.id)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    after: Option<String>,
    limit: Option<usize>,
    adapter: Option<String>,
    tenant: Option<String>,
}

fn check_limit(limit: Option<usize>) -> Result<usize, ApiError> {
    let limit = limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::invalid("'limit' must be between 1 and 100", Some("limit")));
    }
    Ok(limit)
}

/// `GET /v1/fine_tuning/jobs`.
pub async fn list(state: web::Data<AppState>, req: HttpRequest, q: web::Query<ListQuery>) -> Result<HttpResponse, ApiError> {
    let q = q.into_inner();
    let tenant = tenant_for(&req, &state, q.tenant.as_deref())?;
    let limit = check_limit(q.limit)?;
    let records = state.records.clone();
    let mut jobs = blocking(move || records.jobs(&tenant, q.adapter.as_deref(), q.after.as_deref(), limit + 1)).await?;
    let has_more = jobs.len() > limit;
    jobs.truncate(limit);
    Ok(HttpResponse::Ok().json(Page::new(jobs.iter().map(|j| job_json(j, &state.model.id)).collect(), has_more)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OneQuery {
    tenant: Option<String>,
    limit: Option<usize>,
    after: Option<String>,
}

async fn load(state: &web::Data<AppState>, req: &HttpRequest, id: String, tenant: Option<&str>) -> Result<JobRecord, ApiError> {
    let tenant = tenant_for(req, state, tenant)?;
    let records = state.records.clone();
    Ok(blocking(move || records.job(&tenant, &id)).await?)
}

/// `GET /v1/fine_tuning/jobs/{id}`.
pub async fn get(state: web::Data<AppState>, req: HttpRequest, path: web::Path<String>, q: web::Query<OneQuery>) -> Result<HttpResponse, ApiError> {
    let job = load(&state, &req, path.into_inner(), q.tenant.as_deref()).await?;
    Ok(HttpResponse::Ok().json(job_json(&job, &state.model.id)))
}

/// `GET /v1/fine_tuning/jobs/{id}/events`.
pub async fn events(state: web::Data<AppState>, req: HttpRequest, path: web::Path<String>, q: web::Query<OneQuery>) -> Result<HttpResponse, ApiError> {
    let q = q.into_inner();
    let job = load(&state, &req, path.into_inner(), q.tenant.as_deref()).await?;
    let limit = check_limit(q.limit)?;
    let records = state.records.clone();
    let id = job.id.clone();
    let mut events = blocking(move || records.job_events(&id, 10_000)).await?;
    if let Some(after) = &q.after {
        if let Some(pos) = events.iter().position(|e| &e.id == after) {
            events.drain(..=pos);
        }
    }
    let has_more = events.len() > limit;
    events.truncate(limit);
    Ok(HttpResponse::Ok().json(Page::new(events.iter().map(FineTuningJobEvent::from).collect(), has_more)))
}

/// `GET /v1/fine_tuning/jobs/{id}/checkpoints`: the version the job wrote.
pub async fn checkpoints(state: web::Data<AppState>, req: HttpRequest, path: web::Path<String>, q: web::Query<OneQuery>) -> Result<HttpResponse, ApiError> {
    let job = load(&state, &req, path.into_inner(), q.tenant.as_deref()).await?;
    Ok(HttpResponse::Ok().json(Page::new(FineTuningJobCheckpoint::of(&job).into_iter().collect(), false)))
}

/// `POST /v1/fine_tuning/jobs/{id}/cancel`.
pub async fn cancel(state: web::Data<AppState>, req: HttpRequest, path: web::Path<String>, q: web::Query<OneQuery>) -> Result<HttpResponse, ApiError> {
    let tenant = tenant_for(&req, &state, q.tenant.as_deref())?;
    let id = path.into_inner();
    let learner = state.learner.clone();
    let job = blocking(move || learner.cancel(&tenant, &id)).await?;
    Ok(HttpResponse::Ok().json(job_json(&job, &state.model.id)))
}
