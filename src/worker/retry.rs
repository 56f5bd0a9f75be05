//! What happens to a delivery that could not be published yet: parked in a delay queue
//! for a growing delay, or, out of attempts or hopeless, moved to the dead-letter queue
//! with headers saying why.
//!
//! Both moves copy the inbox message (body and headers) and wait for the broker's confirm
//! before the worker acks the original, so a crash in between duplicates, never loses.

use std::time::Duration;

use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::types::AMQPValue;

use crate::broker::{Broker, Outgoing, PublishError};
use crate::inbox::{HEADER_ATTEMPTS, PERSISTENT, unix_now};
use crate::metrics::Metrics;
use crate::topology::{MAX_DELAY, delay_queue};

/// Headers on dead letters (and the last error on parked retries).
pub const HEADER_ERROR_STATUS: &str = "x-relay-error-status";
pub const HEADER_ERROR_REASON: &str = "x-relay-error-reason";
pub const HEADER_ERROR_MESSAGE: &str = "x-relay-error-message";
pub const HEADER_DEAD_AT: &str = "x-relay-dead-at";
/// When a parked message is due (Unix milliseconds): what `release` goes by.
pub const HEADER_DUE_AT: &str = "x-relay-due-at";

/// Why a delivery did not make it this time.
#[derive(Debug, Clone)]
pub struct Failure {
    /// HTTP status of the fetch, when there was one.
    pub status: Option<u16>,
    /// Short label: an HTTP status, `timeout`, `unroutable`, `invalid_envelope`, ...
    pub reason: String,
    pub message: String,
    /// Delay the API asked for.
    pub retry_after: Option<Duration>,
}

#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial: Duration,
    pub max: Duration,
}

impl RetryPolicy {
    /// Delay before attempt `attempt + 1`, after `attempt` (1-based) failed: the API's
    /// `Retry-After` when given, else exponential from `initial` with "equal jitter" (half
    /// fixed, half random, so retries of a burst spread out), capped at `max`.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let cap = self.max.min(MAX_DELAY);
        if let Some(asked) = retry_after {
            return asked.min(cap);
        }
        let exponent = attempt.saturating_sub(1).min(30);
        let full = self.initial.saturating_mul(1 << exponent).min(cap);
        full / 2 + full.mul_f64(fastrand::f64() / 2.0)
    }
}

/// Parks `delivery` in the delay queue for `delay` in front of `target` (the queue it came
/// from), recording the attempts used so far.
pub async fn park(
    broker: &Broker,
    target: &str,
    metrics: &Metrics,
    delivery: &Delivery,
    attempts: u32,
    delay: Duration,
    failure: &Failure,
) -> Result<(), PublishError> {
    let properties = with_headers(&delivery.properties, [
        (HEADER_ATTEMPTS, AMQPValue::LongLongInt(attempts.into())),
        (HEADER_ERROR_REASON, AMQPValue::LongString(failure.reason.as_str().into())),
        (HEADER_ERROR_MESSAGE, AMQPValue::LongString(failure.message.as_str().into())),
    ]);
    let properties = delayed(properties, delay);
    let queue = delay_queue(target, delay);
    let message = Outgoing { exchange: "", routing_key: &queue, body: &delivery.data, properties };
    broker.publish(message, &metrics.publish_confirm_seconds).await?;
    metrics.retries.get_or_create(&crate::metrics::label("reason", failure.reason.as_str())).inc();
    Ok(())
}

/// `properties` for a message parked in a delay queue for `delay`: the time it is due, by
/// which the worker releases it (`release`). No TTL: see `release` for why.
pub fn delayed(properties: BasicProperties, delay: Duration) -> BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    let due = unix_millis().saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
    headers.insert(HEADER_DUE_AT.into(), AMQPValue::LongLongInt(due));
    properties.with_headers(headers)
}

pub fn unix_millis() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Moves `delivery` to the dead-letter queue `dead` (`<inbox>.dead`, `<requests>.dead`)
/// with the reason, from where an operator replays it.
pub async fn dead_letter(
    broker: &Broker,
    dead: &str,
    metrics: &Metrics,
    delivery: &Delivery,
    attempts: u32,
    failure: &Failure,
) -> Result<(), PublishError> {
    let properties = with_headers(&delivery.properties, [
        (HEADER_ATTEMPTS, AMQPValue::LongLongInt(attempts.into())),
        (HEADER_ERROR_STATUS, AMQPValue::LongLongInt(failure.status.map_or(0, i64::from))),
        (HEADER_ERROR_REASON, AMQPValue::LongString(failure.reason.as_str().into())),
        (HEADER_ERROR_MESSAGE, AMQPValue::LongString(failure.message.as_str().into())),
        (HEADER_DEAD_AT, AMQPValue::LongLongInt(unix_now())),
    ]);
    let message = Outgoing { exchange: "", routing_key: dead, body: &delivery.data, properties };
    broker.publish(message, &metrics.publish_confirm_seconds).await?;
    metrics.dead_letters.get_or_create(&crate::metrics::label("reason", failure.reason.as_str())).inc();
    Ok(())
}

/// The message's properties (persistent, its id, content type, headers, `reply_to` and
/// `correlation_id`) with
/// `entries` set in its headers. Built afresh so that no old expiration carries over.
pub fn with_headers<const N: usize>(properties: &BasicProperties, entries: [(&str, AMQPValue); N]) -> BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    for (name, value) in entries {
        headers.insert(name.into(), value);
    }
    let mut copy = BasicProperties::default().with_delivery_mode(PERSISTENT).with_headers(headers);
    if let Some(id) = properties.message_id() {
        copy = copy.with_message_id(id.clone());
    }
    if let Some(content_type) = properties.content_type() {
        copy = copy.with_content_type(content_type.clone());
    }
    if let Some(timestamp) = properties.timestamp() {
        copy = copy.with_timestamp(*timestamp);
    }
    // A gateway request's return address travels with its retries and its dead letter.
    if let Some(reply_to) = properties.reply_to() {
        copy = copy.with_reply_to(reply_to.clone());
    }
    if let Some(correlation_id) = properties.correlation_id() {
        copy = copy.with_correlation_id(correlation_id.clone());
    }
    copy
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy { max_attempts: 10, initial: Duration::from_millis(1000), max: Duration::from_secs(60) }
    }

    #[test]
    fn delays_grow_exponentially_with_jitter_and_a_cap() {
        for attempt in 1..=12 {
            let full = Duration::from_millis(1000 * (1 << (attempt - 1))).min(Duration::from_secs(60));
            for _ in 0..50 {
                let d = policy().delay(attempt, None);
                assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d:?} vs {full:?}");
            }
        }
    }

    #[test]
    fn retry_after_is_honoured_up_to_the_cap() {
        assert_eq!(policy().delay(1, Some(Duration::from_secs(7))), Duration::from_secs(7));
        assert_eq!(policy().delay(1, Some(Duration::from_secs(3600))), Duration::from_secs(60));
    }
}
