//! Learner runs in OpenAI's fine-tuning shape: `POST /v1/adapters/{name}/train`
//! starts one on demand; `/v1/fine_tuning/jobs` lists them (cursor
//! pagination), shows one, its events and checkpoints (the versions it
//! produced), and cancels.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::store::JobRecord;

use super::body::read_limited;
use super::error::ApiError;
use super::state::AppState;
use super::tenant::tenant_for;

/// The job as OpenAI's `fine_tuning.job` object.
pub fn job_json(job: &JobRecord, base_model: &str) -> Value {
    let hp = &job.hyperparameters;
    json!({
        "object": "fine_tuning.job",
        "id": job.id,
        "created_at": job.created_at,
        "finished_at": job.finished_at,
        "model": job.parent_version.map_or_else(|| base_model.to_string(), |v| format!("{}@v{v}", job.adapter)),
        "fine_tuned_model": if job.status == "succeeded" { job.result_version.map(|v| format!("{}@v{v}", job.adapter)) } else { None },
        "organization_id": job.tenant,
        "status": job.status,
        "hyperparameters": {"n_epochs": "auto", "batch_size": hp["batch_size"], "learning_rate_multiplier": "auto", "n_steps": hp["n_steps"], "learning_rate": hp["learning_rate"]},
        "method": {"type": "supervised"},
        "training_file": null,
        "validation_file": null,
        "result_files": [],
        "trained_tokens": null,
        "error": job.error.as_ref().map(|m| json!({"code": "training_failed", "message": m, "param": null})),
        "seed": job.created_at,
        "metadata": {"adapter": job.adapter, "parent_version": job.parent_version, "result_version": job.result_version, "feedback_ids": job.feedback_ids},
        "metrics": job.metrics,
    })
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TrainIn {
    hyperparameters: Option<Value>,
    tenant: Option<String>,
}

/// `POST /v1/adapters/{name}/train`.
pub async fn train(state: web::Data<AppState>, req: HttpRequest, path: web::Path<String>, payload: web::Payload) -> Result<HttpResponse, ApiError> {
    let name = path.into_inner();
    let body = read_limited(&req, payload, state.settings.server.max_body_bytes).await?;
    let input: TrainIn = if body.iter().all(u8::is_ascii_whitespace) { TrainIn::default() } else { super::body::parse_json(&body)? };
    let tenant = tenant_for(&req, &state, input.tenant.as_deref())?;
    crate::adapter_store::validate_name(&name).map_err(|e| ApiError::invalid(e.to_string(), Some("name")))?;
    if name != state.learner.settings().default_adapter {
        state.registry.info(&tenant, &name)?;
    }
    let hp = input.hyperparameters.unwrap_or(Value::Null);
    if !hp.is_null() && !hp.is_object() {
        return Err(ApiError::invalid("'hyperparameters' must be an object", Some("hyperparameters")));
    }
    for (key, max) in [("n_steps", 10_000.0), ("batch_size", 256.0), ("learning_rate", 1.0)] {
        if let Some(v) = hp.get(key).filter(|v| !v.is_null() && v.as_str() != Some("auto")) {
            let ok = v.as_f64().is_some_and(|x| x > 0.0 && x <= max && (key == "learning_rate" || x.fract() == 0.0));
            if !ok {
                return Err(ApiError::invalid(format!("'hyperparameters.{key}' must be a positive number up to {max}, or \"auto\""), Some(&format!("hyperparameters.{key}"))));
            }
        }
    }
    let learner = state.learner.clone();
    let job = web::block(move || learner.submit(&tenant, &name, hp))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::internal(e.to_string()))?;
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
    let mut jobs = web::block(move || records.jobs(&tenant, q.adapter.as_deref(), q.after.as_deref(), limit + 1))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    let has_more = jobs.len() > limit;
    jobs.truncate(limit);
    Ok(HttpResponse::Ok().json(json!({
        "object": "list",
        "data": jobs.iter().map(|j| job_json(j, &state.model.id)).collect::<Vec<_>>(),
        "has_more": has_more,
    })))
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
    Ok(web::block(move || records.job(&tenant, &id)).await.map_err(|e| ApiError::internal(e.to_string()))??)
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
    let mut events = web::block(move || records.job_events(&id, 10_000)).await.map_err(|e| ApiError::internal(e.to_string()))??;
    if let Some(after) = &q.after {
        if let Some(pos) = events.iter().position(|e| &e.id == after) {
            events.drain(..=pos);
        }
    }
    let has_more = events.len() > limit;
    events.truncate(limit);
    let data: Vec<Value> = events
        .iter()
        .map(|e| json!({"object": "fine_tuning.job.event", "id": e.id, "created_at": e.created_at, "level": e.level, "message": e.message, "data": e.data, "type": if e.data.is_null() { "message" } else { "metrics" }}))
        .collect();
    Ok(HttpResponse::Ok().json(json!({"object": "list", "data": data, "has_more": has_more})))
}

/// `GET /v1/fine_tuning/jobs/{id}/checkpoints`: the version the job wrote.
pub async fn checkpoints(state: web::Data<AppState>, req: HttpRequest, path: web::Path<String>, q: web::Query<OneQuery>) -> Result<HttpResponse, ApiError> {
    let job = load(&state, &req, path.into_inner(), q.tenant.as_deref()).await?;
    let data: Vec<Value> = job
        .result_version
        .map(|v| {
            json!({
                "object": "fine_tuning.job.checkpoint",
                "id": format!("ftckpt-{}-v{v}", job.id),
                "created_at": job.finished_at,
                "fine_tuning_job_id": job.id,
                "fine_tuned_model_checkpoint": format!("{}@v{v}", job.adapter),
                "step_number": job.metrics["steps"],
                "metrics": {
                    "train_loss": job.metrics["train_loss"],
                    "valid_loss": job.metrics["valid_loss"],
                    "valid_mean_token_accuracy": job.metrics["valid_mean_token_accuracy"],
                    "base_kl": job.metrics["base_kl"],
                    "base_top1_agreement": job.metrics["base_top1_agreement"],
                },
                "status": job.metrics["status"],
            })
        })
        .into_iter()
        .collect();
    Ok(HttpResponse::Ok().json(json!({"object": "list", "data": data, "has_more": false})))
}

/// `POST /v1/fine_tuning/jobs/{id}/cancel`.
pub async fn cancel(state: web::Data<AppState>, req: HttpRequest, path: web::Path<String>, q: web::Query<OneQuery>) -> Result<HttpResponse, ApiError> {
    let tenant = tenant_for(&req, &state, q.tenant.as_deref())?;
    let id = path.into_inner();
    let learner = state.learner.clone();
    let job = web::block(move || learner.cancel(&tenant, &id)).await.map_err(|e| ApiError::internal(e.to_string()))??;
    Ok(HttpResponse::Ok().json(job_json(&job, &state.model.id)))
}
