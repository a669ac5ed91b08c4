//! `/v1/tenants` (admin only): create with a fresh key shown once, list,
//! delete (with all the tenant's adapters), rotate a key.

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use super::body::{parse_json, read_limited};
use super::error::ApiError;
use super::state::AppState;
use super::tenant::require_admin;
use crate::tenants::TenantError;

impl From<TenantError> for ApiError {
    fn from(e: TenantError) -> Self {
        use actix_web::http::StatusCode;
        match e {
            TenantError::Name(_) => ApiError::invalid(e.to_string(), Some("name")).with_code("invalid_name"),
            TenantError::Exists(_) => ApiError { status: StatusCode::CONFLICT, message: e.to_string(), kind: "invalid_request_error", param: Some("name".into()), code: Some("tenant_exists"), retry_after: None },
            TenantError::NotFound(_) => ApiError { status: StatusCode::NOT_FOUND, message: e.to_string(), kind: "invalid_request_error", param: Some("name".into()), code: Some("tenant_not_found"), retry_after: None },
            TenantError::Io { .. } => ApiError::internal(e.to_string()),
        }
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateTenant {
    name: String,
}

/// Parses a `POST /v1/tenants` body and checks the name, without touching
/// any state: the name becomes a directory, so it is refused here first.
pub fn parse_create(body: &[u8]) -> Result<String, ApiError> {
    let c: CreateTenant = parse_json(body)?;
    crate::adapter_store::validate_name(&c.name).map_err(TenantError::Name)?;
    Ok(c.name)
}

/// `POST /v1/tenants`.
pub async fn create(state: web::Data<AppState>, req: HttpRequest, payload: web::Payload) -> Result<HttpResponse, ApiError> {
    require_admin(&req, &state)?;
    let body = read_limited(&req, payload, state.settings.server.max_body_bytes).await?;
    let name = parse_create(&body)?;
    let key = state.tenants.create(&name)?;
    super::audit::record(&state, &req, &name, "tenant.created", &name, json!({}));
    Ok(HttpResponse::Created().json(json!({"object": "tenant", "name": name, "api_key": key})))
}

/// `GET /v1/tenants`.
pub async fn list(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    require_admin(&req, &state)?;
    let data: Vec<_> = state.tenants.list().into_iter().map(|(name, created)| json!({"object": "tenant", "name": name, "created_at": created})).collect();
    Ok(HttpResponse::Ok().json(json!({"object": "list", "data": data})))
}

/// `DELETE /v1/tenants/{name}`: the tenant, its key and its adapters.
pub async fn delete(state: web::Data<AppState>, req: HttpRequest, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    require_admin(&req, &state)?;
    let name = path.into_inner();
    state.tenants.delete(&name)?;
    for info in state.registry.list(&name).unwrap_or_default() {
        state.registry.delete(&name, &info.name)?;
    }
    super::audit::record(&state, &req, &name, "tenant.deleted", &name, json!({}));
    Ok(HttpResponse::Ok().json(json!({"object": "tenant.deleted", "name": name, "deleted": true})))
}

/// `POST /v1/tenants/{name}/rotate_key`: a new key; the old one stops working.
pub async fn rotate(state: web::Data<AppState>, req: HttpRequest, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    require_admin(&req, &state)?;
    let name = path.into_inner();
    let key = state.tenants.rotate(&name)?;
    super::audit::record(&state, &req, &name, "tenant.key_rotated", &name, json!({}));
    Ok(HttpResponse::Ok().json(json!({"object": "tenant", "name": name, "api_key": key})))
}
