//! Spawning a relay against the real broker, signing deliveries, and reading queues.

use std::time::{Duration, Instant};

use base64::Engine;
use lapin::message::Delivery;
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use openai_webhook_relay::inbox::unix_now;
use openai_webhook_relay::topology::Topology;
use openai_webhook_relay::verify::Secret;
use openai_webhook_relay::{App, Cli, Command};
use clap::Parser;
use tokio_util::sync::CancellationToken;

pub use crate::cleanup::Cleanup;
pub use crate::deliveries::{event, webhook_id};
use crate::fake_openai::{API_KEY, FakeOpenAi};

pub fn amqp_url() -> String {
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
    let openai = FakeOpenAi::start().await;
    spawn_relay_with(options, openai, unique_topology()).await
}

pub fn unique_topology() -> Topology {
    let tag = format!("test.{:016x}", fastrand::u64(..));
    Topology { exchange: format!("{tag}.events"), inbox: format!("{tag}.inbox") }
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
        http: reqwest::Client::new(),
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

/// Waits until the relay at `base` (`http://host:port`) answers `/readyz` with 200.
pub async fn wait_ready(base: &str) {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = http.get(format!("{base}/readyz")).send().await.map(|r| r.status().as_u16()).ok();
        if ready == Some(200) {
            return;
        }
        assert!(Instant::now() < deadline, "relay at {base} not ready after 20 s ({ready:?}); is RabbitMQ running at {}?", amqp_url());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
        let mut request = self.http.post(format!("{}/webhooks/openai", self.url)).header("content-type", "application/json");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(body).send().await.expect("relay answers")
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
        self.stop.cancel();
        self.task.take().unwrap().await.unwrap()
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

    /// Messages ready in `queue` (a passive declare, exact for quorum queues too).
    pub async fn count(&self, queue: &str) -> u32 {
        self.declare_passive(queue).await.message_count()
    }

    /// Messages in `queue`, ready or unacked, once no consumer is attached any more (call it
    /// after stopping the consumers). A quorum queue drops a closed channel's consumer and
    /// returns its unacked messages in one step, so when a passive declare shows no consumer,
    /// its count includes them; while a consumer holds them it counts only ready ones.
    pub async fn count_once_unconsumed(&self, queue: &str) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let declared = self.declare_passive(queue).await;
            if declared.consumer_count() == 0 {
                return declared.message_count();
            }
            assert!(Instant::now() < deadline, "{queue} still has {} consumers after 15 s", declared.consumer_count());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn declare_passive(&self, queue: &str) -> lapin::Queue {
        let options = QueueDeclareOptions { passive: true, ..Default::default() };
        self.channel.queue_declare(queue.into(), options, FieldTable::default()).await.unwrap()
    }
}
