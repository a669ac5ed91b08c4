//! What a tenant uses of every quota: `GET /v1/usage` (a tenant's own) and
//! the `usage` of `GET /v1/tenants/{name}` (the admin's view).

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Serialize;

use super::blocking::blocking;
use super::error::ApiError;
use super::state::AppState;
use super::tenant::tenant_of;

/// One quota: what is used and the limit (0: none).
#[derive(Debug, Clone, Serialize)]
pub struct Measure<T> {
    pub used: T,
    pub limit: T,
}

/// An adapter's versions against the per-adapter limit.
#[derive(Debug, Clone, Serialize)]
pub struct AdapterVersions {
    pub name: String,
    pub versions: usize,
    pub limit: usize,
}

/// A tenant's use of every quota.
#[derive(Debug, Clone, Serialize)]
pub struct TenantUsage {
    pub object: &'static str,
    pub tenant: String,
    /// Bytes of files, examples and adapter versions together.
    pub storage_bytes: Measure<u64>,
    pub files_bytes: u64,
    pub examples_bytes: u64,
    pub adapters_bytes: u64,
    pub adapters: Vec<AdapterVersions>,
    pub queued_jobs: Measure<usize>,
    pub requests_in_flight: Measure<usize>,
    pub tokens_this_minute: Measure<u64>,
    /// Limits checked per item rather than summed.
    pub max_feedback_per_completion: usize,
    pub max_logprob_entries: usize,
}

/// Measures `tenant` (off the HTTP workers: it reads the store and the disk).
pub async fn of(state: &AppState, tenant: &str) -> Result<TenantUsage, ApiError> {
    let (storage, registry, t) = (state.storage.clone(), state.registry.clone(), tenant.to_string());
    let (stored, adapters) = blocking(move || -> Result<_, ApiError> {
        let stored = storage.usage(&t)?;
        let adapters = registry.list(&t)?;
        Ok((stored, adapters))
    })
    .await?;
    let limits = &state.settings.limits;
    let (max_concurrent, tokens_per_minute) = state.quotas.limits();
    Ok(TenantUsage {
        object: "usage",
        tenant: tenant.to_string(),
        storage_bytes: Measure { used: stored.total(), limit: state.storage.limit() },
        files_bytes: stored.files,
        examples_bytes: stored.examples,
        adapters_bytes: stored.adapters,
        adapters: adapters
            .into_iter()
            .map(|a| AdapterVersions { name: a.name, versions: a.versions.len(), limit: limits.max_versions_per_adapter })
            .collect(),
        queued_jobs: Measure { used: state.learner.queued(tenant), limit: state.settings.learning.max_queued_jobs_per_tenant },
        requests_in_flight: Measure { used: state.quotas.in_flight(tenant), limit: max_concurrent },
        tokens_this_minute: Measure { used: state.quotas.tokens_this_minute(tenant), limit: tokens_per_minute },
        max_feedback_per_completion: limits.max_feedback_per_completion,
        max_logprob_entries: limits.max_logprob_entries,
    })
}

/// `GET /v1/usage`.
pub async fn get(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let tenant = tenant_of(&req, &state)?;
    Ok(HttpResponse::Ok().json(of(&state, &tenant).await?))
}
