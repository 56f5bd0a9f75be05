//! Spawning a relay against the real broker, signing deliveries, and reading queues.

use std::process::ExitStatus;
use std::time::{Duration, Instant};

use base64::Engine;
use lapin::message::Delivery;
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use openai_webhook_relay::inbox::{header, unix_now};
use openai_webhook_relay::topology::Topology;
use openai_webhook_relay::verify::Secret;
use openai_webhook_relay::{App, Cli, Command};
use clap::Parser;
use tokio_util::sync::CancellationToken;

pub use crate::cleanup::Cleanup;
pub use crate::deliveries::{event, webhook_id};
use crate::fake_openai::{API_KEY, FakeOpenAi};

pub fn amqp_url() -> String {
    crate::services::ensure();
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub fn secret_text() -> String {
    format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode([42u8; 32]))
}

/// Settings a test may change; everything else is the relay's default.
pub struct Options {
    pub role: &'static str,
    pub secrets: String,
    pub tolerance_secs: u64,
    pub amqp_url: String,
    pub extra: Vec<String>,
    /// Per-project variables (`OPENAI_WEBHOOK_SECRET_ALPHA`, ...), read instead of the
    /// process environment, which parallel tests share.
    pub env: Vec<(String, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Self { role: "all", secrets: secret_text(), tolerance_secs: 300, amqp_url: amqp_url(), extra: Vec::new(), env: Vec::new() }
    }
}

impl Options {
    pub fn role(mut self, role: &'static str) -> Self {
        self.role = role;
        self
    }
    pub fn arg(mut self, flag: &str, value: impl ToString) -> Self {
        self.extra.push(flag.to_owned());
        self.extra.push(value.to_string());
        self
    }
}

/// A running relay with its own exchange and queues; cleaned up on drop.
pub struct Relay {
    pub url: String,
    pub topology: Topology,
    pub openai: FakeOpenAi,
    pub http: reqwest::Client,
    pub amqp: Amqp,
    secret: Secret,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _cleanup: Cleanup,
}

pub async fn spawn_relay(options: Options) -> Relay {
    let openai = FakeOpenAi::start().await.unwrap();
    spawn_relay_with(options, openai, unique_topology()).await
}

/// A fresh topology declared on the broker as a relay declares it, with no relay, and this
/// test's own connection; its queues and exchange go when the `Cleanup` is dropped.
pub async fn declared_topology() -> (Topology, Cleanup, Amqp) {
    let topology = unique_topology();
    let cleanup = Cleanup::topology(&topology);
    let amqp = Amqp::connect().await;
    amqp.declare(&topology).await;
    (topology, cleanup, amqp)
}

pub fn unique_topology() -> Topology {
    let tag = format!("test.{:016x}", fastrand::u64(..));
    Topology { exchange: format!("{tag}.events"), inbox: format!("{tag}.inbox"), requests: None }
}

pub async fn spawn_relay_with(options: Options, openai: FakeOpenAi, topology: Topology) -> Relay {
    let mut argv: Vec<String> = [
        "relay", "serve",
        "--role", options.role,
        "--webhook-secret", &options.secrets,
        "--api-key", API_KEY,
        "--openai-base-url", &openai.base_url,
        "--amqp-url", &options.amqp_url,
        "--exchange", &topology.exchange,
        "--inbox-queue", &topology.inbox,
        "--request-queue", topology.requests.as_deref().unwrap_or_default(),
        "--tolerance-secs", &options.tolerance_secs.to_string(),
        "--confirm-timeout-ms", "2000",
        "--retry-initial-delay-ms", "50",
        "--shutdown-timeout-secs", "5",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    argv.extend(options.extra);
    let Some(Command::Serve(args)) = Cli::try_parse_from(argv).expect("test arguments parse").command else {
        unreachable!("serve subcommand given")
    };
    let env = options.env;
    let config = args.validate_with(|name| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())).expect("test config is valid");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = App::with_listener(config, listener).await.expect("app builds");
    let url = format!("http://{}", app.local_addr());
    let stop = CancellationToken::new();
    let task = tokio::spawn(app.run_until(stop.clone().cancelled_owned()));
    let cleanup = Cleanup::topology(&topology);
    let relay = Relay {
        url,
        topology,
        openai,
        http: http_client(),
        amqp: Amqp::connect().await,
        secret: Secret::parse_list(&options.secrets).unwrap().remove(0),
        stop,
        task: Some(task),
        _cleanup: cleanup,
    };
    if options.amqp_url == amqp_url() {
        relay.wait_ready().await;
    }
    relay
}

