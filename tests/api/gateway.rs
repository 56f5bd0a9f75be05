//! The background-mode gateway: requests published to `<requests>`, answered by the fake
//! OpenAI API (which completes each response and sends its signed webhook to the relay),
//! with the events back on the exchange and on the request's `reply_to` queue.

use std::time::Duration;

use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use openai_webhook_relay::inbox::{header, int_header};
use openai_webhook_relay::verify::Secret;
use serde_json::{Value, json};

use crate::fake_openai::{API_KEY, FakeOpenAi};
use crate::helpers::{Options, Relay, eventually, secret_text, spawn_relay_with, unique_topology};

/// A relay with the gateway on its own `<tag>.requests`, and the fake API sending webhooks to it.
pub async fn spawn_gateway(options: Options) -> Relay {
    let mut topology = unique_topology();
    topology.requests = Some(format!("{}.requests", topology.inbox.trim_end_matches(".inbox")));
    let relay = spawn_relay_with(options, FakeOpenAi::start().await.unwrap(), topology).await;
    relay.openai.send_webhooks_to(&relay.url, Secret::parse(&secret_text()).unwrap());
    relay
}

/// A request message: its properties as a client sets them.
pub struct Request<'a> {
    pub message_id: Option<&'a str>,
    pub reply_to: Option<&'a str>,
    pub correlation_id: Option<&'a str>,
    pub headers: Vec<(&'a str, &'a str)>,
    pub body: String,
}

impl<'a> Request<'a> {
    pub fn create(message_id: &'a str, reply_to: &'a str, body: Value) -> Self {
        Self { message_id: Some(message_id), reply_to: Some(reply_to), correlation_id: Some("corr-1"), headers: Vec::new(), body: body.to_string() }
    }

    fn cancel(message_id: &'a str, response_id: &str) -> Self {
        let body = json!({ "response_id": response_id }).to_string();
        Self { message_id: Some(message_id), reply_to: None, correlation_id: None, headers: vec![("openai-action", "cancel")], body }
    }
}

/// Publishes `request` to the relay's request queue, confirmed.
pub async fn publish(relay: &Relay, request: Request<'_>) {
    let mut headers = FieldTable::default();
    for (name, value) in &request.headers {
        headers.insert((*name).into(), AMQPValue::LongString((*value).into()));
    }
    let mut properties = BasicProperties::default().with_delivery_mode(2).with_content_type("application/json".into()).with_headers(headers);
    if let Some(id) = request.message_id {
        properties = properties.with_message_id(id.into());
    }
    if let Some(queue) = request.reply_to {
        properties = properties.with_reply_to(queue.into());
    }
    if let Some(id) = request.correlation_id {
        properties = properties.with_correlation_id(id.into());
    }
    let channel = &relay.amqp.channel;
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let queue = relay.topology.requests.clone().unwrap();
    let confirm = channel.basic_publish("".into(), queue.as_str().into(), BasicPublishOptions { mandatory: true, ..Default::default() }, request.body.as_bytes(), properties).await.unwrap();
    assert!(confirm.await.unwrap().is_ack(), "the request queue took the request");
}

/// A reply queue of the test's own (exclusive, server-named), bound to nothing.
pub async fn reply_queue(relay: &Relay) -> String {
    let options = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
    relay.amqp.channel.queue_declare("".into(), options, FieldTable::default()).await.unwrap().name().to_string()
}

fn body(delivery: &Delivery) -> Value {
    serde_json::from_slice(&delivery.data).unwrap()
}

fn kind(delivery: &Delivery) -> String {
    delivery.properties.kind().as_ref().map(|k| k.to_string()).unwrap_or_default()
}

fn correlation(delivery: &Delivery) -> Option<String> {
    delivery.properties.correlation_id().as_ref().map(|c| c.to_string())
}

