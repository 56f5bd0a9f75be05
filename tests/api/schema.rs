//! The relay's output against its published description: `docs/asyncapi.yaml` and the JSON
//! Schemas in `docs/schemas/`. Every kind of event goes through a real relay; each message
//! it publishes must validate against the CloudEvent schema and against exactly one of the
//! document's per-kind messages, its headers against the headers schema, and its AMQP
//! properties must be what the document's `x-amqp-properties` say; for the default project and
//! for a named one. The schemas are also shown to reject broken events, so that they cannot
//! pass by accepting everything, and the document's `$ref`s and examples are checked. The
//! gateway's own events (`response.queued`, `request.failed`, a terminal event from its safety
//! net) are produced by a real relay with the fake OpenAI API and checked the same way.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use jsonschema::{Registry, Validator};
use lapin::message::Delivery;
use lapin::types::AMQPValue;
use openai_webhook_relay::inbox::unix_now;
use openai_webhook_relay::verify::Secret;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::fake_openai::API_KEY;
use crate::helpers::{Options, event, spawn_relay, webhook_id};

const WAIT: Duration = Duration::from_secs(15);

/// Where the documents pretend to live while they are validated: nothing is ever fetched from
/// it (the validators are offline); every schema file is registered under it.
const BASE: &str = "https://openai-webhook-relay.invalid/docs/";

fn docs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn fixture(path: &str) -> String {
    read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(path))
}

/// `docs/asyncapi.yaml` and the schema files, ready to build validators from.
pub struct Docs {
    pub asyncapi: Value,
    /// File name (`cloudevent.schema.json`) to its contents.
    pub schemas: BTreeMap<String, Value>,
    registry: Registry<'static>,
}

impl Docs {
    pub fn load() -> Self {
        let asyncapi: Value = serde_norway::from_str(&read(&docs_dir().join("asyncapi.yaml"))).expect("docs/asyncapi.yaml is YAML");
        let mut schemas = BTreeMap::new();
        for entry in std::fs::read_dir(docs_dir().join("schemas")).expect("docs/schemas/ exists") {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "json") {
                let schema: Value = serde_json::from_str(&read(&path)).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
                schemas.insert(path.file_name().unwrap().to_string_lossy().into_owned(), schema);
            }
        }
        let mut builder = Registry::new();
        for (name, schema) in &schemas {
            builder = builder.add(format!("{BASE}schemas/{name}"), schema.clone()).expect("schema URI is valid");
        }
        let registry = builder.prepare().expect("the schemas and their $refs resolve");
        Self { asyncapi, schemas, registry }
    }

    /// A validator for `reference`, a `$ref` as written in `docs/asyncapi.yaml` (relative to it).
    pub fn validator(&self, reference: &str) -> Validator {
        jsonschema::options()
            .with_registry(&self.registry)
            .with_base_uri(format!("{BASE}asyncapi.yaml"))
            .should_validate_formats(true)
            .offline()
            .build(&json!({ "$ref": reference }))
            .unwrap_or_else(|e| panic!("no validator for {reference}: {e}"))
    }

    /// Follows a local `$ref` (`{"$ref": "#/components/..."}`) within the AsyncAPI document.
    pub fn resolve<'a>(&'a self, value: &'a Value) -> &'a Value {
        match value.get("$ref").and_then(Value::as_str) {
            Some(reference) if reference.starts_with('#') => self
                .asyncapi
                .pointer(&reference[1..])
                .unwrap_or_else(|| panic!("asyncapi.yaml: {reference} points nowhere")),
            _ => value,
        }
    }

    /// The messages of the `events` channel, by name, with their traits merged in.
    pub fn event_messages(&self) -> BTreeMap<String, Value> {
        let messages = self.asyncapi["channels"]["events"]["messages"].as_object().expect("channels.events.messages");
        messages
            .iter()
            .map(|(name, message)| {
                let message = self.resolve(message);
                let mut merged = serde_json::Map::new();
                for t in message["traits"].as_array().into_iter().flatten() {
                    merged.extend(self.resolve(t).as_object().unwrap().clone());
                }
                merged.extend(message.as_object().unwrap().clone());
                (name.clone(), Value::Object(merged))
            })
            .collect()
    }
}

/// The errors `validator` finds in `instance`, one per line (empty when valid).
fn errors(validator: &Validator, instance: &Value) -> String {
    validator
        .iter_errors(instance)
        .map(|e| {
            let message: String = e.to_string().chars().take(300).collect();
            format!("  at {}: {message}\n", e.instance_path())
        })
        .collect()
}

