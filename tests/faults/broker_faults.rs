//! The broker going away or refusing work while deliveries keep coming.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::fake_openai::FakeOpenAi;
use crate::harness::{Relay, SERIAL, amqp_url, collect, event, load, rabbitmqctl, report};
use crate::proxy::Proxy;

fn passthrough() -> Arc<dyn Fn(usize) -> String + Send + Sync> {
    Arc::new(|_| event("something.new", "x_1"))
}

#[tokio::test]
async fn broker_connections_cut_repeatedly_under_load_lose_nothing() {
    let _serial = SERIAL.lock().await;
    let openai = FakeOpenAi::start().await.unwrap();
    let proxy = Proxy::start("127.0.0.1:5672").await;
    let relay = Relay::start(&openai, &proxy.amqp_url(), &[]).await;
    let stop = CancellationToken::new();
    let senders = tokio::spawn(load(relay.url(), 8, usize::MAX, stop.clone(), passthrough()));
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        proxy.cut();
        tokio::time::sleep(Duration::from_millis(300)).await;
        proxy.restore();
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.cancel();
    let sender = senders.await.unwrap();
    let outcome = collect(&relay, &sender.acked, Duration::from_secs(30)).await;
    let lost = report("broker_cuts", &sender, &outcome);
    assert!(sender.attempts > sender.sent, "the cuts refused some deliveries");
    assert_eq!(lost, 0);
}

#[tokio::test]
async fn rabbitmqctl_close_all_connections_under_load_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let openai = FakeOpenAi::start().await.unwrap();
    let relay = Relay::start(&openai, &amqp_url(), &[]).await;
    let stop = CancellationToken::new();
    let senders = tokio::spawn(load(relay.url(), 8, usize::MAX, stop.clone(), passthrough()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::task::spawn_blocking(|| rabbitmqctl(&["close_all_connections", "fault test"])).await.unwrap();
    relay.wait_ready().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let sender = senders.await.unwrap();
    let outcome = collect(&relay, &sender.acked, Duration::from_secs(30)).await;
    assert_eq!(report("close_all_connections", &sender, &outcome), 0);
}

#[tokio::test]
async fn broker_refusing_publishes_gets_503_and_recovers() {
    let _serial = SERIAL.lock().await;
    let openai = FakeOpenAi::start().await.unwrap();
    // Receiver only: the inbox fills up and nothing drains it.
    let receiver = Relay::start(&openai, &amqp_url(), &[("RELAY_ROLE", "receiver")]).await;
    let inbox = receiver.topology.inbox.clone();
    let policy = format!("{inbox}.limit");
    let pattern = format!("^{}$", inbox.replace('.', "\\."));
    let (p, pat) = (policy.clone(), pattern.clone());
    // Only a length limit, as an operator would add it: the inbox's own `x-overflow:
    // reject-publish` makes it refuse publishes instead of dropping the oldest deliveries
    // (RabbitMQ's default, `drop-head`, would silently lose deliveries already answered 200).
    let (q, name) = (inbox.clone(), policy.clone());
    tokio::task::spawn_blocking(move || {
        rabbitmqctl(&["set_policy", "--apply-to", "queues", &p, &pat, r#"{"max-length":20}"#]);
        // RabbitMQ applies policies asynchronously.
        let started = std::time::Instant::now();
        while !crate::harness::queue_policies().iter().any(|(queue, applied)| *queue == q && *applied == name) {
            assert!(started.elapsed() < Duration::from_secs(10), "policy {name} not applied to {q} after 10 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await
    .unwrap();

    let stop = CancellationToken::new();
    let senders = tokio::spawn(load(receiver.url(), 4, usize::MAX, stop.clone(), passthrough()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_connection, channel) = crate::harness::connect().await;
    let passive = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
    let held = channel.queue_declare(inbox.as_str().into(), passive, Default::default()).await.unwrap().message_count();
    // A quorum queue checks the limit as it applies commands, so the publishes in flight
    // when it is reached (at most one per sender) may still get in.
    assert!((20..=24).contains(&held), "the limit holds: {held} messages");
    tokio::task::spawn_blocking(move || rabbitmqctl(&["clear_policy", &policy])).await.unwrap();

    // A worker process on the same names drains the inbox; the senders' retries get in.
    let worker_env = [("RELAY_ROLE", "worker"), ("RELAY_EXCHANGE", receiver.topology.exchange.as_str()), ("RELAY_INBOX_QUEUE", inbox.as_str()), ("RELAY_REQUEST_QUEUE", "")];
    let _worker = spawn_worker(&openai, &worker_env);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let sender = senders.await.unwrap();
    let refused = sender.attempts - sender.sent;
    assert!(refused > 0, "deliveries over the limit were refused (503)");
    assert_eq!(sender.acked.len(), sender.sent, "every delivery got in once the broker took publishes again");
    let outcome = collect(&receiver, &sender.acked, Duration::from_secs(30)).await;
    println!("reject_publish: refused attempts={refused}");
    assert_eq!(report("reject_publish", &sender, &outcome), 0);
}

/// A worker-only process for an existing topology; killed on drop.
struct Worker(std::process::Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_worker(openai: &FakeOpenAi, env: &[(&str, &str)]) -> Worker {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_openai-webhook-relay"))
        .env("OPENAI_API_KEY", crate::fake_openai::API_KEY)
        .env("OPENAI_BASE_URL", &openai.base_url)
        .env("AMQP_URL", amqp_url())
        .env("RELAY_LISTEN", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "warn")
        .env_remove("OPENAI_WEBHOOK_SECRET")
        .envs(env.iter().copied())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    Worker(child)
}
