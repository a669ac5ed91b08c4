//! `POST /v1/feedback` (a rating and/or a correction of one choice of a
//! logged completion, answered 202 once committed) and `GET /v1/feedback`
//! (the tenant's feedback, oldest first, with cursor pagination).

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::store::{FeedbackQuery, FeedbackRecord};

use super::blocking::blocking;
use super::body::{parse_json, read_limited};
use super::error::ApiError;
use super::generate::random_id;
use super::state::AppState;
use super::tenant::tenant_for;

/// Longest correction, in bytes.
pub const MAX_CORRECTION_BYTES: usize = 32 * 1024;
/// Longest comment, in bytes.
pub const MAX_COMMENT_BYTES: usize = 4 * 1024;
/// Longest completion id we look up.
const MAX_ID_BYTES: usize = 128;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FeedbackIn {
    completion_id: Value,
    choice_index: Option<Value>,
    rating: Option<Value>,
    correction: Option<Value>,
    comment: Option<Value>,
    /// Admin only: the tenant acted for.
    tenant: Option<String>,
}

fn field_string(v: &Value, param: &str, max: usize) -> Result<String, ApiError> {
    let s = v.as_str().ok_or_else(|| ApiError::invalid(format!("'{param}' must be a string"), Some(param)))?;
    if s.trim().is_empty() {
        return Err(ApiError::invalid(format!("'{param}' must not be empty"), Some(param)));
    }
    if s.len() > max {
        return Err(ApiError::invalid(format!("'{param}' is {} bytes; the limit is {max}", s.len()), Some(param)));
    }
    Ok(s.to_string())
}

fn parse_rating(v: &Value) -> Result<i8, ApiError> {
    let bad = || ApiError::invalid(format!("'rating' must be 1 or -1 (or \"up\" / \"down\"), got {v}"), Some("rating"));
    match v {
        Value::Number(n) => match n.as_i64() {
            Some(1) => Ok(1),
            Some(-1) => Ok(-1),
            _ => Err(bad()),
        },
        Value::String(s) => match s.as_str() {
            "up" => Ok(1),
            "down" => Ok(-1),
            _ => Err(bad()),
        },
        _ => Err(bad()),
    }
}

/// A feedback body, checked: what `POST /v1/feedback` acts on once the
/// caller's tenant is known.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedbackRequest {
    pub completion_id: String,
    pub choice_index: u32,
    pub rating: Option<i8>,
    pub correction: Option<String>,
    pub comment: Option<String>,
    /// Admin only: the tenant acted for.
    pub tenant: Option<String>,
}

/// Parses and checks a feedback body without touching any state, so every
/// refusal is decided before the store is consulted (and can be fuzzed).
pub fn parse_request(body: &[u8]) -> Result<FeedbackRequest, ApiError> {
    let f: FeedbackIn = parse_json(body)?;
    let completion_id = field_string(&f.completion_id, "completion_id", MAX_ID_BYTES)?;
    let rating = f.rating.as_ref().filter(|v| !v.is_null()).map(parse_rating).transpose()?;
    let correction =
        f.correction.as_ref().filter(|v| !v.is_null()).map(|v| field_string(v, "correction", MAX_CORRECTION_BYTES)).transpose()?;
    let comment = f.comment.as_ref().filter(|v| !v.is_null()).map(|v| field_string(v, "comment", MAX_COMMENT_BYTES)).transpose()?;
    if rating.is_none() && correction.is_none() {
        return Err(ApiError::invalid("feedback needs a 'rating' or a 'correction' (or both)", Some("rating")));
    }
    let choice_index = match f.choice_index.as_ref().filter(|v| !v.is_null()) {
        None => 0,
        Some(v) => v
            .as_u64()
            .filter(|i| *i <= u32::MAX as u64)
            .ok_or_else(|| ApiError::invalid(format!("'choice_index' must be a non-negative integer, got {v}"), Some("choice_index")))?
            as u32,
    };
    Ok(FeedbackRequest { completion_id, choice_index, rating, correction, comment, tenant: f.tenant })
}

