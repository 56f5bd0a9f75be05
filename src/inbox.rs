//! The durable inbox: where a verified delivery is stored before the receiver answers 2xx,
//! and how the worker reads it back.
//!
//! Message format (part of the contract): body = the raw request body bytes; AMQP headers
//! `webhook-id`, `webhook-timestamp`, `webhook-signature`, plus `openai-project` for a named
//! project and `traceparent` (W3C trace context: the request's, or with traces exported the
//! store's span, then with `tracestate` when the trace has one); persistent; `message_id` =
//! `webhook-id`. The worker adds `x-relay-attempts` when it parks a delivery for retry.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::BasicProperties;
use tracing::Instrument;

use crate::broker::{Broker, Outgoing, PublishError};
use crate::metrics::Metrics;
use crate::telemetry;
use crate::verify::{HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP, Verified};

/// W3C trace context, carried from the webhook request into the published event.
pub const HEADER_TRACEPARENT: &str = "traceparent";
/// The project a delivery was received for (absent for the default project).
pub const HEADER_PROJECT: &str = "openai-project";
/// How many fetch attempts a delivery has used so far.
pub const HEADER_ATTEMPTS: &str = "x-relay-attempts";

pub const PERSISTENT: u8 = 2;

#[derive(Clone)]
pub struct Inbox {
    broker: Broker,
    queue: Arc<str>,
    metrics: Arc<Metrics>,
}

impl Inbox {
    pub fn new(broker: Broker, queue: &str, metrics: Arc<Metrics>) -> Self {
        Self { broker, queue: queue.into(), metrics }
    }

    /// Stores a verified delivery; returns once the broker has confirmed it, so the caller
    /// may acknowledge it to OpenAI. When spans are exported, the stored `traceparent` is the
    /// store's own span, which the worker's processing continues.
    pub async fn store(&self, delivery: &Verified, project: Option<&str>, traceparent: Option<&str>) -> Result<(), PublishError> {
        let span = telemetry::producer("", &self.queue, delivery.id());
        let properties = telemetry::with_trace_context(&span, properties(delivery, project, traceparent));
        let message = Outgoing { exchange: "", routing_key: &self.queue, body: delivery.body(), properties };
        self.broker.publish(message, &self.metrics.inbox_store_seconds).instrument(span).await
    }
}

/// The properties of an inbox message (the format above). Public so that the tests and the
/// fuzz target build exactly what the receiver stores.
pub fn properties(delivery: &Verified, project: Option<&str>, traceparent: Option<&str>) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (name, value) in [
        (HEADER_ID, delivery.id()),
        (HEADER_TIMESTAMP, delivery.timestamp()),
        (HEADER_SIGNATURE, delivery.signature()),
    ]
    .into_iter()
    .chain(project.map(|p| (HEADER_PROJECT, p)))
    .chain(traceparent.map(|tp| (HEADER_TRACEPARENT, tp)))
    {
        headers.insert(name.into(), AMQPValue::LongString(value.into()));
    }
    BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_content_type("application/json".into())
        .with_message_id(delivery.id().into())
        .with_timestamp(unix_now() as u64)
        .with_headers(headers)
}

pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// A string header of an inbox message, if present.
pub fn header<'a>(properties: &'a BasicProperties, name: &str) -> Option<&'a str> {
    match properties.headers().as_ref()?.inner().get(&ShortString::from(name))? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

/// An integer header of an inbox message, if present.
pub fn int_header(properties: &BasicProperties, name: &str) -> Option<i64> {
    match properties.headers().as_ref()?.inner().get(&ShortString::from(name))? {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        _ => None,
    }
}
