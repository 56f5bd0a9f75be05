//! The relay binary, an OpenAI-like sender, and the accounting of what came out.

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use openai_webhook_relay::inbox::{header, unix_now};
use openai_webhook_relay::topology::Topology;
use openai_webhook_relay::verify::Secret;
use tokio_util::sync::CancellationToken;

use crate::cleanup::Cleanup;
pub use crate::deliveries::event;
use crate::fake_openai::{API_KEY, FakeOpenAi};

/// One fault test at a time: they close every broker connection or set policies.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub fn amqp_url() -> String {
    crate::services::ensure();
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub fn secret_text() -> String {
    format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode([11u8; 32]))
}

/// A relay process, restartable on the same port and names.
pub struct Relay {
    pub port: u16,
    /// Where the test's own connections go (the relay's broker, or its cluster's nodes).
    pub observer: Vec<String>,
    pub topology: Topology,
    pub observed: String,
    env: Vec<(String, String)>,
    child: Option<Child>,
    /// Declared after `child`, so the process is gone before its queues are deleted.
    _cleanup: Cleanup,
}

impl Relay {
    pub async fn start(openai: &FakeOpenAi, amqp_url: &str, extra: &[(&str, &str)]) -> Self {
        Self::start_observed(openai, amqp_url, vec![self::amqp_url()], extra).await
    }

