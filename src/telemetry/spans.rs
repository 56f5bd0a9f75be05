//! The OpenTelemetry side of the delivery spans: span kinds and semantic-convention
//! attributes, and the W3C trace context carried across RabbitMQ in message headers, so that
//! one delivery is one trace from the HTTP request to the published event.
//!
//! Every function here does nothing when no spans are exported ([`super::enabled`]), and the
//! `otel.*` fields of the spans that logs show too are recorded only then, so that logs look
//! the same with and without tracing.

use std::collections::HashMap;

use axum::http::HeaderMap;
use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::Status;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use reqwest::Url;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::enabled;
use crate::inbox::header;

/// A value for an `otel.*` field of a span (`otel.kind`, `otel.name`): made and recorded
/// only when spans are exported.
pub fn otel<T>(value: impl FnOnce() -> T) -> Option<T> {
    enabled().then(value)
}

/// An HTTP request's headers as a source of trace context.
pub struct HttpHeaders<'a>(pub &'a HeaderMap);

impl Extractor for HttpHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key)?.to_str().ok()
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|name| name.as_str()).collect()
    }
}

/// A message's AMQP headers as a source of trace context.
struct AmqpHeaders<'a>(&'a BasicProperties);

impl Extractor for AmqpHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        header(self.0, key)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.headers().as_ref().map(|table| table.inner().keys().map(|key| key.as_str()).collect()).unwrap_or_default()
    }
}

struct AmqpHeadersMut<'a>(&'a mut FieldTable);

impl Injector for AmqpHeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.into(), AMQPValue::LongString(value.into()));
    }
}

/// Makes `span` continue the trace whose context `carrier` holds (a `traceparent` a proxy or
/// a sender set); without one, `span` starts a new trace. Call it before `span` is entered:
/// a span that has started keeps its parent.
pub fn continue_trace(span: &Span, carrier: &dyn Extractor) {
    if enabled() {
        let _ = span.set_parent(TraceContextPropagator::new().extract(carrier));
    }
}

/// Makes `span` (made with `otel.kind = "consumer"`) the processing of `delivery` from
/// `queue`, in the trace of the publish that stored it (its `traceparent` header). Call it
/// before `span` is entered.
pub fn consumer(span: &Span, queue: &str, delivery: &Delivery) {
    if !enabled() {
        return;
    }
    continue_trace(span, &AmqpHeaders(&delivery.properties));
    span.set_attribute("messaging.system", "rabbitmq");
    span.set_attribute("messaging.operation", "process");
    span.set_attribute("messaging.operation.type", "process");
    span.set_attribute("messaging.destination.name", queue.to_owned());
    span.set_attribute("messaging.rabbitmq.destination.routing_key", delivery.routing_key.to_string());
    if let Some(id) = delivery.properties.message_id() {
        span.set_attribute("messaging.message.id", id.to_string());
    }
}

/// The producer span of one publish to `exchange` (`""`: the default exchange, straight to
/// the queue named `routing_key`), a child of the current span; disabled when spans are not
/// exported, so that the caller pays nothing for it.
pub fn producer(exchange: &str, routing_key: &str, message_id: &str) -> Span {
    if !enabled() {
        return Span::none();
    }
    let target = if exchange.is_empty() { routing_key } else { exchange };
    let span = tracing::info_span!("publish", otel.kind = "producer", otel.name = format!("publish {target}"));
    span.set_attribute("messaging.system", "rabbitmq");
    span.set_attribute("messaging.operation", "publish");
    span.set_attribute("messaging.operation.type", "send");
    span.set_attribute("messaging.destination.name", if exchange.is_empty() { "amq.default".to_owned() } else { exchange.to_owned() });
    span.set_attribute("messaging.rabbitmq.destination.routing_key", routing_key.to_owned());
    span.set_attribute("messaging.message.id", message_id.to_owned());
    span
}

/// The client span of one fetch of `object_id` from the OpenAI API, a child of the current
/// span; disabled when spans are not exported: no log line is made within it, and a span
/// costs the JSON log format a serialization of its fields.
pub fn client(object_id: &str) -> Span {
    if !enabled() {
        return Span::none();
    }
    tracing::info_span!("fetch", otel.kind = "client", otel.name = "GET", object_id, status = tracing::field::Empty)
}

/// `properties` with `span`'s trace context in its headers (`traceparent`, and `tracestate`
/// when the trace has one), in place of any copied from elsewhere: whoever consumes the
/// message continues the trace from the publish. Unchanged for a disabled span.
pub fn with_trace_context(span: &Span, properties: BasicProperties) -> BasicProperties {
    if span.is_disabled() {
        return properties;
    }
    let mut headers = properties.headers().clone().unwrap_or_default();
    TraceContextPropagator::new().inject_context(&span.context(), &mut AmqpHeadersMut(&mut headers));
    properties.with_headers(headers)
}

/// The W3C `traceparent` of `span`, for the CloudEvent made inside it; `None` when spans are
/// not exported.
pub fn traceparent(span: &Span) -> Option<String> {
    if !enabled() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.remove("traceparent")
}

/// Records on an HTTP span (`otel.kind` server or client) what was asked and how it was
/// answered: `method`, `url` without its credentials (a client span's `url.full`), and
/// `status` (none when no answer came); a 5xx marks the span failed (a 4xx is the other
/// side's, or for the fetch a deleted object, not a failure of the relay).
pub fn responded(span: &Span, method: &'static str, url: Option<&Url>, status: Option<u16>) {
    if !enabled() {
        return;
    }
    span.set_attribute("http.request.method", method);
    if let Some(url) = url {
        let mut url = url.clone();
        let _ = url.set_username("");
        let _ = url.set_password(None);
        span.set_attribute("url.full", url.to_string());
        if let Some(host) = url.host_str() {
            span.set_attribute("server.address", host.to_owned());
        }
    }
    let Some(status) = status else { return };
    span.set_attribute("http.response.status_code", i64::from(status));
    if status >= 500 {
        span.set_status(Status::error(format!("HTTP {status}")));
    }
}
