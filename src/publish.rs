//! Publishing a normalized CloudEvent to the output topic exchange (worker stage 3).
//!
//! Routing key = the OpenAI event type, so consumers bind `response.*` or `#`; events of a
//! named project carry the header `openai-project`, and the fetched object's `metadata`
//! pairs become headers `openai-metadata-<key>`, so that a headers exchange bound to the
//! topic exchange routes by them without parsing bodies; with traces exported, `traceparent`
//! names the publish's span, in the trace of the delivery. Published persistent and
//! `mandatory`: an event no queue would take comes back as unroutable and the worker retries
//! it instead of losing it.

use std::sync::Arc;

use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use tracing::Instrument;

use crate::broker::{Broker, Outgoing, PublishError};
use crate::envelope::Envelope;
use crate::gateway::reply::{ReplyTo, routed};
use crate::inbox::{HEADER_PROJECT, HEADER_TRACEPARENT, PERSISTENT};
use crate::metrics::Metrics;
use crate::normalize::{HEADER_METADATA_PREFIX, metadata_headers};
use crate::telemetry;
use crate::verify::HEADER_ID;

pub const CONTENT_TYPE: &str = "application/cloudevents+json";

#[derive(Clone)]
pub struct EventPublisher {
    broker: Broker,
    exchange: Arc<str>,
    metrics: Arc<Metrics>,
    /// `expiration` of an incoming call's event (`RELAY_REALTIME_EXPIRATION_MS`).
    realtime_expiration: Duration,
}

/// What an event's message carries besides the CloudEvent; all of it optional.
#[derive(Debug, Clone, Copy, Default)]
pub struct Context<'a> {
    /// Absent only on a message put into the inbox by hand.
    pub webhook_id: Option<&'a str>,
    pub project: Option<&'a str>,
    /// The webhook request's, copied; with traces exported, the publish's own span replaces it.
    pub traceparent: Option<&'a str>,
    /// The fetched object's `metadata` pairs ([`crate::normalize::Object`]), which become headers.
    pub metadata: &'a [(String, String)],
}

impl EventPublisher {
    pub fn new(broker: Broker, exchange: &str, metrics: Arc<Metrics>, realtime_expiration: Duration) -> Self {
        Self { broker, exchange: exchange.into(), metrics, realtime_expiration }
    }

    /// Publishes `cloud_event` (the output of `normalize`) and waits for the broker's confirm;
    /// with `reply` (a terminal event of a gateway response), also a copy to the request's
    /// reply queue, which is then enough for an event no exchange binding takes.
    ///
    /// An incoming call's event expires after `realtime_expiration` in every queue, whichever
    /// path it took (the receiver's direct publish or the worker): a call is answered within
    /// seconds or not at all, and a consumer that was down should not pick up a ringing that
    /// ended long ago.
    pub async fn publish(&self, envelope: &Envelope, context: Context<'_>, cloud_event: &[u8], reply: Option<&ReplyTo>) -> Result<(), PublishError> {
        let mut properties = properties(envelope, context);
        if envelope.is_incoming_call() {
            properties = properties.with_expiration(self.realtime_expiration.as_millis().to_string().into());
        }
        let span = telemetry::producer(&self.exchange, &envelope.kind, &envelope.id);
        let properties = telemetry::with_trace_context(&span, properties);
        async {
            let message = Outgoing { exchange: &self.exchange, routing_key: &envelope.kind, body: cloud_event, properties: properties.clone() };
            let result = self.broker.publish(message, &self.metrics.publish_confirm_seconds).await;
            if matches!(result, Err(PublishError::Unroutable(_))) {
                self.metrics.unroutable.inc();
            }
            match reply {
                Some(reply) => routed(&self.broker, &self.metrics, result, Some(reply), properties, cloud_event, true).await,
                None => result,
            }
        }
        .instrument(span)
        .await
    }
}

/// The properties of an event message (the routing key is `envelope.kind`, the same short
/// string as `type`). Public so that the tests and the fuzz target build exactly what the
/// worker publishes.
pub fn properties(envelope: &Envelope, context: Context<'_>) -> BasicProperties {
    let mut headers = FieldTable::default();
    // No empty `webhook-id` when there is none: consumers deduplicating by it would take
    // every such message for one event.
    if let Some(webhook_id) = context.webhook_id {
        headers.insert(HEADER_ID.into(), AMQPValue::LongString(webhook_id.into()));
    }
    if let Some(project) = context.project {
        headers.insert(HEADER_PROJECT.into(), AMQPValue::LongString(project.into()));
    }
    if let Some(tp) = context.traceparent {
        headers.insert(HEADER_TRACEPARENT.into(), AMQPValue::LongString(tp.into()));
    }
    for (key, value) in metadata_headers(context.metadata) {
        headers.insert(format!("{HEADER_METADATA_PREFIX}{key}").into(), AMQPValue::LongString(value.as_str().into()));
    }
    BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_content_type(CONTENT_TYPE.into())
        .with_message_id(envelope.id.as_str().into())
        .with_type(envelope.kind.as_str().into())
        // Never negative: the envelope parser refuses that.
        .with_timestamp(envelope.created_at.unsigned_abs())
        .with_headers(headers)
}
