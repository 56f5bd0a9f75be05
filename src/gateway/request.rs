//! Gateway stage 1: a message of `<requests>` becomes one `POST /v1/responses` (or a
//! cancel), once per `message_id`.
//!
//! The body is sent with `background: true`, `store: true` and the `relay_*` metadata keys,
//! so the response itself says where its events go. Transient failures (timeouts,
//! 408/409/429/5xx) are parked and retried like fetches; a request that cannot be sent or
//! that OpenAI refuses goes to `<requests>.dead` with a `request.failed` event.
//!
//! Idempotency: the request is claimed in the dedup store under its `message_id`; OpenAI's
//! answer is recorded there before anything else happens, so a retry (a publish that failed)
//! or a redelivery (with Redis, after a crash) replies without a second POST. The one window
//! left is a crash between OpenAI's answer and that record.

use futures::FutureExt;
use lapin::message::Delivery;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use tracing::Span;

use super::reply::{ErrorData, Made, ReplyTo};
use super::{HEADER_ACTION, META_CORRELATION_ID, META_REPLY_TO, META_REQUEST_ID, reconcile};
use crate::envelope::{ObjectKind, Target};
use crate::fetch::{FetchError, Fetched};
use crate::inbox::{header, unix_now};
use crate::metrics::label;
use crate::worker::{Disposition, Worker, WorkerProject, claimed, failure, publish_failed};

/// OpenAI's metadata limits: 16 pairs, keys ≤ 64 characters, values ≤ 512.
pub const METADATA_MAX_KEYS: usize = 16;
pub const METADATA_MAX_KEY_CHARS: usize = 64;
pub const METADATA_MAX_VALUE_CHARS: usize = 512;

/// What the message's properties say about the request.
struct Request<'a> {
    message_id: Option<&'a str>,
    reply: Option<ReplyTo>,
    project: Option<String>,
}

/// Why a request is not (or no longer) sent.
#[derive(Debug)]
pub struct Refusal {
    /// OpenAI's HTTP status; `None` when the request never reached OpenAI.
    status: Option<u16>,
    /// Short label for metrics and the dead letter's reason header.
    reason: String,
    message: String,
    api_error: Option<Box<RawValue>>,
}

impl Refusal {
    fn relay(reason: &str, message: impl Into<String>) -> Self {
        Self { status: None, reason: reason.to_owned(), message: message.into(), api_error: None }
    }

    fn api(error: FetchError) -> Self {
        let (status, reason, message) = (error.status(), error.reason(), error.to_string());
        let api_error = match error {
            FetchError::Status { api_error, .. } => api_error,
            _ => None,
        };
        Self { status, reason, message, api_error }
    }
}

/// Handles one message of `<requests>`; `attempt` counts from 1.
pub(crate) async fn process(worker: &Worker, delivery: &Delivery, project: Option<String>, attempt: u32) -> Disposition {
    let properties = &delivery.properties;
    let reply = properties.reply_to().as_ref().map(|queue| ReplyTo {
        queue: queue.to_string(),
        correlation_id: properties.correlation_id().as_ref().map(|id| id.to_string()),
    });
    let request = Request { message_id: properties.message_id().as_ref().map(|id| id.as_str()), reply, project };
    let Some(message_id) = request.message_id else {
        return refuse(worker, &request, Refusal::relay("no_message_id", "the request has no message_id property (its idempotency key)")).await;
    };
    let Some(settings) = worker.projects.get(&request.project) else {
        let message = format!("openai-project {:?} is not a project of RELAY_PROJECTS", request.project.as_deref().unwrap_or_default());
        return refuse(worker, &request, Refusal::relay("unknown_project", message)).await;
    };
    let key = format!("request/{}/{message_id}", request.project.as_deref().unwrap_or_default());
    let disposition = match header(properties, HEADER_ACTION).unwrap_or("create") {
        "create" => match prepare(&delivery.data, message_id, request.reply.as_ref()) {
            Ok(body) => claimed(worker.dedup.store(), &key, create(worker, &request, settings, &key, body, attempt).boxed(), &worker.metrics).await,
            Err(refusal) => refuse(worker, &request, refusal).await,
        },
        "cancel" => match cancel_target(&delivery.data) {
            Ok(id) => claimed(worker.dedup.store(), &key, cancel(worker, &request, settings, &id, attempt).boxed(), &worker.metrics).await,
            Err(refusal) => refuse(worker, &request, refusal).await,
        },
        other => refuse(worker, &request, Refusal::relay("unknown_action", format!("openai-action {other:?}: use create or cancel"))).await,
    };
    if matches!(disposition, Disposition::Duplicate) {
        tracing::info!("request already handled: acked without a second POST or reply");
        worker.metrics.gateway_requests.get_or_create(&label("outcome", "duplicate")).inc();
    }
    disposition
}

