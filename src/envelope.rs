//! The OpenAI event envelope (`{id, type, created_at, data}`) and what each event type points at.
//!
//! The receiver parses it once to refuse bodies that are not events (400); the worker
//! parses it again from the inbox to decide what to fetch. The raw bytes stay the source
//! of truth: they are what was signed and what `data.event` carries downstream.

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::broker::MAX_SHORT_STRING;

/// The fields of an event the relay acts on. Everything else rides along in the raw body.
#[derive(Debug, Deserialize)]
pub struct Envelope {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub created_at: i64,
    /// Optional in OpenAI's SDK types; `"event"` when present.
    object: Option<String>,
    /// Thin: an object id, or for SIP calls a call/session id. An object when present (a
    /// derived struct would also take a JSON array, hence the map).
    #[serde(default, deserialize_with = "object_only")]
    data: Option<Map<String, Value>>,
}

fn object_only<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Map<String, Value>>, D::Error> {
    Map::deserialize(deserializer).map(Some)
}

/// Why a body is not an event envelope.
#[derive(Debug, thiserror::Error)]
#[error("body is not an OpenAI event envelope: {0}")]
pub struct EnvelopeError(#[from] serde_json::Error);

impl Envelope {
    pub fn parse(body: &[u8]) -> Result<Self, EnvelopeError> {
        // serde_json skips the fields we do not read without checking their UTF-8, and a
        // derived struct also accepts a JSON array of its fields: refuse both here, so that
        // what the receiver accepts the worker can always embed.
        let text = std::str::from_utf8(body).map_err(|_| EnvelopeError(serde::de::Error::custom("body is not UTF-8")))?;
        if !text.trim_start().starts_with('{') {
            return Err(EnvelopeError(serde::de::Error::custom("body is not a JSON object")));
        }
        let envelope: Self = serde_json::from_str(text)?;
        // Both become AMQP short strings when the event is published (`message_id`, `type`
        // and the routing key); the worker dead-letters what is refused here.
        for (field, value) in [("id", &envelope.id), ("type", &envelope.kind)] {
            if !(1..=MAX_SHORT_STRING).contains(&value.len()) {
                return Err(EnvelopeError(serde::de::Error::custom(format!("`{field}` must be 1 to {MAX_SHORT_STRING} bytes"))));
            }
        }
        if envelope.created_at < 0 {
            return Err(EnvelopeError(serde::de::Error::custom("negative `created_at`")));
        }
        if envelope.object.as_deref().is_some_and(|o| o != "event") {
            return Err(EnvelopeError(serde::de::Error::custom("`object` is not \"event\"")));
        }
        Ok(envelope)
    }

    /// The id of the object the event is about: the CloudEvent `subject`.
    pub fn subject(&self) -> Option<&str> {
        let data = self.data.as_ref()?;
        ["id", "call_id", "session_id"].iter().find_map(|key| data.get(*key)?.as_str())
    }

    /// An incoming SIP call (`realtime.call.incoming`, and `live.call.incoming`, which names
    /// the same pending call by its session id): it rings until someone accepts it within
    /// seconds and has nothing to fetch, so the receiver publishes it at once instead of
    /// queueing it behind the inbox's backlog.
    pub fn is_incoming_call(&self) -> bool {
        matches!(self.kind.as_str(), "realtime.call.incoming" | "live.call.incoming")
    }

    /// The API object to fetch for this event, if there is one we can fetch by id alone.
    /// `eval.run.*` is absent on purpose: a run is only addressable with its eval id, which
    /// the event does not carry.
    pub fn target(&self) -> Option<Target<'_>> {
        let kind = ObjectKind::for_event(&self.kind)?;
        Some(Target { kind, id: self.data.as_ref()?.get("id")?.as_str()? })
    }
}

/// The kinds of object the worker fetches, named as their field in the CloudEvent's `data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    Response,
    Batch,
    FineTuningJob,
}

impl ObjectKind {
    pub fn for_event(event_type: &str) -> Option<Self> {
        let (prefix, _) = event_type.rsplit_once('.')?;
        match prefix {
            "response" => Some(Self::Response),
            "batch" => Some(Self::Batch),
            "fine_tuning.job" => Some(Self::FineTuningJob),
            _ => None,
        }
    }

