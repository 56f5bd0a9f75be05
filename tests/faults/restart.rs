//! The broker restarted (`rabbitmqctl stop_app` / `start_app`, as in any rolling upgrade)
//! while deliveries are parked in the delay queues or held unacked by a busy worker.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::fake_openai::{FakeOpenAi, Scripted};
use crate::harness::{BrokerStopped, Relay, SERIAL, amqp_url, collect, event, load, rabbitmqctl, report};

/// The operator's scenario from the durability issue: 24 senders, 12,000 deliveries, every
/// 20th object's fetch fails once with 503 (so retries are parked all along), and mid-stream
/// every broker connection closed, the broker app stopped and started, then the relay
/// killed with SIGKILL twice. Before the delay queues were quorum queues with at-least-once
/// dead-lettering, 6 to 11 of the parked deliveries were lost in every run.
#[tokio::test]
async fn broker_restart_with_parked_retries_connection_closes_and_sigkills_lose_nothing() {
    const DELIVERIES: usize = 12_000;
    let _serial = SERIAL.lock().await;
    let openai = FakeOpenAi::start().await.unwrap();
    // Retries wait 1.5 to 3 s, in the 1 600 and 6 400 ms delay queues: many are parked
    // while the broker is down.
    let mut relay = Relay::start(&openai, &amqp_url(), &[("RELAY_RETRY_INITIAL_DELAY_MS", "3000"), ("RELAY_RETRY_MAX_DELAY_MS", "6000")]).await;
    let api = openai.clone();
    let make = Arc::new(move |n: usize| {
        let id = format!("resp_r{n}");
        let first = if n.is_multiple_of(20) { vec![Scripted::status(503)] } else { Vec::new() };
        api.script(&id, first.into_iter().chain([Scripted::completed(&id)]));
        event("response.completed", &id)
    });
    let stop = CancellationToken::new();
    let senders = tokio::spawn(load(relay.url(), 24, DELIVERIES, stop.clone(), make));

    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::task::spawn_blocking(|| rabbitmqctl(&["close_all_connections", "fault test"])).await.unwrap();
    relay.wait_ready().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let parked = parked(&relay).await;
    let stopped = BrokerStopped::stop().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stopped.start().await;
    relay.wait_ready().await;
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        relay.crash_and_restart().await;
        relay.wait_ready().await;
    }
    let sender = senders.await.unwrap();
    assert_eq!(sender.sent, DELIVERIES);
    let outcome = collect(&relay, &sender.acked, Duration::from_secs(120)).await;
    println!("broker_restart_parked: parked when the broker stopped={parked}");
    let lost = report("broker_restart_parked", &sender, &outcome);
    assert!(parked > 0, "no retry was parked when the broker stopped: the test proves nothing");
    assert_eq!(lost, 0);
}

/// The worker busy with slow fetches (each takes 0.5 s, 32 at a time, 64 prefetched), so
/// deliveries are held unacked when the broker stops; they come back when it starts and
/// nothing is lost.
#[tokio::test]
async fn broker_restart_while_the_worker_holds_unacked_deliveries_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let openai = FakeOpenAi::start().await.unwrap();
    let relay = Relay::start(&openai, &amqp_url(), &[("RELAY_FETCH_TIMEOUT_SECS", "10")]).await;
    let api = openai.clone();
    let make = Arc::new(move |n: usize| {
        let id = format!("resp_s{n}");
        api.always(&id, Scripted::completed(&id).delay(Duration::from_millis(500)));
        event("response.completed", &id)
    });
    let stop = CancellationToken::new();
    let senders = tokio::spawn(load(relay.url(), 16, 1_000, stop.clone(), make));
    // Wait until the worker holds a full set of slow fetches.
    let held = wait_until_held(&relay, Duration::from_secs(30)).await;
    let stopped = BrokerStopped::stop().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stopped.start().await;
    relay.wait_ready().await;
    let sender = senders.await.unwrap();
    let outcome = collect(&relay, &sender.acked, Duration::from_secs(120)).await;
    println!("broker_restart_busy_worker: deliveries held by the worker when the broker stopped={held}");
    assert_eq!(report("broker_restart_busy_worker", &sender, &outcome), 0);
}

/// Messages sitting in the relay's delay queues now, read from the broker.
async fn parked(relay: &Relay) -> u64 {
    let names = relay.topology.queues();
    tokio::task::spawn_blocking(move || {
        crate::harness::queue_counts()
            .into_iter()
            .filter(|(name, _, _)| names.contains(name) && name.contains(".delay."))
            .map(|(_, ready, unacked)| ready + unacked)
            .sum()
    })
    .await
    .unwrap()
}

/// Waits until the relay's worker holds deliveries (its in-flight gauge), returns how many.
async fn wait_until_held(relay: &Relay, within: Duration) -> u64 {
    let started = std::time::Instant::now();
    loop {
        let held = relay.metric("relay_deliveries_in_flight").await.unwrap_or(0.0) as u64;
        if held >= 16 {
            return held;
        }
        assert!(started.elapsed() < within, "the worker never held 16 deliveries (held {held})");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