/// Polls `check` (every 20 ms) until it gives `Some`, and returns that; fails the test,
/// naming `what` it waited for, when `within` has passed. No wait in the tests is unbounded.
pub async fn eventually<T>(within: Duration, what: impl std::fmt::Display, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "not after {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An HTTP client whose requests give up after 30 s, so that a relay that never answers
/// fails the test instead of hanging it.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap()
}

/// Waits until the relay at `base` (`http://host:port`) answers `/readyz` with 200.
pub async fn wait_ready(base: &str) {
    let http = http_client();
    let what = format!("relay at {base} ready (is RabbitMQ running at {}?)", amqp_url());
    eventually(Duration::from_secs(20), what, async || {
        let ready = http.get(format!("{base}/readyz")).send().await.map(|r| r.status().as_u16()).ok();
        (ready == Some(200)).then_some(())
    })
    .await;
}

/// POSTs `body` as webhook `id`, signed with `secret`, to the relay at `base` (`http://host:port`),
/// with `extra` headers besides the signature's.
pub async fn post_signed(http: &reqwest::Client, base: &str, secret: &Secret, id: &str, body: String, extra: &[(&str, &str)]) -> reqwest::Response {
    let ts = unix_now().to_string();
    let signature = secret.sign(id, &ts, body.as_bytes());
    let mut request = http.post(format!("{base}/webhooks/openai")).header("webhook-id", id).header("webhook-timestamp", ts).header("webhook-signature", signature);
    for (name, value) in extra {
        request = request.header(*name, *value);
    }
    request.body(body).send().await.expect("relay answers")
}

/// Sends SIGTERM to a relay process and waits (up to `within`) for it to exit.
pub async fn terminate(child: &mut std::process::Child, within: Duration) -> ExitStatus {
    let sent = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(sent.success(), "kill -TERM {}", child.id());
    eventually(within, "the relay exits after SIGTERM", async || child.try_wait().unwrap()).await
}

/// The `webhook-id` a message carries (a header; `message_id` on the inbox copy too).
pub fn id_of(delivery: &Delivery) -> String {
    let p = &delivery.properties;
    header(p, "webhook-id").map(str::to_owned).or_else(|| p.message_id().as_ref().map(|id| id.to_string())).unwrap_or_else(|| "(no webhook-id)".into())
}

impl Relay {
    pub async fn wait_ready(&self) {
        wait_ready(&self.url).await;
    }

    pub fn sign(&self, id: &str, timestamp: i64, body: &str) -> String {
        self.secret.sign(id, &timestamp.to_string(), body.as_bytes())
    }

    /// POSTs `body` with the headers OpenAI would send.
    pub async fn deliver_as(&self, id: &str, body: &str) -> reqwest::Response {
        let ts = unix_now();
        self.post(&[("webhook-id", id), ("webhook-timestamp", &ts.to_string()), ("webhook-signature", &self.sign(id, ts, body))], body.as_bytes().to_vec()).await
    }

    pub async fn deliver(&self, body: &str) -> reqwest::Response {
        self.deliver_as(&webhook_id(), body).await
    }

    pub async fn post(&self, headers: &[(&str, &str)], body: Vec<u8>) -> reqwest::Response {
        self.try_post(headers, body).await.expect("relay answers")
    }

    /// `post`, giving back the error when the relay closes the connection without answering.
    pub async fn try_post(&self, headers: &[(&str, &str)], body: Vec<u8>) -> reqwest::Result<reqwest::Response> {
        let mut request = self.http.post(format!("{}/webhooks/openai", self.url)).header("content-type", "application/json");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(body).send().await
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(format!("{}{path}", self.url)).send().await.expect("relay answers")
    }