/// An AMQP header table as JSON, the shape the headers schema describes.
fn headers_json(delivery: &Delivery) -> Value {
    let mut map = serde_json::Map::new();
    if let Some(table) = delivery.properties.headers() {
        for (name, value) in table.inner() {
            let value = match value {
                AMQPValue::LongString(s) => Value::String(String::from_utf8_lossy(s.as_bytes()).into_owned()),
                AMQPValue::ShortString(s) => Value::String(s.as_str().to_owned()),
                AMQPValue::LongLongInt(n) => json!(n),
                AMQPValue::LongInt(n) => json!(n),
                AMQPValue::LongUInt(n) => json!(n),
                AMQPValue::ShortInt(n) => json!(n),
                AMQPValue::Boolean(b) => json!(b),
                other => json!({ "unexpected AMQP value": format!("{other:?}") }),
            };
            map.insert(name.as_str().to_owned(), value);
        }
    }
    Value::Object(map)
}

/// Evaluates a runtime expression of the document (`$message.payload#/id`,
/// `$message.header#/webhook-id`); anything else is a literal.
fn expected_value(spec: &Value, payload: &Value, headers: &Value) -> Value {
    let Some(expression) = spec.as_str() else { return spec.clone() };
    let (source, pointer) = match expression.split_once('#') {
        Some(("$message.payload", pointer)) => (payload, pointer),
        Some(("$message.header", pointer)) => (headers, pointer),
        _ => return spec.clone(),
    };
    source.pointer(pointer).cloned().unwrap_or_else(|| panic!("{expression} is absent from the message"))
}

/// What one published message must look like, besides the schemas.
struct Expect<'a> {
    body: &'a str,
    webhook_id: &'a str,
    message: &'a str,
    data_keys: &'a [&'a str],
    traceparent: Option<&'a str>,
    /// The named project it was delivered for (`None`: the default project).
    project: Option<&'a str>,
}

fn check_message(docs: &Docs, messages: &BTreeMap<String, Value>, validators: &BTreeMap<String, (Validator, Validator)>, delivery: &Delivery, expect: &Expect<'_>) {
    let cloud_event: Value = serde_json::from_slice(&delivery.data).expect("the body is JSON");
    let headers = headers_json(delivery);
    let envelope: Value = serde_json::from_str(expect.body).unwrap();
    let kind = envelope["type"].as_str().unwrap();
    let shown = serde_json::to_string_pretty(&cloud_event).unwrap();

    // The CloudEvent schema, and exactly the one per-kind message of the document.
    let root = docs.validator("./schemas/cloudevent.schema.json");
    let found = errors(&root, &cloud_event);
    assert!(found.is_empty(), "{kind}: the published event does not match cloudevent.schema.json:\n{found}{shown}");
    let matching: Vec<&str> = validators.iter().filter(|(_, (payload, _))| payload.is_valid(&cloud_event)).map(|(name, _)| name.as_str()).collect();
    assert_eq!(matching, [expect.message], "{kind}: asyncapi messages whose payload accepts it");
    let (_, headers_validator) = &validators[expect.message];
    let found = errors(headers_validator, &headers);
    assert!(found.is_empty(), "{kind}: headers {headers} do not match the document:\n{found}");

    // The data variant the kind calls for (the schema allows it; this shows it is the one used).
    let data = cloud_event["data"].as_object().unwrap();
    let mut keys: Vec<&str> = data.keys().map(String::as_str).collect();
    keys.sort_unstable();
    let mut want = expect.data_keys.to_vec();
    want.sort_unstable();
    assert_eq!(keys, want, "{kind}: keys of data");

    // What the schema states but cannot check.
    assert_eq!(data["event"], envelope, "{kind}: data.event is the delivered envelope");
    assert_eq!(cloud_event["id"], envelope["id"], "{kind}");
    assert_eq!(cloud_event["type"], format!("com.openai.{kind}"), "{kind}");
    let created_at = envelope["created_at"].as_i64().unwrap();
    let time = OffsetDateTime::from_unix_timestamp(created_at).unwrap().format(&Rfc3339).unwrap();
    assert_eq!(cloud_event["time"], time, "{kind}");
    let object = &envelope["data"];
    let subject = object.get("id").or(object.get("call_id")).or(object.get("session_id"));
    assert_eq!(cloud_event.get("subject"), subject, "{kind}: subject");
    // The project: `openai` and no header for the default one, `openai/<name>` and the header for a named one.
    let source = expect.project.map_or("openai".to_owned(), |name| format!("openai/{name}"));
    assert_eq!(cloud_event["source"], source, "{kind}");
    assert_eq!(headers.get("openai-project").and_then(Value::as_str), expect.project, "{kind}: openai-project header");

    // Headers: exactly the documented ones, with the delivery's values.
    let schema = &docs.schemas["amqp-headers.schema.json"];
    let documented = schema["properties"].as_object().unwrap();
    // Each pattern is a literal prefix anchored with `^` and ending in `.` (one character at least).
    let prefixes: Vec<&str> = schema["patternProperties"].as_object().unwrap().keys().map(|p| p.trim_start_matches('^').trim_end_matches('.')).collect();
    for name in headers.as_object().unwrap().keys() {
        let by_pattern = prefixes.iter().any(|prefix| name.len() > prefix.len() && name.starts_with(prefix));
        assert!(documented.contains_key(name) || by_pattern, "{kind}: header {name} is not documented in amqp-headers.schema.json");
    }
    assert_eq!(headers["webhook-id"], expect.webhook_id, "{kind}");
    assert_eq!(headers.get("traceparent").and_then(Value::as_str), expect.traceparent, "{kind}");

    // AMQP properties: what the document's x-amqp-properties say.
    let properties = messages[expect.message]["x-amqp-properties"].as_object().expect("x-amqp-properties");
    let p = &delivery.properties;
    for (name, spec) in properties {
        let actual = match name.as_str() {
            "delivery_mode" => json!(p.delivery_mode()),
            "content_type" => json!(p.content_type().as_ref().map(|s| s.as_str())),
            "message_id" => json!(p.message_id().as_ref().map(|s| s.as_str())),
            "type" => json!(p.kind().as_ref().map(|s| s.as_str())),
            "timestamp" => json!(p.timestamp()),
            "routing_key" => json!(delivery.routing_key.as_str()),
            "expiration" => json!(p.expiration().as_ref().map(|s| s.as_str())),
            other => panic!("asyncapi.yaml documents an AMQP property this test does not know: {other}"),
        };
        assert_eq!(actual, expected_value(spec, &cloud_event, &headers), "{kind}: AMQP property {name}");
    }
    for name in ["delivery_mode", "content_type", "message_id", "type", "timestamp", "routing_key"] {
        assert!(properties.contains_key(name), "x-amqp-properties of {} lacks {name}", expect.message);
    }
}

