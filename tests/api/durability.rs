//! The worker's loss paths that the review of 4fd3202 demonstrated, each played against the
//! real broker: an in-flight delivery redelivered after a lost connection while the broker
//! refuses the event, and a refused publish tearing down the whole connection.

use std::collections::HashSet;
use std::time::Duration;

use lapin::options::{QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};

use crate::fake_openai::Scripted;
use crate::helpers::{Options, Relay, event, eventually, spawn_relay};
use crate::proxy::Proxy;

/// A queue bound to everything on the relay's exchange that refuses every message
/// (`x-max-length: 0`, `reject-publish`): the broker nacks every event the relay publishes,
/// as it does when a consumer's bounded queue is full.
async fn refuse_all_events(relay: &Relay) -> String {
    let name = format!("{}.full", relay.topology.exchange);
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
    arguments.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
    let options = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
    let channel = &relay.amqp.channel;
    channel.queue_declare(name.as_str().into(), options, arguments).await.unwrap();
    channel
        .queue_bind(name.as_str().into(), relay.topology.exchange.as_str().into(), "#".into(), QueueBindOptions::default(), FieldTable::default())
        .await
        .unwrap();
    name
}

async fn metrics(relay: &Relay) -> String {
    relay.get("/metrics").await.text().await.unwrap()
}

/// The value of the metric line that starts with `series` (name and labels).
fn value(metrics: &str, series: &str) -> f64 {
    metrics.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0.0)
}