/// The body to POST: the request's JSON object with `background` and `store` forced on and
/// the relay's keys in `metadata`.
pub fn prepare(body: &[u8], message_id: &str, reply: Option<&ReplyTo>) -> Result<Vec<u8>, Refusal> {
    let mut object: Map<String, Value> = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(object)) => object,
        Ok(_) => return Err(Refusal::relay("invalid_body", "the body is not a JSON object")),
        Err(e) => return Err(Refusal::relay("invalid_body", format!("the body is not JSON: {e}"))),
    };
    if object.get("stream") == Some(&Value::Bool(true)) {
        return Err(Refusal::relay("stream", "stream: true is not supported through the gateway (results come as events)"));
    }
    let mut metadata = match object.remove("metadata") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(metadata)) => metadata,
        Some(_) => return Err(Refusal::relay("invalid_metadata", "metadata is not an object")),
    };
    // Only what this request says: a key the caller set by hand never routes elsewhere.
    metadata.remove(META_REPLY_TO);
    metadata.remove(META_CORRELATION_ID);
    metadata.insert(META_REQUEST_ID.into(), message_id.into());
    if let Some(reply) = reply {
        metadata.insert(META_REPLY_TO.into(), reply.queue.as_str().into());
        if let Some(id) = &reply.correlation_id {
            metadata.insert(META_CORRELATION_ID.into(), id.as_str().into());
        }
    }
    if metadata.len() > METADATA_MAX_KEYS {
        let message = format!("metadata would have {} keys with the relay's own; OpenAI takes {METADATA_MAX_KEYS} at most", metadata.len());
        return Err(Refusal::relay("metadata_full", message));
    }
    for (key, value) in &metadata {
        if key.chars().count() > METADATA_MAX_KEY_CHARS {
            return Err(Refusal::relay("metadata_full", format!("metadata key {key:?} is longer than {METADATA_MAX_KEY_CHARS} characters")));
        }
        if value.as_str().is_some_and(|v| v.chars().count() > METADATA_MAX_VALUE_CHARS) {
            return Err(Refusal::relay("metadata_full", format!("metadata value of {key:?} is longer than {METADATA_MAX_VALUE_CHARS} characters")));
        }
    }
    object.insert("metadata".into(), Value::Object(metadata));
    object.insert("background".into(), Value::Bool(true));
    object.insert("store".into(), Value::Bool(true));
    serde_json::to_vec(&object).map_err(|e| Refusal::relay("invalid_body", e.to_string()))
}

/// Creates the response (or takes the one recorded for this `message_id`), replies
/// `response.queued` and parks the safety net's watch. Runs under the request's claim.
async fn create(worker: &Worker, request: &Request<'_>, settings: &WorkerProject, key: &str, body: Vec<u8>, attempt: u32) -> Disposition {
    let store = worker.dedup.store();
    let recorded = store.recorded(key).await.and_then(|text| RawValue::from_string(text).ok());
    let answer = match recorded {
        Some(answer) => {
            tracing::info!("a response was already created for this message_id; not posting again");
            answer
        }
        None => {
            let posted = worker.api.post(&["responses"], body, &settings.api_key).await;
            count_post(worker, "create", &posted);
            match posted {
                Ok(answer) => {
                    store.record(key, answer.get()).await;
                    answer
                }
                Err(e) => return failed_call(worker, request, e, attempt).await,
            }
        }
    };
    let Some(response_id) = response_field(&answer, "id") else {
        return refuse(worker, request, Refusal::relay("no_response_id", "OpenAI's answer has no response id")).await;
    };
    Span::current().record("response_id", response_id.as_str());
    let message_id = request.message_id.unwrap_or_default();
    let made = match Made::queued(&settings.source, message_id, &response_id, &answer) {
        Ok(made) => made,
        Err(e) => return Disposition::Dead(failure(None, "normalize", e.to_string(), None)),
    };
    if let Err(e) = made.publish(worker, request.project.as_deref(), request.reply.as_ref(), false).await {
        return publish_failed(e);
    }
    if let Some(after) = worker.gateway.and_then(|g| g.reconcile_after)
        && let Err(e) = reconcile::watch(worker, &response_id, request.project.as_deref(), unix_now(), after).await
    {
        return publish_failed(e);
    }
    worker.metrics.gateway_requests.get_or_create(&label("outcome", "created")).inc();
    tracing::info!(%response_id, "response created; response.queued published");
    Disposition::Published
}