#[tokio::test]
async fn every_kind_of_event_is_published_as_documented() {
    let docs = Docs::load();
    let messages = docs.event_messages();
    let validators = validators(&docs, &messages);

    let relay = spawn_relay(Options::default()).await;
    let queue = relay.bind("#").await;
    let response = ["event", "response", "output_text"];
    let fixtures: [(&str, &str, &[&str]); 9] = [
        ("response.completed", "responseEvent", &response),
        ("response.failed", "responseEvent", &response),
        ("response.cancelled", "responseEvent", &response),
        ("response.incomplete", "responseEvent", &response),
        ("batch.completed", "batchEvent", &["event", "batch"]),
        ("fine_tuning.job.succeeded", "fineTuningJobEvent", &["event", "fine_tuning_job"]),
        ("eval.run.succeeded", "evalRunEvent", &["event"]),
        ("realtime.call.incoming", "realtimeCallEvent", &["event"]),
        ("something.new", "otherEvent", &["event"]),
    ];
    let mut cases: Vec<(String, &str, &[&str])> = fixtures.iter().map(|(kind, message, keys)| (fixture(&format!("webhooks/{kind}.json")), *message, *keys)).collect();
    // A response the API no longer has: published with data.fetch_error.
    cases.push((event("response.completed", "resp_missing"), "responseEvent", &["event", "fetch_error"]));

    for (body, message, data_keys) in &cases {
        let id = webhook_id();
        // One delivery carries a trace context, which must come out as a header.
        let traceparent = body.contains("realtime.call.incoming").then_some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        let ts = unix_now();
        let (timestamp, signature) = (ts.to_string(), relay.sign(&id, ts, body));
        let mut headers = vec![("webhook-id", id.as_str()), ("webhook-timestamp", timestamp.as_str()), ("webhook-signature", signature.as_str())];
        if let Some(tp) = traceparent {
            headers.push(("traceparent", tp));
        }
        assert_eq!(relay.post(&headers, body.as_bytes().to_vec()).await.status(), 200);
        let delivery = relay.amqp.next(&queue, WAIT).await.unwrap_or_else(|| panic!("nothing published for {body}"));
        check_message(&docs, &messages, &validators, &delivery, &Expect { body, webhook_id: &id, message, data_keys, traceparent, project: None });
    }
    let gone: Value = serde_json::from_str(&cases.last().unwrap().0).unwrap();
    assert_eq!(relay.openai.requests("resp_missing"), 1, "{gone}");
}

