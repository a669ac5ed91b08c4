//! `/v1/adapters`: upload PEFT adapters (multipart `name` + `config` +
//! `weights`, or `name` + `archive`, a .tar.gz of a PEFT directory), list
//! them with versions, promote, roll back, delete, and download a version
//! as a .tar.gz for PEFT or vLLM.

use std::io::Read;

use actix_multipart::Multipart;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};

use super::body::read_multipart;
use super::error::ApiError;
use super::state::AppState;
use super::tenant::tenant_of;
use crate::adapter_store::{Manifest, CONFIG_FILE, WEIGHTS_FILE};
use crate::registry::AdapterInfo;

/// Most entries an uploaded archive may hold.
const MAX_ARCHIVE_ENTRIES: usize = 64;

fn manifest_json(m: &Manifest) -> Value {
    json!({
        "version": m.version, "created_at": m.created_at, "source": m.source, "parent": m.parent,
        "rank": m.rank, "target_modules": m.target_modules, "sha256": m.sha256, "metrics": m.metrics,
    })
}

fn adapter_json(state: &AppState, info: &AdapterInfo) -> Value {
    let current = info.current.and_then(|c| info.versions.iter().find(|m| m.version == c));
    json!({
        "object": "adapter",
        "name": info.name,
        "base_model": state.model.id,
        "version": info.current,
        "rank": current.map(|m| m.rank),
        "target_modules": current.map(|m| m.target_modules.clone()),
        "versions": info.versions.iter().map(|m| m.version).collect::<Vec<_>>(),
    })
}

/// Pulls the two PEFT files out of a .tar.gz, refusing links, absolute or
/// parent paths, too many entries and oversized contents.
pub fn unpack_archive(bytes: &[u8], limit: usize) -> Result<(Vec<u8>, Vec<u8>), ApiError> {
    let bad = |m: String| ApiError::invalid(format!("archive: {m}"), Some("archive"));
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(bytes));
    let (mut config, mut weights) = (None, None);
    let mut total = 0u64;
    for (i, entry) in archive.entries().map_err(|e| bad(e.to_string()))?.enumerate() {
        if i >= MAX_ARCHIVE_ENTRIES {
            return Err(bad(format!("more than {MAX_ARCHIVE_ENTRIES} entries")));
        }
        let mut entry = entry.map_err(|e| bad(e.to_string()))?;
        let kind = entry.header().entry_type();
        if kind.is_symlink() || kind.is_hard_link() {
            return Err(bad("links are not allowed".into()));
        }
        if !kind.is_file() {
            continue;
        }
        let path = entry.path().map_err(|e| bad(e.to_string()))?.into_owned();
        if path.is_absolute() || path.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
            return Err(bad(format!("unsafe path {}", path.display())));
        }
        total += entry.size();
        if total > limit as u64 {
            return Err(ApiError::too_large(limit));
        }
        let file = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        let slot = match file.as_str() {
            CONFIG_FILE => &mut config,
            WEIGHTS_FILE => &mut weights,
            _ => continue,
        };
        let mut buf = Vec::new();
        entry.by_ref().take(limit as u64 + 1).read_to_end(&mut buf).map_err(|e| bad(e.to_string()))?;
        *slot = Some(buf);
    }
    match (config, weights) {
        (Some(c), Some(w)) => Ok((c, w)),
        (None, _) => Err(bad(format!("no {CONFIG_FILE}"))),
        (_, None) => Err(bad(format!("no {WEIGHTS_FILE} (pickle .bin files are not accepted)"))),
    }
}

#[derive(serde::Deserialize)]
/// `?promote=false` stages a version without serving it.
pub struct UploadQuery {
    pub promote: Option<bool>,
}

/// `POST /v1/adapters`.
pub async fn upload(
    state: web::Data<AppState>,
    req: HttpRequest,
    query: web::Query<UploadQuery>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let tenant = tenant_of(&req, &state)?;
    let limit = state.settings.lora.max_upload_bytes;
    let is_multipart = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    if !is_multipart {
        return Err(ApiError::invalid("upload adapters as multipart/form-data", None).with_code("invalid_content_type"));
    }
    let parts = read_multipart(Multipart::new(req.headers(), payload), limit).await?;
    let text = |k: &str| parts.iter().find(|p| p.name == k).map(|p| String::from_utf8_lossy(&p.bytes).trim().to_string());
    let bytes = |k: &str| parts.iter().find(|p| p.name == k).map(|p| p.bytes.clone());
    let name = text("name").ok_or_else(|| ApiError::invalid("multipart part 'name' is required", Some("name")))?;
    let promote = match text("promote") {
        Some(p) => p != "false",
        None => query.promote.unwrap_or(true),
    };
    let (config, weights) = match (bytes("config"), bytes("weights"), bytes("archive")) {
        (Some(c), Some(w), None) => (c, w),
        (None, None, Some(a)) => unpack_archive(&a, limit)?,
        _ => {
            return Err(ApiError::invalid(
                "send either parts 'config' (adapter_config.json) and 'weights' (adapter_model.safetensors), or part 'archive' (a .tar.gz of a PEFT directory)",
                Some("weights"),
            ))
        }
    };
    let registry = state.registry.clone();
    let (t, n) = (tenant.clone(), name.clone());
    let (manifest, pointer) = web::block(move || registry.upload(&t, &n, &config, &weights, promote))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    if promote {
        state.metrics.adapter_promotions.with_label_values(&["upload"]).inc();
    }
    let target = format!("{name}@v{}", manifest.version);
    super::audit::record(&state, &req, &tenant, "adapter.uploaded", &target, json!({"promoted": promote, "sha256": manifest.sha256}));
    let mut v = manifest_json(&manifest);
    v["object"] = json!("adapter.version");
    v["current_version"] = json!(pointer.current);
    v["name"] = json!(text("name"));
    Ok(HttpResponse::Created().json(v))
}

