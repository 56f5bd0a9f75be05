//! Phase 3: the worker draining a pre-filled inbox against a fake OpenAI API that answers
//! after 100 ms (what the fetch concurrency bounds), then rounds against one that answers at
//! once (what the worker itself costs), each next to raw lapin doing the same broker work
//! (consume → publish persistent, mandatory, confirmed → ack, same prefetch and concurrency),
//! without and with a fetch from the same fake API per delivery.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, State};
use axum::routing::get;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Confirmation, Connection, ConnectionProperties};
use openai_webhook_relay::inbox::{header, unix_now};
use openai_webhook_relay::topology::Topology;
use openai_webhook_relay::verify::Secret;

use crate::procs::{CpuProbe, RelayProcess, Usage};
use crate::{deliveries, load, procs};

/// A worker run: the relay's, or the raw baseline's (no fetches, no relay process).
pub struct WorkerResult {
    pub events: usize,
    pub published: usize,
    pub duplicates: usize,
    pub left_in_inbox: u64,
    /// Events per second from the first fetch (the baseline: the first consume) to the last event.
    pub eps: f64,
    pub rss_kib: u64,
    pub max_fetches_in_flight: u64,
    /// From the worker's /readyz (the baseline: its start) to the last event.
    pub cpu: Vec<Usage>,
    /// CPU time of the relay process (the baseline: of this process) per published event.
    pub us_per_event: f64,
}

/// One round of the fast-API comparison: the relay, raw lapin, and raw lapin that also
/// fetches, each draining the same number of deliveries, one after the other.
pub struct Round {
    pub relay: WorkerResult,
    pub baseline: WorkerResult,
    pub fetching: WorkerResult,
}

impl Round {
    /// The relay's rate as a share of the baseline's in the same round.
    pub fn ratio(&self) -> f64 {
        crate::share(self.relay.eps, self.baseline.eps)
    }

    /// What a plain worker that fetches reaches of the baseline: where a worker's fetch
    /// leaves it on this box (not a strict bound: it drives all its deliveries from one task).
    pub fn ceiling(&self) -> f64 {
        crate::share(self.fetching.eps, self.baseline.eps)
    }

    pub fn results(&self) -> [&WorkerResult; 3] {
        [&self.relay, &self.baseline, &self.fetching]
    }
}

/// The middle value (of an even count, the upper of the two middle ones); 0 when empty.
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// The fake OpenAI API: any GET under /v1 answers a small completed response after `delay`.
struct FakeApi {
    delay: Duration,
    requests: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    first: Mutex<Option<Instant>>,
}

impl FakeApi {
    /// Serves the fake API on a free local port, in this process.
    async fn serve(delay: Duration) -> Result<(Arc<Self>, SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>), String> {
        let api = Arc::new(Self { delay, requests: AtomicU64::new(0), in_flight: AtomicU64::new(0), max_in_flight: AtomicU64::new(0), first: Mutex::new(None) });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let app = Router::new().route("/v1/{*rest}", get(fake_fetch)).with_state(api.clone());
        Ok((api, addr, tokio::spawn(async move { axum::serve(listener, app).await })))
    }
}

async fn fake_fetch(State(api): State<Arc<FakeApi>>, Path(rest): Path<String>) -> axum::response::Response {
    api.requests.fetch_add(1, Ordering::Relaxed);
    api.first.lock().unwrap().get_or_insert_with(Instant::now);
    let now = api.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
    api.max_in_flight.fetch_max(now, Ordering::Relaxed);
    if !api.delay.is_zero() {
        tokio::time::sleep(api.delay).await;
    }
    api.in_flight.fetch_sub(1, Ordering::Relaxed);
    let id = rest.rsplit('/').next().unwrap_or_default();
    let body = format!(
        r#"{{"id":"{id}","object":"response","created_at":{},"status":"completed","model":"gpt-5","output":[{{"type":"message","id":"msg_1","status":"completed","role":"assistant","content":[{{"type":"output_text","text":"Done.","annotations":[]}}]}}],"usage":{{"input_tokens":12,"output_tokens":2,"total_tokens":14}}}}"#,
        unix_now()
    );
    axum::response::Response::builder().header("content-type", "application/json").body(axum::body::Body::from(body)).unwrap()
}