/// The next message of `queue`, within 15 s.
async fn next(relay: &Relay, queue: &str, what: &str) -> Delivery {
    relay.amqp.next(queue, Duration::from_secs(15)).await.unwrap_or_else(|| panic!("no {what} on {queue} within 15 s"))
}

/// Waits until `/metrics` shows `line` (a metric with labels, and its value).
async fn metric_reaches(relay: &Relay, line: &str) {
    eventually(Duration::from_secs(15), format!("/metrics shows {line}"), async || {
        let metrics = relay.get("/metrics").await.text().await.unwrap();
        metrics.lines().any(|l| l == line).then_some(())
    })
    .await;
}

/// Publishes a create of `model` as `message_id` with a fresh reply queue, and waits for
/// its `response.queued` reply: (the reply queue, the response id).
async fn create_queued(relay: &Relay, message_id: &str, model: &str, input: &str) -> (String, String) {
    let replies = reply_queue(relay).await;
    publish(relay, Request::create(message_id, &replies, json!({"model": model, "input": input}))).await;
    let queued = body(&next(relay, &replies, "queued reply").await);
    assert_eq!(queued["type"], "com.openai.response.queued");
    let response_id = queued["subject"].as_str().unwrap().to_owned();
    (replies, response_id)
}

async fn metrics(relay: &Relay) -> String {
    relay.get("/metrics").await.text().await.unwrap()
}

#[tokio::test]
async fn a_request_is_answered_queued_then_completed_on_its_reply_queue_and_the_exchange() {
    let relay = spawn_gateway(Options::default()).await;
    let events = relay.bind("#").await;
    let replies = reply_queue(&relay).await;
    let request = json!({"model": "gpt-test", "input": "hello", "background": false, "store": false, "metadata": {"team": "a"}});
    publish(&relay, Request::create("rq-1", &replies, request)).await;

    let queued = next(&relay, &replies, "response.queued reply").await;
    assert_eq!(kind(&queued), "response.queued");
    assert_eq!(correlation(&queued).as_deref(), Some("corr-1"));
    let queued_body = body(&queued);
    let response_id = queued_body["subject"].as_str().unwrap().to_owned();
    assert_eq!(queued_body["id"], format!("queued_{response_id}"));
    assert_eq!(queued_body["type"], "com.openai.response.queued");
    assert_eq!(queued_body["data"]["request_id"], "rq-1");
    assert_eq!(queued_body["data"]["response"]["status"], "queued");
    assert_eq!(queued.properties.message_id().as_ref().map(|id| id.to_string()), Some(format!("queued_{response_id}")));

    let completed = next(&relay, &replies, "response.completed reply").await;
    assert_eq!(kind(&completed), "response.completed");
    assert_eq!(correlation(&completed).as_deref(), Some("corr-1"), "the terminal event carries relay_correlation_id");
    let completed_body = body(&completed);
    assert_eq!(completed_body["subject"], response_id.as_str());
    assert_eq!(completed_body["data"]["response"]["status"], "completed");
    assert_eq!(completed_body["data"]["output_text"], "echo: hello");
    assert_eq!(completed_body["data"]["event"]["type"], "response.completed", "the webhook path's event");

    // The same two events on the exchange, without correlation_id.
    let on_exchange = [next(&relay, &events, "event on the exchange").await, next(&relay, &events, "event on the exchange").await];
    let mut kinds: Vec<String> = on_exchange.iter().map(kind).collect();
    kinds.sort();
    assert_eq!(kinds, ["response.completed", "response.queued"]);
    assert!(on_exchange.iter().all(|d| correlation(d).is_none()));

    // What OpenAI received: background and store forced, the relay's keys added.
    let creates = relay.openai.creates();
    assert_eq!(creates.len(), 1);
    assert_eq!(creates[0]["background"], true);
    assert_eq!(creates[0]["store"], true);
    assert_eq!(creates[0]["input"], "hello");
    let metadata = json!({"team": "a", "relay_request_id": "rq-1", "relay_reply_to": replies, "relay_correlation_id": "corr-1"});
    assert_eq!(creates[0]["metadata"], metadata);
    let requests = relay.topology.requests.clone().unwrap();
    assert_eq!(relay.amqp.count(&requests).await, 0);
    assert_eq!(relay.amqp.count(&format!("{requests}.dead")).await, 0);
}

