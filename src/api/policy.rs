//! `/v1/adapters/{name}/policy`: an adapter's learning policy. `GET` shows
//! the overrides and the settings in effect; `PUT` replaces the overrides
//! (validated whole before anything is stored); `DELETE` returns the
//! adapter to the server's settings.

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};

use crate::learner::policy;

use super::blocking::blocking;
use super::body::{parse_json, read_limited};
use super::error::ApiError;
use super::state::AppState;
use super::tenant::tenant_of;

/// The adapter must exist, except the default one the learner creates.
async fn check_adapter(state: &AppState, tenant: &str, name: &str) -> Result<(), ApiError> {
    crate::adapter_store::validate_name(name).map_err(|e| ApiError::invalid(e.to_string(), Some("name")))?;
    if name != state.learner.settings().default_adapter {
        let (registry, t, n) = (state.registry.clone(), tenant.to_string(), name.to_string());
        blocking(move || registry.info(&t, &n)).await?;
    }
    Ok(())
}

fn policy_json(state: &AppState, name: &str, overrides: &Value) -> Result<Value, ApiError> {
    let effective = policy::apply(state.learner.settings(), overrides).map_err(|e| ApiError::internal(format!("stored policy: {e}")))?;
    Ok(json!({"object": "adapter.policy", "adapter": name, "overrides": overrides, "effective": policy::effective(&effective)}))
}

/// `GET /v1/adapters/{name}/policy`.
pub async fn get(state: web::Data<AppState>, req: HttpRequest, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let tenant = tenant_of(&req, &state)?;
    check_adapter(&state, &tenant, &path).await?;
    let records = state.records.clone();
    let name = path.into_inner();
    let n = name.clone();
    let overrides = blocking(move || records.policy(&tenant, &n)).await?;
    Ok(HttpResponse::Ok().json(policy_json(&state, &name, &overrides.unwrap_or_else(|| json!({})))?))
}

/// `PUT /v1/adapters/{name}/policy` with a JSON object of overrides.
pub async fn put(state: web::Data<AppState>, req: HttpRequest, path: web::Path<String>, payload: web::Payload) -> Result<HttpResponse, ApiError> {
    let tenant = tenant_of(&req, &state)?;
    check_adapter(&state, &tenant, &path).await?;
    let body = read_limited(&req, payload, state.settings.server.max_body_bytes).await?;
    let overrides: Value = parse_json(&body)?;
    policy::apply(state.learner.settings(), &overrides).map_err(|e| ApiError::invalid(e.to_string(), Some(&e.field)))?;
    let overrides = policy::normalized(&overrides);
    let (records, name, stored) = (state.records.clone(), path.into_inner(), overrides.clone());
    let n = name.clone();
    let (t, tenants) = (tenant.clone(), state.tenants.clone());
    blocking(move || -> Result<(), ApiError> { Ok(tenants.write_as(&t, || records.set_policy(&t, &n, Some(&stored)))??) }).await?;
    super::audit::record(&state, &req, &tenant, "adapter.policy_set", &name, overrides.clone()).await;
    Ok(HttpResponse::Ok().json(policy_json(&state, &name, &overrides)?))
}

/// `DELETE /v1/adapters/{name}/policy`.
pub async fn delete(state: web::Data<AppState>, req: HttpRequest, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let tenant = tenant_of(&req, &state)?;
    check_adapter(&state, &tenant, &path).await?;
    let (records, name) = (state.records.clone(), path.into_inner());
    let (t, n, tenants) = (tenant.clone(), name.clone(), state.tenants.clone());
    blocking(move || -> Result<(), ApiError> { Ok(tenants.write_as(&t, || records.set_policy(&t, &n, None))??) }).await?;
    super::audit::record(&state, &req, &tenant, "adapter.policy_reset", &name, json!({})).await;
    Ok(HttpResponse::Ok().json(policy_json(&state, &name, &json!({}))?))
}
