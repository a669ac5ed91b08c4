//! OpenAI's Files API for fine-tuning: `POST /v1/files` (multipart `file`
//! and `purpose` = `fine-tune`, JSONL), list, retrieve, content, delete.
//! Files live in the record store, scoped to the tenant; every line must be
//! a JSON object, and what the lines mean is checked when a job uses them.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::store::FileRecord;

use super::blocking::blocking;
use super::body::{read_multipart, MultipartLimits};
use super::error::ApiError;
use super::state::AppState;
use super::tenant::tenant_of;

/// The one purpose served: files that fine-tuning jobs read.
pub const FINE_TUNE: &str = "fine-tune";
/// Longest file name kept.
const MAX_FILENAME: usize = 255;

/// The file as OpenAI's `file` object.
pub fn file_json(f: &FileRecord) -> Value {
    json!({
        "object": "file",
        "id": f.id,
        "bytes": f.bytes,
        "created_at": f.created_at,
        "filename": f.filename,
        "purpose": f.purpose,
        "status": "processed",
        "status_details": null,
    })
}

/// Checks that `content` is UTF-8 JSONL of objects; names the first bad line.
pub fn check_jsonl(content: &[u8]) -> Result<usize, ApiError> {
    let text = std::str::from_utf8(content).map_err(|e| ApiError::invalid(format!("the file is not UTF-8 text: {e}"), Some("file")))?;
    let mut lines = 0;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(_)) => lines += 1,
            Ok(_) => return Err(ApiError::invalid(format!("line {}: each line must be a JSON object", i + 1), Some("file"))),
            Err(e) => return Err(ApiError::invalid(format!("line {}: not valid JSON: {e}", i + 1), Some("file"))),
        }
    }
    if lines == 0 {
        return Err(ApiError::invalid("the file holds no JSONL lines", Some("file")));
    }
    Ok(lines)
}

/// `POST /v1/files`.
pub async fn upload(state: web::Data<AppState>, req: HttpRequest, payload: web::Payload) -> Result<HttpResponse, ApiError> {
    let tenant = tenant_of(&req, &state)?;
    let is_multipart = req.headers().get("content-type").and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("multipart/form-data"));
    if !is_multipart {
        return Err(ApiError::invalid("upload files as multipart/form-data with parts 'file' and 'purpose'", None).with_code("invalid_content_type"));
    }
    // The file plus its multipart framing and the purpose part.
    let limit = state.settings.learning.max_file_bytes.saturating_add(64 * 1024);
    let parts = read_multipart(&req, payload, &MultipartLimits::new(&state.settings, limit), &["file", "purpose"]).await?;
    let purpose = parts
        .iter()
        .find(|p| p.name == "purpose")
        .map(|p| String::from_utf8_lossy(&p.bytes).trim().to_string())
        .ok_or_else(|| ApiError::invalid("multipart part 'purpose' is required", Some("purpose")))?;
    if purpose != FINE_TUNE {
        return Err(ApiError::invalid(format!("purpose {purpose:?} is not supported; this server takes \"{FINE_TUNE}\" files"), Some("purpose")));
    }
    let file = parts.into_iter().find(|p| p.name == "file").ok_or_else(|| ApiError::invalid("multipart part 'file' is required", Some("file")))?;
    if file.bytes.len() > state.settings.learning.max_file_bytes {
        return Err(ApiError::too_large(state.settings.learning.max_file_bytes));
    }
    check_jsonl(&file.bytes)?;
    let mut filename = file.filename.unwrap_or_else(|| "upload.jsonl".into());
    if filename.len() > MAX_FILENAME {
        let mut cut = MAX_FILENAME;
        while !filename.is_char_boundary(cut) {
            cut -= 1;
        }
        filename.truncate(cut);
    }
    let record = FileRecord {
        id: crate::store::new_id("file"),
        tenant: tenant.to_string(),
        filename,
        purpose,
        bytes: file.bytes.len(),
        created_at: crate::store::now(),
    };
    let (records, storage, tenants, saved) = (state.records.clone(), state.storage.clone(), state.tenants.clone(), record.clone());
    blocking(move || -> Result<(), ApiError> {
        tenants.write_as(&tenant, || storage.within(&tenant, file.bytes.len() as u64, || -> Result<(), ApiError> { Ok(records.add_file(&saved, &file.bytes)?) }))?
    })
    .await?;
    Ok(HttpResponse::Ok().json(file_json(&record)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    purpose: Option<String>,
    limit: Option<usize>,
    order: Option<String>,
    after: Option<String>,
}

/// `GET /v1/files`.
pub async fn list(state: web::Data<AppState>, req: HttpRequest, q: web::Query<ListQuery>) -> Result<HttpResponse, ApiError> {
    let tenant = tenant_of(&req, &state)?;
    let q = q.into_inner();
    let limit = q.limit.unwrap_or(10_000);
    if !(1..=10_000).contains(&limit) {
        return Err(ApiError::invalid("'limit' must be between 1 and 10000", Some("limit")));
    }
    let records = state.records.clone();
    let purpose = q.purpose.clone();
    let mut files = blocking(move || records.files(&tenant, purpose.as_deref(), usize::MAX)).await?;
    match q.order.as_deref() {
        None | Some("desc") => {}
        Some("asc") => files.reverse(),
        Some(o) => return Err(ApiError::invalid(format!("'order' must be \"asc\" or \"desc\", got {o:?}"), Some("order"))),
    }
    if let Some(after) = &q.after {
        let at = files.iter().position(|f| &f.id == after).ok_or_else(|| ApiError::from(crate::store::StoreError::NotFound(format!("file {after}"))))?;
        files.drain(..=at);
    }
    let has_more = files.len() > limit;
    files.truncate(limit);
    Ok(HttpResponse::Ok().json(json!({
        "object": "list",
        "data": files.iter().map(file_json).collect::<Vec<_>>(),
        "first_id": files.first().map(|f| f.id.clone()),
        "last_id": files.last().map(|f| f.id.clone()),
        "has_more": has_more,
    })))
}

/// `GET /v1/files/{id}`.
pub async fn get(state: web::Data<AppState>, req: HttpRequest, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let tenant = tenant_of(&req, &state)?;
    let records = state.records.clone();
    let f = blocking(move || records.file(&tenant, &path)).await?;
    Ok(HttpResponse::Ok().json(file_json(&f)))
}

/// `GET /v1/files/{id}/content`.
pub async fn content(state: web::Data<AppState>, req: HttpRequest, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let tenant = tenant_of(&req, &state)?;
    let records = state.records.clone();
    let bytes = blocking(move || records.file_content(&tenant, &path)).await?;
    Ok(HttpResponse::Ok().content_type("application/octet-stream").body(bytes))
}

/// `DELETE /v1/files/{id}`.
pub async fn delete(state: web::Data<AppState>, req: HttpRequest, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let tenant = tenant_of(&req, &state)?;
    let (records, tenants) = (state.records.clone(), state.tenants.clone());
    let id = path.into_inner();
    let gone = id.clone();
    blocking(move || -> Result<(), ApiError> { Ok(tenants.write_as(&tenant, || records.delete_file(&tenant, &gone))??) }).await?;
    Ok(HttpResponse::Ok().json(json!({"object": "file", "id": id, "deleted": true})))
}