#[tokio::test]
async fn a_named_projects_events_are_published_as_documented() {
    let docs = Docs::load();
    let messages = docs.event_messages();
    let validators = validators(&docs, &messages);
    let secret = format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode([7u8; 32]));
    let mut options = Options::default().arg("--projects", "acme-prod");
    options.env = vec![
        ("OPENAI_WEBHOOK_SECRET_ACME_PROD".into(), secret.clone()),
        ("OPENAI_API_KEY_ACME_PROD".into(), format!("{API_KEY}-acme")),
    ];
    let relay = spawn_relay(options).await;
    let queue = relay.bind("#").await;
    for (kind, message, data_keys) in [
        ("response.completed", "responseEvent", &["event", "response", "output_text"][..]),
        ("batch.completed", "batchEvent", &["event", "batch"][..]),
        ("something.new", "otherEvent", &["event"][..]),
    ] {
        let body = fixture(&format!("webhooks/{kind}.json"));
        let (id, ts) = (webhook_id(), unix_now().to_string());
        let signature = Secret::parse(&secret).unwrap().sign(&id, &ts, body.as_bytes());
        let headers = [("webhook-id", id.as_str()), ("webhook-timestamp", ts.as_str()), ("webhook-signature", signature.as_str())];
        let answer = relay.http.post(format!("{}/webhooks/openai/acme-prod", relay.url)).headers(header_map(&headers)).body(body.clone()).send().await.unwrap();
        assert_eq!(answer.status(), 200, "{kind}");
        let delivery = relay.amqp.next(&queue, WAIT).await.unwrap_or_else(|| panic!("nothing published for {kind}"));
        check_message(&docs, &messages, &validators, &delivery, &Expect { body: &body, webhook_id: &id, message, data_keys, traceparent: None, project: Some("acme-prod") });
    }
}

/// One event the gateway made, as a copy on the exchange or on the request's reply queue:
/// the CloudEvent schema, exactly the document's message `message`, its headers schema,
/// and the AMQP properties of its `x-amqp-properties` (`timestamp` and `correlation_id`,
/// described in words there, are checked for what the words say).
fn check_gateway_message(docs: &Docs, messages: &BTreeMap<String, Value>, validators: &BTreeMap<String, (Validator, Validator)>, delivery: &Delivery, message: &str, reply: bool) -> Value {
    let cloud_event: Value = serde_json::from_slice(&delivery.data).expect("the body is JSON");
    let headers = headers_json(delivery);
    let id = cloud_event["id"].as_str().unwrap_or_default().to_owned();
    let shown = serde_json::to_string_pretty(&cloud_event).unwrap();
    let found = errors(&docs.validator("./schemas/cloudevent.schema.json"), &cloud_event);
    assert!(found.is_empty(), "{id}: the published event does not match cloudevent.schema.json:\n{found}{shown}");
    let matching: Vec<&str> = validators.iter().filter(|(_, (payload, _))| payload.is_valid(&cloud_event)).map(|(name, _)| name.as_str()).collect();
    assert_eq!(matching, [message], "{id}: asyncapi messages whose payload accepts it");
    assert!(cloud_event["data"].get("event").is_none(), "{id}: made by the relay, no data.event");
    // Headers: the gateway's, all documented (no webhook-id: no webhook behind it).
    let found = errors(&docs.validator("./schemas/amqp-headers.schema.json#/$defs/gatewayEvent"), &headers);
    assert!(found.is_empty(), "{id}: headers {headers}:\n{found}");
    let documented = docs.schemas["amqp-headers.schema.json"]["$defs"]["gatewayEvent"]["properties"].as_object().unwrap();
    for name in headers.as_object().unwrap().keys() {
        assert!(documented.contains_key(name), "{id}: header {name} is not documented for gateway events");
    }
    // AMQP properties.
    let p = &delivery.properties;
    let kind = cloud_event["type"].as_str().unwrap().strip_prefix("com.openai.").unwrap().to_owned();
    assert_eq!(p.kind().as_ref().map(|s| s.as_str()), Some(kind.as_str()), "{id}: AMQP type");
    let age = unix_now().abs_diff(i64::try_from(p.timestamp().expect("a timestamp")).unwrap());
    assert!(age < 120, "{id}: timestamp is when the relay published it");
    assert_eq!(p.correlation_id().as_ref().map(|s| s.as_str()), reply.then_some("corr-1"), "{id}: correlation_id on the reply copy only");
    if reply {
        assert_eq!(delivery.exchange.as_str(), "", "{id}: replies go through the default exchange");
    } else {
        assert_eq!(delivery.routing_key.as_str(), kind, "{id}: routing key");
    }
    let properties = messages[message]["x-amqp-properties"].as_object().expect("x-amqp-properties");
    for (name, spec) in properties {
        let actual = match name.as_str() {
            "delivery_mode" => json!(p.delivery_mode()),
            "content_type" => json!(p.content_type().as_ref().map(|s| s.as_str())),
            "message_id" => json!(p.message_id().as_ref().map(|s| s.as_str())),
            "type" => json!(kind),
            "routing_key" if !reply => json!(delivery.routing_key.as_str()),
            // Checked above; for a terminal event from the safety net, `type`, `routing_key`
            // and `timestamp` point into a `data.event` it does not have (its description says so).
            _ => continue,
        };
        let expected = match spec.as_str() {
            Some(expression) if expression.starts_with("$message.") => match cloud_event.pointer(expression.split_once('#').unwrap().1) {
                Some(value) => value.clone(),
                None => continue,
            },
            _ => spec.clone(),
        };
        assert_eq!(actual, expected, "{id}: AMQP property {name}");
    }
    cloud_event
}

