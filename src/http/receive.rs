//! `POST /webhooks/openai`: read the body, verify, check it is an event, store it in the
//! inbox, then 200.
//!
//! The 200 goes out only after the broker confirmed the stored copy: from then on OpenAI
//! stops retrying, so an acknowledged event must already be durable.

use axum::Json;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tracing::Span;

use std::sync::Arc;
use std::time::Duration;

use super::AppState;
use super::error::ApiError;
use crate::envelope::Envelope;
use crate::inbox::{HEADER_TRACEPARENT, unix_now};
use crate::metrics::{InFlight, label};

/// `POST /webhooks/openai`: the default project.
pub async fn receive(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    respond(&state, None, &headers, body).await
}

/// `POST /webhooks/openai/{project}`: a project named in `RELAY_PROJECTS`.
pub async fn receive_project(
    State(state): State<Arc<AppState>>,
    Path(project): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    respond(&state, Some(project), &headers, body).await
}

/// The span is at warn level so that its ids stay on every warning at `RUST_LOG=warn`.
#[tracing::instrument(name = "receive", level = "warn", skip_all, fields(project = project.as_deref().unwrap_or("default"), webhook_id, event_id, event_type, object_id))]
async fn respond(state: &AppState, project: Option<String>, headers: &HeaderMap, body: Body) -> Response {
    let result = handle(state, project, headers, body).await;
    let outcome = result.as_ref().map_or_else(ApiError::outcome, |_| "accepted");
    state.metrics.deliveries.get_or_create(&label("outcome", outcome)).inc();
    if let Err(ApiError::Verify(e)) = &result {
        state.metrics.verify_failures.get_or_create(&label("reason", e.reason())).inc();
    }
    result.into_response()
}

async fn handle(
    state: &AppState,
    project: Option<String>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Json<Stored>, ApiError> {
    // Taken before the body is read and held until the answer is ready: bounds the bodies in
    // memory (at most RELAY_MAX_IN_FLIGHT × RELAY_BODY_LIMIT_BYTES, all unauthenticated) as
    // well as the requests waiting on the broker.
    let _permit = state.in_flight.clone().try_acquire_owned().map_err(|_| ApiError::Busy)?;
    let _gauge = InFlight::track(&state.metrics.requests_in_flight);
    let body = read_body(body, state.body_limit, state.body_timeout).await?;

    // A delivery signed for one project verifies only on that project's path.
    let verifier = state.verifiers.get(&project).ok_or(ApiError::UnknownProject)?;
    let verified = verifier.verify(headers, body, unix_now())?;
    let span = Span::current();
    span.record("webhook_id", verified.id());
    let envelope = Envelope::parse(verified.body())?;
    span.record("event_id", envelope.id.as_str());
    span.record("event_type", envelope.kind.as_str());
    if let Some(subject) = envelope.subject() {
        span.record("object_id", subject);
    }

    let traceparent = headers.get(HEADER_TRACEPARENT).and_then(|v| v.to_str().ok());
    state.inbox.store(&verified, project.as_deref(), traceparent).await?;
    tracing::info!("delivery stored in the inbox");
    Ok(Json(Stored { status: "stored", webhook_id: verified.id().to_owned() }))
}

/// Reads the whole body, refusing it once it passes `limit` (at once when its declared length
/// already does), and gives the client `timeout` to send it, so that a slow sender holds its
/// in-flight permit for that long at most.
async fn read_body(body: Body, limit: usize, timeout: Duration) -> Result<Bytes, ApiError> {
    if body.size_hint().lower() > limit as u64 {
        return Err(ApiError::TooLarge(limit));
    }
    let collected = tokio::time::timeout(timeout, Limited::new(body, limit).collect())
        .await
        .map_err(|_| ApiError::SlowBody(timeout))?;
    match collected {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(ApiError::TooLarge(limit)),
        Err(e) => Err(ApiError::UnreadableBody(e.to_string())),
    }
}

/// The 200 body.
#[derive(serde::Serialize)]
pub struct Stored {
    status: &'static str,
    webhook_id: String,
}