/// Takes events off `queue` until every id of `expected` has come, at most `within`; on
/// failure shows the relay's metrics (where did the rest go?).
async fn published_ids(relay: &Relay, queue: &str, expected: &HashSet<String>, within: Duration) -> HashSet<String> {
    let mut seen = HashSet::new();
    let deadline = std::time::Instant::now() + within;
    while !expected.is_subset(&seen) {
        while let Some(delivery) = relay.amqp.next(queue, Duration::ZERO).await {
            seen.insert(delivery.properties.message_id().as_ref().unwrap().to_string());
        }
        if std::time::Instant::now() > deadline {
            let missing: Vec<_> = expected.difference(&seen).collect();
            panic!("not published after {within:?}: {missing:?}; relay metrics:\n{}", metrics(relay).await);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    seen
}

fn event_id(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body).unwrap()["id"].as_str().unwrap().to_owned()
}

/// Review finding 1 (10 of 10 accepted deliveries lost): the broker connection drops while
/// slow fetches are in flight; the broker redelivers those deliveries to the re-attached
/// consumer; meanwhile every event publish is refused. The old worker acked each
/// redelivered copy as a "duplicate" of the copy still in flight, whose nack then went to a
/// dead channel. Now a copy in flight is `Busy` (parked), a refused publish parks the
/// original, and only a published id counts as handled: every event comes out.
#[tokio::test]
async fn an_in_flight_delivery_redelivered_after_a_lost_connection_is_not_lost_when_publishes_are_refused() {
    let proxy = Proxy::start("127.0.0.1:5672").await;
    let relay = spawn_relay(Options { amqp_url: proxy.amqp_url(), ..Default::default() }).await;
    relay.wait_ready().await;
    let full = refuse_all_events(&relay).await;
    let mut expected = HashSet::new();
    for i in 0..5 {
        let id = format!("resp_inflight{i}");
        relay.openai.script(&id, [Scripted::completed(&id).delay(Duration::from_secs(3))]);
        let body = event("response.completed", &id);
        assert_eq!(relay.deliver(&body).await.status(), 200);
        expected.insert(event_id(&body));
    }
    eventually(Duration::from_secs(10), "the worker holds all 5 deliveries in slow fetches", async || {
        (value(&metrics(&relay).await, "relay_deliveries_in_flight") >= 5.0).then_some(())
    })
    .await;
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.restore();
    relay.wait_ready().await;
    // The originals finish their fetch on the new link, are refused and parked; their acks
    // go to the dead channel and are counted.
    eventually(Duration::from_secs(15), "acks on the lost channel counted", async || {
        (value(&metrics(&relay).await, r#"relay_settle_failures_total{op="ack"}"#) >= 1.0).then_some(())
    })
    .await;
    // Bound first: RabbitMQ confirms a message whose only queue is deleted under it, and such
    // an event would be gone with the queue (the test's doing, not the relay's).
    let out = relay.bind("#").await;
    relay.amqp.channel.queue_delete(full.as_str().into(), QueueDeleteOptions::default()).await.unwrap();
    let seen = published_ids(&relay, &out, &expected, Duration::from_secs(60)).await;
    assert!(expected.is_subset(&seen));
    let m = metrics(&relay).await;
    assert!(value(&m, r#"relay_retries_total{reason="broker_refused"}"#) >= 1.0, "the refused publishes were parked:\n{m}");
}

/// Review finding 3: a nacked publish replaced the whole connection, consumer included (11
/// connects in 5 s for 10 nacks). Now only the publishing channel is replaced; the refused
/// delivery is parked and published once the broker takes it.
#[tokio::test]
async fn a_refused_event_is_retried_without_reconnecting() {
    // Enough attempts that a slow machine cannot use them all up before the queue goes.
    let relay = spawn_relay(Options::default().arg("--fetch-max-attempts", 30)).await;
    let full = refuse_all_events(&relay).await;
    let mut expected = HashSet::new();
    for _ in 0..3 {
        let body = event("something.new", "x_1");
        assert_eq!(relay.deliver(&body).await.status(), 200);
        expected.insert(event_id(&body));
    }
    eventually(Duration::from_secs(10), "three refused publishes parked", async || {
        (value(&metrics(&relay).await, r#"relay_retries_total{reason="broker_refused"}"#) >= 3.0).then_some(())
    })
    .await;
    // Deliveries are still taken while the events are refused.
    assert_eq!(relay.deliver(&event("something.new", "x_1")).await.status(), 200);
    let out = relay.bind("#").await; // before the delete, as above
    relay.amqp.channel.queue_delete(full.as_str().into(), QueueDeleteOptions::default()).await.unwrap();
    published_ids(&relay, &out, &expected, Duration::from_secs(30)).await;
    let m = metrics(&relay).await;
    assert_eq!(value(&m, "relay_broker_connects_total"), 1.0, "no reconnect for a refused message:\n{m}");
    assert_eq!(value(&m, "relay_settle_failures_total{op=\"ack\"}"), 0.0);
}

/// Parked messages carry no TTL: the worker releases each one when its `x-relay-due-at`
/// comes, in a tier it holds (100 ms) and in one it polls (the longest), and leaves those
/// not due.
#[tokio::test]
async fn parked_messages_are_released_by_the_worker_when_due() {
    use lapin::BasicProperties;
    use lapin::options::BasicPublishOptions;
    use openai_webhook_relay::topology::MAX_DELAY;

    let relay = spawn_relay(Options::default()).await;
    let out = relay.bind("#").await;
    let now_ms = i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()).unwrap();
    let parked = [
        ("wh_short_due", Duration::from_millis(100), now_ms + 300),
        ("wh_long_due", MAX_DELAY, now_ms - 1_000),
        ("wh_not_due", Duration::from_millis(409_600), now_ms + 60_000),
        ("wh_long_not_due", MAX_DELAY, now_ms + 3_600_000),
    ];
    let mut bodies = Vec::new();
    for (webhook_id, tier, due) in parked {
        let body = event("something.new", "x_1");
        let mut headers = FieldTable::default();
        headers.insert("webhook-id".into(), AMQPValue::LongString(webhook_id.into()));
        headers.insert("x-relay-due-at".into(), AMQPValue::LongLongInt(due));
        let properties = BasicProperties::default().with_delivery_mode(2).with_message_id(webhook_id.into()).with_headers(headers);
        let queue = relay.topology.delay_queue(tier);
        let confirm = relay.amqp.channel.basic_publish("".into(), queue.as_str().into(), BasicPublishOptions::default(), body.as_bytes(), properties).await.unwrap();
        confirm.await.unwrap();
        bodies.push(body);
    }
    let expected: HashSet<String> = [event_id(&bodies[0]), event_id(&bodies[1])].into();
    let seen = published_ids(&relay, &out, &expected, Duration::from_secs(30)).await;
    assert!(!seen.contains(&event_id(&bodies[2])) && !seen.contains(&event_id(&bodies[3])), "a message not yet due was released");
    eventually(Duration::from_secs(10), "both releases counted", async || {
        (value(&metrics(&relay).await, "relay_released_total") == 2.0).then_some(())
    })
    .await;
    assert_eq!(relay.amqp.count(&relay.topology.delay_queue(MAX_DELAY)).await, 1, "the long one not due stays parked");
}

/// lapin hands a `basic.return` to whichever confirm of the next (possibly multiple) ack it
/// happens to complete first, so on a shared channel an unroutable publish could be told
/// "acked" while a routed one is told "returned". The broker publish must tell each
/// publish its own fate: every publish to a queue that does not exist fails as unroutable,
/// every publish to one that does succeeds, however the broker batches its acks.
#[tokio::test]
async fn concurrent_publishes_get_their_own_return() {
    use std::sync::Arc;
    use openai_webhook_relay::broker::{Broker, Nodes, Outgoing, PublishError};
    use openai_webhook_relay::metrics::Metrics;

    let (topology, _cleanup, amqp) = crate::helpers::declared_topology().await;
    let metrics = Arc::new(Metrics::default());
    let nodes = Nodes::parse(&crate::helpers::amqp_url()).unwrap();
    let broker = Broker::start(nodes, topology.clone(), false, Duration::from_secs(10), metrics.clone());
    eventually(Duration::from_secs(10), "broker link", async || broker.is_ready().then_some(())).await;
    let missing = format!("{}.missing", topology.inbox);

    let mut wrong = Vec::new();
    for round in 0..20 {
        let publishes = (0..200).map(|i| {
            let broker = broker.clone();
            let (target, routed) = if i % 7 == round % 7 { (missing.clone(), false) } else { (topology.inbox.clone(), true) };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let body = format!("{round}-{i}");
                let properties = lapin::BasicProperties::default().with_message_id(body.as_str().into());
                let message = Outgoing { exchange: "", routing_key: &target, body: body.as_bytes(), properties };
                let result = broker.publish(message, &metrics.publish_confirm_seconds).await;
                match (routed, result) {
                    (true, Ok(())) | (false, Err(PublishError::Unroutable(_))) => None,
                    (routed, result) => Some(format!("{body} routed={routed}: {result:?}")),
                }
            })
        });
        for outcome in futures::future::join_all(publishes).await {
            wrong.extend(outcome.unwrap());
        }
    }
    broker.close().await;
    let stored = amqp.take_all(&topology.inbox).await.len();
    assert!(wrong.is_empty(), "{} of 4000 publishes were told another publish's fate (stored {stored}): {:?}", wrong.len(), &wrong[..wrong.len().min(10)]);
}

/// A claim whose handling is abandoned (the worker's time limit dropped it) must not hold its
/// delivery back: in Redis, another replica would otherwise see it `Busy` until it expires.
#[tokio::test]
async fn a_dropped_redis_claim_is_released() {
    use openai_webhook_relay::worker::dedup::{Claim, Held, Shared, Store};
    let shared = Shared::connect("redis://127.0.0.1:6379".into(), Duration::from_secs(60), Duration::from_secs(600)).await.unwrap();
    let store = Store::Redis(&shared);
    let key = format!("test/dropped-{:016x}", fastrand::u64(..));
    assert_eq!(store.claim(&key).await, Claim::Fresh);
    assert_eq!(store.claim(&key).await, Claim::Busy, "claimed and held");
    drop(Held::new(store, &key));
    eventually(Duration::from_secs(5), "the dropped claim is released", async || (store.claim(&key).await == Claim::Fresh).then_some(())).await;
    Held::new(store, &key).release().await;
}
