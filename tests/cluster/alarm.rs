//! Back-pressure under a real resource alarm: a disk alarm on one node blocks publishers on
//! every node of the cluster (`connection.blocked`). The relay must then refuse deliveries
//! with 503 at once, not after its confirm timeout, and turn not-ready, and take deliveries
//! again once the broker unblocks it, with every accepted one in the inbox.
//!
//! Prints `cluster_disk_alarm: first_503_after_ms=… slowest_503_ms=… ready_again_after_ms=…`
//! (times from raising, respectively clearing, the alarm).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use lapin::options::BasicGetOptions;
use openai_webhook_relay::inbox::unix_now;
use openai_webhook_relay::verify::Secret;

use crate::SERIAL;
use crate::fake_openai::FakeOpenAi;
use crate::harness::Cluster;
use crate::load::{Relay, connect_any, event, secret_text};

/// Far beyond any disk: the node raises its disk alarm at once.
const ALARM_LIMIT: &str = "1000000GB";
/// RabbitMQ's default.
const NORMAL_LIMIT: &str = "50MB";
/// Long, so that a 503 that waited for it cannot pass for one given at once.
const CONFIRM_TIMEOUT_MS: u64 = 10_000;
/// The most a refusal under the alarm may take.
const AT_ONCE: Duration = Duration::from_secs(1);
const EACH: usize = 5;

#[tokio::test]
async fn a_disk_alarm_answers_503_at_once_and_not_ready_until_it_clears() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start().await;
    let openai = FakeOpenAi::start().await.unwrap();
    let urls = cluster.amqp_urls();
    // No worker: whatever was accepted stays in the inbox, to be counted there.
    let extra = [("RELAY_ROLE", "receiver"), ("RELAY_CONFIRM_TIMEOUT_MS", &CONFIRM_TIMEOUT_MS.to_string())];
    let relay = Relay::start_observed(&openai, &urls.join(","), urls.clone(), &extra).await;
    let client = Client::new(&relay);

    let mut accepted = BTreeSet::new();
    for _ in 0..EACH {
        let (status, _, body) = client.deliver(&event("response.completed", "resp_before")).await;
        assert_eq!(status, 200, "before the alarm");
        accepted.insert(body);
    }

    cluster.ctl(0, &["set_disk_free_limit", ALARM_LIMIT]).await;
    let alarmed = Instant::now();
    // RabbitMQ tells a connection it is blocked at its first publish under the alarm: until
    // then deliveries may still be taken, and that first one is refused once the block is
    // announced, not after the confirm timeout.
    let mut refused = Vec::new();
    let mut slowest = Duration::ZERO;
    let first_refused_after = loop {
        assert!(alarmed.elapsed() < Duration::from_secs(30), "no delivery refused 30 s into the disk alarm");
        let body = event("response.completed", "resp_during");
        let started = Instant::now();
        let (status, retry_after, id) = client.deliver(&body).await;
        let took = started.elapsed();
        if status == 200 {
            accepted.insert(id);
            continue;
        }
        assert_eq!(status, 503, "under the disk alarm");
        assert!(retry_after.is_some(), "a 503 carries Retry-After");
        assert!(took < AT_ONCE, "the first 503 after {took:?}: waited for the confirm timeout instead of the block");
        slowest = slowest.max(took);
        refused.push(body);
        break alarmed.elapsed();
    };
    assert_eq!(client.ready().await, 503, "/readyz under the disk alarm");
    assert_eq!(relay.metric("relay_broker_blocked").await, Some(1.0));
    for _ in 0..EACH {
        let body = event("response.completed", "resp_during");
        let started = Instant::now();
        let (status, retry_after, _) = client.deliver(&body).await;
        let took = started.elapsed();
        assert_eq!(status, 503, "under the disk alarm");
        assert!(retry_after.is_some(), "a 503 carries Retry-After");
        assert!(took < AT_ONCE, "503 after {took:?}: waited for the confirm timeout instead of answering at once");
        slowest = slowest.max(took);
        refused.push(body);
    }

    cluster.ctl(0, &["set_disk_free_limit", NORMAL_LIMIT]).await;
    let cleared = Instant::now();
    wait_until(Duration::from_secs(30), "/readyz 200 once the alarm cleared", async || client.ready().await == 200).await;
    let ready_again_after = cleared.elapsed();
    assert_eq!(relay.metric("relay_broker_blocked").await, Some(0.0));
    // OpenAI retries what was refused: now it is taken.
    for body in refused {
        let (status, _, id) = client.deliver(&body).await;
        assert_eq!(status, 200, "after the alarm");
        accepted.insert(id);
    }

    let (_connection, channel) = connect_any(&urls).await;
    let mut stored = BTreeSet::new();
    while let Some(message) = channel.basic_get(relay.topology.inbox.as_str().into(), BasicGetOptions { no_ack: true }).await.unwrap() {
        stored.insert(event_id(&message.delivery.data));
    }
    let missing: Vec<_> = accepted.difference(&stored).collect();
    assert!(missing.is_empty(), "accepted but not in the inbox: {missing:?}");
    println!(
        "cluster_disk_alarm: first_503_after_ms={} slowest_503_ms={} ready_again_after_ms={} accepted={} refused={} confirm_timeout_ms={CONFIRM_TIMEOUT_MS}",
        first_refused_after.as_millis(),
        slowest.as_millis(),
        ready_again_after.as_millis(),
        accepted.len(),
        EACH + 1
    );
}

/// Signs and posts deliveries as OpenAI does, and reads readiness.
struct Client {
    http: reqwest::Client,
    secret: Secret,
    port: u16,
}

impl Client {
    fn new(relay: &Relay) -> Self {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
        Self { http, secret: Secret::parse(&secret_text()).unwrap(), port: relay.port }
    }

    /// The status, the `Retry-After` header and the event id of one delivery of `body`.
    async fn deliver(&self, body: &str) -> (u16, Option<String>, String) {
        let (id, ts) = (format!("wh_{:032x}", fastrand::u128(..)), unix_now().to_string());
        let answer = self
            .http
            .post(format!("http://127.0.0.1:{}/webhooks/openai", self.port))
            .header("webhook-id", &id)
            .header("webhook-timestamp", &ts)
            .header("webhook-signature", self.secret.sign(&id, &ts, body.as_bytes()))
            .body(body.to_owned())
            .send()
            .await
            .expect("the relay answers");
        let retry_after = answer.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
        (answer.status().as_u16(), retry_after, event_id(body.as_bytes()))
    }

    async fn ready(&self) -> u16 {
        let answer = self.http.get(format!("http://127.0.0.1:{}/readyz", self.port)).send().await;
        answer.map_or(0, |r| r.status().as_u16())
    }
}

fn event_id(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body).unwrap()["id"].as_str().unwrap().to_owned()
}

async fn wait_until(within: Duration, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < within, "not after {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
