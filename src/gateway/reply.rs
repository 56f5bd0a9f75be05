//! The CloudEvents the gateway makes itself, and the copies of events sent to a request's
//! `reply_to` queue.
//!
//! Made events have no webhook behind them and so no `data.event`: `queued_<response id>`
//! (`response.queued`, when OpenAI accepted a create), `failed_<message_id>`
//! (`request.failed`, when a request is refused) and `reconciled_<response id>` (a terminal
//! event the safety net found). A reply copy carries the exchange copy's properties plus
//! `correlation_id`; a reply queue that does not exist is counted, not retried.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use serde::Serialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{META_CORRELATION_ID, META_REPLY_TO, META_REQUEST_ID};
use crate::broker::{Broker, MAX_SHORT_STRING, Outgoing, PublishError};
use crate::inbox::{HEADER_PROJECT, PERSISTENT, unix_now};
use crate::metrics::{Metrics, label};
use crate::normalize::{CloudEvent, Object};
use crate::publish::CONTENT_TYPE;
use crate::worker::Worker;

/// Where a request asked its events to go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyTo {
    pub queue: String,
    pub correlation_id: Option<String>,
}

/// What a response's metadata says about the gateway request that created it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub request_id: String,
    pub reply: Option<ReplyTo>,
}

impl Origin {
    /// `None` for a response not created through the gateway (no `relay_request_id`).
    /// Values that cannot be an AMQP short string (a queue name, a correlation id) are
    /// ignored: lapin would panic on them.
    pub fn of(response: &Object<'_>) -> Option<Self> {
        let text = |key: &str| {
            let (_, value) = response.metadata.iter().find(|(k, _)| k == key)?;
            (!value.is_empty() && value.len() <= MAX_SHORT_STRING).then(|| value.clone())
        };
        let request_id = text(META_REQUEST_ID)?;
        let reply = text(META_REPLY_TO).map(|queue| ReplyTo { queue, correlation_id: text(META_CORRELATION_ID) });
        Some(Self { request_id, reply })
    }
}

/// The terminal response event types (the ones whose copy goes to `relay_reply_to`).
pub fn is_terminal(event_type: &str) -> bool {
    matches!(event_type, "response.completed" | "response.failed" | "response.cancelled" | "response.incomplete")
}

/// The dedup key both paths claim before publishing a response's terminal event.
pub fn terminal_key(response_id: &str) -> String {
    format!("terminal/{response_id}")
}

