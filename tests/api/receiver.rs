//! The receiver: what is stored in the inbox, and what is refused before it gets there.

use std::time::Duration;

use openai_webhook_relay::inbox::{header, unix_now};

use crate::helpers::{Options, event, spawn_relay, webhook_id};

fn receiver() -> Options {
    Options::default().role("receiver")
}

#[tokio::test]
async fn signed_delivery_is_stored_in_the_inbox_before_200() {
    let relay = spawn_relay(receiver()).await;
    let body = event("response.completed", "resp_1");
    let id = webhook_id();
    let response = relay.deliver_as(&id, &body).await;
    assert_eq!(response.status(), 200);
    let answer: serde_json::Value = response.json().await.unwrap();
    assert_eq!(answer["webhook_id"], id.as_str());

    // The 200 came after the confirm, so the message is there now, without waiting.
    assert_eq!(relay.amqp.count(&relay.topology.inbox).await, 1);
    let stored = relay.amqp.next(&relay.topology.inbox, Duration::ZERO).await.unwrap();
    assert_eq!(stored.data, body.as_bytes(), "body is the raw bytes received");
    let p = &stored.properties;
    assert_eq!(p.message_id().as_ref().map(|s| s.as_str()), Some(id.as_str()));
    assert_eq!(*p.delivery_mode(), Some(2));
    assert_eq!(header(p, "webhook-id"), Some(id.as_str()));
    assert!(header(p, "webhook-timestamp").unwrap().parse::<i64>().unwrap() >= unix_now() - 5);
    assert!(header(p, "webhook-signature").unwrap().starts_with("v1,"));
}

#[tokio::test]
async fn openai_sdk_test_vector_is_accepted_end_to_end() {
    // The vector is signed at 1750861210; widen the tolerance so the timestamp passes.
    let mut options = receiver();
    options.secrets = "whsec_RdvaYFYUXuIFuEbvZHwMfYFhUf7aMYjYcmM24+Aj40c=".into();
    options.tolerance_secs = 10_000_000_000;
    let relay = spawn_relay(options).await;
    let payload = r#"{"id": "evt_685c059ae3a481909bdc86819b066fb6", "object": "event", "created_at": 1750861210, "type": "response.completed", "data": {"id": "resp_123"}}"#;
    let response = relay
        .post(
            &[
                ("webhook-id", "wh_685c059ae39c8190af8c71ed1022a24d"),
                ("webhook-timestamp", "1750861210"),
                ("webhook-signature", "v1,gUAg4R2hWouRZqRQG4uJypNS8YK885G838+EHb4nKBY="),
            ],
            payload.as_bytes().to_vec(),
        )
        .await;
    assert_eq!(response.status(), 200);
    let stored = relay.amqp.next(&relay.topology.inbox, Duration::ZERO).await.unwrap();
    assert_eq!(stored.data, payload.as_bytes());
}

