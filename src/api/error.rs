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

    /// The JSON body of this error (also used inside SSE streams).
    pub fn body(&self) -> serde_json::Value {
        serde_json::to_value(ErrorBody {
            error: ErrorObject {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        })
        .unwrap_or_default()
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
            EngineError::QueueFull { .. } => ApiError {
                status: StatusCode::TOO_MANY_REQUESTS,
                message: e.to_string(),
                kind: "rate_limit_error",
                param: None,
                code: Some("queue_full"), retry_after: None,
            },
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
            R::Lora(l) => ApiError::invalid(format!("adapter refused: {l}"), Some("weights")).with_code("invalid_adapter"),
            R::Store(StoreError::InvalidName(_)) => ApiError::invalid(e.to_string(), Some("name")).with_code("invalid_name"),
            R::Store(StoreError::NotFound(_)) | R::Store(StoreError::VersionNotFound { .. }) => ApiError {
                status: StatusCode::NOT_FOUND,
                message: e.to_string(),
                kind: "invalid_request_error",
                param: None,
                code: Some("adapter_not_found"), retry_after: None,
            },
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
            other => ApiError::internal(other.to_string()),
        }
    }
}
