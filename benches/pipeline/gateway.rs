//! Phase 4: requests through the gateway, against the library's fake OpenAI API (in this
//! process), next to the simplest request/reply service over the same broker.
//!
//! Gateway: N requests published at once to the request queue, each with `reply_to` and a
//! `correlation_id`; the relay (`--role all`) POSTs each one, replies `response.queued`,
//! parks a safety-net watch; the fake completes the response after `COMPLETE_AFTER` and
//! sends the signed webhook back to the relay, which stores it, fetches the response and
//! replies with the terminal event. The phase ends when every request has its terminal reply.
//!
//! Baseline: the same N requests through a raw lapin responder that, for each one, publishes
//! one reply (persistent, mandatory, confirmed) and acks, with the relay's request prefetch
//! and handling concurrency: the broker's floor for a request/reply, which the gateway (five
//! confirmed publishes and two HTTP calls per request, plus the webhook) can only approach.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use openai_webhook_relay::dev::fake_openai::{self, FakeOpenAi};
use openai_webhook_relay::inbox::PERSISTENT;
use openai_webhook_relay::topology::{Topology, table};
use openai_webhook_relay::verify::Secret;

use crate::load::percentile;
use crate::procs::{self, CpuProbe, RelayProcess, Usage};

/// How long the fake takes to finish a response: short, so that the relay is what is measured.
const COMPLETE_AFTER: Duration = Duration::from_millis(20);
/// Requests published at once, and replies awaited, in both runs.
const PUBLISH_WINDOW: usize = 256;
/// The relay's default `RELAY_FETCH_CONCURRENCY`, and its request prefetch (twice that).
const HANDLING: usize = 32;

pub struct GatewayResult {
    pub requests: usize,
    pub terminal: usize,
    pub queued: usize,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub duplicate_posts: usize,
    pub webhooks: usize,
    pub baseline_rps: f64,
    pub cpu: Vec<Usage>,
    pub baseline_cpu: Vec<Usage>,
}

/// Queue names this phase creates besides the relay's own.
pub fn extra_queues(tag: &str) -> [String; 3] {
    [format!("{tag}.g.replies"), format!("{tag}.g.rpc"), format!("{tag}.g.rpc.replies")]
}