/// Where a run's events are counted: a queue bound with '#' to `exchange`, consumed without
/// acks, counting distinct `webhook-id`s until `n`. Yields (distinct, total, time of the last).
async fn collect(connection: &Connection, exchange: &str, n: usize) -> Result<tokio::task::JoinHandle<(usize, usize, Option<Instant>)>, String> {
    let channel = connection.create_channel().await.map_err(|e| e.to_string())?;
    let declared = channel
        .queue_declare("".into(), QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() }, FieldTable::default())
        .await
        .map_err(|e| e.to_string())?;
    let queue = declared.name().to_string();
    channel.queue_bind(queue.as_str().into(), exchange.into(), "#".into(), QueueBindOptions::default(), FieldTable::default()).await.map_err(|e| e.to_string())?;
    let mut consumer = channel
        .basic_consume(queue.as_str().into(), "bench-events".into(), BasicConsumeOptions { no_ack: true, ..Default::default() }, FieldTable::default())
        .await
        .map_err(|e| e.to_string())?;
    Ok(tokio::spawn(async move {
        let (mut seen, mut total, mut last) = (HashSet::new(), 0usize, None);
        while let Some(Ok(delivery)) = consumer.next().await {
            total += 1;
            last = Some(Instant::now());
            if let Some(id) = header(&delivery.properties, "webhook-id") {
                seen.insert(id.to_owned());
            }
            if seen.len() >= n {
                break;
            }
        }
        (seen.len(), total, last)
    }))
}

/// Fills `queue` with `n` signed deliveries as the receiver would have stored them.
async fn prefill(connection: &Connection, queue: &str, n: usize, secret: &Secret) -> Result<(), String> {
    let channel = connection.create_channel().await.map_err(|e| e.to_string())?;
    // A baseline stops once it has seen its last event, and the deliveries whose acks were
    // still on the way come back: they would count towards the next run on this queue.
    let purged = channel.queue_purge(queue.into(), QueuePurgeOptions::default()).await.map_err(|e| e.to_string())?;
    if purged > 0 {
        println!("    purged {purged} deliveries an earlier run left in {queue}");
    }
    channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(|e| e.to_string())?;
    let timestamp = unix_now().to_string();
    let confirmed = futures::stream::iter(0..n)
        .map(|i| {
            let (channel, timestamp) = (channel.clone(), timestamp.clone());
            async move {
                let id = deliveries::webhook_id();
                let body = deliveries::event("response.completed", &format!("resp_bench{i:06}"));
                let properties = load::amqp_properties(&id, &timestamp, &secret.sign(&id, &timestamp, body.as_bytes()));
                let confirm = channel.basic_publish("".into(), queue.into(), BasicPublishOptions { mandatory: true, ..Default::default() }, body.as_bytes(), properties).await?;
                confirm.await
            }
        })
        .buffer_unordered(64)
        .filter(|c| futures::future::ready(matches!(c, Ok(Confirmation::Ack(None)))))
        .count()
        .await;
    let _ = channel.close(200, "prefilled".into()).await;
    if confirmed != n {
        return Err(format!("pre-filling {queue}: {confirmed} of {n} confirmed"));
    }
    Ok(())
}

/// Before a timed run: waits for the broker to go idle after the pre-fill and whatever came
/// before, and says how long that took.
async fn broker_settled(broker: &CpuProbe) {
    let (waited, busy) = broker.wait_idle("broker", BROKER_IDLE_CORES, Duration::from_secs(15)).await;
    let secs = waited.as_secs_f64();
    if busy <= BROKER_IDLE_CORES {
        println!("    broker idle (<= {BROKER_IDLE_CORES} cores) after {secs:.1} s");
    } else {
        println!("    WARNING: the broker still used {busy:.2} cores after {secs:.1} s; timing anyway");
    }
}

/// What RabbitMQ uses here with nothing to do is about 0.002 cores.
const BROKER_IDLE_CORES: f64 = 0.1;

