//! The audit log at the edge: every admin action (tenants, keys, adapter
//! versions) is recorded with who did it and when, and the admin reads it
//! back with `GET /v1/audit`. Keys are never part of an entry.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::store::AuditRecord;

use super::error::ApiError;
use super::state::AppState;
use super::tenant::{caller, forbidden, Caller};

/// Who made a request, as the audit log names them.
fn actor(req: &HttpRequest, state: &AppState) -> String {
    if state.settings.auth.admin_key.is_empty() {
        return "open".into();
    }
    match caller(req, state) {
        Ok(Caller::Admin) => "admin".into(),
        Ok(Caller::Tenant(t)) => format!("tenant:{t}"),
        Err(_) => "unknown".into(),
    }
}

/// Records an action already done (the write runs off the HTTP workers).
/// A failure to record is logged, not returned: the action itself stands
/// and its answer must say so.
pub async fn record(state: &AppState, req: &HttpRequest, tenant: &str, action: &str, target: &str, detail: Value) {
    let entry = AuditRecord {
        id: crate::store::new_id("audit"),
        created_at: crate::store::now(),
        actor: actor(req, state),
        tenant: tenant.to_string(),
        action: action.to_string(),
        target: target.to_string(),
        detail,
    };
    tracing::info!(actor = %entry.actor, tenant, action, target, "audit");
    let records = state.records.clone();
    if let Err(e) = super::blocking::blocking(move || records.add_audit(&entry)).await {
        tracing::error!(tenant, action, target, "cannot write the audit log: {e}");
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    tenant: Option<String>,
    action: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
}

const MAX_PAGE: usize = 1000;

/// `GET /v1/audit?tenant=&action=&after=&limit=`: admin only (or anyone on
/// an open server, which has one operator), oldest first.
pub async fn list(state: web::Data<AppState>, req: HttpRequest, q: web::Query<AuditQuery>) -> Result<HttpResponse, ApiError> {
    if !state.settings.auth.admin_key.is_empty() && caller(&req, &state)? != Caller::Admin {
        return Err(forbidden());
    }
    let q = q.into_inner();
    let limit = q.limit.unwrap_or(100);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::invalid(format!("'limit' must be between 1 and {MAX_PAGE}"), Some("limit")));
    }
    let records = state.records.clone();
    let mut items = super::blocking::blocking(move || records.audit(q.tenant.as_deref(), q.action.as_deref(), q.after.as_deref(), limit + 1)).await?;
    let has_more = items.len() > limit;
    items.truncate(limit);
    let data: Vec<Value> = items
        .iter()
        .map(|a| {
            json!({"object": "audit.entry", "id": a.id, "created_at": a.created_at, "actor": a.actor, "tenant": a.tenant,
                   "action": a.action, "target": a.target, "detail": a.detail})
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({
        "object": "list",
        "data": data,
        "first_id": items.first().map(|a| a.id.clone()),
        "last_id": items.last().map(|a| a.id.clone()),
        "has_more": has_more,
    })))
}