/// The response a cancel message names: body `{"response_id": "resp_..."}`.
fn cancel_target(body: &[u8]) -> Result<String, Refusal> {
    #[derive(Deserialize)]
    struct Cancel {
        response_id: String,
    }
    match serde_json::from_slice::<Cancel>(body) {
        Ok(Cancel { response_id }) if !response_id.is_empty() && response_id.len() <= 255 => Ok(response_id),
        _ => Err(Refusal::relay("invalid_body", r#"a cancel's body is {"response_id": "resp_..."}"#)),
    }
}

/// `POST /v1/responses/{id}/cancel`. A response that had already ended is not an error:
/// OpenAI refuses to cancel it, the relay sees that it ended and acks.
async fn cancel(worker: &Worker, request: &Request<'_>, settings: &WorkerProject, response_id: &str, attempt: u32) -> Disposition {
    Span::current().record("response_id", response_id);
    let posted = worker.api.post(&["responses", response_id, "cancel"], Vec::new(), &settings.api_key).await;
    count_post(worker, "cancel", &posted);
    let error = match posted {
        Ok(_) => {
            worker.metrics.gateway_requests.get_or_create(&label("outcome", "cancelled")).inc();
            tracing::info!("cancel accepted; response.cancelled follows by webhook");
            return Disposition::Published;
        }
        Err(error) => error,
    };
    if let FetchError::Status { status: 400 | 409, .. } = error {
        let target = Target { kind: ObjectKind::Response, id: response_id };
        if let Ok(Fetched::Object(object)) = worker.api.fetch(target, &settings.api_key).await
            && response_field(&object, "status").is_some_and(|s| is_terminal_status(&s))
        {
            worker.metrics.gateway_requests.get_or_create(&label("outcome", "cancel_after_end")).inc();
            tracing::info!("the response had already ended; nothing to cancel");
            return Disposition::Published;
        }
    }
    failed_call(worker, request, error, attempt).await
}

/// A transient failure is parked for another attempt while attempts remain; anything else,
/// or the last attempt, refuses the request.
async fn failed_call(worker: &Worker, request: &Request<'_>, error: FetchError, attempt: u32) -> Disposition {
    let transient = match &error {
        FetchError::Timeout | FetchError::Connect(_) | FetchError::Decode(_) => true,
        FetchError::Status { status, .. } => matches!(status, 408 | 409 | 429 | 500..),
        FetchError::TooLarge(_) => false,
    };
    if transient && attempt < worker.policy.max_attempts {
        return Disposition::Retry(failure(error.status(), &error.reason(), error.to_string(), error.retry_after()));
    }
    refuse(worker, request, Refusal::api(error)).await
}

/// Publishes `request.failed` (exchange and `reply_to`), then lets the worker move the
/// message to `<requests>.dead` with the reason.
async fn refuse(worker: &Worker, request: &Request<'_>, refusal: Refusal) -> Disposition {
    let source = worker.projects.get(&request.project).or_else(|| worker.projects.get(&None)).map_or("openai", |p| p.source.as_str());
    let error = match &refusal.api_error {
        Some(raw) => ErrorData::Api(raw),
        None => ErrorData::Relay { kind: if refusal.status.is_some() { "api_error" } else { "invalid_request_error" }, message: &refusal.message },
    };
    let made = match Made::failed(source, request.message_id, refusal.status, error) {
        Ok(made) => made,
        Err(e) => return Disposition::Dead(failure(None, "normalize", e.to_string(), None)),
    };
    if let Err(e) = made.publish(worker, request.project.as_deref(), request.reply.as_ref(), false).await {
        return publish_failed(e);
    }
    worker.metrics.gateway_requests.get_or_create(&label("outcome", "refused")).inc();
    tracing::warn!(reason = %refusal.reason, error.message = %refusal.message, "request refused; request.failed published");
    Disposition::Dead(failure(refusal.status, &refusal.reason, refusal.message, None))
}

fn count_post(worker: &Worker, action: &'static str, result: &Result<Box<RawValue>, FetchError>) {
    let status = match result {
        Ok(_) => "2xx".to_owned(),
        Err(e) => e.reason(),
    };
    worker.metrics.gateway_posts.get_or_create(&vec![("action", action.to_owned()), ("status", status)]).inc();
}

/// A string field of a response object.
pub fn response_field(response: &RawValue, field: &str) -> Option<String> {
    let object: Map<String, Value> = serde_json::from_str(response.get()).ok()?;
    object.get(field)?.as_str().map(str::to_owned)
}

/// `completed`, `failed`, `cancelled` or `incomplete`: the response will not change any more.
pub fn is_terminal_status(status: &str) -> bool {
    matches!(status, "completed" | "failed" | "cancelled" | "incomplete")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prepared(body: &str, reply: Option<&ReplyTo>) -> Result<Value, Refusal> {
        prepare(body.as_bytes(), "rq-1", reply).map(|bytes| serde_json::from_slice(&bytes).unwrap())
    }

    #[test]
    fn background_and_store_are_forced_and_the_relay_keys_added() {
        let reply = ReplyTo { queue: "replies".into(), correlation_id: Some("c-1".into()) };
        let body = prepared(r#"{"model":"gpt-x","input":"hi","background":false,"store":false,"metadata":{"mine":"1"}}"#, Some(&reply)).unwrap();
        assert_eq!(body["background"], true);
        assert_eq!(body["store"], true);
        assert_eq!(body["input"], "hi");
        assert_eq!(body["metadata"], serde_json::json!({"mine": "1", "relay_request_id": "rq-1", "relay_reply_to": "replies", "relay_correlation_id": "c-1"}));
        let body = prepared(r#"{"model":"gpt-x","metadata":{"relay_reply_to":"elsewhere"}}"#, None).unwrap();
        assert_eq!(body["metadata"], serde_json::json!({"relay_request_id": "rq-1"}), "absent reply_to: the key is left out");
    }

    #[test]
    fn requests_that_cannot_be_sent_are_refused_with_a_reason() {
        let full: Map<String, Value> = (0..15).map(|i| (format!("k{i}"), Value::from("v"))).collect();
        let reply = ReplyTo { queue: "replies".into(), correlation_id: None };
        let cases = [
            ("not json".to_owned(), "invalid_body"),
            ("[1]".to_owned(), "invalid_body"),
            (r#"{"model":"m","stream":true}"#.to_owned(), "stream"),
            (r#"{"model":"m","metadata":"x"}"#.to_owned(), "invalid_metadata"),
            (serde_json::json!({"model": "m", "metadata": full}).to_string(), "metadata_full"),
            (serde_json::json!({"model": "m", "metadata": {"k".repeat(65): "v"}}).to_string(), "metadata_full"),
            (serde_json::json!({"model": "m", "metadata": {"k": "v".repeat(513)}}).to_string(), "metadata_full"),
        ];
        for (body, reason) in cases {
            assert_eq!(prepared(&body, Some(&reply)).err().map(|r| r.reason), Some(reason.to_owned()), "{body}");
        }
        let fourteen: Map<String, Value> = (0..14).map(|i| (format!("k{i}"), Value::from("v"))).collect();
        assert!(prepared(&serde_json::json!({"model": "m", "metadata": fourteen}).to_string(), Some(&reply)).is_ok(), "14 + 2 = 16 keys fit");
        assert!(prepared(&serde_json::json!({"model": "m", "metadata": full}).to_string(), None).is_ok(), "15 + 1 = 16 keys fit");
    }
}
