//! Gateway stage 3, the safety net: a response created through the gateway whose terminal
//! webhook never arrives (OpenAI's endpoint misconfigured, deliveries disabled, a secret
//! rotated wrong) is still reported.
//!
//! For each created response the relay parks a watch: a small message in
//! `<requests>.watch.delay.<tier>` that the worker releases into `<requests>.watch` after
//! `RELAY_RECONCILE_AFTER_SECS`. When it comes due, the relay claims `terminal/<response id>`
//! in the dedup store (the webhook path claims the same key): already published → the watch
//! ends; else it fetches the response. Terminal → published as `reconciled_<id>` with the
//! same routing and reply as the webhook path; still running → watched again after twice the
//! delay (at most an hour apart) until 24 h have passed, then dead-lettered with the reason.

use std::time::Duration;

use lapin::BasicProperties;
use futures::FutureExt;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable};
use tracing::Span;

use super::reply::{Made, Origin, terminal_key};
use super::request::{is_terminal_status, response_field};
use crate::broker::{Outgoing, PublishError};
use crate::envelope::{ObjectKind, Target};
use crate::fetch::Fetched;
use crate::inbox::{HEADER_PROJECT, PERSISTENT, header, int_header, unix_now};
use crate::metrics::label;
use crate::normalize::Object;
use crate::topology::delay_queue;
use crate::worker::{Disposition, Worker, WorkerProject, claimed, failure, publish_failed};

/// Headers of a watch message.
pub const HEADER_RESPONSE_ID: &str = "x-relay-response-id";
/// When OpenAI accepted the create (Unix seconds).
pub const HEADER_WATCH_SINCE: &str = "x-relay-watch-since";
/// How long this watch waited, in milliseconds (the next one waits twice as long).
pub const HEADER_WATCH_DELAY_MS: &str = "x-relay-watch-delay-ms";

/// Longest pause between two looks at one response.
pub const LONGEST_GAP: Duration = Duration::from_secs(3600);
/// How long a response is watched before its watch is dead-lettered.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(24 * 3600);

/// Parks a watch on `response_id` that comes due after `delay`.
pub async fn watch(worker: &Worker, response_id: &str, project: Option<&str>, since: i64, delay: Duration) -> Result<(), PublishError> {
    let watch = worker.topology.watch().expect("watches are parked only with the gateway on");
    let queue = delay_queue(&watch, delay);
    let delay_ms = delay.as_millis().max(1);
    let mut headers = FieldTable::default();
    headers.insert(HEADER_RESPONSE_ID.into(), AMQPValue::LongString(response_id.into()));
    headers.insert(HEADER_WATCH_SINCE.into(), AMQPValue::LongLongInt(since));
    headers.insert(HEADER_WATCH_DELAY_MS.into(), AMQPValue::LongLongInt(i64::try_from(delay_ms).unwrap_or(i64::MAX)));
    if let Some(project) = project {
        headers.insert(HEADER_PROJECT.into(), AMQPValue::LongString(project.into()));
    }
    let properties = BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_content_type("application/json".into())
        .with_message_id(format!("watch_{response_id}").into())
        .with_headers(headers);
    let properties = crate::worker::retry::delayed(properties, delay);
    let body = serde_json::json!({ "response_id": response_id }).to_string();
    let message = Outgoing { exchange: "", routing_key: &queue, body: body.as_bytes(), properties };
    worker.broker.publish(message, &worker.metrics.publish_confirm_seconds).await
}

/// The pause before the next look, or `None` when the response has been watched long enough.
pub fn next_delay(watched_for: Duration, last: Duration) -> Option<Duration> {
    (watched_for < GIVE_UP_AFTER).then(|| (last * 2).min(LONGEST_GAP))
}