#[tokio::test]
async fn a_request_openai_refuses_is_dead_lettered_with_a_request_failed_reply() {
    let relay = spawn_gateway(Options::default()).await;
    let events = relay.bind("request.failed").await;
    let replies = reply_queue(&relay).await;
    publish(&relay, Request::create("rq-bad-model", &replies, json!({"model": "unknown-model", "input": "hi"}))).await;

    let failed = next(&relay, &replies, "request.failed reply").await;
    assert_eq!(kind(&failed), "request.failed");
    assert_eq!(correlation(&failed).as_deref(), Some("corr-1"));
    let failed_body = body(&failed);
    assert_eq!(failed_body["id"], "failed_rq-bad-model");
    assert_eq!(failed_body["subject"], "rq-bad-model");
    assert_eq!(failed_body["data"]["request_id"], "rq-bad-model");
    assert_eq!(failed_body["data"]["status"], 400);
    assert_eq!(failed_body["data"]["error"]["code"], "model_not_found", "OpenAI's error object: {failed_body}");
    assert_eq!(body(&next(&relay, &events, "request.failed on the exchange").await)["id"], "failed_rq-bad-model");

    let dead_queue = format!("{}.dead", relay.topology.requests.as_deref().unwrap());
    let dead = next(&relay, &dead_queue, "dead letter").await;
    assert_eq!(dead.properties.message_id().as_ref().map(|id| id.to_string()).as_deref(), Some("rq-bad-model"));
    assert_eq!(int_header(&dead.properties, "x-relay-error-status"), Some(400));
    assert_eq!(header(&dead.properties, "x-relay-error-reason"), Some("400"));
    assert_eq!(relay.openai.creates().len(), 1, "a refusal is not retried");
}

#[tokio::test]
async fn requests_that_cannot_be_sent_are_refused_before_reaching_openai() {
    let relay = spawn_gateway(Options::default()).await;
    let replies = reply_queue(&relay).await;
    let full: serde_json::Map<String, Value> = (0..15).map(|i| (format!("k{i}"), json!("v"))).collect();
    let mut no_id = Request::create("unused", &replies, json!({"model": "gpt-test"}));
    no_id.message_id = None;
    let mut not_json = Request::create("rq-not-json", &replies, json!(null));
    not_json.body = "not json".into();
    let mut unknown_project = Request::create("rq-project", &replies, json!({"model": "gpt-test"}));
    unknown_project.headers.push(("openai-project", "nobody"));
    let cases = [
        no_id,
        not_json,
        Request::create("rq-stream", &replies, json!({"model": "gpt-test", "stream": true})),
        Request::create("rq-full", &replies, json!({"model": "gpt-test", "metadata": full})),
        unknown_project,
    ];
    let count = cases.len();
    for request in cases {
        publish(&relay, request).await;
    }
    let mut reasons = Vec::new();
    for _ in 0..count {
        let failed = body(&next(&relay, &replies, "request.failed reply").await);
        assert_eq!(failed["data"]["status"], Value::Null, "never reached OpenAI: {failed}");
        assert_eq!(failed["data"]["error"]["type"], "invalid_request_error");
        reasons.push((failed["data"]["request_id"].clone(), failed["data"]["error"]["message"].as_str().unwrap().to_owned()));
    }
    assert!(reasons.iter().any(|(id, m)| id.is_null() && m.contains("message_id")), "{reasons:?}");
    assert!(reasons.iter().any(|(id, m)| id == "rq-full" && m.contains("16")), "{reasons:?}");
    assert!(reasons.iter().any(|(id, m)| id == "rq-stream" && m.contains("stream")), "{reasons:?}");
    assert!(reasons.iter().any(|(id, m)| id == "rq-project" && m.contains("nobody")), "{reasons:?}");
    let dead_queue = format!("{}.dead", relay.topology.requests.as_deref().unwrap());
    eventually(Duration::from_secs(10), "every refused request in <requests>.dead", async || (relay.amqp.count(&dead_queue).await == count as u32).then_some(())).await;
    assert!(relay.openai.creates().is_empty(), "nothing reached OpenAI");
}