#[tokio::test]
async fn unverifiable_deliveries_get_401_and_never_reach_the_inbox() {
    let relay = spawn_relay(receiver()).await;
    let body = event("response.completed", "resp_1");
    let id = webhook_id();
    let tampered = body.replace("resp_1", "resp_2");
    // Each case reads the clock just before its request, the relay just after. Its clock
    // only moves on, so 301 s in the past stays outside the 300 s window. A timestamp in the
    // future gets closer instead, and the window is inclusive (300 s ahead is accepted): 310 s
    // gives 10 s of margin. The exact edges, ±300 accepted and ±301 refused, are checked at a
    // fixed `now` by `timestamp_window_is_inclusive_at_the_tolerance` in src/verify/tests.rs.
    // (case, timestamp offset, signed over `body` or a wrong signature, payload sent)
    let cases = [
        ("wrong signature", 0, false, &body),
        ("tampered body", 0, true, &tampered),
        ("stale timestamp", -301, true, &body),
        ("future timestamp", 310, true, &body),
    ];
    for (case, offset, signed, payload) in cases {
        let ts = unix_now() + offset;
        let sig = if signed { relay.sign(&id, ts, &body) } else { "v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".to_owned() };
        let response = relay.post(&[("webhook-id", &id), ("webhook-timestamp", &ts.to_string()), ("webhook-signature", &sig)], payload.as_bytes().to_vec()).await;
        assert_eq!(response.status(), 401, "{case}");
        let answer: serde_json::Value = response.json().await.unwrap();
        assert_eq!(answer["error"], "webhook verification failed", "{case}: no hint which check failed");
    }
    assert_eq!(relay.amqp.count(&relay.topology.inbox).await, 0);
    let metrics = relay.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains(r#"relay_deliveries_total{outcome="unauthorized"} 4"#), "{metrics}");
    assert!(metrics.contains(r#"relay_verify_failures_total{reason="too_old"} 1"#), "{metrics}");
}

#[tokio::test]
async fn malformed_deliveries_get_400_and_never_reach_the_inbox() {
    let relay = spawn_relay(receiver()).await;
    let body = event("response.completed", "resp_1");
    let id = webhook_id();
    let now = unix_now().to_string();
    let sig = relay.sign(&id, unix_now(), &body);
    let all = [("webhook-id", id.as_str()), ("webhook-timestamp", now.as_str()), ("webhook-signature", sig.as_str())];
    for missing in 0..3 {
        let headers: Vec<_> = all.iter().enumerate().filter(|(i, _)| *i != missing).map(|(_, h)| *h).collect();
        let response = relay.post(&headers, body.clone().into_bytes()).await;
        assert_eq!(response.status(), 400, "without {}", all[missing].0);
        let answer: serde_json::Value = response.json().await.unwrap();
        assert_eq!(answer["error"], format!("missing header {}", all[missing].0));
    }
    let response = relay.post(&[all[0], ("webhook-timestamp", "soon"), all[2]], body.clone().into_bytes()).await;
    assert_eq!(response.status(), 400, "non-numeric timestamp");

    // Correctly signed, but not an event: still refused, so the worker never sees it.
    for not_an_event in ["not json at all", "[1,2,3]", r#"{"id":"evt_1","type":"response.completed"}"#] {
        let response = relay.deliver(not_an_event).await;
        assert_eq!(response.status(), 400, "{not_an_event}");
    }
    assert_eq!(relay.amqp.count(&relay.topology.inbox).await, 0);
}

/// The `webhook-id` becomes the inbox message's `message_id`, an AMQP short string of at most
/// 255 bytes (lapin panics on a longer one: the connection used to close without an answer).
#[tokio::test]
async fn a_webhook_id_over_255_bytes_gets_400_and_is_not_stored() {
    let relay = spawn_relay(receiver()).await;
    let id = format!("wh_{}", "x".repeat(297));
    let response = relay.deliver_as(&id, &event("response.completed", "resp_1")).await;
    assert_eq!(response.status(), 400);
    let answer: serde_json::Value = response.json().await.unwrap();
    assert_eq!(answer["error"], "header webhook-id is longer than 255 bytes");
    assert_eq!(relay.amqp.count(&relay.topology.inbox).await, 0);
    let metrics = relay.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains(r#"relay_verify_failures_total{reason="id_too_long"} 1"#), "{metrics}");
}

#[tokio::test]
async fn body_over_the_limit_gets_413() {
    let relay = spawn_relay(receiver().arg("--body-limit-bytes", 4096)).await;
    let big = format!(r#"{{"id":"evt_1","type":"response.completed","created_at":1,"data":{{"id":"resp_1"}},"pad":"{}"}}"#, "x".repeat(5000));
    let response = relay.deliver(&big).await;
    assert_eq!(response.status(), 413);
    let small = event("response.completed", "resp_1");
    let id = webhook_id();
    assert_eq!(relay.deliver_as(&id, &small).await.status(), 200, "the limit is not lower than asked");
    assert_eq!(relay.take_stored_ids().await, [id], "only the small one stored");
}

#[tokio::test]
async fn broker_unreachable_gets_503_with_retry_after_and_readyz_503() {
    // Nothing listens on port 1: the relay starts anyway and refuses deliveries.
    let mut options = receiver();
    options.amqp_url = "amqp://guest:guest@127.0.0.1:1/%2f".into();
    let relay = spawn_relay(options).await;
    assert_eq!(relay.get("/healthz").await.status(), 200);
    assert_eq!(relay.get("/readyz").await.status(), 503);
    let response = relay.deliver(&event("response.completed", "resp_1")).await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "5");
}

#[tokio::test]
async fn readyz_and_metrics_report_the_broker_link() {
    let relay = spawn_relay(receiver()).await;
    assert_eq!(relay.get("/readyz").await.status(), 200);
    assert_eq!(relay.deliver(&event("batch.completed", "batch_1")).await.status(), 200);
    let metrics = relay.get("/metrics").await.text().await.unwrap();
    for expected in [
        "relay_broker_connected 1",
        r#"relay_deliveries_total{outcome="accepted"} 1"#,
        "relay_inbox_store_seconds_count 1",
    ] {
        assert!(metrics.contains(expected), "missing {expected} in\n{metrics}");
    }
}

#[tokio::test]
async fn the_secret_list_supports_rotation() {
    let old = crate::helpers::secret_text();
    let new = format!("whsec_{}", base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [7u8; 32]));
    let mut options = receiver();
    options.secrets = format!("{new}, {old}");
    let relay = spawn_relay(options).await;
    // `deliver` signs with the first secret (new); sign with the old one by hand.
    let signed_with_new = webhook_id();
    assert_eq!(relay.deliver_as(&signed_with_new, &event("response.completed", "resp_1")).await.status(), 200);
    let body = event("response.completed", "resp_2");
    let id = webhook_id();
    let ts = unix_now();
    let old_sig = openai_webhook_relay::verify::Secret::parse(&old).unwrap().sign(&id, &ts.to_string(), body.as_bytes());
    let response = relay.post(&[("webhook-id", &id), ("webhook-timestamp", &ts.to_string()), ("webhook-signature", &old_sig)], body.into_bytes()).await;
    assert_eq!(response.status(), 200);
    assert_eq!(relay.take_stored_ids().await, [signed_with_new, id]);
}
