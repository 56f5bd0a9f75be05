//! Turning a verified event and what was fetched for it into the published CloudEvent
//! (worker stage 2). Pure: no IO, so it is tested against files in `fixtures/`.
//!
//! The event envelope and the fetched object are embedded as the exact JSON text received,
//! never re-serialized; only `output_text` is computed.

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde::Deserialize;
use serde_json::value::RawValue;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::envelope::{Envelope, ObjectKind};

/// What the worker learned about the event's object.
#[derive(Debug, Clone, Copy)]
pub enum Enrichment<'a> {
    /// Nothing to fetch for this event type (or a type this version does not know).
    None,
    Object(ObjectKind, &'a RawValue),
    /// The API answered 404.
    Gone { status: u16, message: &'a str },
}

#[derive(Debug, thiserror::Error)]
pub enum NormalizeError {
    #[error("created_at {0} is not a representable time")]
    Time(i64),
    #[error("could not encode the CloudEvent: {0}")]
    Encode(#[from] serde_json::Error),
}

/// The CloudEvents 1.0 structured-mode JSON for one event; with `traceparent`, the
/// distributed-tracing extension attribute of that name, so consumers continue the trace.
pub fn normalize(
    envelope: &Envelope,
    raw_event: &RawValue,
    source: &str,
    enrichment: Enrichment<'_>,
    traceparent: Option<&str>,
) -> Result<Vec<u8>, NormalizeError> {
    let time = OffsetDateTime::from_unix_timestamp(envelope.created_at)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .ok_or(NormalizeError::Time(envelope.created_at))?;
    let event = CloudEvent {
        specversion: "1.0",
        id: &envelope.id,
        source,
        kind: format!("com.openai.{}", envelope.kind),
        subject: envelope.subject(),
        time,
        datacontenttype: "application/json",
        traceparent,
        data: Data { event: raw_event, enrichment },
    };
    Ok(serde_json::to_vec(&event)?)
}

/// The CloudEvents 1.0 structured-mode envelope; `data` is what differs between the events
/// made from webhooks (here) and the ones the gateway makes itself.
#[derive(serde::Serialize)]
pub(crate) struct CloudEvent<'a, D> {
    pub specversion: &'static str,
    pub id: &'a str,
    pub source: &'a str,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<&'a str>,
    pub time: String,
    pub datacontenttype: &'static str,
    /// W3C trace context of the span that made the event (CloudEvents distributed tracing).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<&'a str>,
    pub data: D,
}

struct Data<'a> {
    event: &'a RawValue,
    enrichment: Enrichment<'a>,
}

/// By hand, because the object's key depends on its kind.
impl Serialize for Data<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("event", self.event)?;
        match self.enrichment {
            Enrichment::None => {}
            Enrichment::Object(kind, object) => {
                map.serialize_entry(kind.field(), object)?;
                if kind == ObjectKind::Response {
                    map.serialize_entry("output_text", &output_text(object))?;
                }
            }
            Enrichment::Gone { status, message } => {
                map.serialize_entry("fetch_error", &serde_json::json!({ "status": status, "message": message }))?;
            }
        }
        map.end()
    }
}

/// What the SDKs call `response.output_text`: the `output_text` parts of the message items,
/// concatenated. `None` when there are none (a failed response, or only tool calls).
pub fn output_text(response: &RawValue) -> Option<String> {
    // Only these fields are read; serde skips the rest of a possibly large object.
    #[derive(Deserialize)]
    struct Response {
        #[serde(default)]
        output: Vec<Item>,
    }
    #[derive(Deserialize)]
    struct Item {
        #[serde(rename = "type")]
        kind: String,
        /// Parsed only for message items: other item kinds shape `content` their own way.
        content: Option<Box<RawValue>>,
    }
    #[derive(Deserialize)]
    struct Part {
        #[serde(rename = "type")]
        kind: String,
        text: Option<String>,
    }
    let response: Response = serde_json::from_str(response.get()).ok()?;
    let parts: Vec<String> = response
        .output
        .into_iter()
        .filter(|item| item.kind == "message")
        .filter_map(|item| serde_json::from_str::<Vec<Part>>(item.content?.get()).ok())
        .flatten()
        .filter(|part| part.kind == "output_text")
        .filter_map(|part| part.text)
        .collect();
    (!parts.is_empty()).then(|| parts.concat())
}

/// OpenAI's limits on an object's `metadata`: 16 pairs, keys up to 64 and values up to 512
/// characters.
const METADATA_PAIRS: usize = 16;
const METADATA_KEY_CHARS: usize = 64;
const METADATA_VALUE_CHARS: usize = 512;
/// AMQP header name of a metadata pair: this prefix, then the key.
pub const HEADER_METADATA_PREFIX: &str = "openai-metadata-";
/// A header name is an AMQP short string: lapin panics past 255 bytes.
const HEADER_NAME_BYTES: usize = 255;
/// All metadata headers together. Every header travels in one frame, and a broker with a
/// small `frame_max` closes the whole connection over a larger one, failing every publish
/// on it; within OpenAI's limits, non-ASCII text could reach about 37 KiB.
const METADATA_HEADER_BYTES: usize = 8 * 1024;

/// The string pairs of a fetched object's `metadata`, which the published message carries as
/// headers. Pairs outside OpenAI's limits (a non-string value, an over-long key or value, a
/// 17th pair) are left out rather than trusted, and so are those that would not fit an AMQP
/// header name or the headers' byte budget, in the object's key order.
pub fn metadata(object: &RawValue) -> Vec<(String, String)> {
    #[derive(Deserialize)]
    struct Object {
        #[serde(default)]
        metadata: Option<serde_json::Map<String, serde_json::Value>>,
    }
    let Ok(Object { metadata: Some(metadata) }) = serde_json::from_str(object.get()) else { return Vec::new() };
    let mut budget = METADATA_HEADER_BYTES;
    metadata
        .into_iter()
        .filter_map(|(key, value)| match value {
            serde_json::Value::String(value) => Some((key, value)),
            _ => None,
        })
        .filter(|(key, value)| !key.is_empty() && key.chars().count() <= METADATA_KEY_CHARS && value.chars().count() <= METADATA_VALUE_CHARS)
        .filter(|(key, _)| HEADER_METADATA_PREFIX.len() + key.len() <= HEADER_NAME_BYTES)
        .take(METADATA_PAIRS)
        .filter(|(key, value)| {
            let bytes = HEADER_METADATA_PREFIX.len() + key.len() + value.len();
            let fits = bytes <= budget;
            budget -= if fits { bytes } else { 0 };
            fits
        })
        .collect()
}

#[cfg(test)]
mod tests;
