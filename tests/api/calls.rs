//! Incoming calls skip the inbox: the receiver publishes them to the exchange itself, with
//! an `expiration`, so that no backlog delays a ringing call; and every family of event
//! OpenAI sends comes out, unknown ones untouched.

use std::collections::BTreeMap;
use std::time::Duration;

use openai_webhook_relay::inbox::unix_now;
use serde_json::{Value, json};

use crate::helpers::{Options, event, spawn_relay, webhook_id};

const WAIT: Duration = Duration::from_secs(15);

fn fixture(path: &str) -> String {
    std::fs::read_to_string(format!("{}/fixtures/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// An event of `kind` with `data` as OpenAI sends it.
fn envelope(kind: &str, data: Value) -> String {
    json!({"id": format!("evt_{:032x}", fastrand::u128(..)), "object": "event", "created_at": unix_now(), "type": kind, "data": data}).to_string()
}

#[tokio::test]
async fn an_incoming_call_reaches_the_exchange_without_a_worker_and_falls_back_to_the_inbox() {
    let relay = spawn_relay(Options::default().role("receiver").arg("--realtime-expiration-ms", 4000)).await;
    let call = fixture("webhooks/realtime.call.incoming.json");

    // No queue is bound: the exchange returns it, so it is stored like any delivery.
    let unbound = webhook_id();
    let answer = relay.deliver_as(&unbound, &call).await;
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.json::<Value>().await.unwrap()["status"], "stored");
    assert_eq!(relay.take_stored_ids().await, [unbound]);

    let queue = relay.bind("realtime.call.*").await;
    let id = webhook_id();
    let answer = relay.deliver_as(&id, &call).await;
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.json::<Value>().await.unwrap()["status"], "published");
    let delivery = relay.amqp.next(&queue, WAIT).await.expect("published with no worker running");
    assert_eq!(delivery.routing_key.as_str(), "realtime.call.incoming");
    assert_eq!(delivery.properties.expiration().as_ref().map(|e| e.as_str()), Some("4000"));
    assert_eq!(delivery.properties.delivery_mode(), &Some(2));
    assert_eq!(crate::helpers::id_of(&delivery), id);
    let cloud_event: Value = serde_json::from_slice(&delivery.data).unwrap();
    assert_eq!(cloud_event["type"], "com.openai.realtime.call.incoming");
    assert_eq!(cloud_event["data"], json!({"event": serde_json::from_str::<Value>(&call).unwrap()}));
    assert!(relay.take_stored_ids().await.is_empty(), "a published call is not also in the inbox");
}

#[tokio::test]
async fn one_event_of_every_family_comes_out_and_only_calls_expire() {
    let relay = spawn_relay(Options::default()).await;
    let queue = relay.bind("#").await;
    let sip = json!([{"name": "From", "value": "sip:+14155550100@example.com"}]);
    let bodies = [
        fixture("webhooks/response.completed.json"),
        event("batch.completed", "batch_completed01"),
        fixture("webhooks/fine_tuning.job.succeeded.json"),
        fixture("webhooks/eval.run.succeeded.json"),
        fixture("webhooks/realtime.call.incoming.json"),
        envelope("live.call.incoming", json!({"session_id": "rtc_live01", "sip_headers": sip})),
        envelope("safety_identifier.blocked", json!({"safety_category": "cyber", "safety_identifier": "user_1"})),
        envelope("video.completed", json!({"id": "video_01"})),
        fixture("webhooks/something.new.json"),
    ];
    let mut sent = BTreeMap::new();
    for body in &bodies {
        let value: Value = serde_json::from_str(body).unwrap();
        assert_eq!(relay.deliver(body).await.status(), 200, "{body}");
        sent.insert(value["type"].as_str().unwrap().to_owned(), value);
    }
    let mut out = BTreeMap::new();
    while out.len() < sent.len() {
        let delivery = relay.amqp.next(&queue, WAIT).await.unwrap_or_else(|| panic!("only {:?} came out", out.keys().collect::<Vec<_>>()));
        let expiration = delivery.properties.expiration().as_ref().map(|e| e.to_string());
        out.insert(delivery.routing_key.to_string(), (expiration, serde_json::from_slice::<Value>(&delivery.data).unwrap()));
    }
    assert_eq!(out.keys().collect::<Vec<_>>(), sent.keys().collect::<Vec<_>>());
    for (kind, (expiration, cloud_event)) in &out {
        assert_eq!(cloud_event["type"], format!("com.openai.{kind}"));
        assert_eq!(cloud_event["data"]["event"], sent[kind], "{kind}: the event as delivered");
        let call = kind.ends_with(".call.incoming");
        assert_eq!(expiration.as_deref(), call.then_some("30000"), "{kind}: expiration (the default for calls)");
    }
    assert_eq!(out["live.call.incoming"].1["subject"], "rtc_live01");
    assert_eq!(relay.amqp.count(&relay.topology.dead()).await, 0);
}
