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
    let m = &state.model;
    let card = ModelCard {
        id: m.id.clone(),
        object: "model",
        created: state.created,
        owned_by: "lifelora".into(),
        root: m.id.clone(),
        parent: None,
        max_model_len: m.model.config.max_position_embeddings,
        description: m.builtin.then(|| BUILTIN_NOTE.to_string()),
    };
    let mut data = vec![serde_json::to_value(card).unwrap_or_default()];
    for info in state.registry.list(&tenant)? {
        let Some(current) = info.current else { continue };
        let created = info.versions.iter().find(|v| v.version == current).map_or(state.created, |v| v.created_at);
        data.push(json!({
            "id": info.name, "object": "model", "created": created, "owned_by": tenant,
            "root": m.id, "parent": m.id, "max_model_len": m.model.config.max_position_embeddings,
            "version": current,
        }));
    }
    Ok(HttpResponse::Ok().json(json!({"object": "list", "data": data})))
}

/// Liveness and readiness: the server listens only once the model is
/// loaded; `learner` says whether the learner has built the base model's
/// anchors (it does so once, at start, while serving goes first).
pub async fn health(state: web::Data<AppState>) -> HttpResponse {
    let learner = if state.learner.prepared() { "ready" } else { "preparing" };
    HttpResponse::Ok().json(json!({"status": "ok", "model": state.model.id, "builtin": state.model.builtin, "learner": learner}))
}

/// Prometheus text exposition.
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render())
}