/// Sends a copy of an event to the reply queue: through the default exchange, with the
/// exchange copy's `properties` plus `correlation_id`. A queue that does not exist is
/// counted as unroutable and not retried (`Ok(false)`).
pub async fn copy(broker: &Broker, metrics: &Metrics, reply: &ReplyTo, properties: BasicProperties, body: &[u8]) -> Result<bool, PublishError> {
    let properties = match &reply.correlation_id {
        Some(id) => properties.with_correlation_id(id.as_str().into()),
        None => properties,
    };
    let message = Outgoing { exchange: "", routing_key: &reply.queue, body, properties };
    match broker.publish(message, &metrics.publish_confirm_seconds).await {
        Ok(()) => {
            metrics.replies.get_or_create(&label("outcome", "delivered")).inc();
            Ok(true)
        }
        Err(PublishError::Unroutable(_)) => {
            metrics.replies.get_or_create(&label("outcome", "unroutable")).inc();
            tracing::warn!(reply_to = %reply.queue, "the reply queue does not exist; not retried");
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// A CloudEvent the relay made, ready to publish.
#[derive(Debug)]
pub struct Made {
    /// CloudEvent `id`, also the AMQP `message_id` (hashed when longer than a short string).
    pub id: String,
    /// The event type without `com.openai.`: the routing key.
    pub kind: String,
    pub body: Vec<u8>,
}

/// `request.failed`'s `error`: OpenAI's error object when it sent one, else the relay's.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum ErrorData<'a> {
    Api(&'a RawValue),
    Relay {
        #[serde(rename = "type")]
        kind: &'a str,
        message: &'a str,
    },
}

impl Made {
    fn build<D: Serialize>(id: String, kind: &str, subject: Option<&str>, source: &str, data: D) -> Result<Self, serde_json::Error> {
        let time = OffsetDateTime::from_unix_timestamp(unix_now()).ok().and_then(|t| t.format(&Rfc3339).ok()).unwrap_or_default();
        let event = CloudEvent { specversion: "1.0", id: &id, source, kind: format!("com.openai.{kind}"), subject, time, datacontenttype: "application/json", traceparent: None, data };
        let body = serde_json::to_vec(&event)?;
        Ok(Self { id, kind: kind.to_owned(), body })
    }

    /// `response.queued`: OpenAI accepted a create; `data.response` is its answer.
    pub fn queued(source: &str, request_id: &str, response_id: &str, response: &RawValue) -> Result<Self, serde_json::Error> {
        #[derive(Serialize)]
        struct Data<'a> {
            response: &'a RawValue,
            request_id: &'a str,
        }
        Self::build(format!("queued_{response_id}"), "response.queued", Some(response_id), source, Data { response, request_id })
    }

    /// `request.failed`: the request was refused (by OpenAI with `status`, or by the relay
    /// before sending it, without).
    pub fn failed(source: &str, request_id: Option<&str>, status: Option<u16>, error: ErrorData<'_>) -> Result<Self, serde_json::Error> {
        #[derive(Serialize)]
        struct Data<'a> {
            request_id: Option<&'a str>,
            status: Option<u16>,
            error: ErrorData<'a>,
        }
        // A request without a `message_id` still gets a unique event id.
        let id = match request_id {
            Some(id) => format!("failed_{id}"),
            None => format!("failed_{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..)),
        };
        Self::build(id, "request.failed", request_id, source, Data { request_id, status, error })
    }

    /// A terminal event the safety net found: `response.<status>`, with the fetched response
    /// and its `output_text` as the webhook path has them.
    pub fn reconciled(source: &str, response_id: &str, status: &str, response: &Object<'_>) -> Result<Self, serde_json::Error> {
        #[derive(Serialize)]
        struct Data<'a> {
            response: &'a RawValue,
            output_text: &'a Option<String>,
        }
        let data = Data { response: response.raw, output_text: &response.output_text };
        Self::build(format!("reconciled_{response_id}"), &format!("response.{status}"), Some(response_id), source, data)
    }

    /// The properties of both copies (before `correlation_id`): persistent, CloudEvents
    /// content type, `message_id` = the event id, `type` = the routing key, and the project.
    pub fn properties(&self, project: Option<&str>) -> BasicProperties {
        let mut headers = FieldTable::default();
        if let Some(project) = project {
            headers.insert(HEADER_PROJECT.into(), AMQPValue::LongString(project.into()));
        }
        BasicProperties::default()
            .with_delivery_mode(PERSISTENT)
            .with_content_type(CONTENT_TYPE.into())
            .with_message_id(short_id(&self.id).into())
            .with_type(self.kind.as_str().into())
            .with_timestamp(unix_now().unsigned_abs())
            .with_headers(headers)
    }

    /// Publishes to the exchange and to `reply`. `must_route`: an event that neither the
    /// exchange nor the reply queue takes is an error (retried, as on the webhook path);
    /// otherwise the exchange copy is published without `mandatory` and may go nowhere.
    pub async fn publish(&self, worker: &Worker, project: Option<&str>, reply: Option<&ReplyTo>, must_route: bool) -> Result<(), PublishError> {
        let properties = self.properties(project);
        let message = Outgoing { exchange: &worker.topology.exchange, routing_key: &self.kind, body: &self.body, properties: properties.clone() };
        let published = if must_route {
            worker.broker.publish(message, &worker.metrics.publish_confirm_seconds).await
        } else {
            worker.broker.publish_optional(message, &worker.metrics.publish_confirm_seconds).await
        };
        if matches!(published, Err(PublishError::Unroutable(_))) {
            worker.metrics.unroutable.inc();
        }
        routed(&worker.broker, &worker.metrics, published, reply, properties, &self.body, must_route).await
    }
}

/// After the exchange copy's `published` (an unroutable one counted by the caller): sends
/// the reply copy (when it went to the exchange or no queue there takes it) and decides. A reply queue that takes the event is enough
/// for an event no exchange binding wants: a gateway user may read only its reply queues.
pub async fn routed(
    broker: &Broker,
    metrics: &Metrics,
    published: Result<(), PublishError>,
    reply: Option<&ReplyTo>,
    properties: BasicProperties,
    body: &[u8],
    must_route: bool,
) -> Result<(), PublishError> {
    let unroutable = match published {
        Ok(()) => None,
        Err(e @ PublishError::Unroutable(_)) => Some(e),
        Err(e) => return Err(e),
    };
    let replied = match reply {
        Some(reply) => copy(broker, metrics, reply, properties, body).await?,
        None => false,
    };
    match unroutable {
        Some(e) if must_route && !replied => Err(e),
        _ => Ok(()),
    }
}

/// `id` if it fits an AMQP short string, else a prefix and its SHA-256.
fn short_id(id: &str) -> String {
    if id.len() <= MAX_SHORT_STRING {
        return id.to_owned();
    }
    let digest = Sha256::digest(id.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}_{hex}", &id[..id.find('_').unwrap_or(0)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::ObjectKind;

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_owned()).unwrap()
    }

    #[test]
    fn the_origin_comes_from_the_relay_keys_of_the_metadata() {
        let origin = |text: &str| Origin::of(&Object::read(ObjectKind::Response, &raw(text)));
        let response = r#"{"id":"resp_1","metadata":{"relay_request_id":"rq-1","relay_reply_to":"replies","relay_correlation_id":"c-9","mine":"x"}}"#;
        let reply = Some(ReplyTo { queue: "replies".into(), correlation_id: Some("c-9".into()) });
        assert_eq!(origin(response), Some(Origin { request_id: "rq-1".into(), reply }));
        assert_eq!(origin(r#"{"id":"resp_1","metadata":{"relay_request_id":"rq-1"}}"#).unwrap().reply, None);
        assert_eq!(origin(r#"{"id":"resp_1","metadata":{"mine":"x"}}"#), None, "not created through the gateway");
        assert_eq!(origin(r#"{"id":"resp_1","metadata":null}"#), None);
        let long = "q".repeat(300);
        let response = format!(r#"{{"metadata":{{"relay_request_id":"rq","relay_reply_to":"{long}"}}}}"#);
        assert_eq!(origin(&response).unwrap().reply, None, "no queue name lapin would panic on");
    }

    #[test]
    fn made_events_have_the_contracts_ids_and_no_event_field() {
        let queued = Made::queued("openai", "rq-1", "resp_1", &raw(r#"{"id":"resp_1","status":"queued"}"#)).unwrap();
        let body: serde_json::Value = serde_json::from_slice(&queued.body).unwrap();
        assert_eq!(body["id"], "queued_resp_1");
        assert_eq!(body["type"], "com.openai.response.queued");
        assert_eq!(body["subject"], "resp_1");
        assert_eq!(body["data"]["request_id"], "rq-1");
        assert_eq!(body["data"]["response"]["status"], "queued");
        assert!(body["data"].get("event").is_none());
        let failed = Made::failed("openai", None, None, ErrorData::Relay { kind: "invalid_request", message: "no message_id" }).unwrap();
        let body: serde_json::Value = serde_json::from_slice(&failed.body).unwrap();
        assert_eq!(failed.kind, "request.failed");
        assert_eq!(body["data"], serde_json::json!({"request_id": null, "status": null, "error": {"type": "invalid_request", "message": "no message_id"}}));
        assert!(body.get("subject").is_none());
        let long = Made::failed("openai", Some(&"m".repeat(255)), Some(400), ErrorData::Api(&raw(r#"{"message":"bad"}"#))).unwrap();
        let id = long.properties(None).message_id().clone().unwrap();
        assert!(id.as_str().len() <= MAX_SHORT_STRING && id.as_str().starts_with("failed_"), "{id}");
    }
}