#[allow(clippy::too_many_arguments)]
pub async fn phase(
    amqp_url: &str,
    binary: &std::path::Path,
    topology: &Topology,
    tag: &str,
    requests: usize,
    secret_text: &str,
    env: &[(&str, String)],
    broker: &[String],
    http: &reqwest::Client,
) -> Result<GatewayResult, String> {
    println!("phase 4/4: gateway (--role all), {requests} requests; the fake OpenAI API finishes each after {} ms and sends its webhook", COMPLETE_AFTER.as_millis());
    let connection = Connection::connect(amqp_url, ConnectionProperties::default()).await.map_err(|e| e.to_string())?;
    let channel = connection.create_channel().await.map_err(|e| e.to_string())?;
    let [replies, rpc, rpc_replies] = extra_queues(tag);
    for queue in [&replies, &rpc, &rpc_replies] {
        let options = QueueDeclareOptions { durable: true, ..Default::default() };
        channel.queue_declare(queue.as_str().into(), options, table([("x-queue-type", AMQPValue::LongString("quorum".into()))])).await.map_err(|e| e.to_string())?;
    }
    let requests_queue = topology.requests.clone().expect("the gateway phase has a request queue");

    let fake = FakeOpenAi::start().await.map_err(|e| e.to_string())?;
    fake.complete_after(COMPLETE_AFTER);
    let addr = procs::free_port();
    fake.send_webhooks_to(&format!("http://{addr}"), Secret::parse(secret_text).map_err(|e| e.to_string())?);
    let mut env = env.to_vec();
    env.retain(|(name, _)| !matches!(*name, "RELAY_REQUEST_QUEUE" | "OPENAI_API_KEY"));
    env.extend([
        ("RELAY_REQUEST_QUEUE", requests_queue.clone()),
        ("OPENAI_API_KEY", fake_openai::API_KEY.to_owned()),
        ("OPENAI_BASE_URL", fake.base_url.clone()),
    ]);
    let mut relay = RelayProcess::spawn(binary, "all", addr, &env)?;
    relay.wait_ready(http).await?;
    let probe = CpuProbe::new().with("relay", vec![relay.pid().to_string()]).with("broker", broker.to_vec()).with("generator", vec![std::process::id().to_string()]);

    let ran = round_trips(&connection, &requests_queue, &replies, requests, &probe).await;
    relay.stop().await;
    let gateway = ran?;
    let creates = fake.creates().len();

    // The baseline: a raw responder on the same broker.
    let responder_channel = connection.create_channel().await.map_err(|e| e.to_string())?;
    let responder = tokio::spawn(respond(responder_channel, rpc.clone()));
    let baseline = round_trips(&connection, &rpc, &rpc_replies, requests, &probe).await;
    responder.abort();
    let _ = connection.close(200, "gateway phase done".into()).await;
    let baseline = baseline?;

    let result = GatewayResult {
        requests,
        terminal: gateway.terminal,
        queued: gateway.queued,
        rps: gateway.rate(),
        p50_ms: percentile(&gateway.latencies_us, 50.0) as f64 / 1000.0,
        p99_ms: percentile(&gateway.latencies_us, 99.0) as f64 / 1000.0,
        duplicate_posts: creates.saturating_sub(requests),
        webhooks: fake.webhooks_sent(),
        baseline_rps: baseline.rate(),
        cpu: gateway.cpu,
        baseline_cpu: baseline.cpu,
    };
    println!(
        "  gateway: {} of {requests} terminal replies ({} queued replies) at {:.0} requests/s, request to terminal reply p50 {:.1} ms p99 {:.1} ms; {creates} POSTs ({} duplicate), {} webhooks",
        result.terminal, result.queued, result.rps, result.p50_ms, result.p99_ms, result.duplicate_posts, result.webhooks
    );
    println!("  baseline (raw lapin request → reply): {} of {requests} replies at {:.0} requests/s, p99 {:.1} ms", baseline.terminal, result.baseline_rps, percentile(&baseline.latencies_us, 99.0) as f64 / 1000.0);
    println!("    CPU used (cores): gateway {}; baseline {}", cores(&result.cpu), cores(&result.baseline_cpu));
    Ok(result)
}

/// What came back for one run of N requests.
struct RoundTrips {
    terminal: usize,
    queued: usize,
    first_sent: Instant,
    last_terminal: Instant,
    /// Request published to its terminal reply, sorted.
    latencies_us: Vec<u32>,
    cpu: Vec<Usage>,
}

impl RoundTrips {
    fn rate(&self) -> f64 {
        self.terminal as f64 / (self.last_terminal - self.first_sent).as_secs_f64()
    }
}

