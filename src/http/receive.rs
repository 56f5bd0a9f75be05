//! `POST /webhooks/openai`: read the body, verify, check it is an event, store it in the
//! inbox (an incoming call: publish it to the exchange), then 200.
//!
//! The 200 goes out only after the broker confirmed the stored copy: from then on OpenAI
//! stops retrying, so an acknowledged event must already be durable.

use axum::Json;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tracing::field::Empty;
use tracing::{Instrument, Span};

use std::sync::Arc;
use std::time::Duration;

use super::AppState;
use super::error::ApiError;
use crate::broker::PublishError;
use crate::envelope::{self, Envelope};
use crate::inbox::{HEADER_TRACEPARENT, unix_now};
use crate::metrics::{InFlight, label};
use crate::normalize::{Enrichment, normalize};
use crate::publish::Context;
use crate::telemetry;
use crate::verify::Verified;

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

/// The span is at warn level so that its ids stay on every warning at `RUST_LOG=warn`. It is
/// also the trace's server span, continuing a trace a proxy started (its `traceparent`).
async fn respond(state: &AppState, project: Option<String>, headers: &HeaderMap, body: Body) -> Response {
    let route = if project.is_some() { "POST /webhooks/openai/{project}" } else { "POST /webhooks/openai" };
    let span = tracing::warn_span!("receive", otel.kind = telemetry::otel(|| "server"), otel.name = telemetry::otel(|| route), project = project.as_deref().unwrap_or("default"), webhook_id = Empty, event_id = Empty, event_type = Empty, object_id = Empty);
    telemetry::continue_trace(&span, &telemetry::HttpHeaders(headers));
    let response = answer(state, project, headers, body).instrument(span.clone()).await;
    telemetry::responded(&span, "POST", None, Some(response.status().as_u16()));
    response
}

async fn answer(state: &AppState, project: Option<String>, headers: &HeaderMap, body: Body) -> Response {
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
    let settings = state.projects.get(&project).ok_or(ApiError::UnknownProject)?;
    let verified = settings.verifier.verify(headers, body, unix_now())?;
    let envelope = Envelope::parse(verified.body());
    // In one call: the JSON log format re-serializes a span's fields on every record. The
    // webhook id goes on the span even when the envelope is refused.
    let (span, parsed) = (Span::current(), envelope.as_ref().ok());
    tracing::record_all!(
        span,
        webhook_id = verified.id(),
        event_id = parsed.map(|e| e.id.as_str()),
        event_type = parsed.map(|e| e.kind.as_str()),
        object_id = parsed.and_then(Envelope::subject)
    );
    let envelope = envelope?;

    let traceparent = headers.get(HEADER_TRACEPARENT).and_then(|v| v.to_str().ok());
    let context = Context { webhook_id: Some(verified.id()), project: project.as_deref(), traceparent, metadata: &[] };
    if envelope.is_incoming_call() && publish_call(state, &settings.source, &verified, &envelope, context).await? {
        tracing::info!("incoming call published");
        return Ok(Json(Stored { status: "published", webhook_id: verified.id().to_owned() }));
    }
    state.inbox.store(&verified, project.as_deref(), traceparent).await?;
    // Debug, like the worker's "event published": formatting this line was an eighth of
    // the receiver's CPU; `relay_deliveries_total` counts what it would say.
    tracing::debug!("delivery stored in the inbox");
    Ok(Json(Stored { status: "stored", webhook_id: verified.id().to_owned() }))
}

/// Publishes an incoming call to the exchange at once, as the worker would publish it
/// (nothing to fetch: the event alone), so that no inbox backlog delays a ringing call.
/// `Ok(true)`: published and confirmed; `Ok(false)`: store it in the inbox instead.
///
/// When the exchange does not take it (returned for want of a bound queue, refused by a
/// queue, the channel failed, or it cannot be made into a CloudEvent), the delivery goes to
/// the inbox like any other: the worker then publishes it when it can and dead-letters it
/// with the reason when it cannot, which is visible and replayable in `<inbox>.dead`, where
/// a 503 would only make OpenAI retry for 72 hours with no trace in RabbitMQ; and a
/// consumer briefly without its binding gets the call from the worker's first retry,
/// sooner than from OpenAI's. When the broker itself is unavailable (not connected,
/// blocking publishes, no confirm in time) the inbox on the same broker would fare no
/// better: 503, and OpenAI retries.
async fn publish_call(state: &AppState, source: &str, verified: &Verified, envelope: &Envelope, context: Context<'_>) -> Result<bool, PublishError> {
    let cloud_event = envelope::raw(verified.body()).ok().and_then(|raw| normalize(envelope, raw, source, Enrichment::None, telemetry::traceparent(&Span::current()).as_deref()).ok());
    let Some(cloud_event) = cloud_event else { return Ok(false) };
    match state.publisher.publish(envelope, context, &cloud_event, None).await {
        Ok(()) => {
            state.metrics.events_published.get_or_create(&label("enrichment", "event_only")).inc();
            Ok(true)
        }
        Err(error @ (PublishError::Unroutable(_) | PublishError::Nacked | PublishError::Channel(_))) => {
            tracing::warn!(error.message = %error, "the exchange did not take the incoming call; storing it in the inbox");
            Ok(false)
        }
        Err(error @ (PublishError::NotConnected | PublishError::Timeout(_) | PublishError::Blocked(_))) => Err(error),
    }
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
