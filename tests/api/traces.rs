//! Traces over OTLP. The OpenTelemetry pipeline is process-global, so these tests run the
//! relay binary as a child process with the standard `OTEL_*` variables, exporting to a fake
//! OTLP receiver here (`POST /v1/traces`, protobuf); its spans are checked after a graceful
//! stop, which must flush them.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Attribute;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;
use serde_json::Value;

use crate::fake_openai::{API_KEY, FakeOpenAi};
use crate::schema::Docs;
use crate::helpers::{Amqp, Cleanup, amqp_url, declared_topology, event, http_client, post_signed, secret_text, terminate, wait_ready, webhook_id};
use openai_webhook_relay::inbox::header;
use openai_webhook_relay::topology::Topology;
use openai_webhook_relay::verify::Secret;

/// A span as received, with its service's name.
struct Received {
    service: String,
    span: Span,
}

/// A fake OTLP/HTTP receiver on a free local port: keeps every span it is sent.
async fn otlp_receiver() -> (String, Arc<Mutex<Vec<Received>>>) {
    async fn traces(State(store): State<Arc<Mutex<Vec<Received>>>>, body: Bytes) -> ([(&'static str, &'static str); 1], Vec<u8>) {
        let request = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf export request");
        let mut store = store.lock().unwrap();
        for resource_spans in request.resource_spans {
            let resource = resource_spans.resource.unwrap_or_default().attributes;
            let service = resource.iter().find(|kv| kv.key == "service.name").and_then(|kv| string(kv.value.as_ref()?.value.as_ref()?)).unwrap_or_default();
            for span in resource_spans.scope_spans.into_iter().flat_map(|scope| scope.spans) {
                store.push(Received { service: service.clone(), span });
            }
        }
        ([("content-type", "application/x-protobuf")], ExportTraceServiceResponse::default().encode_to_vec())
    }
    let store = Arc::new(Mutex::new(Vec::new()));
    let app = axum::Router::new().route("/v1/traces", post(traces)).with_state(store.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (endpoint, store)
}

fn string(value: &Attribute) -> Option<String> {
    match value {
        Attribute::StringValue(s) => Some(s.clone()),
        Attribute::IntValue(n) => Some(n.to_string()),
        _ => None,
    }
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes.iter().find(|kv| kv.key == key).and_then(|kv| string(kv.value.as_ref()?.value.as_ref()?))
}

/// The relay binary, both roles, on `topology`, with the OTLP endpoint `otlp` (none: no
/// `OTEL_*` variable at all) and `RUST_LOG=warn` as in production.
async fn spawn_relay(topology: &Topology, openai: &FakeOpenAi, otlp: Option<&str>) -> (Child, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut command = Command::new(env!("CARGO_BIN_EXE_openai-webhook-relay"));
    command
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .envs([
            ("OPENAI_WEBHOOK_SECRET", secret_text()),
            ("OPENAI_API_KEY", API_KEY.to_owned()),
            ("OPENAI_BASE_URL", openai.base_url.clone()),
            ("AMQP_URL", amqp_url()),
            ("RELAY_LISTEN", format!("127.0.0.1:{port}")),
            ("RELAY_EXCHANGE", topology.exchange.clone()),
            ("RELAY_INBOX_QUEUE", topology.inbox.clone()),
            ("RELAY_REQUEST_QUEUE", String::new()),
            ("RUST_LOG", "warn".to_owned()),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(endpoint) = otlp {
        command.env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint).env("OTEL_SERVICE_NAME", "relay-under-test");
    }
    let child = command.spawn().expect("relay binary starts");
    let base = format!("http://127.0.0.1:{port}");
    wait_ready(&base).await;
    (child, base)
}

/// Sends a signed `response.completed` delivery with `traceparent` and returns the message
/// the relay published for it.
async fn deliver_traced(base: &str, amqp: &Amqp, queue: &str, traceparent: &str) -> lapin::message::Delivery {
    let secret = Secret::parse(&secret_text()).unwrap();
    let body = event("response.completed", "resp_completed01");
    let response = post_signed(&http_client(), base, &secret, &webhook_id(), body, &[("traceparent", traceparent)]).await;
    assert_eq!(response.status(), 200);
    amqp.next(queue, Duration::from_secs(20)).await.expect("the event is published")
}

/// A fresh incoming trace context, as a proxy in front of the relay would send it.
fn incoming() -> (String, String, String) {
    let (trace, span) = (format!("{:032x}", fastrand::u128(1..)), format!("{:016x}", fastrand::u64(1..)));
    (format!("00-{trace}-{span}-01"), trace, span)
}

async fn relay_topology() -> (Topology, Cleanup, Amqp, String, FakeOpenAi) {
    let (topology, cleanup, amqp) = declared_topology().await;
    let queue = amqp.bind(&topology.exchange, "#").await;
    (topology, cleanup, amqp, queue, FakeOpenAi::start().await.unwrap())
}

#[tokio::test]
async fn with_an_otlp_endpoint_a_delivery_is_one_trace_from_the_request_to_the_published_event() {
    let (topology, _cleanup, amqp, queue, openai) = relay_topology().await;
    let (endpoint, store) = otlp_receiver().await;
    let (mut child, base) = spawn_relay(&topology, &openai, Some(&endpoint)).await;
    let (traceparent, trace, caller_span) = incoming();
    let published = deliver_traced(&base, &amqp, &queue, &traceparent).await;
    // The graceful stop exports the spans still buffered (the batch delay is 5 s).
    assert!(terminate(&mut child, Duration::from_secs(20)).await.success());

    let spans: Vec<Received> = std::mem::take(&mut store.lock().unwrap());
    let hex = |id: &[u8]| id.iter().map(|b| format!("{b:02x}")).collect::<String>();
    for received in &spans {
        assert_eq!(hex(&received.span.trace_id), trace, "every span is in the caller's trace: {}", received.span.name);
        assert_eq!(received.service, "relay-under-test", "OTEL_SERVICE_NAME names the service");
    }
    let by_kind = |kind: SpanKind, name: &str| -> &Span {
        let found: Vec<&Span> = spans.iter().map(|r| &r.span).filter(|s| s.kind == kind as i32 && s.name == name).collect();
        assert_eq!(found.len(), 1, "one {kind:?} span {name:?} among {:?}", spans.iter().map(|r| &r.span.name).collect::<Vec<_>>());
        found[0]
    };
    let server = by_kind(SpanKind::Server, "POST /webhooks/openai");
    let store_span = by_kind(SpanKind::Producer, &format!("publish {}", topology.inbox));
    let process = by_kind(SpanKind::Consumer, &format!("process {}", topology.inbox));
    let fetch = by_kind(SpanKind::Client, "GET");
    let publish = by_kind(SpanKind::Producer, &format!("publish {}", topology.exchange));
    print_tree(&spans);

    let chain = [(server, caller_span.as_str()), (store_span, &hex(&server.span_id)), (process, &hex(&store_span.span_id)), (fetch, &hex(&process.span_id)), (publish, &hex(&process.span_id))];
    for (span, parent) in chain {
        assert_eq!(hex(&span.parent_span_id), parent, "parent of {}", span.name);
    }
    assert_eq!(attribute(server, "http.response.status_code").as_deref(), Some("200"));
    for (span, operation, destination) in [(store_span, "publish", "amq.default"), (process, "process", topology.inbox.as_str()), (publish, "publish", topology.exchange.as_str())] {
        assert_eq!(attribute(span, "messaging.system").as_deref(), Some("rabbitmq"), "{}", span.name);
        assert_eq!(attribute(span, "messaging.operation").as_deref(), Some(operation), "{}", span.name);
        assert_eq!(attribute(span, "messaging.destination.name").as_deref(), Some(destination), "{}", span.name);
    }
    assert_eq!(attribute(store_span, "messaging.rabbitmq.destination.routing_key").as_deref(), Some(topology.inbox.as_str()));
    assert_eq!(attribute(publish, "messaging.rabbitmq.destination.routing_key").as_deref(), Some("response.completed"));
    assert_eq!(attribute(fetch, "http.request.method").as_deref(), Some("GET"));
    assert_eq!(attribute(fetch, "url.full"), Some(format!("{}/responses/resp_completed01", openai.base_url)));
    assert_eq!(attribute(fetch, "http.response.status_code").as_deref(), Some("200"));

    // Consumers continue the trace from the message's header or from the CloudEvent.
    assert_eq!(header(&published.properties, "traceparent"), Some(format!("00-{trace}-{}-01", hex(&publish.span_id)).as_str()));
    let cloud_event: Value = serde_json::from_slice(&published.data).unwrap();
    assert_eq!(cloud_event["traceparent"], format!("00-{trace}-{}-01", hex(&process.span_id)));
    assert!(Docs::load().validator("./schemas/cloudevent.schema.json").is_valid(&cloud_event), "the documented schema takes it: {cloud_event}");
}

#[tokio::test]
async fn without_an_otlp_endpoint_the_cloud_event_carries_no_traceparent() {
    let (topology, _cleanup, amqp, queue, openai) = relay_topology().await;
    let (mut child, base) = spawn_relay(&topology, &openai, None).await;
    let (traceparent, _, _) = incoming();
    let published = deliver_traced(&base, &amqp, &queue, &traceparent).await;
    assert!(terminate(&mut child, Duration::from_secs(20)).await.success());

    let cloud_event: Value = serde_json::from_slice(&published.data).unwrap();
    assert_eq!(cloud_event.get("traceparent"), None, "{cloud_event}");
    assert_eq!(header(&published.properties, "traceparent"), Some(traceparent.as_str()), "the request's header, copied as before");
}

/// The span tree, as the README shows it (`--nocapture`).
fn print_tree(spans: &[Received]) {
    let children: HashMap<&[u8], Vec<&Span>> = spans.iter().fold(HashMap::new(), |mut map, r| {
        map.entry(r.span.parent_span_id.as_slice()).or_default().push(&r.span);
        map
    });
    let ids: Vec<&[u8]> = spans.iter().map(|r| r.span.span_id.as_slice()).collect();
    fn walk(span: &Span, depth: usize, children: &HashMap<&[u8], Vec<&Span>>) {
        let kind = SpanKind::try_from(span.kind).map_or("?", |k| k.as_str_name());
        let ms = span.end_time_unix_nano.saturating_sub(span.start_time_unix_nano) as f64 / 1e6;
        eprintln!("{}{} [{kind}] {ms:.1} ms", "  ".repeat(depth), span.name);
        let mut below = children.get(span.span_id.as_slice()).cloned().unwrap_or_default();
        below.sort_by_key(|s| s.start_time_unix_nano);
        for child in below {
            walk(child, depth + 1, children);
        }
    }
    for root in spans.iter().map(|r| &r.span).filter(|s| !ids.contains(&s.parent_span_id.as_slice())) {
        walk(root, 0, &children);
    }
}
