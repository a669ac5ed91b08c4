//! The one place library errors become HTTP: OpenAI's error object
//! `{"error": {"message", "type", "param", "code"}}` with the right status.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

use crate::engine::EngineError;
use crate::model::ModelError;

/// An error answered to a client.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds a client should wait before retrying (429 and 503; 1 when unset).
    pub retry_after: Option<u64>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorObject<'a>,
}

#[derive(Serialize)]
struct ErrorObject<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    /// 400 for a request the client must fix.
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None, retry_after: None,
        }
    }

    /// Sets the machine-readable code.
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// 404 for a model (or adapter) the caller cannot see.
    pub fn model_not_found(model: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist or you do not have access to it."),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"), retry_after: None,
        }
    }

    /// 404 for an unknown route.
    pub fn route_not_found(path: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("Unknown request URL: {path}. Please check the URL and method."),
            kind: "invalid_request_error",
            param: None,
            code: Some("unknown_url"), retry_after: None,
        }
    }

    /// 413 for a body over the limit.
    pub fn too_large(limit: usize) -> Self {
        ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!("Request body is larger than the limit of {limit} bytes."),
            kind: "invalid_request_error",
            param: None,
            code: Some("request_too_large"), retry_after: None,
        }
    }

    /// 500 for a failure on our side.
    pub fn internal(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None, retry_after: None,
        }
    }

    /// 429 for a quota or limit a client reached (not a fault in its request).
    pub fn limit(message: impl Into<String>, code: &'static str) -> Self {
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: message.into(),
            kind: "rate_limit_error",
            param: None,
            code: Some(code),
            retry_after: None,
        }
    }

    /// 409 for a request that conflicts with the current state.
    pub fn conflict(message: impl Into<String>, code: &'static str) -> Self {
        ApiError { status: StatusCode::CONFLICT, message: message.into(), kind: "invalid_request_error", param: None, code: Some(code), retry_after: None }
    }

    /// The JSON body of this error (also used inside SSE streams).
    pub fn body(&self) -> serde_json::Value {
        let message = without_backtrace(&self.message);
        serde_json::to_value(ErrorBody {
            error: ErrorObject {
                message: &message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        })
        .unwrap_or_default()
    }
}

/// The message without a captured backtrace: library errors (candle's,
/// with `RUST_BACKTRACE` set) carry one after their first line, and a
/// client never needs our stack.
fn without_backtrace(message: &str) -> std::borrow::Cow<'_, str> {
    let frame = |line: &str| {
        let t = line.trim_start();
        t.starts_with("stack backtrace:")
            || t.starts_with("Stack backtrace:")
            || t.starts_with("at ") && line.starts_with(' ')
            || t.split_once(": ").is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) && line.starts_with(' '))
    };
    match message.lines().position(frame) {
        None => std::borrow::Cow::Borrowed(message),
        Some(at) => {
            let kept: Vec<&str> = message.lines().take(at).collect();
            std::borrow::Cow::Owned(kept.join("\n").trim_end().to_string())
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut r = HttpResponse::build(self.status);
        if self.status == StatusCode::TOO_MANY_REQUESTS
            || self.status == StatusCode::SERVICE_UNAVAILABLE
        {
            r.insert_header(("Retry-After", self.retry_after.unwrap_or(1).max(1).to_string()));
        }
        r.json(self.body())
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::QueueFull { .. } => ApiError::limit(e.to_string(), "queue_full"),
            EngineError::TenantQueueFull { .. } => ApiError::limit(e.to_string(), "tenant_queue_full"),
            EngineError::Stopped | EngineError::Start(_) => ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: e.to_string(),
                kind: "server_error",
                param: None,
                code: Some("engine_unavailable"), retry_after: None,
            },
        }
    }
}

impl From<crate::registry::RegistryError> for ApiError {
    fn from(e: crate::registry::RegistryError) -> Self {
        use crate::adapter_store::StoreError;
        use crate::registry::RegistryError as R;
        match e {
            R::NotFound(name) => ApiError {
                status: StatusCode::NOT_FOUND,
                message: format!("The adapter `{name}` does not exist or you do not have access to it."),
                kind: "invalid_request_error",
                param: Some("name".into()),
                code: Some("adapter_not_found"), retry_after: None,
            },
            R::BadReference(_) => ApiError::invalid(e.to_string(), Some("model")),
            R::Rejected { .. } => ApiError { param: Some("model".into()), ..ApiError::conflict(e.to_string(), "adapter_version_rejected") },
            R::TooManyVersions { .. } => ApiError::limit(e.to_string(), "version_limit_reached"),
            R::Lora(l) => ApiError::invalid(format!("adapter refused: {l}"), Some("weights")).with_code("invalid_adapter"),
            R::Store(StoreError::InvalidName(_)) => ApiError::invalid(e.to_string(), Some("name")).with_code("invalid_name"),
            R::Store(StoreError::NotFound(_)) | R::Store(StoreError::VersionNotFound { .. }) => ApiError {
                status: StatusCode::NOT_FOUND,
                message: e.to_string(),
                kind: "invalid_request_error",
                param: None,
                code: Some("adapter_not_found"), retry_after: None,
            },
            R::Store(StoreError::VersionIsCurrent { .. }) => ApiError::conflict(e.to_string(), "version_is_current"),
            R::Store(StoreError::NoPrevious { .. }) => ApiError {
                status: StatusCode::CONFLICT,
                message: e.to_string(),
                kind: "invalid_request_error",
                param: None,
                code: Some("no_previous_version"), retry_after: None,
            },
            R::Store(_) => ApiError::internal(e.to_string()),
        }
    }
}