/// Handles a watch that came due.
pub(crate) async fn process(worker: &Worker, delivery: &Delivery, project: Option<String>) -> Disposition {
    let properties = &delivery.properties;
    let Some(response_id) = header(properties, HEADER_RESPONSE_ID).map(str::to_owned) else {
        return Disposition::Dead(failure(None, "invalid_watch", format!("a watch without {HEADER_RESPONSE_ID}"), None));
    };
    Span::current().record("response_id", response_id.as_str());
    let Some(settings) = worker.projects.get(&project) else {
        let message = format!("no API key for project {:?} in this worker", project.as_deref().unwrap_or("default"));
        return Disposition::Retry(failure(None, "unknown_project", message, None));
    };
    let since = int_header(properties, HEADER_WATCH_SINCE).unwrap_or_else(unix_now);
    let last = int_header(properties, HEADER_WATCH_DELAY_MS).map_or(Duration::from_secs(1), |ms| Duration::from_millis(ms.max(1).unsigned_abs()));
    let look = look(worker, settings, &response_id, project.as_deref(), since, last);
    match claimed(worker.dedup.store(), &terminal_key(&response_id), look.boxed(), &worker.metrics).await {
        Disposition::Duplicate => {
            // The webhook path (or an earlier watch) published the terminal event.
            worker.metrics.watches.get_or_create(&label("outcome", "webhook_first")).inc();
            tracing::debug!("terminal event already published; watch ends");
            Disposition::Done
        }
        other => other,
    }
}

/// Fetches the response under the `terminal/<id>` claim: publishes it if it ended, else
/// parks the next watch.
async fn look(worker: &Worker, settings: &WorkerProject, response_id: &str, project: Option<&str>, since: i64, last: Duration) -> Disposition {
    let target = Target { kind: ObjectKind::Response, id: response_id };
    let object = match worker.api.fetch(target, &settings.api_key).await {
        Ok(Fetched::Object(object)) => object,
        Ok(Fetched::Gone { message }) => {
            // Which way it ended cannot be known any more: an operator looks at it.
            worker.metrics.watches.get_or_create(&label("outcome", "gone")).inc();
            return Disposition::Dead(failure(Some(404), "gone", format!("response {response_id} is gone before its end was seen: {message}"), None));
        }
        Err(e) if e.is_retryable() => return Disposition::Retry(failure(e.status(), &e.reason(), e.to_string(), e.retry_after())),
        Err(e) => return Disposition::Dead(failure(e.status(), &e.reason(), e.to_string(), None)),
    };
    let status = response_field(&object, "status").unwrap_or_default();
    if !is_terminal_status(&status) {
        let watched_for = Duration::from_secs(unix_now().saturating_sub(since).max(0).unsigned_abs());
        let Some(next) = next_delay(watched_for, last) else {
            worker.metrics.watches.get_or_create(&label("outcome", "expired")).inc();
            let message = format!("response {response_id} is still {status:?} after {} h of watching", GIVE_UP_AFTER.as_secs() / 3600);
            return Disposition::Dead(failure(None, "watch_expired", message, None));
        };
        return match watch(worker, response_id, project, since, next).await {
            Ok(()) => {
                worker.metrics.watches.get_or_create(&label("outcome", "rewatched")).inc();
                tracing::debug!(%status, next_in = ?next, "response still running; watched again");
                Disposition::Done
            }
            Err(e) => publish_failed(e),
        };
    }
    let response = Object::read(ObjectKind::Response, &object);
    let made = match Made::reconciled(&settings.source, response_id, &status, &response) {
        Ok(made) => made,
        Err(e) => return Disposition::Dead(failure(None, "normalize", e.to_string(), None)),
    };
    let reply = Origin::of(&response).and_then(|origin| origin.reply);
    match made.publish(worker, project, reply.as_ref(), true).await {
        Ok(()) => {
            worker.metrics.watches.get_or_create(&label("outcome", "reconciled")).inc();
            worker.metrics.events_published.get_or_create(&label("enrichment", "reconciled")).inc();
            tracing::warn!(%status, "no terminal webhook was handled for this response; published it from the safety net");
            Disposition::Published
        }
        Err(e) => publish_failed(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watches_double_up_to_an_hour_and_stop_after_a_day() {
        let min = |m: u64| Duration::from_secs(60 * m);
        assert_eq!(next_delay(min(5), min(5)), Some(min(10)));
        assert_eq!(next_delay(min(300), min(40)), Some(min(60)), "at most an hour apart");
        assert_eq!(next_delay(min(23 * 60), min(60)), Some(min(60)));
        assert_eq!(next_delay(min(24 * 60), min(60)), None, "24 h watched: dead-lettered");
    }
}