/// Publishes `n` requests (confirmed, `PUBLISH_WINDOW` at a time) and collects the replies
/// on `replies` until each has a terminal one, for five minutes at most.
async fn round_trips(connection: &Connection, queue: &str, replies: &str, n: usize, probe: &CpuProbe) -> Result<RoundTrips, String> {
    let consumer_channel = connection.create_channel().await.map_err(|e| e.to_string())?;
    let mut consumer = consumer_channel
        .basic_consume(replies.into(), "bench-replies".into(), BasicConsumeOptions { no_ack: true, ..Default::default() }, FieldTable::default())
        .await
        .map_err(|e| e.to_string())?;
    let publisher = connection.create_channel().await.map_err(|e| e.to_string())?;
    publisher.confirm_select(ConfirmSelectOptions::default()).await.map_err(|e| e.to_string())?;
    let first_sent = Instant::now();
    let sent: HashMap<usize, Instant> = HashMap::with_capacity(n);
    let sent = std::sync::Arc::new(std::sync::Mutex::new(sent));
    let publishing = {
        let (publisher, sent, queue, replies) = (publisher.clone(), sent.clone(), queue.to_owned(), replies.to_owned());
        tokio::spawn(async move {
            futures::stream::iter(0..n)
                .map(|i| {
                    let (publisher, sent, queue, replies) = (publisher.clone(), sent.clone(), queue.clone(), replies.clone());
                    async move {
                        let body = serde_json::json!({"model": "gpt-bench", "input": format!("request {i}")}).to_string();
                        let properties = BasicProperties::default()
                            .with_delivery_mode(PERSISTENT)
                            .with_content_type("application/json".into())
                            .with_message_id(format!("bench-{i}").into())
                            .with_correlation_id(i.to_string().into())
                            .with_reply_to(replies.as_str().into());
                        sent.lock().unwrap().insert(i, Instant::now());
                        let options = BasicPublishOptions { mandatory: true, ..Default::default() };
                        let confirm = publisher.basic_publish("".into(), queue.as_str().into(), options, body.as_bytes(), properties).await?;
                        confirm.await
                    }
                })
                .buffer_unordered(PUBLISH_WINDOW)
                .filter(|c| futures::future::ready(matches!(c, Ok(Confirmation::Ack(None)))))
                .count()
                .await
        })
    };
    let collect = async {
        let (mut terminal, mut queued, mut latencies, mut done) = (0, 0, Vec::with_capacity(n), HashSet::new());
        let mut last_terminal = Instant::now();
        while done.len() < n {
            let Some(Ok(delivery)) = consumer.next().await else { break };
            let Some(i) = delivery.properties.correlation_id().as_ref().and_then(|c| c.as_str().parse::<usize>().ok()) else { continue };
            let kind = serde_json::from_slice::<serde_json::Value>(&delivery.data).ok().and_then(|e| e["type"].as_str().map(str::to_owned)).unwrap_or_default();
            if kind.ends_with(".queued") {
                queued += 1;
                continue;
            }
            if done.insert(i) {
                terminal += 1;
                last_terminal = Instant::now();
                if let Some(at) = sent.lock().unwrap().get(&i) {
                    latencies.push(at.elapsed().as_micros() as u32);
                }
            }
        }
        latencies.sort_unstable();
        (terminal, queued, latencies, last_terminal)
    };
    let window = probe.start();
    let collected = tokio::time::timeout(Duration::from_secs(300), collect).await;
    let cpu = probe.finish(window);
    let confirmed = publishing.await.map_err(|e| e.to_string())?;
    let _ = consumer_channel.close(200, "collected".into()).await;
    let _ = publisher.close(200, "published".into()).await;
    if confirmed != n {
        return Err(format!("publishing requests to {queue}: {confirmed} of {n} confirmed"));
    }
    let (terminal, queued, latencies_us, last_terminal) = collected.map_err(|_| format!("not every request to {queue} had its reply after 300 s"))?;
    Ok(RoundTrips { terminal, queued, first_sent, last_terminal, latencies_us, cpu })
}

/// The baseline's service: each request gets one confirmed reply, then its ack.
async fn respond(channel: Channel, queue: String) -> Result<(), lapin::Error> {
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    channel.basic_qos((HANDLING * 2) as u16, BasicQosOptions::default()).await?;
    let consumer = channel.basic_consume(queue.as_str().into(), "bench-responder".into(), BasicConsumeOptions::default(), FieldTable::default()).await?;
    consumer
        .for_each_concurrent(HANDLING, |delivery| {
            let channel = channel.clone();
            async move {
                let Ok(delivery) = delivery else { return };
                let properties = &delivery.properties;
                let (Some(reply_to), Some(correlation)) = (properties.reply_to().clone(), properties.correlation_id().clone()) else { return };
                let reply = BasicProperties::default().with_delivery_mode(PERSISTENT).with_correlation_id(correlation);
                let options = BasicPublishOptions { mandatory: true, ..Default::default() };
                let body = br#"{"type":"com.openai.response.completed"}"#;
                if let Ok(confirm) = channel.basic_publish("".into(), reply_to.as_str().into(), options, body, reply).await
                    && confirm.await.is_ok()
                {
                    let _ = delivery.ack(BasicAckOptions::default()).await;
                }
            }
        })
        .await;
    Ok(())
}

fn cores(cpu: &[Usage]) -> String {
    cpu.iter().map(|u| format!("{} {:.2}", u.name, u.cores)).collect::<Vec<_>>().join(", ")
}
