//! `GET /v1/models`, `GET /health`, `GET /metrics`.

use actix_web::{web, HttpResponse};
use serde_json::json;

use super::state::AppState;
use super::types::ModelCard;

/// The note the built-in model carries in its card and log line.
pub const BUILTIN_NOTE: &str =
    "built-in demo model: random weights and a byte tokenizer, so its text is noise. \
Serve a real model with `lifelora serve --model /path/to/hf-model-dir` (or set model.path).";

/// Lists the served model and the caller's adapters (as vLLM does, with
/// `parent`/`root` naming the base).
pub async fn list(state: web::Data<AppState>, req: actix_web::HttpRequest) -> Result<HttpResponse, super::error::ApiError> {
    let tenant = super::tenant::tenant_of(&req, &state)?;
    let mut data = vec![serde_json::to_value(base_card(&state)).unwrap_or_default()];
    let registry = state.registry.clone();
    let t = tenant.clone();
    for info in super::blocking::blocking(move || registry.list(&t)).await? {
        if let Some(card) = adapter_card(&state, &tenant, &info) {
            data.push(card);
        }
    }
    Ok(HttpResponse::Ok().json(json!({"object": "list", "data": data})))
}

/// `GET /v1/models/{id}` (the official client's `models.retrieve`): the
/// base model, or one of the caller's adapters with a current version.
pub async fn retrieve(state: web::Data<AppState>, req: actix_web::HttpRequest, path: web::Path<String>) -> Result<HttpResponse, super::error::ApiError> {
    let id = path.into_inner();
    let tenant = super::tenant::tenant_of(&req, &state)?;
    if id == state.model.id {
        return Ok(HttpResponse::Ok().json(base_card(&state)));
    }
    let (registry, t, name) = (state.registry.clone(), tenant.clone(), id.clone());
    let info = super::blocking::blocking(move || registry.info(&t, &name)).await.map_err(|_| super::error::ApiError::model_not_found(&id))?;
    let card = adapter_card(&state, &tenant, &info).ok_or_else(|| super::error::ApiError::model_not_found(&id))?;
    Ok(HttpResponse::Ok().json(card))
}

/// The base model's card.
fn base_card(state: &AppState) -> ModelCard {
    let m = &state.model;
    ModelCard {
        id: m.id.clone(),
        object: "model",
        created: state.created,
        owned_by: "lifelora".into(),
        root: m.id.clone(),
        parent: None,
        max_model_len: m.model.config.max_position_embeddings,
        description: m.builtin.then(|| BUILTIN_NOTE.to_string()),
    }
}

/// An adapter's card, when it has a current version (vLLM's shape: `parent`/`root` name the base).
fn adapter_card(state: &AppState, tenant: &str, info: &crate::registry::AdapterInfo) -> Option<serde_json::Value> {
    let current = info.current?;
    let m = &state.model;
    let created = info.versions.iter().find(|v| v.version == current).map_or(state.created, |v| v.created_at);
    Some(json!({
        "id": info.name, "object": "model", "created": created, "owned_by": tenant,
        "root": m.id, "parent": m.id, "max_model_len": m.model.config.max_position_embeddings,
        "version": current,
    }))
}

/// Liveness and readiness: the server listens only once the model is
/// loaded; `learner` says whether the learner has built the base model's
/// anchors (it does so once, at start, while serving goes first).
pub async fn health(state: web::Data<AppState>) -> HttpResponse {
    let learner = if state.learner.prepared() { "ready" } else { "preparing" };
    HttpResponse::Ok().json(json!({"status": "ok", "model": state.model.id, "builtin": state.model.builtin, "learner": learner}))
}

/// Prometheus text exposition; with `metrics.bearer_token` set, only for
/// a request that carries it.
pub async fn metrics(state: web::Data<AppState>, req: actix_web::HttpRequest) -> Result<HttpResponse, super::error::ApiError> {
    let token = &state.settings.metrics.bearer_token;
    if !token.is_empty() {
        let sent = req.headers().get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).map(str::trim).unwrap_or("");
        if !crate::tenants::constant_time_eq(sent.as_bytes(), token.as_bytes()) {
            return Err(super::error::ApiError {
                status: actix_web::http::StatusCode::UNAUTHORIZED,
                message: "/metrics needs `Authorization: Bearer <metrics.bearer_token>`".into(),
                kind: "invalid_request_error",
                param: None,
                code: Some("invalid_api_key"),
                retry_after: None,
            });
        }
    }
    Ok(HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(state.metrics.render()))
}