#[tokio::test]
async fn a_message_id_creates_one_response_even_when_published_twice() {
    let relay = spawn_gateway(Options::default()).await;
    let replies = reply_queue(&relay).await;
    publish(&relay, Request::create("rq-twice", &replies, json!({"model": "gpt-test", "input": "once"}))).await;
    assert_eq!(kind(&next(&relay, &replies, "queued reply").await), "response.queued");
    publish(&relay, Request::create("rq-twice", &replies, json!({"model": "gpt-test", "input": "once"}))).await;
    metric_reaches(&relay, r#"relay_gateway_requests_total{outcome="duplicate"} 1"#).await;
    assert_eq!(kind(&next(&relay, &replies, "completed reply").await), "response.completed");
    assert_eq!(relay.openai.creates().len(), 1, "one POST for one message_id");
    assert_eq!(relay.openai.created_for("rq-twice").len(), 1);
    assert!(relay.amqp.next(&replies, Duration::from_millis(500)).await.is_none(), "no second reply for the duplicate");
}

#[tokio::test]
async fn a_429_with_retry_after_ms_is_retried_and_creates_one_response() {
    let relay = spawn_gateway(Options::default()).await;
    let replies = reply_queue(&relay).await;
    relay.openai.rate_limit_next_create(300);
    let started = std::time::Instant::now();
    publish(&relay, Request::create("rq-429", &replies, json!({"model": "gpt-test", "input": "later"}))).await;
    let queued = next(&relay, &replies, "queued reply after the 429").await;
    assert_eq!(kind(&queued), "response.queued");
    assert!(started.elapsed() >= Duration::from_millis(300), "retry-after-ms honoured: {:?}", started.elapsed());
    assert_eq!(relay.openai.creates().len(), 2, "the 429 and the retry");
    assert_eq!(relay.openai.created_for("rq-429").len(), 1);
    assert!(metrics(&relay).await.contains(r#"relay_gateway_posts_total{action="create",status="429"} 1"#));
    assert_eq!(kind(&next(&relay, &replies, "completed reply").await), "response.completed");
}

#[tokio::test]
async fn a_reply_queue_that_does_not_exist_is_counted_and_the_events_still_reach_the_exchange() {
    let relay = spawn_gateway(Options::default()).await;
    let events = relay.bind("response.*").await;
    let missing = format!("no-such-queue-{:016x}", fastrand::u64(..));
    publish(&relay, Request::create("rq-missing", &missing, json!({"model": "gpt-test", "input": "x"}))).await;
    let mut kinds = vec![kind(&next(&relay, &events, "event").await), kind(&next(&relay, &events, "event").await)];
    kinds.sort();
    assert_eq!(kinds, ["response.completed", "response.queued"]);
    metric_reaches(&relay, r#"relay_replies_total{outcome="unroutable"} 2"#).await;
    let requests = relay.topology.requests.clone().unwrap();
    assert_eq!(relay.amqp.count(&format!("{requests}.dead")).await, 0, "not a failure");
    assert_eq!(relay.amqp.count(&relay.topology.dead()).await, 0, "the webhook is not dead-lettered for its reply");
}

#[tokio::test]
async fn a_response_whose_webhook_never_comes_is_published_by_the_safety_net() {
    let relay = spawn_gateway(Options::default().arg("--reconcile-after-secs", 1)).await;
    let (replies, response_id) = create_queued(&relay, "rq-lost-webhook", "no-webhook", "quiet").await;

    let terminal = next(&relay, &replies, "the safety net's terminal reply").await;
    assert_eq!(kind(&terminal), "response.completed");
    assert_eq!(correlation(&terminal).as_deref(), Some("corr-1"));
    let terminal_body = body(&terminal);
    assert_eq!(terminal_body["id"], format!("reconciled_{response_id}"));
    assert_eq!(terminal_body["subject"], response_id.as_str());
    assert_eq!(terminal_body["data"]["response"]["status"], "completed");
    assert_eq!(terminal_body["data"]["output_text"], "echo: quiet");
    assert!(terminal_body["data"].get("event").is_none(), "no webhook behind it");
    assert_eq!(relay.openai.webhooks_sent(), 0);
    metric_reaches(&relay, r#"relay_watches_total{outcome="reconciled"} 1"#).await;
}

#[tokio::test]
async fn a_terminal_event_the_webhook_brought_is_not_published_again_by_the_safety_net() {
    // The webhook must come first: 3 s leave it room while the whole suite shares two cores
    // (at 1 s the safety net once got there first, which is right but not this test's case).
    let relay = spawn_gateway(Options::default().arg("--reconcile-after-secs", 3)).await;
    let events = relay.bind("response.completed").await;
    let replies = reply_queue(&relay).await;
    publish(&relay, Request::create("rq-both-paths", &replies, json!({"model": "gpt-test", "input": "x"}))).await;
    let first = next(&relay, &events, "the webhook's response.completed").await;
    assert!(body(&first)["id"].as_str().unwrap().starts_with("evt_"), "{}", body(&first));
    metric_reaches(&relay, r#"relay_watches_total{outcome="webhook_first"} 1"#).await;
    assert!(relay.amqp.next(&events, Duration::from_millis(500)).await.is_none(), "published once");
    assert_eq!(relay.openai.webhooks_sent(), 1);
}

#[tokio::test]
async fn a_cancel_ends_a_running_response_and_its_event_goes_where_the_request_asked() {
    let relay = spawn_gateway(Options::default().arg("--reconcile-after-secs", 1)).await;
    let (replies, response_id) = create_queued(&relay, "rq-slow", "slow", "long").await;
    // The safety net finds it still running and watches it again.
    metric_reaches(&relay, r#"relay_watches_total{outcome="rewatched"} 1"#).await;

    publish(&relay, Request::cancel("rq-cancel-1", &response_id)).await;
    let cancelled = next(&relay, &replies, "response.cancelled reply").await;
    assert_eq!(kind(&cancelled), "response.cancelled");
    assert_eq!(correlation(&cancelled).as_deref(), Some("corr-1"), "the original request's correlation_id");
    assert_eq!(body(&cancelled)["data"]["response"]["status"], "cancelled");
    assert_eq!(relay.openai.response(&response_id).unwrap()["status"], "cancelled");
    metric_reaches(&relay, r#"relay_gateway_requests_total{outcome="cancelled"} 1"#).await;

    // Cancelling it again, now that it has ended: acked without error.
    publish(&relay, Request::cancel("rq-cancel-2", &response_id)).await;
    metric_reaches(&relay, r#"relay_gateway_requests_total{outcome="cancel_after_end"} 1"#).await;
    let dead = format!("{}.dead", relay.topology.requests.as_deref().unwrap());
    assert_eq!(relay.amqp.count(&dead).await, 0);
    // The next watch sees the terminal event already published.
    metric_reaches(&relay, r#"relay_watches_total{outcome="webhook_first"} 1"#).await;
    assert!(relay.amqp.next(&replies, Duration::from_millis(300)).await.is_none(), "one terminal reply");
}

#[tokio::test]
async fn a_response_deleted_before_it_is_fetched_still_gets_its_terminal_event_with_fetch_error() {
    let relay = spawn_gateway(Options::default()).await;
    relay.openai.complete_after(Duration::from_secs(1));
    let events = relay.bind("response.completed").await;
    let (_replies, response_id) = create_queued(&relay, "rq-deleted", "gpt-test", "x").await;
    relay.openai.always(&response_id, crate::fake_openai::Scripted::status(404));
    let completed = body(&next(&relay, &events, "response.completed on the exchange").await);
    assert_eq!(completed["subject"], response_id.as_str());
    assert_eq!(completed["data"]["fetch_error"]["status"], 404, "{completed}");
}

#[tokio::test]
async fn a_request_for_a_named_project_is_sent_with_its_key_and_tagged() {
    let mut options = Options::default().arg("--projects", "alpha");
    options.env = vec![("OPENAI_WEBHOOK_SECRET_ALPHA".into(), secret_text()), ("OPENAI_API_KEY_ALPHA".into(), format!("{API_KEY}-alpha"))];
    let relay = spawn_gateway(options).await;
    let replies = reply_queue(&relay).await;
    let mut request = Request::create("rq-alpha", &replies, json!({"model": "gpt-test", "input": "a"}));
    request.headers.push(("openai-project", "alpha"));
    publish(&relay, request).await;
    publish(&relay, Request::create("rq-default", &replies, json!({"model": "gpt-test", "input": "d"}))).await;
    let mut sources = Vec::new();
    while sources.len() < 2 {
        let reply = next(&relay, &replies, "queued reply").await;
        if kind(&reply) == "response.queued" {
            sources.push((body(&reply)["data"]["request_id"].as_str().unwrap().to_owned(), body(&reply)["source"].as_str().unwrap().to_owned(), header(&reply.properties, "openai-project").map(str::to_owned)));
        }
    }
    sources.sort();
    assert_eq!(sources, [("rq-alpha".into(), "openai/alpha".into(), Some("alpha".into())), ("rq-default".into(), "openai".into(), None)]);
    let mut keys = relay.openai.create_keys();
    keys.sort();
    assert_eq!(keys, [API_KEY.to_owned(), format!("{API_KEY}-alpha")]);
}

#[tokio::test]
async fn a_request_published_again_after_a_restart_is_not_posted_again_with_redis() {
    // Redis outlives the test: a message_id of this run only.
    let message_id = format!("rq-redis-{:016x}", fastrand::u64(..));
    let options = || Options::default().arg("--dedup-redis-url", "redis://127.0.0.1:6379");
    let mut first = spawn_gateway(options()).await;
    metric_reaches(&first, "relay_dedup_fallback 0").await;
    let (_replies, response_id) = create_queued(&first, &message_id, "gpt-test", "x").await;
    first.halt().await.unwrap();

    let second = spawn_relay_with(options(), first.openai.clone(), first.topology.clone()).await;
    metric_reaches(&second, "relay_dedup_fallback 0").await;
    let replies = reply_queue(&second).await;
    publish(&second, Request::create(&message_id, &replies, json!({"model": "gpt-test", "input": "x"}))).await;
    metric_reaches(&second, r#"relay_gateway_requests_total{outcome="duplicate"} 1"#).await;
    assert_eq!(first.openai.creates().len(), 1, "the second relay did not POST {message_id} again");
    assert_eq!(first.openai.created_for(&message_id).len(), 1);
    assert!(first.openai.response(&response_id).is_some());
}

/// README.md's "A client in Python (pika)", as it is, against a gateway relay.
#[tokio::test]
async fn the_readme_python_client_gets_its_reply() {
    let python = crate::consumers::python_with_pika().await;
    let readme = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let section = readme.split_once("### A client in Python (pika)").expect("README.md has the section").1;
    let code = section.split_once("```python\n").expect("a ```python block").1.split_once("\n```").expect("closed").0;
    let relay = spawn_gateway(Options::default()).await;
    let mut command = tokio::process::Command::new(python);
    command
        .arg("-c")
        .arg(code)
        .env("AMQP_URL", crate::helpers::amqp_url())
        .env("RELAY_REQUEST_QUEUE", relay.topology.requests.as_deref().unwrap())
        .env("MODEL", "gpt-test")
        .env("INPUT", "from python")
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(30), command.output()).await.expect("the client ends within 30 s").unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(lines[0].starts_with("com.openai.response.queued resp_"), "{stdout}");
    assert!(lines[1].starts_with("com.openai.response.completed resp_"), "{stdout}");
    assert_eq!(lines[2], "echo: from python");
}

/// A batch through the gateway, a quarter of it without webhooks and three creates answered
/// 429: every request gets one `queued` and one terminal event id on its reply queue (copies of
/// the same id are at-least-once delivery, counted), one response each; prints a figure line.
#[tokio::test]
async fn a_batch_of_requests_gets_one_response_and_one_terminal_reply_each() {
    const N: usize = 40;
    let relay = spawn_gateway(Options::default().arg("--reconcile-after-secs", 1)).await;
    let replies = reply_queue(&relay).await;
    for _ in 0..3 {
        relay.openai.rate_limit_next_create(100);
    }
    let started = std::time::Instant::now();
    let ids: Vec<String> = (0..N).map(|i| format!("rq-batch-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let model = if i % 4 == 0 { "no-webhook" } else { "gpt-test" };
        publish(&relay, Request::create(id, &replies, json!({"model": model, "input": id}))).await;
    }
    // Per request: the distinct event ids of its replies, by type.
    let mut seen: std::collections::BTreeMap<String, std::collections::BTreeSet<(String, String)>> = std::collections::BTreeMap::new();
    let (mut copies, mut terminal) = (0, 0);
    while terminal < N {
        let reply = relay.amqp.next(&replies, Duration::from_secs(20)).await.unwrap_or_else(|| panic!("only {terminal} of {N} terminal replies: {seen:?}"));
        let event = body(&reply);
        let request_id = match kind(&reply).as_str() {
            "response.queued" => event["data"]["request_id"].as_str().unwrap().to_owned(),
            _ => event["data"]["response"]["metadata"]["relay_request_id"].as_str().unwrap().to_owned(),
        };
        copies += 1;
        let new = seen.entry(request_id).or_default().insert((kind(&reply), event["id"].as_str().unwrap().to_owned()));
        terminal += usize::from(new && kind(&reply) != "response.queued");
    }
    let elapsed = started.elapsed();
    while relay.amqp.next(&replies, Duration::from_millis(300)).await.is_some() {
        copies += 1;
    }
    let mut reconciled = 0;
    for id in &ids {
        let events = seen.get(id).cloned().unwrap_or_default();
        let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(kinds.len(), 2, "{id}: one queued and one terminal event: {events:?}");
        assert!(kinds.contains(&"response.queued") && kinds.contains(&"response.completed"), "{id}: {events:?}");
        reconciled += events.iter().filter(|(_, e)| e.starts_with("reconciled_")).count();
        assert_eq!(relay.openai.created_for(id).len(), 1, "{id}: one response");
    }
    assert_eq!(reconciled, N / 4, "the responses without webhook came through the safety net, the others not");
    let posts = relay.openai.creates().len();
    assert_eq!(posts, N + 3, "the 429s and one POST per request");
    println!(
        "gateway batch: requests={N} posts={posts} rate_limited=3 duplicate_posts={} responses={N} distinct_replies={} reply_copies={copies} reconciled={reconciled} webhooks={} seconds={:.1}",
        posts - N - 3,
        2 * N,
        relay.openai.webhooks_sent(),
        elapsed.as_secs_f64()
    );
    if copies > 2 * N {
        let metrics = metrics(&relay).await;
        println!("repeated reply copies, at-least-once; retries: {:?}", metrics.lines().filter(|l| l.starts_with("relay_retries_total")).collect::<Vec<_>>());
    }
}
