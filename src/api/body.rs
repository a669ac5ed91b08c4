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
        Err(_) => Err(request_timeout(timeout)),
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
        } else if let Some(field) = unknown_field(&inner.to_string()) {
            let at = match path.rsplit_once('.') {
                Some((parent, _)) if parent != "." && !parent.is_empty() => format!("{parent}.{field}"),
                _ => field.to_string(),
            };
            ApiError::invalid(
                format!("Unrecognized request argument supplied: '{at}' (this server does not honour it; see docs/api.md for the fields it accepts)"),
                Some(&at),
            )
            .with_code("unknown_parameter")
        } else if path == "." {
            ApiError::invalid(format!("Invalid request: {inner}"), None)
        } else {
            ApiError::invalid(format!("Invalid value for '{path}': {inner}"), Some(&path))
        }
    })
}

/// The field named by serde's "unknown field `X`, expected ..." error.
fn unknown_field(message: &str) -> Option<&str> {
    message.strip_prefix("unknown field `")?.split_once('`').map(|(field, _)| field)
}

/// One part of a multipart form.
pub struct Part {
    pub name: String,
    /// The file name the client sent, if any.
    pub filename: Option<String>,
    pub bytes: Vec<u8>,
}

/// What one multipart body may hold.
#[derive(Debug, Clone)]
pub struct MultipartLimits {
    /// Bytes of the whole body, part headers included (413 beyond).
    pub max_bytes: usize,
    /// Parts in all.
    pub max_parts: usize,
    /// Bytes of one part's name, file name and content type together.
    pub max_header_bytes: usize,
    /// The whole body must arrive within this (408 beyond).
    pub timeout: std::time::Duration,
}

impl MultipartLimits {
    /// The server's limits for a body of at most `max_bytes`.
    pub fn new(settings: &crate::config::Settings, max_bytes: usize) -> Self {
        MultipartLimits {
            max_bytes,
            max_parts: settings.limits.max_multipart_parts,
            max_header_bytes: settings.limits.max_multipart_header_bytes,
            timeout: std::time::Duration::from_secs(settings.limits.client_timeout_secs.max(1)),
        }
    }
}

fn request_timeout(secs: u64) -> ApiError {
    ApiError {
        status: actix_web::http::StatusCode::REQUEST_TIMEOUT,
        message: format!("the request body did not arrive within {secs} s"),
        kind: "invalid_request_error",
        param: None,
        code: Some("request_timeout"),
        retry_after: None,
    }
}

/// Reads a multipart body into the parts named in `wanted` (others are
/// read past, never kept), within `limits`: a part count, header bytes per
/// part, total bytes, and one deadline for the whole body. A part named
/// twice is refused.
pub async fn read_multipart(req: &HttpRequest, payload: web::Payload, limits: &MultipartLimits, wanted: &[&str]) -> Result<Vec<Part>, ApiError> {
    read_multipart_from(req.headers(), payload, limits, wanted).await
}

/// [`read_multipart`] over any body stream (the fuzz target's way in).
pub async fn read_multipart_from<S>(
    headers: &actix_web::http::header::HeaderMap,
    body: S,
    limits: &MultipartLimits,
    wanted: &[&str],
) -> Result<Vec<Part>, ApiError>
where
    S: futures_util::Stream<Item = Result<web::Bytes, actix_web::error::PayloadError>> + 'static,
{
    if let Some(len) = headers.get("content-length").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok()) {
        if len > limits.max_bytes {
            return Err(ApiError::too_large(limits.max_bytes));
        }
    }
    let multipart = actix_multipart::Multipart::new(headers, body);
    match tokio::time::timeout(limits.timeout, read_parts(multipart, limits, wanted)).await {
        Ok(result) => result,
        Err(_) => Err(request_timeout(limits.timeout.as_secs())),
    }
}

async fn read_parts(mut payload: actix_multipart::Multipart, limits: &MultipartLimits, wanted: &[&str]) -> Result<Vec<Part>, ApiError> {
    let malformed = |e: actix_multipart::MultipartError| ApiError::invalid(format!("malformed multipart body: {e}"), None);
    let mut parts: Vec<Part> = Vec::new();
    let mut total = 0usize;
    let mut count = 0usize;
    while let Some(field) = payload.next().await {
        let mut field = field.map_err(malformed)?;
        count += 1;
        if count > limits.max_parts {
            return Err(ApiError::invalid(format!("the multipart body has more than {} parts", limits.max_parts), None).with_code("too_many_parts"));
        }
        let name = field.name().unwrap_or("").to_string();
        let filename = field.content_disposition().and_then(|d| d.get_filename()).map(str::to_string);
        let header_bytes = name.len() + filename.as_ref().map_or(0, String::len) + field.content_type().map_or(0, |m| m.as_ref().len());
        if header_bytes > limits.max_header_bytes {
            return Err(ApiError::invalid(
                format!("a multipart part's name, file name and content type take {header_bytes} bytes; at most {} are accepted", limits.max_header_bytes),
                None,
            )
            .with_code("part_header_too_large"));
        }
        total += header_bytes;
        let keep = wanted.contains(&name.as_str());
        if keep && parts.iter().any(|p| p.name == name) {
            return Err(ApiError::invalid(format!("multipart part '{name}' appears more than once"), Some(&name)));
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = field.next().await {
            let chunk = chunk.map_err(malformed)?;
            total += chunk.len();
            if total > limits.max_bytes {
                return Err(ApiError::too_large(limits.max_bytes));
            }
            if keep {
                bytes.extend_from_slice(&chunk);
            }
        }
        if keep {
            parts.push(Part { name, filename, bytes });
        }
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        #[allow(dead_code)]
        a: Option<u32>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        #[allow(dead_code)]
        inner: Option<Inner>,
        #[allow(dead_code)]
        n: Option<u32>,
    }

    #[test]
    fn an_unknown_field_is_refused_naming_it_with_its_path() {
        let e = parse_json::<Outer>(br#"{"n": 1, "frobnicate": true}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("frobnicate"));
        assert_eq!(e.code, Some("unknown_parameter"));
        assert!(e.message.contains("'frobnicate'"), "{}", e.message);
        let e = parse_json::<Outer>(br#"{"inner": {"a": 1, "b": 2}}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("inner.b"), "{}", e.message);
    }

    #[test]
    fn a_wrong_type_names_the_field_and_bad_json_says_so() {
        let e = parse_json::<Outer>(br#"{"n": "x"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("n"));
        let e = parse_json::<Outer>(br#"{"n": "#).unwrap_err();
        assert_eq!(e.code, Some("invalid_json"));
    }
}
