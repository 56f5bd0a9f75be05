//! The one place where receiver failures become HTTP answers.
//!
//! Bodies are short JSON (`{"error": "..."}`) and never carry internals such as broker
//! addresses. Each failure is logged here, once, inside the request's span.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::broker::PublishError;
use crate::envelope::EnvelopeError;
use crate::verify::VerifyError;

/// Seconds a sender should wait after a 503; OpenAI keeps its own (longer) schedule anyway.
const RETRY_AFTER_SECS: &str = "5";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error(transparent)]
    NotAnEvent(#[from] EnvelopeError),
    #[error("request body exceeds {0} bytes")]
    TooLarge(usize),
    #[error("request body could not be read: {0}")]
    UnreadableBody(String),
    #[error("request body not received within {0:?}")]
    SlowBody(Duration),
    #[error("no such project")]
    UnknownProject,
    #[error("too many webhook requests in flight")]
    Busy,
    #[error("delivery could not be stored: {0}")]
    Unavailable(#[from] PublishError),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Verify(e) if e.is_unauthorized() => StatusCode::UNAUTHORIZED,
            Self::Verify(_) | Self::NotAnEvent(_) | Self::UnreadableBody(_) => StatusCode::BAD_REQUEST,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::SlowBody(_) => StatusCode::REQUEST_TIMEOUT,
            Self::UnknownProject => StatusCode::NOT_FOUND,
            Self::Busy | Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Label for `relay_deliveries_total{outcome}`.
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::Verify(e) if e.is_unauthorized() => "unauthorized",
            Self::Verify(_) => "malformed",
            Self::NotAnEvent(_) => "not_an_event",
            Self::TooLarge(_) => "too_large",
            Self::UnreadableBody(_) => "unreadable",
            Self::SlowBody(_) => "slow_body",
            Self::UnknownProject => "unknown_project",
            Self::Busy => "busy",
            Self::Unavailable(_) => "unavailable",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            tracing::error!(error.message = %self, "delivery refused; the sender will retry");
        } else {
            tracing::warn!(error.message = %self, status = status.as_u16(), "delivery rejected");
        }
        // Unauthenticated callers learn only that verification failed, not which part.
        let message = match &self {
            Self::Verify(e) if e.is_unauthorized() => "webhook verification failed".to_owned(),
            Self::Unavailable(_) => "event store unavailable, retry later".to_owned(),
            other => other.to_string(),
        };
        let mut response = (status, Json(serde_json::json!({ "error": message }))).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS));
        }
        response
    }
}