/// The gateway's own events, from a real relay and the fake OpenAI API: `response.queued`, a
/// terminal event found by the safety net (`reconciled_...`), `request.failed` from OpenAI
/// (400) and from the relay (no `message_id`), on the exchange and on the reply queue. Each
/// matches the schemas and exactly one document message; the same events, broken, do not.
#[tokio::test]
async fn the_gateways_events_are_published_as_documented() {
    use crate::gateway::{Request, publish, reply_queue, spawn_gateway};
    let docs = Docs::load();
    let messages = docs.event_messages();
    let validators = validators(&docs, &messages);
    let relay = spawn_gateway(Options::default().arg("--reconcile-after-secs", 1)).await;
    let exchange = relay.bind("#").await;
    let replies = reply_queue(&relay).await;
    // "no-webhook": the fake API never sends its webhook, so the safety net publishes its end.
    publish(&relay, Request::create("rq-schema-lost", &replies, json!({"model": "no-webhook", "input": "x"}))).await;
    publish(&relay, Request::create("rq-schema-refused", &replies, json!({"model": "unknown-model", "input": "x"}))).await;
    let mut no_id = Request::create("unused", &replies, json!({"model": "gpt-test"}));
    no_id.message_id = None;
    publish(&relay, no_id).await;

    let mut seen: BTreeMap<String, Value> = BTreeMap::new();
    for (queue, reply) in [(&replies, true), (&exchange, false)] {
        for _ in 0..4 {
            let delivery = relay.amqp.next(queue, WAIT).await.unwrap_or_else(|| panic!("only {} events on {queue}: {seen:?}", seen.len()));
            let id = serde_json::from_slice::<Value>(&delivery.data).unwrap()["id"].as_str().unwrap().to_owned();
            let message = match id.split_once('_').map(|(prefix, _)| prefix) {
                Some("queued") => "responseQueuedEvent",
                Some("failed") => "requestFailedEvent",
                Some("reconciled") => "responseEvent",
                _ => panic!("not a gateway event: {id}"),
            };
            let event = check_gateway_message(&docs, &messages, &validators, &delivery, message, reply);
            let key = if event["data"]["request_id"].is_null() && message == "requestFailedEvent" { "failed_<no message_id>".to_owned() } else { id };
            seen.insert(format!("{key} {}", if reply { "reply" } else { "exchange" }), event);
        }
    }
    let response_id = seen.keys().find_map(|k| k.strip_prefix("queued_")?.strip_suffix(" reply")).expect("a queued event").to_owned();
    let mut want: Vec<String> = [format!("queued_{response_id}"), format!("reconciled_{response_id}"), "failed_rq-schema-refused".into(), "failed_<no message_id>".into()]
        .into_iter()
        .flat_map(|id| [format!("{id} reply"), format!("{id} exchange")])
        .collect();
    want.sort();
    assert_eq!(seen.keys().cloned().collect::<Vec<_>>(), want);
    let queued = &seen[&format!("queued_{response_id} reply")];
    let reconciled = &seen[&format!("reconciled_{response_id} reply")];
    let refused = &seen["failed_rq-schema-refused reply"];
    let no_id = &seen["failed_<no message_id> reply"];
    assert_eq!((&queued["data"]["request_id"], &queued["subject"]), (&json!("rq-schema-lost"), &json!(response_id)));
    assert_eq!((&reconciled["type"], &reconciled["subject"]), (&json!("com.openai.response.completed"), &json!(response_id)));
    assert_eq!((&refused["data"]["status"], &refused["subject"]), (&json!(400), &json!("rq-schema-refused")));
    assert_eq!((&no_id["data"]["status"], no_id.get("subject")), (&Value::Null, None));

    // The same events, broken: neither the CloudEvent schema nor any message accepts them.
    let root = docs.validator("./schemas/cloudevent.schema.json");
    let broken = |what: &str, event: &Value, change: &dyn Fn(&mut Value)| {
        let mut event = event.clone();
        change(&mut event);
        (what.to_owned(), event)
    };
    let remove = |pointer: &'static str, key: &'static str| move |e: &mut Value| {
        e.pointer_mut(pointer).unwrap().as_object_mut().unwrap().remove(key);
    };
    let cases = [
        broken("a queued event without request_id", queued, &remove("/data", "request_id")),
        broken("a queued event without its response", queued, &remove("/data", "response")),
        broken("a queued event without subject", queued, &remove("", "subject")),
        broken("a queued event with a webhook's id", queued, &|e| e["id"] = json!("evt_1")),
        broken("a queued event with an unexpected data key", queued, &|e| e["data"]["output_text"] = json!("x")),
        broken("a queued event whose response is no response", queued, &|e| e["data"]["response"]["object"] = json!("batch")),
        broken("a request.failed with a status that is no number", refused, &|e| e["data"]["status"] = json!("400")),
        broken("a request.failed whose error has no message", refused, &remove("/data/error", "message")),
        broken("a request.failed without error", refused, &remove("/data", "error")),
        broken("a request.failed for a message_id without subject", refused, &remove("", "subject")),
        broken("a request.failed without message_id but with a subject", no_id, &|e| e["subject"] = json!("x")),
        broken("a request.failed with a queued id", refused, &|e| e["id"] = json!("queued_resp_1")),
        broken("a reconciled event without output_text", reconciled, &remove("/data", "output_text")),
        broken("a reconciled event of a status that is not terminal", reconciled, &|e| e["type"] = json!("com.openai.response.in_progress")),
        broken("a reconciled event with a fetch error", reconciled, &|e| e["data"]["fetch_error"] = json!({"status": 404, "message": "gone"})),
        broken("a made event of another type", refused, &|e| e["type"] = json!("com.openai.request.queued")),
    ];
    for (what, event) in &cases {
        let accepting: Vec<&str> = validators.iter().filter(|(_, (payload, _))| payload.is_valid(event)).map(|(name, _)| name.as_str()).collect();
        assert!(!root.is_valid(event) && accepting.is_empty(), "accepted ({accepting:?}): {what}:\n{}", serde_json::to_string_pretty(event).unwrap());
    }
}