/// CPU seconds the process named `name` used in the window.
fn cpu_seconds(cpu: &[Usage], name: &str, window: Duration) -> f64 {
    crate::cpu_cores(cpu, name) * window.as_secs_f64()
}

#[allow(clippy::too_many_arguments)]
pub async fn relay(
    amqp_url: &str,
    binary: &std::path::Path,
    control: &Channel,
    topology: &Topology,
    secret: &Secret,
    n: usize,
    concurrency: usize,
    delay: Duration,
    env: &[(&str, String)],
    broker: &[String],
    http: &reqwest::Client,
) -> Result<WorkerResult, String> {
    println!("  relay (--role worker), {n} deliveries, fake OpenAI API answering after {} ms, RELAY_FETCH_CONCURRENCY={concurrency}", delay.as_millis());
    topology.declare(control).await.map_err(|e| format!("declaring the worker topology: {e}"))?;
    let connection = Connection::connect(amqp_url, ConnectionProperties::default()).await.map_err(|e| e.to_string())?;
    let collector = collect(&connection, &topology.exchange, n).await?;
    prefill(&connection, &topology.inbox, n, secret).await?;

    let (api, api_addr, server) = FakeApi::serve(delay).await?;
    broker_settled(&CpuProbe::new().with("broker", broker.to_vec())).await;

    let mut env = env.to_vec();
    env.push(("OPENAI_BASE_URL", format!("http://{api_addr}/v1")));
    env.push(("RELAY_FETCH_CONCURRENCY", concurrency.to_string()));
    let mut worker = RelayProcess::spawn(binary, "worker", procs::free_port(), &env)?;
    let spawned = Instant::now();
    worker.wait_ready(http).await?;
    let ready = Instant::now();
    let probe = CpuProbe::new().with("relay", vec![worker.pid().to_string()]).with("broker", broker.to_vec()).with("generator", vec![std::process::id().to_string()]);
    let window = probe.start();
    let collected = tokio::time::timeout(Duration::from_secs(300), collector).await;
    let cpu = probe.finish(window);
    let (published, total, last) = match collected {
        Ok(Ok(counts)) => counts,
        Ok(Err(e)) => return Err(format!("event collector failed: {e}")),
        Err(_) => return Err(format!("worker did not publish all {n} events in 300 s; last log lines:\n{}", worker.log_tail().join("\n"))),
    };
    let last = last.unwrap_or_else(Instant::now);
    let first_fetch = api.first.lock().unwrap().unwrap_or(ready);
    // Acks follow the publishes; give them a moment before checking the inbox is empty.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let left_in_inbox = crate::queue_depth(control, &topology.inbox).await?;
    let rss_kib = worker.peak_rss_kib().unwrap_or(0);
    worker.stop().await;
    server.abort();
    let _ = connection.close(200, "worker phase done".into()).await;
    let result = WorkerResult {
        events: n,
        published,
        duplicates: total - published,
        left_in_inbox,
        eps: published as f64 / (last - first_fetch).as_secs_f64(),
        rss_kib,
        max_fetches_in_flight: api.max_in_flight.load(Ordering::Relaxed),
        us_per_event: cpu_seconds(&cpu, "relay", last - ready) * 1e6 / published.max(1) as f64,
        cpu,
    };
    println!(
        "    {published} of {n} events published in {:.2} s from the first fetch ({:.0}/s; /readyz {:.2} s after spawn); {} fetches, at most {} at once; relay CPU {:.1} µs per event",
        (last - first_fetch).as_secs_f64(),
        result.eps,
        (ready - spawned).as_secs_f64(),
        api.requests.load(Ordering::Relaxed),
        result.max_fetches_in_flight,
        result.us_per_event
    );
    Ok(result)
}

