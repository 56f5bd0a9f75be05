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
    Object(&'a Object<'a>),
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
            Enrichment::Object(object) => {
                map.serialize_entry(object.kind.field(), object.raw)?;
                if object.kind == ObjectKind::Response {
                    map.serialize_entry("output_text", &object.output_text)?;
                }
            }
            Enrichment::Gone { status, message } => {
                map.serialize_entry("fetch_error", &serde_json::json!({ "status": status, "message": message }))?;
            }
        }
        map.end()
    }
}

/// A fetched object and the few fields the relay reads from it, found in one pass: the
/// CloudEvent's `output_text`, the `metadata` pairs that become headers, and the gateway's
/// keys in that metadata. Reading them separately parsed the object three times (callgrind of
/// 3 000 events: `serde_json` went from 77 to 45 million instructions with one pass); the
/// object itself is still embedded as received.
#[derive(Debug)]
pub struct Object<'a> {
    pub kind: ObjectKind,
    pub raw: &'a RawValue,
    /// Only for a response: see [`output_text`].
    pub output_text: Option<String>,
    /// Every string pair of `metadata`, sorted by key, unchecked; see
    /// [`metadata_headers`] for the ones a message may carry.
    pub metadata: Vec<(String, String)>,
}

impl<'a> Object<'a> {
    /// Never fails: an object whose `output` or `metadata` has another shape than documented
    /// is still published, without text or headers.
    pub fn read(kind: ObjectKind, raw: &'a RawValue) -> Self {
        // Each field is only delimited here (serde skips the rest of a possibly large object),
        // then parsed on its own, so one of an unexpected shape does not hide the other.
        #[derive(Deserialize, Default)]
        struct Fields<'a> {
            #[serde(borrow)]
            output: Option<&'a RawValue>,
            #[serde(borrow)]
            metadata: Option<&'a RawValue>,
        }
        let fields: Fields = serde_json::from_str(raw.get()).unwrap_or_default();
        let output_text = match (kind, fields.output) {
            (ObjectKind::Response, Some(output)) => output_text(output),
            _ => None,
        };
        let metadata = fields
            .metadata
            .and_then(|metadata| serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(metadata.get()).ok())
            .into_iter()
            .flatten()
            .filter_map(|(key, value)| match value {
                serde_json::Value::String(value) => Some((key, value)),
                _ => None,
            })
            .collect();
        Self { kind, raw, output_text, metadata }
    }
}

/// What the SDKs call `response.output_text`: the `output_text` parts of a response's message
/// items (its `output`), concatenated. `None` when there are none (a failed response, or
/// only tool calls).
fn output_text(output: &RawValue) -> Option<String> {
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
    let output: Vec<Item> = serde_json::from_str(output.get()).ok()?;
    let parts: Vec<String> = output
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

/// The metadata pairs a published message carries as headers. Pairs outside OpenAI's limits
/// (an empty or over-long key, an over-long value, a 17th pair) are left out rather than
/// trusted, and so are those that would not fit an AMQP header name or the headers' byte
/// budget, taken in key order.
pub fn metadata_headers(metadata: &[(String, String)]) -> impl Iterator<Item = &(String, String)> {
    let mut budget = METADATA_HEADER_BYTES;
    metadata
        .iter()
        .filter(|(key, value)| !key.is_empty() && key.chars().count() <= METADATA_KEY_CHARS && value.chars().count() <= METADATA_VALUE_CHARS)
        .filter(|(key, _)| HEADER_METADATA_PREFIX.len() + key.len() <= HEADER_NAME_BYTES)
        .take(METADATA_PAIRS)
        .filter(move |(key, value)| {
            let bytes = HEADER_METADATA_PREFIX.len() + key.len() + value.len();
            let fits = bytes <= budget;
            budget -= if fits { bytes } else { 0 };
            fits
        })
}

#[cfg(test)]
mod tests;