fn header_map(headers: &[(&str, &str)]) -> reqwest::header::HeaderMap {
    headers
        .iter()
        .map(|(name, value)| (reqwest::header::HeaderName::from_bytes(name.as_bytes()).unwrap(), value.parse().unwrap()))
        .collect()
}

/// Payload and headers validators of each message of the `events` channel.
fn validators(docs: &Docs, messages: &BTreeMap<String, Value>) -> BTreeMap<String, (Validator, Validator)> {
    messages
        .iter()
        .map(|(name, message)| {
            let payload = message["payload"]["$ref"].as_str().unwrap_or_else(|| panic!("{name}: payload is not a $ref"));
            let headers = message["headers"]["$ref"].as_str().unwrap_or_else(|| panic!("{name}: headers are not a $ref"));
            (name.clone(), (docs.validator(payload), docs.validator(headers)))
        })
        .collect()
}

/// `fixtures/events/response.completed.json` (the full CloudEvent the relay produces) with
/// `change` applied.
fn mutated(change: impl FnOnce(&mut Value)) -> Value {
    let mut event: Value = serde_json::from_str(&fixture("events/response.completed.json")).unwrap();
    change(&mut event);
    event
}

/// An event-only CloudEvent for `kind`, as the relay builds one.
fn event_only(kind: &str) -> Value {
    json!({
        "specversion": "1.0", "id": "evt_1", "source": "openai", "type": format!("com.openai.{kind}"),
        "subject": "x_1", "time": "2025-08-27T15:53:20Z", "datacontenttype": "application/json",
        "data": { "event": { "id": "evt_1", "object": "event", "created_at": 1756310000, "type": kind, "data": { "id": "x_1" } } }
    })
}

