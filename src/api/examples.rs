//! `POST /v1/adapters/{name}/examples`: OpenAI fine-tuning JSONL (chat
//! `messages`, or `prompt`/`completion`) to seed or steer an adapter. Good
//! lines are stored for its next training run; bad lines are reported by
//! number. Nothing is stored when no line is usable.

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use crate::learner::dataset;
use crate::store::ExampleRecord;

use super::blocking::blocking;
use super::body::read_limited;
use super::error::ApiError;
use super::state::AppState;
use super::tenant::tenant_for;

/// Handler.
pub async fn create(state: web::Data<AppState>, req: HttpRequest, path: web::Path<String>, payload: web::Payload) -> Result<HttpResponse, ApiError> {
    let name = path.into_inner();
    let body = read_limited(&req, payload, state.settings.server.max_body_bytes).await?;
    let tenant = tenant_for(&req, &state, None)?;
    crate::adapter_store::validate_name(&name).map_err(|e| ApiError::invalid(e.to_string(), Some("name")))?;
    if name != state.learner.settings().default_adapter {
        let (registry, t, n) = (state.registry.clone(), tenant.clone(), name.clone());
        blocking(move || registry.info(&t, &n)).await?;
    }
    let text = std::str::from_utf8(&body).map_err(|_| ApiError::invalid("the body must be UTF-8 JSONL", None))?;
    let (examples, errors) = dataset::parse_jsonl(text, &state.model.tokenizer, &state.model.chat);
    let errors: Vec<serde_json::Value> = errors
        .iter()
        .map(|e| match e {
            crate::learner::LearnError::BadExample { line, message } => json!({"line": line, "message": message}),
            other => json!({"line": null, "message": other.to_string()}),
        })
        .collect();
    if examples.is_empty() {
        let detail = errors.iter().take(5).map(|e| format!("line {}: {}", e["line"], e["message"].as_str().unwrap_or(""))).collect::<Vec<_>>().join("; ");
        return Err(ApiError::invalid(format!("no usable example in the JSONL body ({detail})"), Some("body")));
    }
    let now = crate::store::now();
    let records: Vec<ExampleRecord> = examples
        .into_iter()
        .map(|e| ExampleRecord {
            id: crate::store::new_id("ex"),
            tenant: tenant.to_string(),
            adapter: name.clone(),
            prompt_ids: e.prompt,
            answer_ids: e.answer,
            created_at: now,
        })
        .collect();
    let accepted = records.len();
    let adding: u64 = records.iter().map(|r| serde_json::to_string(r).map_or(0, |j| j.len() as u64)).sum();
    let (store, storage, tenants, who) = (state.records.clone(), state.storage.clone(), state.tenants.clone(), tenant.clone());
    blocking(move || -> Result<(), ApiError> {
        tenants.write_as(&who, || storage.within(&who, adding, || -> Result<(), ApiError> { Ok(store.add_examples(&records)?) }))?
    })
    .await?;
    let (learner, t, n) = (state.learner.clone(), tenant, name.clone());
    actix_web::rt::task::spawn_blocking(move || learner.maybe_trigger(&t, &n));
    Ok(HttpResponse::Ok().json(json!({"object": "adapter.examples", "adapter": name, "accepted": accepted, "errors": errors})))
}
