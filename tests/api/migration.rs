//! Starting this version on a broker where the previous one left its queues: the classic
//! retry tiers `<inbox>.retry.<tier>ms` (with parked retries in them), and the inbox and
//! dead-letter queue declared without delivery limits or at-least-once dead-lettering. A
//! redeclare with other arguments fails with 406; the relay must neither crash-loop on it
//! nor lose what those queues hold.

use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};
use openai_webhook_relay::topology::{DELAY_TIERS, Topology, table};

use crate::fake_openai::FakeOpenAi;
use crate::helpers::{Amqp, Cleanup, Options, event, eventually, id_of, spawn_relay_with, unique_topology};

fn old_tier(topology: &Topology, tier: Duration) -> String {
    format!("{}.retry.{}ms", topology.inbox, tier.as_millis())
}

/// Declares the queues exactly as the version before the quorum delay queues did.
async fn declare_previous_version(channel: &Channel, topology: &Topology) {
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    let quorum = table([("x-queue-type", AMQPValue::LongString("quorum".into()))]);
    channel.queue_declare(topology.inbox.as_str().into(), durable, quorum.clone()).await.unwrap();
    channel.queue_declare(topology.dead().as_str().into(), durable, quorum).await.unwrap();
    for tier in DELAY_TIERS {
        let classic = table([
            ("x-dead-letter-exchange", AMQPValue::LongString("".into())),
            ("x-dead-letter-routing-key", AMQPValue::LongString(topology.inbox.as_str().into())),
        ]);
        channel.queue_declare(old_tier(topology, tier).as_str().into(), durable, classic).await.unwrap();
    }
}

/// A message as the previous version stored or parked it.
async fn put(channel: &Channel, queue: &str, webhook_id: &str, extra: &[(&str, AMQPValue)], expiration: Option<&str>) {
    let mut headers = FieldTable::default();
    headers.insert("webhook-id".into(), AMQPValue::LongString(webhook_id.into()));
    for (name, value) in extra {
        headers.insert((*name).into(), value.clone());
    }
    let mut properties = BasicProperties::default().with_delivery_mode(2).with_message_id(webhook_id.into()).with_headers(headers);
    if let Some(expiration) = expiration {
        properties = properties.with_expiration(expiration.into());
    }
    let body = event("something.new", "x_1");
    let confirm = channel.basic_publish("".into(), queue.into(), BasicPublishOptions { mandatory: true, ..Default::default() }, body.as_bytes(), properties).await.unwrap();
    confirm.await.unwrap();
}

fn cleanup(topology: &Topology) -> Cleanup {
    let mut cleanup = Cleanup::topology(topology);
    for tier in DELAY_TIERS {
        cleanup = cleanup.and_queue(&old_tier(topology, tier));
    }
    cleanup.and_queue(&format!("{}.migrating", topology.inbox)).and_queue(&format!("{}.migrating", topology.dead()))
}

async fn exists(queue: &str) -> bool {
    // A passive declare of a missing queue closes its channel: a connection of its own.
    let amqp = Amqp::connect().await;
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    amqp.channel.queue_declare(queue.into(), passive, FieldTable::default()).await.is_ok()
}

fn metric(metrics: &str, name: &str) -> f64 {
    metrics.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(-1.0)
}