impl From<ModelError> for ApiError {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::Tokenizer(_) | ModelError::Template(_) => {
                ApiError::invalid(e.to_string(), None)
            }
            other => ApiError::internal(other.to_string()),
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        match e {
            crate::store::StoreError::NotFound(what) => ApiError {
                status: StatusCode::NOT_FOUND,
                message: format!("{what} does not exist or you do not have access to it"),
                kind: "invalid_request_error",
                param: None,
                code: Some("not_found"), retry_after: None,
            },
            crate::store::StoreError::Limit { .. } => ApiError::limit(e.to_string(), "limit_reached"),
            other => ApiError::internal(other.to_string()),
        }
    }
}

impl From<crate::storage_quota::StorageError> for ApiError {
    fn from(e: crate::storage_quota::StorageError) -> Self {
        use crate::storage_quota::StorageError as S;
        match e {
            S::Exceeded { .. } => ApiError { status: StatusCode::PAYLOAD_TOO_LARGE, ..ApiError::limit(e.to_string(), "storage_quota_exceeded") },
            S::Records(r) => r.into(),
            S::Adapters(a) => a.into(),
        }
    }
}

impl From<crate::tenants::TenantError> for ApiError {
    fn from(e: crate::tenants::TenantError) -> Self {
        use crate::tenants::TenantError as T;
        match e {
            T::Name(_) => ApiError::invalid(e.to_string(), Some("name")).with_code("invalid_name"),
            T::Exists(_) => ApiError { param: Some("name".into()), ..ApiError::conflict(e.to_string(), "tenant_exists") },
            T::BeingDeleted(_) => ApiError { param: Some("name".into()), retry_after: Some(1), ..ApiError::conflict(e.to_string(), "tenant_being_deleted") },
            T::NotFound(_) => ApiError {
                status: StatusCode::NOT_FOUND,
                message: e.to_string(),
                kind: "invalid_request_error",
                param: Some("name".into()),
                code: Some("tenant_not_found"),
                retry_after: None,
            },
            T::Gone(_) => ApiError {
                status: StatusCode::UNAUTHORIZED,
                message: format!("{e}; its key no longer works"),
                kind: "invalid_request_error",
                param: None,
                code: Some("invalid_api_key"),
                retry_after: None,
            },
            T::Io { .. } => ApiError::internal(e.to_string()),
        }
    }
}

impl From<crate::learner::worker::QueueError> for ApiError {
    fn from(e: crate::learner::worker::QueueError) -> Self {
        use crate::learner::worker::QueueError as Q;
        match e {
            Q::Full(_) => ApiError { retry_after: Some(5), ..ApiError::limit(e.to_string(), "too_many_queued_jobs") },
            Q::Store(s) => s.into(),
            Q::Tenant(t) => t.into(),
            Q::Stopped => ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: e.to_string(),
                kind: "server_error",
                param: None,
                code: Some("shutting_down"),
                retry_after: Some(1),
            },
        }
    }
}

impl From<crate::lora::archive::ArchiveError> for ApiError {
    fn from(e: crate::lora::archive::ArchiveError) -> Self {
        use crate::lora::archive::ArchiveError as A;
        match e {
            A::TooLarge { limit } => ApiError { message: format!("archive: {e}"), ..ApiError::too_large(limit.min(usize::MAX as u64) as usize) },
            _ => ApiError::invalid(format!("archive: {e}"), Some("archive")).with_code("invalid_archive"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backtrace_never_reaches_the_client() {
        let msg = "adapter refused: shape mismatch in matmul\nStack backtrace:\n   0: candle_core::error::Error::bt\n             at /x/error.rs:264:25\n   1: main";
        let e = ApiError::invalid(msg, None);
        assert_eq!(e.body()["error"]["message"], "adapter refused: shape mismatch in matmul");
        let std_style = "oops\n   0: std::backtrace::Backtrace::create\n   1: lifelora::x";
        assert_eq!(ApiError::internal(std_style).body()["error"]["message"], "oops");
        let plain = "line 3: not valid JSON: expected value at line 1 column 2";
        assert_eq!(ApiError::invalid(plain, None).body()["error"]["message"], plain);
    }
}
