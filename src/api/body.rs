//! Reading a request body within the size limit and parsing it as JSON,
//! with errors that name the offending field.

use actix_web::{web, HttpRequest};
use futures_util::StreamExt;
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// Reads the whole body, refusing more than `limit` bytes with 413.
pub async fn read_limited(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<web::Bytes, ApiError> {
    if let Some(len) = req
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
    {
        if len > limit {
            return Err(ApiError::too_large(limit));
        }
    }
    // A client that trickles its body holds a worker: it gets this long in all.
    let timeout = req
        .app_data::<web::Data<super::state::AppState>>()
        .map_or(30, |s| s.settings.limits.client_timeout_secs)
        .max(1);
    let read = async {
        let mut body = web::BytesMut::new();
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|e| {
                ApiError::invalid(format!("could not read the request body: {e}"), None)
            })?;
            if body.len() + chunk.len() > limit {
                return Err(ApiError::too_large(limit));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    };
    match tokio::time::timeout(std::time::Duration::from_secs(timeout), read).await {
        Ok(result) => result,
        Err(_) => Err(ApiError {
            status: actix_web::http::StatusCode::REQUEST_TIMEOUT,
            message: format!("the request body did not arrive within {timeout} s"),
            kind: "invalid_request_error",
            param: None,
            code: Some("request_timeout"),
            retry_after: None,
        }),
    }
}

/// Parses JSON into `T`; the error names the field path as `param`.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::invalid(
            "The request body is empty; expected a JSON object.",
            None,
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::invalid(format!("The request body is not valid JSON: {inner}"), None)
                .with_code("invalid_json")
        } else if path == "." {
            ApiError::invalid(format!("Invalid request: {inner}"), None)
        } else {
            ApiError::invalid(format!("Invalid value for '{path}': {inner}"), Some(&path))
        }
    })
}

/// One part of a multipart form.
pub struct Part {
    pub name: String,
    /// The file name the client sent, if any.
    pub filename: Option<String>,
    pub bytes: Vec<u8>,
}

/// Reads a multipart body into its parts, refusing more than `limit` bytes in all.
pub async fn read_multipart(mut payload: actix_multipart::Multipart, limit: usize) -> Result<Vec<Part>, ApiError> {
    use futures_util::StreamExt;
    let mut parts = Vec::new();
    let mut total = 0usize;
    while let Some(field) = payload.next().await {
        let mut field = field.map_err(|e| ApiError::invalid(format!("malformed multipart body: {e}"), None))?;
        let name = field.name().unwrap_or("").to_string();
        let filename = field.content_disposition().and_then(|d| d.get_filename()).map(str::to_string);
        let mut bytes = Vec::new();
        while let Some(chunk) = field.next().await {
            let chunk = chunk.map_err(|e| ApiError::invalid(format!("malformed multipart body: {e}"), None))?;
            total += chunk.len();
            if total > limit {
                return Err(ApiError::too_large(limit));
            }
            bytes.extend_from_slice(&chunk);
        }
        parts.push(Part { name, filename, bytes });
    }
    Ok(parts)
}
