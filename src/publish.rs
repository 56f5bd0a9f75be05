//! Publishing a normalized CloudEvent to the output topic exchange (worker stage 3).
//!
//! Routing key = the OpenAI event type, so consumers bind `response.*` or `#`; events of a
//! named project carry the header `openai-project`. Published
//! persistent and `mandatory`: an event no queue would take comes back as unroutable and
//! the worker retries it instead of losing it.

use std::sync::Arc;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};

use crate::broker::{Broker, Outgoing, PublishError};
use crate::envelope::Envelope;
use crate::gateway::reply::{ReplyTo, routed};
use crate::inbox::{HEADER_PROJECT, HEADER_TRACEPARENT, PERSISTENT};
use crate::metrics::Metrics;
use crate::verify::HEADER_ID;

pub const CONTENT_TYPE: &str = "application/cloudevents+json";

#[derive(Clone)]
pub struct EventPublisher {
    broker: Broker,
    exchange: Arc<str>,
    metrics: Arc<Metrics>,
}

impl EventPublisher {
    pub fn new(broker: Broker, exchange: &str, metrics: Arc<Metrics>) -> Self {
        Self { broker, exchange: exchange.into(), metrics }
    }

    /// Publishes `cloud_event` (the output of `normalize`) and waits for the broker's confirm;
    /// with `reply` (a terminal event of a gateway response), also a copy to the request's
    /// reply queue, which is then enough for an event no exchange binding takes.
    pub async fn publish(
        &self,
        envelope: &Envelope,
        webhook_id: Option<&str>,
        project: Option<&str>,
        traceparent: Option<&str>,
        cloud_event: &[u8],
        reply: Option<&ReplyTo>,
    ) -> Result<(), PublishError> {
        let properties = properties(envelope, webhook_id, project, traceparent);
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
}

/// The properties of an event message (the routing key is `envelope.kind`, the same short
/// string as `type`). Public so that the tests and the fuzz target build exactly what the
/// worker publishes.
pub fn properties(envelope: &Envelope, webhook_id: Option<&str>, project: Option<&str>, traceparent: Option<&str>) -> BasicProperties {
    let mut headers = FieldTable::default();
    // Absent only on a message put into the inbox by hand: no empty header that consumers
    // deduplicating by it would take for one event.
    if let Some(webhook_id) = webhook_id {
        headers.insert(HEADER_ID.into(), AMQPValue::LongString(webhook_id.into()));
    }
    if let Some(project) = project {
        headers.insert(HEADER_PROJECT.into(), AMQPValue::LongString(project.into()));
    }
    if let Some(tp) = traceparent {
        headers.insert(HEADER_TRACEPARENT.into(), AMQPValue::LongString(tp.into()));
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