    /// A fresh queue bound to the relay's exchange with `pattern`.
    pub async fn bind(&self, pattern: &str) -> String {
        self.amqp.bind(&self.topology.exchange, pattern).await
    }

    /// Sends the stop signal without waiting.
    pub fn signal_stop(&self) {
        self.stop.cancel();
    }

    /// Stops the relay gracefully and returns what `run_until` returned.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.halt().await
    }

    /// Stops the relay gracefully but keeps its queues (and this test's connection) for
    /// looking at; `run_until` returns after the relay has closed its broker connection.
    pub async fn halt(&mut self) -> anyhow::Result<()> {
        self.stop.cancel();
        let Some(task) = self.task.take() else { return Ok(()) };
        tokio::time::timeout(Duration::from_secs(20), task).await.expect("the relay stops within 20 s").unwrap()
    }

    /// Stops the relay and lists every delivery still in its inbox or a retry queue, acked
    /// or not: see [`Amqp::left_over`].
    pub async fn halt_and_list_left_over(&mut self) -> Vec<String> {
        self.halt().await.expect("the relay stops without error");
        self.amqp.left_over(&self.topology).await
    }

    /// The `webhook-id`s stored in the inbox since the last look, taking them off. Only for
    /// a relay without a worker (`role("receiver")`): see [`Amqp::take_all`].
    pub async fn take_stored_ids(&self) -> Vec<String> {
        self.amqp.take_all(&self.topology.inbox).await.iter().map(id_of).collect()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The test's own broker connection, for looking at queues.
pub struct Amqp {
    _connection: Connection,
    pub channel: Channel,
}

impl Amqp {
    pub async fn connect() -> Self {
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| panic!("RabbitMQ unreachable at {}: {e}; start it (`rabbitmq-server -detached`) or set AMQP_URL", amqp_url()));
        let channel = connection.create_channel().await.unwrap();
        Self { _connection: connection, channel }
    }

    /// Declares `topology`'s exchange and queues as a relay does at start.
    pub async fn declare(&self, topology: &Topology) {
        openai_webhook_relay::topology::migrate::declare(&self._connection, topology).await.unwrap();
    }

    /// A server-named exclusive queue bound to `exchange`; it disappears with this connection.
    pub async fn bind(&self, exchange: &str, pattern: &str) -> String {
        let options = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
        let queue = self.channel.queue_declare("".into(), options, FieldTable::default()).await.unwrap();
        let name = queue.name().to_string();
        self.channel
            .queue_bind(name.as_str().into(), exchange.into(), pattern.into(), QueueBindOptions::default(), FieldTable::default())
            .await
            .unwrap();
        name
    }

    /// The next message of `queue` (acked), waiting up to `timeout`.
    pub async fn next(&self, queue: &str, timeout: Duration) -> Option<Delivery> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.channel.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await.unwrap();
            if let Some(message) = got {
                return Some(message.delivery);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Messages *ready* in `queue` (a passive declare). A message a consumer holds without
    /// acknowledging is not counted: this says nothing about acks while anything consumes
    /// from `queue`. Use [`Amqp::settled_count`] for that.
    pub async fn count(&self, queue: &str) -> u32 {
        self.declare_passive(queue).await.message_count()
    }

    async fn declare_passive(&self, queue: &str) -> lapin::Queue {
        let options = QueueDeclareOptions { passive: true, ..Default::default() };
        self.channel.queue_declare(queue.into(), options, FieldTable::default()).await.unwrap()
    }

    /// Messages in `queue`, ready or unacknowledged, once nothing consumes from it any more:
    /// waits until the queue has no consumer, then counts the ready ones, which are then all.
    ///
    /// Why that is exact: a consumer whose connection goes away (a stopped relay, an exited
    /// process, a `replay-dead --dry-run`) is removed in the same step in which what it held
    /// unacknowledged goes back to ready: one command of a quorum queue's state machine, whose
    /// state answers the passive declare (messages ready and consumers, read together); for a
    /// classic queue, one step of the queue process. A quorum queue counts a `basic.get`
    /// without ack as a consumer until it is settled too. Before that step a passive declare
    /// reads 0 for a message a consumer holds, which is why "0 ready" alone proves nothing.
    pub async fn settled_count(&self, queue: &str) -> u32 {
        eventually(SETTLE_WITHIN, format!("{queue} has no consumer (whoever consumed from it has gone)"), async || {
            let declared = self.declare_passive(queue).await;
            (declared.consumer_count() == 0).then_some(declared.message_count())
        })
        .await
    }

    /// Every message in `queue`, ready or unacknowledged, taken off it: [`Amqp::settled_count`],
    /// then `basic.get` until it is empty.
    pub async fn take_all(&self, queue: &str) -> Vec<Delivery> {
        let count = self.settled_count(queue).await;
        let mut taken = Vec::with_capacity(count as usize);
        while let Some(message) = self.channel.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await.unwrap() {
            taken.push(message.delivery);
        }
        taken
    }

    /// What a stopped relay left behind: every delivery in the retry queues and the inbox
    /// of `topology`, ready or never acknowledged, as `"<webhook-id> in <queue>"`, taken off.
    /// Empty when every delivery the relay took was settled (published, dead-lettered or
    /// skipped as a duplicate) and acked. Only once every relay on `topology` has stopped:
    /// it waits for the inbox to have no consumer. The retry queues come first, so a parked
    /// delivery whose delay runs out meanwhile is found in the inbox.
    pub async fn left_over(&self, topology: &Topology) -> Vec<String> {
        let mut queues = topology.queues();
        queues.retain(|queue| *queue != topology.dead() && *queue != topology.inbox);
        queues.push(topology.inbox.clone());
        let mut left = Vec::new();
        for queue in queues {
            left.extend(self.take_all(&queue).await.iter().map(|delivery| format!("{} in {queue}", id_of(delivery))));
        }
        left
    }
}

/// How long a queue may take to lose its consumers after they have gone.
const SETTLE_WITHIN: Duration = Duration::from_secs(10);

/// What the acknowledgement checks rely on: a message a consumer holds without ack, taken
/// by `basic.consume` or by `basic.get`, is invisible to a passive declare, and counted by
/// `settled_count` (and taken by `take_all`) once its connection has gone.
#[tokio::test]
async fn messages_held_unacked_are_counted_once_their_consumer_has_gone() {
    use futures::StreamExt;
    use lapin::BasicProperties;
    use lapin::options::{BasicConsumeOptions, BasicPublishOptions};

    let (topology, _cleanup, amqp) = declared_topology().await;
    let inbox = topology.inbox.as_str();
    for id in ["wh_got", "wh_consumed"] {
        let properties = BasicProperties::default().with_message_id(id.into());
        amqp.channel.basic_publish("".into(), inbox.into(), BasicPublishOptions::default(), b"{}", properties).await.unwrap();
    }
    eventually(Duration::from_secs(5), "both messages in the inbox", async || (amqp.count(inbox).await == 2).then_some(())).await;

    let holder = Amqp::connect().await;
    let got = holder.channel.basic_get(inbox.into(), BasicGetOptions { no_ack: false }).await.unwrap().expect("a message to get");
    assert_eq!(amqp.declare_passive(inbox).await.consumer_count(), 1, "a quorum queue counts an unsettled basic.get as a consumer");
    let mut consumer = holder.channel.basic_consume(inbox.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()).await.unwrap();
    let consumed = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await.expect("a message to consume").unwrap().unwrap();
    assert_eq!([id_of(&got.delivery), id_of(&consumed)], ["wh_got", "wh_consumed"]);
    assert_eq!(amqp.count(inbox).await, 0, "a passive declare counts neither held message");

    holder._connection.close(200, "gone".into()).await.unwrap();
    let mut left: Vec<String> = amqp.take_all(inbox).await.iter().map(id_of).collect();
    left.sort();
    assert_eq!(left, ["wh_consumed", "wh_got"], "both held messages are back and counted");
}