    /// The key under which the fetched object sits in the CloudEvent's `data`.
    pub fn field(self) -> &'static str {
        match self {
            Self::Response => "response",
            Self::Batch => "batch",
            Self::FineTuningJob => "fine_tuning_job",
        }
    }

    /// API path below `OPENAI_BASE_URL`.
    pub fn path(self) -> &'static str {
        match self {
            Self::Response => "responses",
            Self::Batch => "batches",
            Self::FineTuningJob => "fine_tuning/jobs",
        }
    }
}

/// An object to fetch: its kind and id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target<'a> {
    pub kind: ObjectKind,
    pub id: &'a str,
}

/// The body as a JSON value that is embedded verbatim, never re-serialized.
pub fn raw(body: &[u8]) -> Result<&RawValue, EnvelopeError> {
    Ok(serde_json::from_slice(body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_fetchable_kind_maps_to_its_endpoint() {
        let cases = [
            ("response.completed", Some("responses")),
            ("response.incomplete", Some("responses")),
            ("batch.expired", Some("batches")),
            ("fine_tuning.job.succeeded", Some("fine_tuning/jobs")),
            ("eval.run.canceled", None),
            ("realtime.call.incoming", None),
            ("something.new", None),
            ("response", None),
        ];
        for (event_type, path) in cases {
            assert_eq!(ObjectKind::for_event(event_type).map(ObjectKind::path), path, "{event_type}");
        }
    }

    #[test]
    fn envelope_without_object_field_parses() {
        let e = Envelope::parse(br#"{"id":"evt_1","type":"batch.completed","created_at":1,"data":{"id":"batch_1"}}"#).unwrap();
        assert_eq!(e.target(), Some(Target { kind: ObjectKind::Batch, id: "batch_1" }));
        assert_eq!(e.subject(), Some("batch_1"));
    }

    #[test]
    fn realtime_call_subject_is_the_call_id() {
        let e = Envelope::parse(br#"{"id":"evt_1","type":"realtime.call.incoming","created_at":1,"data":{"call_id":"rtc_1","sip_headers":[]}}"#).unwrap();
        assert_eq!(e.subject(), Some("rtc_1"));
        assert_eq!(e.target(), None);
    }

    #[test]
    fn only_incoming_calls_skip_the_inbox() {
        let kind = |kind: &str| Envelope::parse(format!(r#"{{"id":"evt_1","type":"{kind}","created_at":1}}"#).as_bytes()).unwrap().is_incoming_call();
        assert!(kind("realtime.call.incoming") && kind("live.call.incoming"));
        for other in ["realtime.call.ended", "response.completed", "eval.run.canceled", "safety_identifier.blocked", "something.new"] {
            assert!(!kind(other), "{other}");
        }
    }

    #[test]
    fn id_and_type_must_fit_an_amqp_short_string() {
        let body = |id: &str, kind: &str| format!(r#"{{"id":"{id}","type":"{kind}","created_at":1}}"#);
        let longest = "e".repeat(MAX_SHORT_STRING);
        assert!(Envelope::parse(body(&longest, &longest).as_bytes()).is_ok());
        // Bytes count, not characters: 128 × "é" is 256 bytes.
        let over = "é".repeat(MAX_SHORT_STRING / 2 + 1);
        for (id, kind, field) in [(over.as_str(), "x", "id"), ("e", over.as_str(), "type")] {
            let err = Envelope::parse(body(id, kind).as_bytes()).unwrap_err().to_string();
            assert!(err.contains(&format!("`{field}` must be 1 to {MAX_SHORT_STRING} bytes")), "{err}");
        }
    }

    #[test]
    fn non_events_are_refused() {
        let bodies: [&[u8]; 11] = [
            b"{\"id\":\"e\",\"type\":\"x\",\"created_at\":1,\"note\":\"caf\xE9\"}",
            br#"["evt_1","response.completed",1,null]"#,
            br#"{"id":"e","type":"x","created_at":-1}"#,
            b"not json",
            b"[]",
            br#"{"id":"evt_1"}"#,
            br#"{"id":"","type":"x","created_at":1}"#,
            br#"{"id":"e","type":"x","created_at":"soon"}"#,
            br#"{"id":"e","type":"x","created_at":1,"data":null}"#,
            br#"{"id":"e","type":"x","created_at":1,"data":["a",null,null]}"#,
            br#"{"id":"e","type":"x","created_at":1,"object":"weird"}"#,
        ];
        for body in bodies {
            assert!(Envelope::parse(body).is_err(), "{}", String::from_utf8_lossy(body));
        }
    }
}
