//! One mapping from every failure a request can meet to an HTTP status and
//! OpenAI's error JSON (`{"error": {"message", "type", "param", "code"}}`).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tl_engine::EngineError;

/// An error answered to a client.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds, for 429 and 503 answers.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 400 about one request field.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        let mut e = Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            message.into(),
        );
        e.param = Some(param.into());
        e
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "missing or invalid API key (send 'Authorization: Bearer KEY')",
        )
        .with_code("invalid_api_key")
    }

    pub fn loading() -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the model is still loading",
        )
        .with_code("model_loading");
        e.retry_after = Some(1);
        e
    }

    pub fn unknown_model(asked: &str, served: &str) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("the model '{asked}' does not exist; this server serves '{served}'"),
        )
        .with_code("model_not_found");
        e.param = Some("model".into());
        e
    }

    pub fn timeout(secs: f64) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout_error",
            format!("the request did not finish within the server's limit of {secs} s"),
        )
        .with_code("timeout")
    }

    /// The JSON body, also sent as an SSE event when a stream fails.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let message = e.to_string();
        if e.is_invalid_request() {
            let mut a = ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message);
            a.param = e.param().map(str::to_string);
            if matches!(e, EngineError::TooLong { .. }) {
                a.code = Some("context_length_exceeded");
            }
            return a;
        }
        match e {
            EngineError::QueueFull { .. } => {
                let mut a =
                    ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
                        .with_code("queue_full");
                a.retry_after = Some(1);
                a
            }
            EngineError::ShuttingDown => {
                let mut a = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
                    .with_code("shutting_down");
                a.retry_after = Some(5);
                a
            }
            // Another replica can serve it: 503, as a router expects of a
            // replica that is going away.
            EngineError::DeviceLost(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
                    .with_code("device_lost")
            }
            _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}