#[test]
fn the_schema_rejects_what_the_relay_never_publishes() {
    let docs = Docs::load();
    let schema = docs.validator("./schemas/cloudevent.schema.json");
    let valid: Vec<(&str, Value)> = vec![
        ("the README's full example", mutated(|_| {})),
        ("an event type nobody knows yet, event alone", event_only("something.new")),
        ("eval.run.*, event alone", event_only("eval.run.failed")),
        ("a 404, for a batch", {
            let mut e = event_only("batch.failed");
            e["data"]["fetch_error"] = json!({ "status": 404, "message": "Batch with id 'x_1' not found." });
            e
        }),
        ("a named project", mutated(|e| e["source"] = json!("openai/acme-prod"))),
        ("with traces exported, the traceparent extension", mutated(|e| e["traceparent"] = json!("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"))),
        ("a response without text", mutated(|e| e["data"]["output_text"] = Value::Null)),
        ("a realtime call, subject = call id", {
            let mut e = event_only("realtime.call.incoming");
            e["data"]["event"]["data"] = json!({ "call_id": "rtc_1", "sip_headers": [] });
            e["subject"] = json!("rtc_1");
            e
        }),
        ("a response event without an object id, event alone, no subject", {
            let mut e = event_only("response.completed");
            e["data"]["event"]["data"] = json!({});
            e.as_object_mut().unwrap().remove("subject");
            e
        }),
    ];
    for (what, event) in &valid {
        let found = errors(&schema, event);
        assert!(found.is_empty(), "{what} should be valid:\n{found}");
    }

    let remove = |key: &'static str| move |e: &mut Value| {
        e.as_object_mut().unwrap().remove(key);
    };
    let invalid: Vec<(&str, Value)> = vec![
        ("missing specversion", mutated(remove("specversion"))),
        ("specversion 0.3", mutated(|e| e["specversion"] = json!("0.3"))),
        ("missing id", mutated(remove("id"))),
        ("a traceparent that is not W3C trace context", mutated(|e| e["traceparent"] = json!("0af7651916cd43dd8448eb211c80319c"))),
        ("missing source", mutated(remove("source"))),
        ("missing time", mutated(remove("time"))),
        ("missing data", mutated(remove("data"))),
        ("type without com.openai.", mutated(|e| e["type"] = json!("response.completed"))),
        ("time that is no date-time", mutated(|e| e["time"] = json!("yesterday"))),
        ("another datacontenttype", mutated(|e| e["datacontenttype"] = json!("text/plain"))),
        ("an attribute name CloudEvents forbids", mutated(|e| e["Trace-Id"] = json!("x"))),
        ("data with an unexpected key", mutated(|e| e["data"]["extra"] = json!(1))),
        ("a response event without its response", mutated(|e| {
            e["data"].as_object_mut().unwrap().remove("response");
        })),
        ("a response without output_text", mutated(|e| {
            e["data"].as_object_mut().unwrap().remove("output_text");
        })),
        ("a response that is no response object", mutated(|e| e["data"]["response"]["object"] = json!("batch"))),
        ("a response without status", mutated(|e| {
            e["data"]["response"].as_object_mut().unwrap().remove("status");
        })),
        ("output_text that is no string", mutated(|e| e["data"]["output_text"] = json!(["a", "b"]))),
        ("both the response and a fetch error", mutated(|e| e["data"]["fetch_error"] = json!({ "status": 404, "message": "gone" }))),
        ("a fetch error other than 404", mutated(|e| {
            let data = e["data"].as_object_mut().unwrap();
            data.remove("response");
            data.remove("output_text");
            data.insert("fetch_error".into(), json!({ "status": 500, "message": "boom" }));
        })),
        ("a batch event carrying a response", mutated(|e| {
            e["type"] = json!("com.openai.batch.completed");
            e["data"]["event"]["type"] = json!("batch.completed");
        })),
        ("an unknown event type with an object", mutated(|e| {
            e["type"] = json!("com.openai.something.new");
            e["data"]["event"]["type"] = json!("something.new");
        })),
        ("an event-only kind with an eval_run key", {
            let mut e = event_only("eval.run.succeeded");
            e["data"]["eval_run"] = json!({ "id": "x_1", "object": "eval.run" });
            e
        }),
        ("a fine-tuning event with a batch object", {
            let mut e = event_only("fine_tuning.job.succeeded");
            e["data"]["batch"] = json!({ "id": "x_1", "object": "batch" });
            e
        }),
        ("an envelope without created_at", mutated(|e| {
            e["data"]["event"].as_object_mut().unwrap().remove("created_at");
        })),
        ("an envelope whose created_at is a string", mutated(|e| e["data"]["event"]["created_at"] = json!("1756306531"))),
        ("an envelope that is no event object", mutated(|e| e["data"]["event"]["object"] = json!("response"))),
        ("an object id without subject", mutated(remove("subject"))),
        ("a subject for an event that names nothing", {
            let mut e = event_only("something.new");
            e["data"]["event"]["data"] = json!({});
            e
        }),
    ];
    for (what, event) in &invalid {
        assert!(!schema.is_valid(event), "the schema accepts {what}:\n{}", serde_json::to_string_pretty(event).unwrap());
    }
}