    /// A relay on `amqp_url` (one URL or a cluster's list) whose queues the test reads
    /// through the first of `observer` that answers.
    pub async fn start_observed(openai: &FakeOpenAi, amqp_url: &str, observer: Vec<String>, extra: &[(&str, &str)]) -> Self {
        let tag = format!("fault.{:016x}", fastrand::u64(..));
        let topology = Topology { exchange: format!("{tag}.events"), inbox: format!("{tag}.inbox"), requests: None };
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut env: Vec<(String, String)> = [
            ("OPENAI_WEBHOOK_SECRET", secret_text()),
            ("OPENAI_API_KEY", API_KEY.to_owned()),
            ("OPENAI_BASE_URL", openai.base_url.clone()),
            ("AMQP_URL", amqp_url.to_owned()),
            ("RELAY_LISTEN", format!("127.0.0.1:{port}")),
            ("RELAY_EXCHANGE", topology.exchange.clone()),
            ("RELAY_INBOX_QUEUE", topology.inbox.clone()),
            ("RELAY_REQUEST_QUEUE", String::new()),
            ("RELAY_RETRY_INITIAL_DELAY_MS", "50".to_owned()),
            ("RELAY_RETRY_MAX_DELAY_MS", "400".to_owned()),
            ("RELAY_CONFIRM_TIMEOUT_MS", "2000".to_owned()),
            ("RUST_LOG", "warn".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let observed = format!("{tag}.observed");
        let cleanup = Cleanup::topology(&topology).and_queue(&observed);
        let mut relay = Self { port, observer, observed, topology, env, child: None, _cleanup: cleanup };
        relay.spawn();
        relay.wait_ready().await;
        // A quorum queue of the test's own, so that closing connections or restarting the
        // broker (or a cluster node) loses nothing of it.
        let (_c, channel) = connect_any(&relay.observer).await;
        let durable = QueueDeclareOptions { durable: true, ..Default::default() };
        let quorum = openai_webhook_relay::topology::table([("x-queue-type", lapin::types::AMQPValue::LongString("quorum".into()))]);
        channel.queue_declare(relay.observed.as_str().into(), durable, quorum).await.unwrap();
        channel
            .queue_bind(relay.observed.as_str().into(), relay.topology.exchange.as_str().into(), "#".into(), QueueBindOptions::default(), FieldTable::default())
            .await
            .unwrap();
        relay
    }

    pub fn spawn(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_openai-webhook-relay"))
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(match std::env::var("FAULT_RELAY_LOG") { Ok(path) => Stdio::from(std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap()), Err(_) => Stdio::null() })
            .spawn()
            .expect("relay binary starts");
        self.child = Some(child);
    }

    /// A crash (SIGKILL) and a restart half a second later, as a supervisor would do it.
    pub async fn crash_and_restart(&mut self) {
        self.kill();
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.spawn();
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // SIGKILL
            let _ = child.wait();
        }
    }

    pub async fn wait_ready(&self) {
        let http = reqwest::Client::new();
        let started = Instant::now();
        loop {
            let status = http.get(format!("http://127.0.0.1:{}/readyz", self.port)).send().await.map(|r| r.status().as_u16()).ok();
            if status == Some(200) {
                return;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "relay not ready after 30 s ({status:?})");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/webhooks/openai", self.port)
    }

    /// The value of an unlabelled metric on the relay's `/metrics`.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let text = reqwest::get(format!("http://127.0.0.1:{}/metrics", self.port)).await.ok()?.text().await.ok()?;
        text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill();
    }
}

pub async fn connect() -> (Connection, Channel) {
    connect_any(&[amqp_url()]).await
}

/// A connection to the first of `urls` that answers.
pub async fn connect_any(urls: &[String]) -> (Connection, Channel) {
    for url in urls {
        if let Ok(connection) = Connection::connect(url, ConnectionProperties::default()).await {
            let channel = connection.create_channel().await.unwrap();
            return (connection, channel);
        }
    }
    panic!("RabbitMQ unreachable at every one of {urls:?}")
}

/// Delivers events the way OpenAI does: the same webhook-id, freshly signed, until a 2xx.
pub struct Sender {
    pub sent: usize,
    pub acked: HashSet<String>,
    pub attempts: usize,
    /// The longest time between two 2xx answers (to any sender): how long the relay
    /// accepted nothing.
    pub longest_stall: Duration,
    last_ok: Option<Instant>,
}

impl Sender {
    fn accepted(&mut self, event_id: String) {
        let now = Instant::now();
        if let Some(last) = self.last_ok {
            self.longest_stall = self.longest_stall.max(now - last);
        }
        self.last_ok = Some(now);
        self.acked.insert(event_id);
    }
}

/// Runs `senders` tasks delivering events of `make_event` until `stop` or until `total`
/// deliveries were started; each task keeps retrying its current event (as OpenAI would)
/// before moving on.
pub async fn load(url: String, senders: usize, total: usize, stop: CancellationToken, make_event: Arc<dyn Fn(usize) -> String + Send + Sync>) -> Sender {
    let secret = Secret::parse(&secret_text()).unwrap();
    let result = Arc::new(Mutex::new(Sender { sent: 0, acked: HashSet::new(), attempts: 0, longest_stall: Duration::ZERO, last_ok: None }));
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let mut tasks = Vec::new();
    for s in 0..senders {
        let (url, stop, result, http, secret, make_event) = (url.clone(), stop.clone(), result.clone(), http.clone(), secret.clone(), make_event.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.is_cancelled() {
                n += 1;
                {
                    let mut result = result.lock().unwrap();
                    if result.sent >= total {
                        break;
                    }
                    result.sent += 1;
                }
                let body = make_event(s * 1_000_000 + n);
                let event_id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"].as_str().unwrap().to_owned();
                let webhook_id = format!("wh_{:032x}", fastrand::u128(..));
                // Once sent, an event is retried until acknowledged, even past `stop`,
                // but for at most 60 s (OpenAI would go on for 72 h).
                let deadline = Instant::now() + Duration::from_secs(60);
                while Instant::now() < deadline {
                    let ts = unix_now().to_string();
                    let signature = secret.sign(&webhook_id, &ts, body.as_bytes());
                    result.lock().unwrap().attempts += 1;
                    let answer = http
                        .post(&url)
                        .header("webhook-id", &webhook_id)
                        .header("webhook-timestamp", &ts)
                        .header("webhook-signature", signature)
                        .body(body.clone())
                        .send()
                        .await;
                    if answer.is_ok_and(|r| r.status().is_success()) {
                        result.lock().unwrap().accepted(event_id.clone());
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    Arc::try_unwrap(result).ok().unwrap().into_inner().unwrap()
}

/// What came out: published event ids (with how often) and dead-lettered ones with reasons.
#[derive(Default)]
pub struct Outcome {
    pub published: HashMap<String, usize>,
    pub dead: HashMap<String, String>,
}

/// Drains the observed and dead queues until every acked event is accounted for, or
/// `within` passes.
pub async fn collect(relay: &Relay, acked: &HashSet<String>, within: Duration) -> Outcome {
    let mut outcome = Outcome::default();
    let started = Instant::now();
    let (_connection, channel) = connect_any(&relay.observer).await;
    loop {
        let mut got_any = false;
        for queue in [relay.observed.clone(), relay.topology.dead()] {
            while let Some(message) = channel.basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true }).await.unwrap() {
                got_any = true;
                let delivery = message.delivery;
                if queue == relay.observed {
                    let id = delivery.properties.message_id().as_ref().unwrap().to_string();
                    *outcome.published.entry(id).or_default() += 1;
                } else {
                    let body: serde_json::Value = serde_json::from_slice(&delivery.data).unwrap();
                    let reason = header(&delivery.properties, "x-relay-error-message").unwrap_or("").to_owned();
                    outcome.dead.insert(body["id"].as_str().unwrap().to_owned(), reason);
                }
            }
        }
        let accounted = acked.iter().all(|id| outcome.published.contains_key(id) || outcome.dead.contains_key(id));
        if accounted && !got_any {
            return outcome;
        }
        if started.elapsed() > within {
            // Where the missing ones are, for the failure message.
            let names = relay.topology.queues();
            let counts = tokio::task::spawn_blocking(queue_counts).await.unwrap();
            println!("not all acked events came out within {within:?}; relay queues (name, ready, unacked): {:?}", counts.iter().filter(|(name, _, _)| names.contains(name)).collect::<Vec<_>>());
            return outcome;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Prints the figure line, with the accounting done per event id, and returns how many
/// acked events were lost (neither published nor dead-lettered).
pub fn report(name: &str, sender: &Sender, outcome: &Outcome) -> usize {
    let mut lost: Vec<&String> = sender.acked.iter().filter(|id| !outcome.published.contains_key(*id) && !outcome.dead.contains_key(*id)).collect();
    lost.sort();
    let published: usize = outcome.published.values().sum();
    let duplicates = published - outcome.published.len();
    // Stored but answered 503 (a confirm that came after its timeout): a repeat, not a loss.
    let unacked_out = outcome.published.keys().chain(outcome.dead.keys()).filter(|id| !sender.acked.contains(*id)).count();
    println!(
        "{name}: sent={} acked={} published={} dead={} lost={} duplicates={duplicates} longest_stall_ms={} out_but_not_acked={unacked_out} (delivery attempts={})",
        sender.sent,
        sender.acked.len(),
        outcome.published.len(),
        outcome.dead.len(),
        lost.len(),
        sender.longest_stall.as_millis(),
        sender.attempts
    );
    if !lost.is_empty() {
        println!("{name}: lost ids (first 20): {:?}", &lost[..lost.len().min(20)]);
    }
    lost.len()
}

/// Stops the shared broker's application; it is started again when the guard drops, also
/// when the test fails, so no other test finds the broker down.
pub struct BrokerStopped;

impl BrokerStopped {
    pub async fn stop() -> Self {
        tokio::task::spawn_blocking(|| rabbitmqctl(&["stop_app"])).await.unwrap();
        Self
    }

    /// Starts the application and waits until the broker answers.
    pub async fn start(self) {
        tokio::task::spawn_blocking(move || drop(self)).await.unwrap();
    }
}

impl Drop for BrokerStopped {
    fn drop(&mut self) {
        rabbitmqctl(&["start_app"]);
        rabbitmqctl(&["await_startup", "--timeout", "60"]);
    }
}

/// `(queue, ready, unacked)` for every queue of the default vhost. Quorum queue counters lag
/// about a second behind.
pub fn queue_counts() -> Vec<(String, u64, u64)> {
    let output = Command::new("rabbitmqctl").args(["list_queues", "-q", "--no-table-headers", "name", "messages_ready", "messages_unacknowledged"]).output().expect("rabbitmqctl runs");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            Some((fields.next()?.to_owned(), fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
        })
        .collect()
}

/// `(queue, policy)` for every queue of the default vhost that has a policy applied.
pub fn queue_policies() -> Vec<(String, String)> {
    let output = Command::new("rabbitmqctl").args(["list_queues", "-q", "--no-table-headers", "name", "policy"]).output().expect("rabbitmqctl runs");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            Some((fields.next()?.to_owned(), fields.next()?.to_owned()))
        })
        .collect()
}

pub fn rabbitmqctl(args: &[&str]) {
    let status = Command::new("rabbitmqctl").args(args).stdout(Stdio::null()).stderr(Stdio::null()).status().expect("rabbitmqctl runs");
    assert!(status.success(), "rabbitmqctl {args:?} failed");
}
