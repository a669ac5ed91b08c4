//! `/v1/adapters`: upload PEFT adapters (multipart `name` + `config` +
//! `weights`, or `name` + `archive`, a .tar.gz of a PEFT directory), list
//! them with versions, promote, roll back, delete, and download a version
//! as a .tar.gz for PEFT or vLLM.

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};

use super::blocking::blocking;
use super::body::{read_multipart, MultipartLimits};
use super::error::ApiError;
use super::state::AppState;
use super::tenant::tenant_of;
use crate::adapter_store::{Manifest, Pointer, CONFIG_FILE, WEIGHTS_FILE};
use crate::lora::archive::{unpack_peft, PeftFiles};
use crate::registry::AdapterInfo;

fn manifest_json(m: &Manifest, pointer: Option<&Pointer>) -> Value {
    let rejected = m.rejection();
    json!({
        "version": m.version, "created_at": m.created_at, "source": m.source, "parent": m.parent,
        "rank": m.rank, "target_modules": m.target_modules, "sha256": m.sha256, "metrics": m.metrics,
        "status": match (&rejected, pointer) {
            (Some(_), Some(p)) if p.servable(m) => "released",
            (Some(_), _) => "rejected",
            _ => "ready",
        },
        "rejection_reasons": rejected,
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

/// The most an upload may hold: the setting, or less when the served
/// model could not take an adapter that large at the rank limit.
fn upload_limit(state: &AppState) -> usize {
    (state.settings.lora.max_upload_bytes as u64).min(state.registry.max_adapter_bytes()).min(usize::MAX as u64) as usize
}

#[derive(serde::Deserialize)]
/// `?promote=false` stages a version without serving it.
pub struct UploadQuery {
    pub promote: Option<bool>,
}

/// `POST /v1/adapters`: read within the multipart limits, unpacked and
/// validated off the HTTP workers, stored within the tenant's quotas.
pub async fn upload(
    state: web::Data<AppState>,
    req: HttpRequest,
    query: web::Query<UploadQuery>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let tenant = tenant_of(&req, &state)?;
    let limit = upload_limit(&state);
    let is_multipart = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    if !is_multipart {
        return Err(ApiError::invalid("upload adapters as multipart/form-data", None).with_code("invalid_content_type"));
    }
    let limits = MultipartLimits::new(&state.settings, limit);
    let parts = read_multipart(&req, payload, &limits, &["name", "config", "weights", "archive", "promote"]).await?;
    let text = |k: &str| parts.iter().find(|p| p.name == k).map(|p| String::from_utf8_lossy(&p.bytes).trim().to_string());
    let name = text("name").ok_or_else(|| ApiError::invalid("multipart part 'name' is required", Some("name")))?;
    crate::adapter_store::validate_name(&name).map_err(|e| ApiError::invalid(e.to_string(), Some("name")).with_code("invalid_name"))?;
    let promote = match text("promote") {
        Some(p) => p != "false",
        None => query.promote.unwrap_or(true),
    };
    let mut parts = parts;
    let mut take = |k: &str| parts.iter().position(|p| p.name == k).map(|i| parts.swap_remove(i).bytes);
    let (config, weights, archive) = (take("config"), take("weights"), take("archive"));
    let (registry, storage, tenants, who, n) = (state.registry.clone(), state.storage.clone(), state.tenants.clone(), tenant.clone(), name.clone());
    let (manifest, pointer) = blocking(move || -> Result<_, ApiError> {
        let files = match (config, weights, archive) {
            (Some(config), Some(weights), None) => PeftFiles { config, weights },
            (None, None, Some(a)) => unpack_peft(&a, limit as u64)?,
            _ => {
                return Err(ApiError::invalid(
                    "send either parts 'config' (adapter_config.json) and 'weights' (adapter_model.safetensors), or part 'archive' (a .tar.gz of a PEFT directory)",
                    Some("weights"),
                ))
            }
        };
        let adding = (files.config.len() + files.weights.len()) as u64;
        tenants.write_as(&who, || {
            storage.within(&who, adding, || -> Result<_, ApiError> { Ok(registry.upload(&who, &n, &files.config, &files.weights, promote)?) })
        })?
    })
    .await?;
    if promote {
        state.metrics.adapter_promotions.with_label_values(&["upload"]).inc();
    }
    let target = format!("{name}@v{}", manifest.version);
    super::audit::record(&state, &req, &tenant, "adapter.uploaded", &target, json!({"promoted": promote, "sha256": manifest.sha256})).await;
    let mut v = manifest_json(&manifest, Some(&pointer));
    v["object"] = json!("adapter.version");
    v["current_version"] = json!(pointer.current);
    v["name"] = json!(name);
    Ok(HttpResponse::Created().json(v))
}

/// `GET /v1/adapters`.
pub async fn list(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let tenant = tenant_of(&req, &state)?;
    let registry = state.registry.clone();
    let infos = blocking(move || registry.list(&tenant)).await?;
    Ok(HttpResponse::Ok().json(json!({"object": "list", "data": infos.iter().map(|i| adapter_json(&state, i)).collect::<Vec<_>>()})))
}

/// An adapter of the caller's (404 for another tenant's, as for a missing one).
async fn info(state: &AppState, tenant: &str, name: &str) -> Result<AdapterInfo, ApiError> {
    let (registry, t, n) = (state.registry.clone(), tenant.to_string(), name.to_string());
    blocking(move || registry.info(&t, &n)).await
}

/// `GET /v1/adapters/{name}`.
pub async fn get(state: web::Data<AppState>, req: HttpRequest, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let info = info(&state, &tenant_of(&req, &state)?, &path).await?;
    Ok(HttpResponse::Ok().json(adapter_json(&state, &info)))
}

/// `GET /v1/adapters/{name}/versions`: each with its status (`ready`;
/// `rejected` by the learner's gate, with the reasons; `released` when a
/// rejected version was promoted by hand).
pub async fn versions(state: web::Data<AppState>, req: HttpRequest, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let tenant = tenant_of(&req, &state)?;
    let (registry, name) = (state.registry.clone(), path.into_inner());
    let (info, pointer) = blocking(move || -> Result<_, ApiError> {
        let info = registry.info(&tenant, &name)?;
        let pointer = registry.pointer(&tenant, &name)?;
        Ok((info, pointer))
    })
    .await?;
    let data: Vec<Value> = info
        .versions
        .iter()
        .map(|m| {
            let mut v = manifest_json(m, Some(&pointer));
            v["current"] = json!(info.current == Some(m.version));
            v
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({"object": "list", "data": data})))
}

fn parse_version(v: &str) -> Result<u32, ApiError> {
    v.trim_start_matches('v').parse().map_err(|_| ApiError::invalid(format!("version {v:?} is not a number like 3 or v3"), Some("version")))
}

/// `POST /v1/adapters/{name}/versions/{v}/promote` (also releases a
/// version the learner's gate rejected: an explicit decision to serve it).
pub async fn promote(state: web::Data<AppState>, req: HttpRequest, path: web::Path<(String, String)>) -> Result<HttpResponse, ApiError> {
    let (name, v) = path.into_inner();
    let tenant = tenant_of(&req, &state)?;
    let (registry, tenants, who, n) = (state.registry.clone(), state.tenants.clone(), tenant.clone(), name.clone());
    let p = blocking(move || -> Result<_, ApiError> {
        // A missing adapter is a 404 whatever version is named.
        registry.info(&who, &n)?;
        let version = parse_version(&v)?;
        Ok(tenants.write_as(&who, || registry.promote(&who, &n, version))??)
    })
    .await?;
    state.metrics.adapter_promotions.with_label_values(&["manual"]).inc();
    let target = format!("{name}@v{}", p.current.unwrap_or_default());
    super::audit::record(&state, &req, &tenant, "adapter.promoted", &target, json!({"history": p.history})).await;
    Ok(HttpResponse::Ok().json(json!({"object": "adapter", "name": name, "version": p.current, "previous": p.history})))
}

/// `POST /v1/adapters/{name}/rollback`.
pub async fn rollback(state: web::Data<AppState>, req: HttpRequest, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let tenant = tenant_of(&req, &state)?;
    let name = path.into_inner();
    let (registry, tenants, who, n) = (state.registry.clone(), state.tenants.clone(), tenant.clone(), name.clone());
    let p = blocking(move || -> Result<_, ApiError> {
        registry.info(&who, &n)?;
        Ok(tenants.write_as(&who, || registry.rollback(&who, &n))??)
    })
    .await?;
    state.metrics.adapter_rollbacks.inc();
    let target = format!("{name}@v{}", p.current.unwrap_or_default());
    super::audit::record(&state, &req, &tenant, "adapter.rolled_back", &target, json!({"history": p.history})).await;
    Ok(HttpResponse::Ok().json(json!({"object": "adapter", "name": name, "version": p.current, "previous": p.history})))
}

/// `DELETE /v1/adapters/{name}`.
pub async fn delete(state: web::Data<AppState>, req: HttpRequest, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let tenant = tenant_of(&req, &state)?;
    let name = path.into_inner();
    let (registry, records, tenants, who, n) = (state.registry.clone(), state.records.clone(), state.tenants.clone(), tenant.clone(), name.clone());
    blocking(move || -> Result<_, ApiError> {
        registry.info(&who, &n)?;
        tenants.write_as(&who, || -> Result<(), ApiError> {
            registry.delete(&who, &n)?;
            // Its policy goes with it (a later adapter of the same name starts from the server's settings).
            if let Err(e) = records.set_policy(&who, &n, None) {
                tracing::error!(tenant = %who, adapter = %n, "cannot remove a deleted adapter's policy: {e}");
            }
            Ok(())
        })?
    })
    .await?;
    super::audit::record(&state, &req, &tenant, "adapter.deleted", &name, json!({})).await;
    Ok(HttpResponse::Ok().json(json!({"object": "adapter.deleted", "name": name, "deleted": true})))
}

/// `DELETE /v1/adapters/{name}/versions/{v}`: one version that is not
/// current (409 for the current one); it leaves the rollback history.
pub async fn delete_version(state: web::Data<AppState>, req: HttpRequest, path: web::Path<(String, String)>) -> Result<HttpResponse, ApiError> {
    let (name, v) = path.into_inner();
    let tenant = tenant_of(&req, &state)?;
    let (registry, tenants, who, n) = (state.registry.clone(), state.tenants.clone(), tenant.clone(), name.clone());
    let (p, version) = blocking(move || -> Result<_, ApiError> {
        registry.info(&who, &n)?;
        let version = parse_version(&v)?;
        Ok((tenants.write_as(&who, || registry.delete_version(&who, &n, version))??, version))
    })
    .await?;
    super::audit::record(&state, &req, &tenant, "adapter.version_deleted", &format!("{name}@v{version}"), json!({"history": p.history})).await;
    Ok(HttpResponse::Ok().json(json!({"object": "adapter.version.deleted", "name": name, "version": version, "deleted": true, "current_version": p.current})))
}

/// `GET /v1/adapters/{name}/versions/{v}/download`: the PEFT files as .tar.gz.
pub async fn download(state: web::Data<AppState>, req: HttpRequest, path: web::Path<(String, String)>) -> Result<HttpResponse, ApiError> {
    let (name, v) = path.into_inner();
    let version = parse_version(&v)?;
    let (registry, tenant, n) = (state.registry.clone(), tenant_of(&req, &state)?, name.clone());
    let body = blocking(move || -> Result<Vec<u8>, ApiError> {
        let (config, weights) = registry.files(&tenant, &n, version).map_err(|e| match e {
            crate::registry::RegistryError::Store(crate::adapter_store::StoreError::InvalidName(_)) => crate::registry::RegistryError::NotFound(n.clone()),
            other => other,
        })?;
        pack_peft(&n, &config, &weights).map_err(|e| ApiError::internal(format!("cannot pack the adapter: {e}")))
    })
    .await?;
    Ok(HttpResponse::Ok()
        .content_type("application/gzip")
        .insert_header(("Content-Disposition", format!("attachment; filename=\"{name}-v{version}.tar.gz\"")))
        .body(body))
}

/// A version's PEFT files as a .tar.gz of one directory named after the adapter.
fn pack_peft(name: &str, config: &[u8], weights: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    {
        let mut tar = tar::Builder::new(&mut gz);
        for (file, data) in [(CONFIG_FILE, config), (WEIGHTS_FILE, weights)] {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            tar.append_data(&mut header, format!("{name}/{file}"), data)?;
        }
        tar.finish()?;
    }
    gz.finish()
}