/// `POST /v1/feedback`.
pub async fn create(state: web::Data<AppState>, req: HttpRequest, payload: web::Payload) -> Result<HttpResponse, ApiError> {
    let body = read_limited(&req, payload, state.settings.server.max_body_bytes).await?;
    let FeedbackRequest { completion_id, choice_index, rating, correction, comment, tenant } = parse_request(&body)?;
    let tenant = tenant_for(&req, &state, tenant.as_deref())?;
    let (records, tenants, max_per_completion) = (state.records.clone(), state.tenants.clone(), state.settings.limits.max_feedback_per_completion);
    let who = tenant.clone();
    let accepted = blocking(move || -> Result<FeedbackRecord, ApiError> {
        // Another tenant's completion answers exactly like a missing one.
        let completion = records.completion(&tenant, &completion_id)?;
        if choice_index as usize >= completion.outputs.len() {
            return Err(ApiError::invalid(
                format!("'choice_index' {choice_index} is out of range: the completion has {} choice(s)", completion.outputs.len()),
                Some("choice_index"),
            ));
        }
        let record = FeedbackRecord {
            id: random_id("fb"),
            completion_id,
            tenant: tenant.to_string(),
            adapter: completion.adapter,
            adapter_version: completion.adapter_version,
            choice_index,
            rating,
            correction,
            comment,
            created_at: crate::store::now(),
        };
        tenants.write_as(&tenant, || records.add_feedback(&record, max_per_completion)).map_err(ApiError::from)?.map_err(|e| match e {
            crate::store::StoreError::Limit { limit, .. } => ApiError::limit(
                format!("completion {} already has {limit} feedback items, the limit (limits.max_feedback_per_completion)", record.completion_id),
                "feedback_limit_reached",
            ),
            other => other.into(),
        })?;
        Ok(record)
    })
    .await?;
    let adapter = accepted.adapter.clone().unwrap_or_else(|| state.learner.settings().default_adapter.clone());
    let (learner, tenant) = (state.learner.clone(), who);
    let watched = match (&accepted.adapter, accepted.adapter_version, accepted.rating) {
        (Some(name), Some(version), Some(_)) => Some((name.clone(), version)),
        _ => None,
    };
    // Counting pending feedback touches the database: off the async runtime.
    actix_web::rt::task::spawn_blocking(move || {
        if let Some((name, version)) = watched {
            learner.watch(&tenant, &name, version);
        }
        learner.maybe_trigger(&tenant, &adapter);
    });
    Ok(HttpResponse::Accepted().json(feedback_json(&accepted)))
}

fn feedback_json(f: &FeedbackRecord) -> Value {
    json!({
        "id": f.id,
        "object": "feedback",
        "created_at": f.created_at,
        "completion_id": f.completion_id,
        "choice_index": f.choice_index,
        "adapter": f.adapter,
        "adapter_version": f.adapter_version,
        "rating": f.rating,
        "correction": f.correction,
        "comment": f.comment,
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    adapter: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
    tenant: Option<String>,
}

/// Most items per page.
const MAX_PAGE: usize = 1000;

/// `GET /v1/feedback?adapter=NAME&after=ID&limit=N`.
pub async fn list(state: web::Data<AppState>, req: HttpRequest, q: web::Query<ListQuery>) -> Result<HttpResponse, ApiError> {
    let q = q.into_inner();
    let tenant = tenant_for(&req, &state, q.tenant.as_deref())?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::invalid(format!("'limit' must be between 1 and {MAX_PAGE}"), Some("limit")));
    }
    let records = state.records.clone();
    let query = FeedbackQuery { adapter: q.adapter, after: q.after, limit: limit + 1 };
    let mut items = blocking(move || records.feedback(&tenant, &query)).await?;
    let has_more = items.len() > limit;
    items.truncate(limit);
    Ok(HttpResponse::Ok().json(json!({
        "object": "list",
        "data": items.iter().map(feedback_json).collect::<Vec<_>>(),
        "first_id": items.first().map(|f| f.id.clone()),
        "last_id": items.last().map(|f| f.id.clone()),
        "has_more": has_more,
    })))
}
