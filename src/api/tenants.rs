//! `/v1/tenants` (admin only): create with a fresh key shown once, list,
//! show with its use of every quota, delete (with everything it stored),
//! rotate a key.

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use super::blocking::blocking;
use super::body::{parse_json, read_limited};
use super::error::ApiError;
use super::state::AppState;
use super::tenant::require_admin;
use crate::tenants::TenantError;

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
    let (tenants, n) = (state.tenants.clone(), name.clone());
    let key = blocking(move || tenants.create(&n)).await?;
    super::audit::record(&state, &req, &name, "tenant.created", &name, json!({})).await;
    Ok(HttpResponse::Created().json(json!({"object": "tenant", "name": name, "api_key": key})))
}

/// `GET /v1/tenants`.
pub async fn list(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    require_admin(&req, &state)?;
    let data: Vec<_> = state.tenants.list().into_iter().map(|(name, created)| json!({"object": "tenant", "name": name, "created_at": created})).collect();
    Ok(HttpResponse::Ok().json(json!({"object": "list", "data": data})))
}

/// Why a deleted tenant's data could not be removed (the deletion stays
/// pending and is finished at the next start).
#[derive(Debug, thiserror::Error)]
pub enum PurgeError {
    #[error("database: {0}")]
    Records(#[from] crate::store::StoreError),
    #[error("adapter store: {0}")]
    Adapters(#[from] crate::registry::RegistryError),
    #[error(transparent)]
    Tenants(#[from] TenantError),
}

impl From<PurgeError> for ApiError {
    fn from(e: PurgeError) -> Self {
        ApiError::internal(format!("the tenant is deleted but its data is not yet all removed ({e}); it will be at the next start"))
    }
}

/// Removes everything a tenant whose deletion began left behind: every
/// record but the audit log (one transaction), every adapter version (one
/// rename), then marks the deletion finished. Safe to run again.
pub fn remove_tenant_data(
    records: &dyn crate::store::RecordStore,
    registry: &crate::registry::Registry,
    tenants: &crate::tenants::Tenants,
    name: &str,
) -> Result<crate::store::Purged, PurgeError> {
    let purged = records.delete_tenant(name)?;
    registry.delete_tenant(name)?;
    tenants.finish_delete(name)?;
    Ok(purged)
}

/// `DELETE /v1/tenants/{name}`: the tenant, its key and everything it
/// stored. Its key stops working and its writes are refused first; its
/// queued jobs are dropped and its running job stops writing; then its
/// records and adapters are removed. The audit log keeps the deletion.
pub async fn delete(state: web::Data<AppState>, req: HttpRequest, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    require_admin(&req, &state)?;
    let name = path.into_inner();
    let (tenants, n) = (state.tenants.clone(), name.clone());
    blocking(move || tenants.begin_delete(&n)).await?;
    super::audit::record(&state, &req, &name, "tenant.deleted", &name, json!({})).await;
    let dropped_jobs = state.learner.forget_tenant(&name);
    state.quotas.forget(&name);
    state.storage.forget(&name);
    let (records, registry, tenants, n) = (state.records.clone(), state.registry.clone(), state.tenants.clone(), name.clone());
    let purged = blocking(move || remove_tenant_data(records.as_ref(), &registry, &tenants, &n)).await?;
    tracing::info!(tenant = %name, ?purged, jobs_stopped = dropped_jobs.len(), "tenant deleted");
    Ok(HttpResponse::Ok().json(json!({"object": "tenant.deleted", "name": name, "deleted": true, "removed": purged})))
}

/// `GET /v1/tenants/{name}`: a tenant with its use of every quota.
pub async fn get(state: web::Data<AppState>, req: HttpRequest, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    require_admin(&req, &state)?;
    let name = path.into_inner();
    let created = state.tenants.created_at(&name).ok_or_else(|| TenantError::NotFound(name.clone()))?;
    let usage = super::usage::of(&state, &name).await?;
    Ok(HttpResponse::Ok().json(json!({"object": "tenant", "name": name, "created_at": created, "usage": usage})))
}

/// `POST /v1/tenants/{name}/rotate_key`: a new key; the old one stops working.
pub async fn rotate(state: web::Data<AppState>, req: HttpRequest, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    require_admin(&req, &state)?;
    let name = path.into_inner();
    let (tenants, n) = (state.tenants.clone(), name.clone());
    let key = blocking(move || tenants.rotate(&n)).await?;
    super::audit::record(&state, &req, &name, "tenant.key_rotated", &name, json!({})).await;
    Ok(HttpResponse::Ok().json(json!({"object": "tenant", "name": name, "api_key": key})))
}
