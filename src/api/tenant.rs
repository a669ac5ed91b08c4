//! Which tenant a request acts as. The server runs open (no admin key
//! configured) as the single tenant `default`; keys come with the auth layer.

use actix_web::HttpRequest;

use super::error::ApiError;

/// The tenant of an open server.
pub const DEFAULT_TENANT: &str = "default";

/// The tenant a request acts as.
pub fn tenant_of(_req: &HttpRequest) -> Result<String, ApiError> {
    Ok(DEFAULT_TENANT.to_string())
}