/// Every `$ref` string in `value`, with where it was found.
fn refs(value: &Value, at: &str, out: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                match (key.as_str(), child) {
                    ("$ref", Value::String(reference)) => out.push((at.to_owned(), reference.clone())),
                    _ => refs(child, &format!("{at}/{key}"), out),
                }
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                refs(child, &format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

/// Checks that `reference`, found in the document at `dir/file`, names an existing file and,
/// when it has a fragment, a part of it.
fn check_ref(dir: &Path, document: &Value, file: &str, at: &str, reference: &str) {
    let (path, fragment) = reference.split_once('#').unwrap_or((reference, ""));
    let target = if path.is_empty() {
        document.clone()
    } else {
        let target = dir.join(path);
        assert!(target.is_file(), "{file} {at}: $ref {reference} names {path}, which does not exist");
        let text = read(&target);
        if path.ends_with(".json") {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path} is not JSON: {e}"))
        } else {
            serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{path} is not YAML: {e}"))
        }
    };
    assert!(target.pointer(fragment).is_some(), "{file} {at}: $ref {reference} points at nothing");
}

#[test]
fn the_asyncapi_document_is_consistent() {
    let docs = Docs::load();
    let api = &docs.asyncapi;
    assert_eq!(api["asyncapi"], "3.0.0");

    // Every $ref, in the document and in the schemas, points at something that exists.
    let mut found = Vec::new();
    refs(api, "", &mut found);
    assert!(found.iter().any(|(_, r)| r.starts_with("./schemas/cloudevent-kinds.schema.json")), "payloads reference the schema files");
    for (at, reference) in &found {
        check_ref(&docs_dir(), api, "asyncapi.yaml", at, reference);
    }
    for (name, schema) in &docs.schemas {
        assert_eq!(schema["$schema"], "https://json-schema.org/draft/2020-12/schema", "{name}");
        if let Err(e) = jsonschema::meta::validate(schema) {
            panic!("{name} is not a valid JSON Schema: {e}");
        }
        let mut found = Vec::new();
        refs(schema, "", &mut found);
        for (at, reference) in &found {
            check_ref(&docs_dir().join("schemas"), schema, name, at, reference);
        }
    }

    // The exchange as the relay declares it, and every event type the contract names.
    let events = &api["channels"]["events"];
    assert_eq!(events["bindings"]["amqp"]["is"], "routingKey");
    let exchange = &events["bindings"]["amqp"]["exchange"];
    assert_eq!((&exchange["name"], &exchange["type"], &exchange["durable"]), (&json!("openai.events"), &json!("topic"), &json!(true)));
    assert_eq!(events["address"], "{eventType}");
    let known = events["parameters"]["eventType"]["examples"].as_array().expect("eventType examples");
    for kind in [
        "response.completed", "response.failed", "response.cancelled", "response.incomplete",
        "batch.completed", "batch.failed", "batch.expired", "batch.cancelled",
        "fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled",
        "eval.run.succeeded", "eval.run.failed", "eval.run.canceled", "realtime.call.incoming",
    ] {
        assert!(known.contains(&json!(kind)), "eventType lacks {kind}");
    }
    for kind in ["response.queued", "request.failed"] {
        assert!(known.contains(&json!(kind)), "eventType lacks the gateway's {kind}");
    }
    for (queue, channel) in [("openai.webhooks.inbox", "inbox"), ("openai.webhooks.inbox.dead", "deadLetters"), ("openai.requests", "requests"), ("openai.requests.dead", "requestDeadLetters")] {
        assert_eq!(api["channels"][channel]["address"], queue);
        assert_eq!(api["channels"][channel]["bindings"]["amqp"]["queue"]["name"], queue);
    }

    // Operations receive messages of their own channel.
    for (name, operation) in api["operations"].as_object().unwrap() {
        let channel = operation["channel"]["$ref"].as_str().unwrap();
        for message in operation["messages"].as_array().unwrap() {
            let reference = message["$ref"].as_str().unwrap();
            assert!(reference.starts_with(&format!("{channel}/messages/")), "operation {name}: {reference} is not a message of {channel}");
        }
    }

    // Each documented example is a valid message of its kind, and only of its kind.
    let messages = docs.event_messages();
    let payloads: BTreeMap<&str, Validator> = messages.iter().map(|(name, m)| (name.as_str(), docs.validator(m["payload"]["$ref"].as_str().unwrap()))).collect();
    let root = docs.validator("./schemas/cloudevent.schema.json");
    for (name, message) in &messages {
        assert_eq!(message["contentType"], "application/cloudevents+json", "{name}");
        let headers = docs.validator(message["headers"]["$ref"].as_str().unwrap());
        let examples = message["examples"].as_array().unwrap_or_else(|| panic!("{name} has no examples"));
        for example in examples {
            let what = format!("{name} example {}", example["name"]);
            let found = errors(&root, &example["payload"]);
            assert!(found.is_empty(), "{what}:\n{found}");
            let matching: Vec<&str> = payloads.iter().filter(|(_, v)| v.is_valid(&example["payload"])).map(|(n, _)| *n).collect();
            assert_eq!(matching, [name.as_str()], "{what}: messages accepting it");
            let found = errors(&headers, &example["headers"]);
            assert!(found.is_empty(), "{what} headers:\n{found}");
            assert_eq!(example["payload"]["source"] != "openai", example["headers"].get("openai-project").is_some(), "{what}: source and openai-project agree");
        }
    }
}