#[tokio::test]
async fn queues_of_the_previous_version_are_migrated_without_losing_a_message() {
    let topology = unique_topology();
    let _cleanup = cleanup(&topology);
    let amqp = Amqp::connect().await;
    let channel = &amqp.channel;
    channel.confirm_select(Default::default()).await.unwrap();
    declare_previous_version(channel, &topology).await;
    // The output exchange and a queue of the test's, bound before the relay starts.
    channel
        .exchange_declare(topology.exchange.as_str().into(), ExchangeKind::Topic, ExchangeDeclareOptions { durable: true, ..Default::default() }, FieldTable::default())
        .await
        .unwrap();
    let out = amqp.bind(&topology.exchange, "#").await;

    put(channel, &topology.inbox, "wh_inbox_1", &[], None).await;
    put(channel, &topology.inbox, "wh_inbox_2", &[], None).await;
    let dead_reason = [("x-relay-error-reason", AMQPValue::LongString("401".into()))];
    put(channel, &topology.dead(), "wh_dead_1", &dead_reason, None).await;
    // Parked by the previous version for 3 s in the 6 400 ms tier: still parked when the
    // relay starts a moment later.
    let attempts = [("x-relay-attempts", AMQPValue::LongLongInt(1))];
    for id in ["wh_parked_1", "wh_parked_2"] {
        put(channel, &old_tier(&topology, Duration::from_millis(6_400)), id, &attempts, Some("3000")).await;
    }

    let relay = spawn_relay_with(Options::default(), FakeOpenAi::start().await.unwrap(), topology.clone()).await;
    let mut published = Vec::new();
    eventually(Duration::from_secs(30), "the two inbox and the two parked deliveries published", async || {
        while let Some(delivery) = amqp.next(&out, Duration::ZERO).await {
            published.push(id_of(&delivery));
        }
        (published.len() >= 4).then_some(())
    })
    .await;
    published.sort();
    assert_eq!(published, ["wh_inbox_1", "wh_inbox_2", "wh_parked_1", "wh_parked_2"]);

    for tier in DELAY_TIERS {
        assert!(!exists(&old_tier(&topology, tier)).await, "{} is gone", old_tier(&topology, tier));
    }
    let metrics = relay.get("/metrics").await.text().await.unwrap();
    assert_eq!(metric(&metrics, "relay_queues_outdated"), 0.0, "{metrics}");
    assert!(metric(&metrics, "relay_migrated_messages_total") >= 5.0, "{metrics}");
    assert_eq!(metric(&metrics, "relay_broker_connects_total"), 1.0, "no reconnect loop: {metrics}");

    let mut relay = relay;
    relay.halt().await.unwrap();
    // The inbox and the dead-letter queue now have the current arguments: declaring them
    // with those succeeds (it would fail with 406 otherwise).
    let fresh = Amqp::connect().await;
    for spec in topology.queue_specs() {
        spec.declare(&fresh.channel).await.unwrap_or_else(|e| panic!("{} has other arguments: {e}", spec.name));
    }
    let dead: Vec<String> = fresh.take_all(&topology.dead()).await.iter().map(id_of).collect();
    assert_eq!(dead, ["wh_dead_1"], "the dead letter moved with its queue");
    assert!(fresh.left_over(&topology).await.is_empty());
}

/// An inbox of the previous version that another process still consumes (an old replica
/// during a rolling upgrade) cannot be rebuilt: the relay uses it as it is, says so, and
/// keeps serving without a reconnect loop.
#[tokio::test]
async fn an_old_inbox_still_consumed_elsewhere_is_used_as_it_is() {
    let topology = unique_topology();
    let _cleanup = cleanup(&topology);
    let other = Amqp::connect().await;
    declare_previous_version(&other.channel, &topology).await;
    let _old_replica = other
        .channel
        .basic_consume(topology.inbox.as_str().into(), "old-replica".into(), Default::default(), FieldTable::default())
        .await
        .unwrap();

    let relay = spawn_relay_with(Options::default().role("receiver"), FakeOpenAi::start().await.unwrap(), topology.clone()).await;
    assert_eq!(relay.deliver(&event("something.new", "x_1")).await.status(), 200);
    let metrics = eventually(Duration::from_secs(5), "the outdated inbox reported", async || {
        let metrics = relay.get("/metrics").await.text().await.unwrap();
        (metric(&metrics, "relay_queues_outdated") >= 1.0).then_some(metrics)
    })
    .await;
    assert_eq!(metric(&metrics, "relay_broker_connects_total"), 1.0, "no reconnect loop: {metrics}");
}