/// Raw lapin doing the worker's broker work on the same deliveries: consume (prefetch twice
/// the concurrency, as the relay), publish each body with its properties to a topic exchange
/// (persistent, mandatory, confirmed), then ack; `concurrency` at a time. With `fetch`, each
/// delivery first GETs an object from the same fake API as the relay's fast run (in this
/// process, answering at once, over one keep-alive reqwest client) and publishes that
/// instead: a plain worker that fetches, with none of the relay's own work.
#[allow(clippy::too_many_arguments)]
pub async fn baseline(amqp_url: &str, control: &Channel, topology: &Topology, secret: &Secret, n: usize, concurrency: usize, fetch: bool, generator: &CpuProbe) -> Result<WorkerResult, String> {
    let what = if fetch { "consume → fetch → publish → ack" } else { "consume → publish → ack" };
    println!("  baseline (raw lapin {what}), {n} deliveries, {concurrency} at a time");
    topology.declare(control).await.map_err(|e| format!("declaring the baseline topology: {e}"))?;
    let connection = Connection::connect(amqp_url, ConnectionProperties::default()).await.map_err(|e| e.to_string())?;
    let collector = collect(&connection, &topology.exchange, n).await?;
    prefill(&connection, &topology.inbox, n, secret).await?;
    let api = if fetch { Some(FakeApi::serve(Duration::ZERO).await?) } else { None };
    let objects = api.as_ref().map(|(_, addr, _)| (reqwest::Client::new(), format!("http://{addr}/v1/responses/")));
    let channel = connection.create_channel().await.map_err(|e| e.to_string())?;
    channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(|e| e.to_string())?;
    channel.basic_qos((concurrency * 2) as u16, BasicQosOptions::default()).await.map_err(|e| e.to_string())?;
    broker_settled(generator).await;
    let started = Instant::now();
    let window = generator.start();
    let consumer = channel.basic_consume(topology.inbox.as_str().into(), "bench-baseline".into(), BasicConsumeOptions::default(), FieldTable::default()).await.map_err(|e| e.to_string())?;
    let exchange = topology.exchange.clone();
    let worker = tokio::spawn(consumer.for_each_concurrent(concurrency, move |delivery| {
        let (channel, exchange, objects) = (channel.clone(), exchange.clone(), objects.clone());
        async move {
            let Ok(delivery) = delivery else { return };
            let body = match objects {
                None => delivery.data.clone(),
                Some((http, url)) => {
                    // The fake API answers any id; the message id saves parsing the body.
                    let id = delivery.properties.message_id().as_ref().map_or("", |id| id.as_str());
                    let fetched = match http.get(format!("{url}{id}")).send().await {
                        Ok(response) => response.bytes().await,
                        Err(e) => Err(e),
                    };
                    // Unacked, it stays in the inbox and the missing event fails the run.
                    let Ok(object) = fetched else { return };
                    object.to_vec()
                }
            };
            let options = BasicPublishOptions { mandatory: true, ..Default::default() };
            let published = channel.basic_publish(exchange.as_str().into(), "response.completed".into(), options, &body, delivery.properties.clone()).await;
            if let Ok(confirm) = published
                && matches!(confirm.await, Ok(Confirmation::Ack(None)))
            {
                let _ = delivery.ack(BasicAckOptions::default()).await;
            }
        }
    }));
    let collected = tokio::time::timeout(Duration::from_secs(300), collector).await;
    let cpu = generator.finish(window);
    worker.abort();
    if let Some((_, _, server)) = api {
        server.abort();
    }
    let (published, total, last) = collected.map_err(|_| format!("the baseline did not publish all {n} events in 300 s"))?.map_err(|e| e.to_string())?;
    let last = last.unwrap_or_else(Instant::now);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let left_in_inbox = crate::queue_depth(control, &topology.inbox).await?;
    let _ = connection.close(200, "worker baseline done".into()).await;
    let result = WorkerResult {
        events: n,
        published,
        duplicates: total - published,
        left_in_inbox,
        eps: published as f64 / (last - started).as_secs_f64(),
        rss_kib: 0,
        max_fetches_in_flight: 0,
        us_per_event: cpu_seconds(&cpu, "generator", last - started) * 1e6 / published.max(1) as f64,
        cpu,
    };
    println!("    {published} of {n} events published in {:.2} s ({:.0}/s); this process's CPU {:.1} µs per event (counting the events included)", (last - started).as_secs_f64(), result.eps, result.us_per_event);
    Ok(result)
}
