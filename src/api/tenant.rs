//! Which tenant a request acts as. With no admin key configured the server
//! runs open as the single tenant `default`. Otherwise every /v1 route needs
//! `Authorization: Bearer <key>`: a tenant key acts as that tenant, the
//! admin key as the tenant named by `X-Lifelora-Tenant`.

use actix_web::http::StatusCode;
use actix_web::HttpRequest;

use super::error::ApiError;
use super::state::AppState;
use crate::tenants::{constant_time_eq, TenantRef};

/// The tenant of an open server.
pub const DEFAULT_TENANT: &str = "default";
/// The header the admin names a tenant with.
pub const TENANT_HEADER: &str = "x-lifelora-tenant";

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Admin,
    Tenant(TenantRef),
}

fn unauthorized(message: &str) -> ApiError {
    ApiError {
        status: StatusCode::UNAUTHORIZED,
        message: message.to_string(),
        kind: "invalid_request_error",
        param: None,
        code: Some("invalid_api_key"), retry_after: None,
    }
}

/// 403 for a tenant key on an admin route.
pub fn forbidden() -> ApiError {
    ApiError {
        status: StatusCode::FORBIDDEN,
        message: "This route needs the admin key.".into(),
        kind: "invalid_request_error",
        param: None,
        code: Some("admin_required"), retry_after: None,
    }
}

/// Authenticates the request.
pub fn caller(req: &HttpRequest, state: &AppState) -> Result<Caller, ApiError> {
    let admin_key = &state.settings.auth.admin_key;
    if admin_key.is_empty() {
        return Ok(Caller::Tenant(TenantRef::open(DEFAULT_TENANT)));
    }
    let header = req.headers().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
    let key = header.strip_prefix("Bearer ").map(str::trim).filter(|k| !k.is_empty());
    let Some(key) = key else {
        return Err(unauthorized("You didn't provide an API key. Send `Authorization: Bearer <key>`."));
    };
    if constant_time_eq(key.as_bytes(), admin_key.as_bytes()) {
        return Ok(Caller::Admin);
    }
    match state.tenants.authenticate(key) {
        Some(t) => Ok(Caller::Tenant(t)),
        None => Err(unauthorized("Incorrect API key provided.")),
    }
}

/// The tenant a request acts as (the admin names one with the header).
pub fn tenant_of(req: &HttpRequest, state: &AppState) -> Result<TenantRef, ApiError> {
    tenant_for(req, state, None)
}

/// As [`tenant_of`], where the body may name the tenant too (`tenant`
/// field): the admin acts as it; a tenant key may only name itself.
pub fn tenant_for(req: &HttpRequest, state: &AppState, named: Option<&str>) -> Result<TenantRef, ApiError> {
    let tenant = resolve_tenant(req, state, named)?;
    use actix_web::HttpMessage;
    let mut ext = req.extensions_mut();
    match ext.get_mut::<super::server::RequestLog>() {
        Some(log) => log.tenant = Some(tenant.to_string()),
        None => {
            ext.insert(super::server::RequestLog { tenant: Some(tenant.to_string()), ..Default::default() });
        }
    }
    drop(ext);
    Ok(tenant)
}

fn resolve_tenant(req: &HttpRequest, state: &AppState, named: Option<&str>) -> Result<TenantRef, ApiError> {
    match caller(req, state)? {
        Caller::Tenant(t) => match named {
            Some(n) if n != t.name() => Err(forbidden()),
            _ => Ok(t),
        },
        Caller::Admin => {
            let header = req.headers().get(TENANT_HEADER).and_then(|v| v.to_str().ok()).map(str::trim);
            let name = named.or(header).unwrap_or("");
            if name.is_empty() {
                return Err(ApiError::invalid(
                    "the admin key acts as a tenant named by the X-Lifelora-Tenant header",
                    Some("X-Lifelora-Tenant"),
                ));
            }
            let Some(tenant) = state.tenants.current(name) else {
                return Err(ApiError {
                    status: StatusCode::NOT_FOUND,
                    message: format!("tenant {name:?} not found"),
                    kind: "invalid_request_error",
                    param: Some("X-Lifelora-Tenant".into()),
                    code: Some("tenant_not_found"), retry_after: None,
                });
            };
            Ok(tenant)
        }
    }
}

/// Requires the admin key.
pub fn require_admin(req: &HttpRequest, state: &AppState) -> Result<(), ApiError> {
    if state.settings.auth.admin_key.is_empty() {
        return Err(ApiError::invalid("tenants need auth.admin_key to be set (the server runs open)", None).with_code("auth_disabled"));
    }
    match caller(req, state)? {
        Caller::Admin => Ok(()),
        Caller::Tenant(_) => Err(forbidden()),
    }
}