/// `GET /v1/adapters`.
pub async fn list(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let tenant = tenant_of(&req, &state)?;
    let infos = state.registry.list(&tenant)?;
    Ok(HttpResponse::Ok().json(json!({"object": "list", "data": infos.iter().map(|i| adapter_json(&state, i)).collect::<Vec<_>>()})))
}

/// `GET /v1/adapters/{name}`.
pub async fn get(state: web::Data<AppState>, req: HttpRequest, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let info = state.registry.info(&tenant_of(&req, &state)?, &path)?;
    Ok(HttpResponse::Ok().json(adapter_json(&state, &info)))
}

/// `GET /v1/adapters/{name}/versions`.
pub async fn versions(state: web::Data<AppState>, req: HttpRequest, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let info = state.registry.info(&tenant_of(&req, &state)?, &path)?;
    let data: Vec<Value> = info
        .versions
        .iter()
        .map(|m| {
            let mut v = manifest_json(m);
            v["current"] = json!(info.current == Some(m.version));
            v
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({"object": "list", "data": data})))
}

fn parse_version(v: &str) -> Result<u32, ApiError> {
    v.trim_start_matches('v').parse().map_err(|_| ApiError::invalid(format!("version {v:?} is not a number like 3 or v3"), Some("version")))
}

/// `POST /v1/adapters/{name}/versions/{v}/promote`.
pub async fn promote(state: web::Data<AppState>, req: HttpRequest, path: web::Path<(String, String)>) -> Result<HttpResponse, ApiError> {
    let (name, v) = path.into_inner();
    let tenant = tenant_of(&req, &state)?;
    state.registry.info(&tenant, &name)?;
    let p = state.registry.promote(&tenant, &name, parse_version(&v)?)?;
    state.metrics.adapter_promotions.with_label_values(&["manual"]).inc();
    let target = format!("{name}@v{}", p.current.unwrap_or_default());
    super::audit::record(&state, &req, &tenant, "adapter.promoted", &target, json!({"history": p.history}));
    Ok(HttpResponse::Ok().json(json!({"object": "adapter", "name": name, "version": p.current, "previous": p.history})))
}

/// `POST /v1/adapters/{name}/rollback`.
pub async fn rollback(state: web::Data<AppState>, req: HttpRequest, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let tenant = tenant_of(&req, &state)?;
    state.registry.info(&tenant, &path)?;
    let p = state.registry.rollback(&tenant, &path)?;
    state.metrics.adapter_rollbacks.inc();
    let target = format!("{}@v{}", path.as_str(), p.current.unwrap_or_default());
    super::audit::record(&state, &req, &tenant, "adapter.rolled_back", &target, json!({"history": p.history}));
    Ok(HttpResponse::Ok().json(json!({"object": "adapter", "name": path.into_inner(), "version": p.current, "previous": p.history})))
}

/// `DELETE /v1/adapters/{name}`.
pub async fn delete(state: web::Data<AppState>, req: HttpRequest, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let tenant = tenant_of(&req, &state)?;
    state.registry.info(&tenant, &path)?;
    state.registry.delete(&tenant, &path)?;
    // Its policy goes with it (a later adapter of the same name starts from the server's settings).
    if let Err(e) = state.records.set_policy(&tenant, &path, None) {
        tracing::error!(tenant = %tenant, adapter = %path.as_str(), "cannot remove a deleted adapter's policy: {e}");
    }
    super::audit::record(&state, &req, &tenant, "adapter.deleted", path.as_str(), json!({}));
    Ok(HttpResponse::Ok().json(json!({"object": "adapter.deleted", "name": path.into_inner(), "deleted": true})))
}

/// `GET /v1/adapters/{name}/versions/{v}/download`: the PEFT files as .tar.gz.
pub async fn download(state: web::Data<AppState>, req: HttpRequest, path: web::Path<(String, String)>) -> Result<HttpResponse, ApiError> {
    let (name, v) = path.into_inner();
    let version = parse_version(&v)?;
    let (config, weights) = state.registry.files(&tenant_of(&req, &state)?, &name, version).map_err(|e| match e {
        crate::registry::RegistryError::Store(crate::adapter_store::StoreError::InvalidName(_)) => {
            ApiError::from(crate::registry::RegistryError::NotFound(name.clone()))
        }
        other => other.into(),
    })?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    {
        let mut tar = tar::Builder::new(&mut gz);
        for (file, data) in [(CONFIG_FILE, &config), (WEIGHTS_FILE, &weights)] {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            tar.append_data(&mut header, format!("{name}/{file}"), data.as_slice()).map_err(|e| ApiError::internal(e.to_string()))?;
        }
        tar.finish().map_err(|e| ApiError::internal(e.to_string()))?;
    }
    let body = gz.finish().map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(HttpResponse::Ok()
        .content_type("application/gzip")
        .insert_header(("Content-Disposition", format!("attachment; filename=\"{name}-v{version}.tar.gz\"")))
        .body(body))
}
