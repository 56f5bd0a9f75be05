//! The worker: what comes out on the exchange for each kind of event, and how every failure
//! ends in a published event or a dead letter with its reason.

use std::time::{Duration, Instant};

use lapin::message::Delivery;
use openai_webhook_relay::inbox::{header, int_header};
use serde_json::Value;

use crate::fake_openai::Scripted;
use crate::helpers::{Options, Relay, event, id_of, spawn_relay, webhook_id};

const WAIT: Duration = Duration::from_secs(15);

fn fixture(path: &str) -> String {
    std::fs::read_to_string(format!("{}/fixtures/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn json(delivery: &Delivery) -> Value {
    serde_json::from_slice(&delivery.data).expect("CloudEvent is JSON")
}

/// A relay whose output exchange already has a test queue bound to `#`.
async fn relay_with_queue(options: Options) -> (Relay, String) {
    let relay = spawn_relay(options).await;
    let queue = relay.bind("#").await;
    (relay, queue)
}

async fn published(relay: &Relay, queue: &str) -> Delivery {
    relay.amqp.next(queue, WAIT).await.expect("an event is published")
}

#[tokio::test]
async fn response_completed_comes_out_as_the_contracts_cloudevent() {
    let (mut relay, queue) = relay_with_queue(Options::default()).await;
    let body = fixture("webhooks/response.completed.json");
    let id = webhook_id();
    assert_eq!(relay.deliver_as(&id, &body).await.status(), 200);

    let delivery = published(&relay, &queue).await;
    let envelope: Value = serde_json::from_str(&body).unwrap();
    let p = &delivery.properties;
    assert_eq!(delivery.routing_key.as_str(), "response.completed");
    assert_eq!(p.content_type().as_ref().unwrap().as_str(), "application/cloudevents+json");
    assert_eq!(p.message_id().as_ref().unwrap().as_str(), envelope["id"].as_str().unwrap());
    assert_eq!(p.kind().as_ref().unwrap().as_str(), "response.completed");
    assert_eq!(*p.timestamp(), Some(envelope["created_at"].as_u64().unwrap()));
    assert_eq!(*p.delivery_mode(), Some(2));
    assert_eq!(header(p, "webhook-id"), Some(id.as_str()));

    let event = json(&delivery);
    assert_eq!(event["specversion"], "1.0");
    assert_eq!(event["id"], envelope["id"]);
    assert_eq!(event["source"], "openai");
    assert_eq!(event["type"], "com.openai.response.completed");
    assert_eq!(event["subject"], "resp_completed01");
    assert_eq!(event["time"], "2025-08-27T14:55:31Z");
    assert_eq!(event["datacontenttype"], "application/json");
    assert_eq!(event["data"]["event"], envelope);
    let response: Value = serde_json::from_str(&fixture("openai/responses/resp_completed01.json")).unwrap();
    assert_eq!(event["data"]["response"], response);
    let expected_text: String = response["output"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|item| item["type"] == "message")
        .flat_map(|item| item["content"].as_array().unwrap())
        .filter(|part| part["type"] == "output_text")
        .map(|part| part["text"].as_str().unwrap())
        .collect();
    assert!(!expected_text.is_empty());
    assert_eq!(event["data"]["output_text"], expected_text.as_str());
    assert_eq!(relay.openai.bad_auth(), 0, "fetched with the configured key");
    assert_eq!(relay.halt_and_list_left_over().await, Vec::<String>::new(), "inbox message acked");
}

#[tokio::test]
async fn each_fetchable_kind_is_published_under_its_field() {
    let (relay, queue) = relay_with_queue(Options::default()).await;
    let cases = [
        ("response.failed", "responses/resp_failed01", "response"),
        ("response.cancelled", "responses/resp_cancelled01", "response"),
        ("response.incomplete", "responses/resp_incomplete01", "response"),
        ("batch.completed", "batches/batch_completed01", "batch"),
        ("fine_tuning.job.succeeded", "fine_tuning/jobs/ftjob_succeeded01", "fine_tuning_job"),
    ];
    for (event_type, object, field) in cases {
        assert_eq!(relay.deliver(&fixture(&format!("webhooks/{event_type}.json"))).await.status(), 200);
        let delivery = published(&relay, &queue).await;
        assert_eq!(delivery.routing_key.as_str(), event_type);
        let cloud_event = json(&delivery);
        let expected: Value = serde_json::from_str(&fixture(&format!("openai/{object}.json"))).unwrap();
        assert_eq!(cloud_event["data"][field], expected, "{event_type}");
        assert_eq!(cloud_event["subject"], expected["id"], "{event_type}");
        assert_eq!(cloud_event["data"].get("output_text").is_some(), field == "response", "{event_type}");
    }
}

#[tokio::test]
async fn events_with_nothing_to_fetch_pass_through_untouched() {
    let (relay, queue) = relay_with_queue(Options::default()).await;
    for event_type in ["eval.run.succeeded", "realtime.call.incoming", "something.new"] {
        let body = fixture(&format!("webhooks/{event_type}.json"));
        assert_eq!(relay.deliver(&body).await.status(), 200);
        let delivery = published(&relay, &queue).await;
        assert_eq!(delivery.routing_key.as_str(), event_type);
        let cloud_event = json(&delivery);
        assert_eq!(cloud_event["type"], format!("com.openai.{event_type}"));
        let data = cloud_event["data"].as_object().unwrap();
        assert_eq!(data.keys().collect::<Vec<_>>(), ["event"], "{event_type}");
        assert_eq!(data["event"], serde_json::from_str::<Value>(&body).unwrap());
    }
    let realtime: Value = serde_json::from_str(&fixture("webhooks/realtime.call.incoming.json")).unwrap();
    assert_eq!(relay.openai.requests(realtime["data"]["call_id"].as_str().unwrap()), 0);
}

#[tokio::test]
async fn rate_limited_fetch_is_retried_after_retry_after() {
    let (relay, queue) = relay_with_queue(Options::default()).await;
    relay.openai.script("resp_completed01", [Scripted::status(429).header("retry-after-ms", "700")]);
    let started = Instant::now();
    assert_eq!(relay.deliver(&fixture("webhooks/response.completed.json")).await.status(), 200);
    let cloud_event = json(&published(&relay, &queue).await);
    assert!(started.elapsed() >= Duration::from_millis(700), "waited {:?}", started.elapsed());
    assert_eq!(cloud_event["data"]["response"]["id"], "resp_completed01");
    assert_eq!(relay.openai.requests("resp_completed01"), 2);
}

#[tokio::test]
async fn server_errors_timeouts_resets_and_truncated_json_are_retried() {
    let (relay, queue) = relay_with_queue(Options::default().arg("--fetch-timeout-secs", 1)).await;
    relay.openai.script(
        "resp_completed01",
        [
            Scripted::status(500),
            Scripted::status(503).header("retry-after", "0"),
            Scripted::status(200).body(r#"{"id": "resp_completed01", "outp"#),
            Scripted::reset(),
            Scripted::status(200).delay(Duration::from_millis(1500)),
        ],
    );
    assert_eq!(relay.deliver(&fixture("webhooks/response.completed.json")).await.status(), 200);
    let cloud_event = json(&relay.amqp.next(&queue, Duration::from_secs(30)).await.expect("published after retries"));
    assert_eq!(cloud_event["data"]["response"]["status"], "completed");
    assert_eq!(relay.openai.requests("resp_completed01"), 6);
    let metrics = relay.get("/metrics").await.text().await.unwrap();
    for reason in ["500", "503", "decode", "connect", "timeout"] {
        assert!(metrics.contains(&format!(r#"relay_retries_total{{reason="{reason}"}} 1"#)), "{reason}:\n{metrics}");
    }
}

#[tokio::test]
async fn gone_object_is_published_with_fetch_error_and_not_retried() {
    let (relay, queue) = relay_with_queue(Options::default()).await;
    assert_eq!(relay.deliver(&event("response.completed", "resp_expired")).await.status(), 200);
    let cloud_event = json(&published(&relay, &queue).await);
    let data = &cloud_event["data"];
    assert_eq!(data["fetch_error"]["status"], 404);
    assert_eq!(data["fetch_error"]["message"], "Response with id 'resp_expired' not found.");
    assert!(data.get("response").is_none());
    assert_eq!(relay.openai.requests("resp_expired"), 1);
}

#[tokio::test]
async fn wrong_api_key_is_dead_lettered_after_bounded_attempts() {
    let (mut relay, queue) = relay_with_queue(Options::default().arg("--fetch-max-attempts", 3)).await;
    relay.openai.always("resp_completed01", Scripted::status(401).body(r#"{"error":{"message":"Incorrect API key provided.","type":"invalid_request_error"}}"#));
    let id = webhook_id();
    assert_eq!(relay.deliver_as(&id, &fixture("webhooks/response.completed.json")).await.status(), 200);

    let dead = relay.amqp.next(&relay.topology.dead(), WAIT).await.expect("dead-lettered");
    let p = &dead.properties;
    assert_eq!(int_header(p, "x-relay-error-status"), Some(401));
    assert_eq!(int_header(p, "x-relay-attempts"), Some(3));
    assert_eq!(header(p, "x-relay-error-message"), Some("HTTP 401: Incorrect API key provided."));
    assert_eq!(header(p, "webhook-id"), Some(id.as_str()), "original headers kept");
    assert_eq!(dead.data, fixture("webhooks/response.completed.json").as_bytes(), "original body kept");
    assert_eq!(relay.openai.requests("resp_completed01"), 3);
    assert!(relay.amqp.next(&queue, Duration::from_millis(300)).await.is_none(), "nothing published");
    assert_eq!(relay.amqp.count(&relay.topology.dead()).await, 0, "dead-lettered once");
    assert_eq!(relay.halt_and_list_left_over().await, Vec::<String>::new(), "every attempt acked, none still parked");
}

#[tokio::test]
async fn permanent_client_error_is_dead_lettered_at_once() {
    let (relay, _queue) = relay_with_queue(Options::default()).await;
    relay.openai.always("resp_bad", Scripted::status(400));
    let id = webhook_id();
    assert_eq!(relay.deliver_as(&id, &event("response.completed", "resp_bad")).await.status(), 200);
    let dead = relay.amqp.next(&relay.topology.dead(), WAIT).await.expect("dead-lettered");
    assert_eq!(id_of(&dead), id);
    assert_eq!(int_header(&dead.properties, "x-relay-error-status"), Some(400));
    assert_eq!(int_header(&dead.properties, "x-relay-attempts"), Some(1));
    assert_eq!(relay.openai.requests("resp_bad"), 1);
}

#[tokio::test]
async fn unroutable_event_is_kept_until_a_queue_is_bound() {
    let relay = spawn_relay(Options::default().arg("--fetch-max-attempts", 50).arg("--retry-max-delay-ms", 300)).await;
    let id = webhook_id();
    assert_eq!(relay.deliver_as(&id, &event("batch.completed", "batch_completed01")).await.status(), 200);
    // No queue is bound: the broker returns the event, and the relay keeps retrying it.
    let deadline = Instant::now() + WAIT;
    loop {
        let metrics = relay.get("/metrics").await.text().await.unwrap();
        if metrics.lines().any(|l| l.starts_with("relay_unroutable_total") && !l.ends_with(" 0")) {
            break;
        }
        assert!(Instant::now() < deadline, "never returned as unroutable:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let queue = relay.bind("batch.*").await;
    let delivery = published(&relay, &queue).await;
    assert_eq!(id_of(&delivery), id);
    assert_eq!(json(&delivery)["data"]["batch"]["id"], "batch_completed01");
    assert_eq!(relay.amqp.count(&relay.topology.dead()).await, 0);
}

#[tokio::test]
async fn duplicate_delivery_is_published_once() {
    let (mut relay, queue) = relay_with_queue(Options::default()).await;
    let body = event("response.completed", "resp_completed01");
    let id = webhook_id();
    assert_eq!(relay.deliver_as(&id, &body).await.status(), 200);
    assert_eq!(relay.deliver_as(&id, &body).await.status(), 200, "OpenAI still gets its 2xx");
    assert_eq!(id_of(&published(&relay, &queue).await), id);
    assert!(relay.amqp.next(&queue, Duration::from_millis(1500)).await.is_none(), "second copy not published");
    let metrics = relay.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("relay_duplicates_total 1"), "{metrics}");
    assert_eq!(relay.halt_and_list_left_over().await, Vec::<String>::new(), "both copies acked");
}

#[tokio::test]
async fn a_slow_fetch_does_not_hold_up_the_deliveries_behind_it() {
    let (relay, queue) = relay_with_queue(Options::default()).await;
    relay.openai.script("resp_completed01", [Scripted::status(200).body(&fixture("openai/responses/resp_completed01.json")).delay(Duration::from_secs(2))]);
    relay.deliver(&fixture("webhooks/response.completed.json")).await;
    relay.deliver(&fixture("webhooks/batch.completed.json")).await;
    let first = published(&relay, &queue).await;
    assert_eq!(first.routing_key.as_str(), "batch.completed", "the fast one overtakes the slow one");
    let second = published(&relay, &queue).await;
    assert_eq!(second.routing_key.as_str(), "response.completed");
}

#[tokio::test]
async fn multi_megabyte_response_passes_through() {
    let (relay, queue) = relay_with_queue(Options::default()).await;
    let text = "All work and no play. ".repeat(250_000); // 5.5 MB
    let response = serde_json::json!({
        "id": "resp_big", "object": "response", "status": "completed", "created_at": 1_756_306_478,
        "output": [{"id": "msg_big", "type": "message", "role": "assistant", "status": "completed",
                    "content": [{"type": "output_text", "text": text, "annotations": []}]}],
    });
    relay.openai.always("resp_big", Scripted::status(200).body(&response.to_string()));
    assert_eq!(relay.deliver(&event("response.completed", "resp_big")).await.status(), 200);
    let cloud_event = json(&published(&relay, &queue).await);
    assert_eq!(cloud_event["data"]["output_text"].as_str().unwrap().len(), text.len());
    assert_eq!(cloud_event["data"]["response"], response);
}

#[tokio::test]
async fn traceparent_is_carried_into_the_published_event() {
    let (relay, queue) = relay_with_queue(Options::default()).await;
    let body = event("something.new", "x_1");
    let id = webhook_id();
    let ts = openai_webhook_relay::inbox::unix_now();
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let sig = relay.sign(&id, ts, &body);
    let ts = ts.to_string();
    let headers = [("webhook-id", id.as_str()), ("webhook-timestamp", ts.as_str()), ("webhook-signature", sig.as_str()), ("traceparent", traceparent)];
    assert_eq!(relay.post(&headers, body.into_bytes()).await.status(), 200);
    let delivery = published(&relay, &queue).await;
    assert_eq!(header(&delivery.properties, "traceparent"), Some(traceparent));
}

/// Something other than the receiver may put a message into the inbox without a
/// `webhook-id` (the inbox format is a contract). Each such message is its own delivery,
/// keyed by its event id: none is skipped as a duplicate of another.
#[tokio::test]
async fn messages_without_a_webhook_id_are_not_duplicates_of_each_other() {
    use lapin::BasicProperties;
    use lapin::options::BasicPublishOptions;

    let (mut relay, queue) = relay_with_queue(Options::default()).await;
    let bodies = [event("something.new", "x_1"), event("something.new", "x_1")];
    let mut event_ids: Vec<String> = bodies.iter().map(|body| serde_json::from_str::<Value>(body).unwrap()["id"].as_str().unwrap().to_owned()).collect();
    assert_ne!(event_ids[0], event_ids[1]);
    for body in &bodies {
        let properties = BasicProperties::default().with_delivery_mode(2).with_content_type("application/json".into());
        let inbox = relay.topology.inbox.as_str();
        relay.amqp.channel.basic_publish("".into(), inbox.into(), BasicPublishOptions::default(), body.as_bytes(), properties).await.unwrap();
    }

    let mut published = Vec::new();
    for _ in &bodies {
        let delivery = relay.amqp.next(&queue, WAIT).await.unwrap_or_else(|| panic!("only {published:?} of {event_ids:?} published"));
        published.push(delivery.properties.message_id().as_ref().expect("the CloudEvent id").to_string());
    }
    published.sort();
    event_ids.sort();
    assert_eq!(published, event_ids, "both published");
    let metrics = relay.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("relay_duplicates_total 0"), "{metrics}");
    assert_eq!(relay.halt_and_list_left_over().await, Vec::<String>::new(), "both acked");
}

/// The CloudEvent would be bigger than the broker takes (RabbitMQ 4.x closes the channel on
/// it): the small inbox message is dead-lettered as `too_large` instead, and nothing is sent.
#[tokio::test]
async fn a_cloudevent_over_the_message_size_limit_is_dead_lettered_as_too_large() {
    let limit = 2000;
    let object = fixture("openai/responses/resp_completed01.json");
    assert!(object.len() > limit, "the fixture alone is over the limit");
    let (mut relay, queue) = relay_with_queue(Options::default().arg("--max-message-bytes", limit)).await;
    let id = webhook_id();
    assert_eq!(relay.deliver_as(&id, &event("response.completed", "resp_completed01")).await.status(), 200);

    let dead = relay.amqp.next(&relay.topology.dead(), WAIT).await.expect("dead-lettered");
    assert_eq!(id_of(&dead), id);
    let p = &dead.properties;
    assert_eq!(header(p, "x-relay-error-reason"), Some("too_large"));
    assert_eq!(int_header(p, "x-relay-attempts"), Some(1), "not retried: it would be as large again");
    let message = header(p, "x-relay-error-message").unwrap_or_default();
    assert!(message.contains(&format!("over RELAY_MAX_MESSAGE_BYTES ({limit})")), "{message}");
    assert_eq!(relay.openai.requests("resp_completed01"), 1);

    // A small event behind it still goes out, and it is the only one.
    let small = webhook_id();
    assert_eq!(relay.deliver_as(&small, &event("something.new", "x_1")).await.status(), 200);
    assert_eq!(id_of(&published(&relay, &queue).await), small);
    assert!(relay.amqp.next(&queue, Duration::from_millis(300)).await.is_none(), "the large one was not published");
    assert_eq!(relay.halt_and_list_left_over().await, Vec::<String>::new(), "both acked");
}
