//! `cargo bench --bench pipeline`: the relay's throughput, latency, worker rate and memory
//! against the real RabbitMQ, next to what the same machine does without the relay.
//!
//! Phases (on fresh, uniquely named queues and exchanges, all deleted at the end):
//! 1. ingest: the release binary as `--role receiver`, driven over keep-alive HTTP/1.1 with
//!    pre-signed deliveries. A ramp of short closed-loop steps (32 to 512 connections) finds
//!    the concurrency C that saturates it; then a closed loop at C, and an open loop at a
//!    fixed half of that peak. After each, the inbox is drained and the id of every 2xx looked
//!    up among what it held, so that each phase starts on an empty queue and a loss is
//!    counted per delivery, not as a difference of totals;
//! 2. baselines, each with the same ramp, then a closed loop, then an open loop at the relay's
//!    open-loop rate (the same offered load), each drained and checked by id like the relay's:
//!    - the bare receiver (`pipeline/bare.rs`): the same HTTP requests to the relay's accept
//!      loop with a handler that only publishes and awaits the confirm, the floor under any
//!      receiver built on axum and lapin;
//!    - raw lapin publishes of the same bodies with the same properties, persistent,
//!      mandatory, to a quorum queue declared like the inbox, each task awaiting its own confirm;
//! 3. worker: the release binary as `--role worker` draining a pre-filled inbox against a
//!    fake OpenAI API (in this process) that answers after 100 ms (what the fetch concurrency
//!    bounds), counting the CloudEvents that reach the exchange. Then rounds against one that
//!    answers at once (what the worker costs), each also running raw lapin doing the same
//!    broker work on as many deliveries (consume → publish → ack, same prefetch and
//!    concurrency) and raw lapin with one fetch per delivery from the same fake API
//!    (consume → fetch → publish → ack: what a plain worker that fetches reaches here; it
//!    drives all its deliveries from one task, so the relay can beat it). Each timed run
//!    starts on a purged and pre-filled queue, once the broker is idle. Ratios are taken
//!    within a round, where the box's speed is the same for all three, and the median
//!    round's reported, so that one disturbed window does not decide them; each round starts
//!    with a different one of the three;
//! 4. gateway: requests through RabbitMQ to the library's fake OpenAI API and back, next to a
//!    raw lapin request/reply service (see `pipeline/gateway.rs`).
//!
//! The last line printed is the machine-readable summary. The process fails when an
//! accepted delivery is missing (`lost` > 0) or a phase cannot run.
//!
//! Settings (environment): AMQP_URL; BENCH_CONCURRENCY (skip the ramp and use this C);
//! BENCH_WARMUP_SECS (2); BENCH_SECS (10, each measured window); BENCH_THREADS (2, the
//! generator's tokio runtime); BENCH_WORKER_EVENTS (3200); BENCH_WORKER_FAST_EVENTS (20000,
//! per run of a round); BENCH_WORKER_ROUNDS (3); BENCH_FETCH_CONCURRENCY (32);
//! BENCH_GATEWAY_REQUESTS (2000);
//! BENCH_QUIET_WAIT_SECS (60: how long to wait for other processes to leave the CPU before
//! starting anyway).

#[path = "pipeline/bare.rs"]
mod bare;
#[path = "../tests/support/deliveries.rs"]
mod deliveries;
#[path = "pipeline/gateway.rs"]
mod gateway;
#[path = "pipeline/load.rs"]
mod load;
#[path = "pipeline/procs.rs"]
mod procs;
#[path = "pipeline/worker.rs"]
mod worker;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use futures::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use openai_webhook_relay::topology::Topology;
use openai_webhook_relay::verify::Secret;

use load::{Pool, PhaseResult, Sink};
use procs::{CpuProbe, RelayProcess, Usage};
use worker::WorkerResult;

const FETCH_DELAY: Duration = Duration::from_millis(100);

struct Settings {
    amqp_url: String,
    /// None: found by the ramp.
    concurrency: Option<usize>,
    warmup: Duration,
    window: Duration,
    threads: usize,
    worker_events: usize,
    worker_fast_events: usize,
    worker_rounds: usize,
    fetch_concurrency: usize,
    gateway_requests: usize,
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

impl Settings {
    fn from_env() -> Self {
        Self {
            amqp_url: std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
            concurrency: std::env::var("BENCH_CONCURRENCY").ok().and_then(|v| v.parse().ok()),
            warmup: Duration::from_secs(env_number("BENCH_WARMUP_SECS", 2)),
            window: Duration::from_secs(env_number("BENCH_SECS", 10)),
            threads: env_number("BENCH_THREADS", 2) as usize,
            worker_events: env_number("BENCH_WORKER_EVENTS", 3200) as usize,
            worker_fast_events: env_number("BENCH_WORKER_FAST_EVENTS", 20_000) as usize,
            worker_rounds: env_number("BENCH_WORKER_ROUNDS", 3).max(1) as usize,
            fetch_concurrency: env_number("BENCH_FETCH_CONCURRENCY", 32) as usize,
            gateway_requests: env_number("BENCH_GATEWAY_REQUESTS", 2000) as usize,
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.windows(2).any(|pair| pair[0] == "--role" && pair[1] == bare::ROLE) {
        return bare::main();
    }
    let settings = Settings::from_env();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.threads)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(settings)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("pipeline bench failed: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Names of everything this run creates on the broker, for the clean-up.
struct Names {
    tag: String,
    ingest: Topology,
    worker: Topology,
    worker_baseline: Topology,
    gateway: Topology,
    baseline: String,
    bare: String,
}

async fn run(settings: Settings) -> Result<ExitCode, String> {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("pipeline bench: relay (release binary), RabbitMQ and this load generator share this machine's {cores} CPU cores;");
    println!("  the generator runs on a {}-thread tokio runtime, the relay on its default runtime; nothing is pinned,", settings.threads);
    println!("  so every figure is for the whole pipeline on one box, not for a dedicated broker or relay.");
    let started = Instant::now();
    let binary = procs::build_relay()?;
    println!("relay binary built/checked in {:.1} s", started.elapsed().as_secs_f64());
    // On a shared development machine, wait (a while) for builds and test runs to finish.
    let probe = CpuProbe::new().with("broker", procs::broker_pids()).with("generator", vec![std::process::id().to_string()]);
    let quiet_deadline = Instant::now() + Duration::from_secs(env_number("BENCH_QUIET_WAIT_SECS", 60));
    loop {
        let others = probe.others_now(Duration::from_secs(2)).await;
        if others <= 0.15 {
            break;
        }
        if Instant::now() >= quiet_deadline {
            println!("WARNING: other processes keep {others:.2} cores busy (a build or a test run?); the figures will be low");
            break;
        }
        println!("  other processes keep {others:.2} cores busy; waiting for the machine to be quiet");
    }
    drop(probe);
    let started = Instant::now();
    let control = Connection::connect(&settings.amqp_url, ConnectionProperties::default())
        .await
        .map_err(|e| format!("RabbitMQ unreachable at AMQP_URL: {e}; start it (`rabbitmq-server -detached`) or set AMQP_URL"))?;
    let channel = control.create_channel().await.map_err(|e| e.to_string())?;
    let tag = format!("bench.{:012x}", fastrand::u64(..) >> 16);
    let names = Names {
        ingest: Topology { exchange: format!("{tag}.events"), inbox: format!("{tag}.inbox"), requests: None },
        worker: Topology { exchange: format!("{tag}.w.events"), inbox: format!("{tag}.w.inbox"), requests: None },
        worker_baseline: Topology { exchange: format!("{tag}.wb.events"), inbox: format!("{tag}.wb.inbox"), requests: None },
        gateway: Topology { exchange: format!("{tag}.g.events"), inbox: format!("{tag}.g.inbox"), requests: Some(format!("{tag}.g.requests")) },
        baseline: format!("{tag}.baseline"),
        bare: format!("{tag}.bare"),
        tag,
    };
    let result = phases(&settings, &binary, &channel, &names).await;
    let _ = control.close(200, "bench done".into()).await;
    cleanup(&settings.amqp_url, &names).await;
    let report = result?;
    println!("phases and clean-up took {:.0} s", started.elapsed().as_secs_f64());
    Ok(report.print(&settings))
}

/// Deletes everything the run created, on a fresh connection (a failed phase may have
/// closed the control channel).
async fn cleanup(amqp_url: &str, names: &Names) {
    let Ok(connection) = Connection::connect(amqp_url, ConnectionProperties::default()).await else {
        eprintln!("clean-up: RabbitMQ unreachable; queues named {}.* may be left behind", names.ingest.inbox.trim_end_matches(".inbox"));
        return;
    };
    let Ok(channel) = connection.create_channel().await else { return };
    let mut queues = names.ingest.queues();
    queues.extend(names.worker.queues());
    queues.extend(names.worker_baseline.queues());
    queues.extend(names.gateway.queues());
    queues.extend(gateway::extra_queues(&names.tag));
    queues.push(names.baseline.clone());
    queues.push(names.bare.clone());
    for queue in queues {
        let _ = channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
    }
    for exchange in [&names.ingest.exchange, &names.worker.exchange, &names.worker_baseline.exchange, &names.gateway.exchange] {
        let _ = channel.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default()).await;
    }
    let _ = connection.close(200, "bench clean-up".into()).await;
}

/// One measured load phase, and what the queue held after it.
struct Measured {
    result: PhaseResult,
    /// Open loop: the rate asked for.
    rate_asked: Option<f64>,
    drained: Drained,
    /// Open loop of the relay: its own publish-to-confirm times meanwhile.
    store: Option<StoreTimes>,
}

/// The relay's own publish-to-confirm times (`relay_inbox_store_seconds`, from its
/// `/metrics`) over a phase: near the HTTP latency, the time goes in lapin and the broker's
/// confirms (or in waiting for a CPU meanwhile); far below it, in the relay's HTTP side.
/// Cumulative counts by bucket bound, in seconds; the bounds double, so a percentile is
/// known only to within a factor of two.
struct StoreTimes(Vec<(f64, u64)>);

impl StoreTimes {
    /// None where nothing serves the relay's metrics (the bare receiver, the baseline), or
    /// when the relay's could not be read (the report then says so).
    async fn scrape(addr: SocketAddr) -> Option<Self> {
        let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().ok()?;
        let response = client.get(format!("http://{addr}/metrics")).send().await.ok()?.error_for_status().ok()?;
        let text = response.text().await.ok()?;
        let buckets: Vec<(f64, u64)> = text
            .lines()
            .filter_map(|line| {
                let (bound, count) = line.strip_prefix("relay_inbox_store_seconds_bucket{le=\"")?.split_once("\"} ")?;
                let bound = if bound == "+Inf" { f64::INFINITY } else { bound.parse().ok()? };
                Some((bound, count.trim().parse().ok()?))
            })
            .collect();
        (!buckets.is_empty()).then_some(Self(buckets))
    }

    fn since(&self, before: &Self) -> Self {
        Self(self.0.iter().zip(&before.0).map(|(&(bound, after), &(_, before))| (bound, after.saturating_sub(before))).collect())
    }

    fn total(&self) -> u64 {
        self.0.last().map_or(0, |&(_, count)| count)
    }

    /// The bound (ms) of the bucket that holds the `p`-th percentile: infinite above the
    /// largest bound, None without a publish.
    fn percentile_ms(&self, p: f64) -> Option<f64> {
        let rank = ((p / 100.0 * self.total() as f64).ceil() as u64).max(1);
        self.0.iter().find(|&&(_, count)| count >= rank).map(|&(bound, _)| bound * 1000.0)
    }

    /// Publishes slower than the largest bound ≤ `ms`.
    fn slower_than_ms(&self, ms: f64) -> (f64, u64) {
        let (bound, within) = self.0.iter().rev().find(|&&(bound, _)| bound * 1000.0 <= ms).copied().unwrap_or((0.0, 0));
        (bound * 1000.0, self.total() - within)
    }
}

/// What a queue held after a phase, checked against the ids the phase had accepted.
#[derive(Debug, Default, Clone, Copy)]
struct Drained {
    stored: u64,
    /// Accepted ids (answered 2xx, or confirmed) that the queue did not hold.
    missing: u64,
}

impl std::ops::AddAssign for Drained {
    fn add_assign(&mut self, other: Self) {
        self.stored += other.stored;
        self.missing += other.missing;
    }
}

struct Report {
    body_bytes: usize,
    concurrency_chosen: bool,
    ingest: Driven,
    bare: Driven,
    baseline_ramp: Ramp,
    baseline_closed: Measured,
    baseline_open: Measured,
    reused: usize,
    worker: WorkerResult,
    worker_rounds: Vec<worker::Round>,
    gateway: gateway::GatewayResult,
}

fn secret_text() -> String {
    let key: Vec<u8> = (0..32).map(|_| fastrand::u8(..)).collect();
    format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(key))
}

/// Enough pre-signed deliveries for a closed-loop run of `duration` at up to `max_rate`/s.
fn closed_pool_size(duration: Duration, max_rate: f64, concurrency: usize) -> usize {
    (max_rate * duration.as_secs_f64()) as usize + 10 * concurrency
}

fn build_pool(secret: &Secret, addr: SocketAddr, count: usize, quiet: bool) -> Arc<Pool> {
    let started = Instant::now();
    let pool = Pool::build(secret, addr, count);
    if !quiet {
        println!("  signed {count} deliveries ahead of the phase in {:.2} s (not timed)", started.elapsed().as_secs_f64());
    }
    Arc::new(pool)
}

async fn queue_depth(channel: &Channel, queue: &str) -> Result<u64, String> {
    let options = QueueDeclareOptions { passive: true, ..Default::default() };
    let declared = channel.queue_declare(queue.into(), options, FieldTable::default()).await.map_err(|e| format!("passive declare of {queue}: {e}"))?;
    Ok(u64::from(declared.message_count()))
}

/// Empties `queue` by consuming it and looks up every id in `accepted` among the
/// `message_id`s it held (the relay's inbox sets it to the `webhook-id`, the baseline does the
/// same): an accepted delivery is lost when its own id is absent, whatever the totals say.
/// The next phase then starts on an empty queue, as a relay whose worker keeps up sees it.
async fn drain(channel: &Channel, queue: &str, accepted: &[String]) -> Result<Drained, String> {
    let tag = format!("bench-drain-{:x}", fastrand::u64(..));
    let options = BasicConsumeOptions { no_ack: true, ..Default::default() };
    let mut consumer = channel.basic_consume(queue.into(), tag.as_str().into(), options, FieldTable::default()).await.map_err(|e| format!("draining {queue}: {e}"))?;
    let mut held = HashSet::with_capacity(accepted.len());
    let mut stored = 0;
    loop {
        match tokio::time::timeout(Duration::from_millis(300), consumer.next()).await {
            Ok(Some(Ok(delivery))) => {
                stored += 1;
                if let Some(id) = delivery.properties.message_id() {
                    held.insert(id.to_string());
                }
            }
            Ok(Some(Err(e))) => return Err(format!("draining {queue}: {e}")),
            Ok(None) => break,
            Err(_) if queue_depth(channel, queue).await? == 0 => break,
            Err(_) => {}
        }
    }
    channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await.map_err(|e| format!("draining {queue}: {e}"))?;
    let missing = accepted.iter().filter(|id| !held.contains(id.as_str())).count() as u64;
    // Let the broker finish truncating its log before the next timed phase.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(Drained { stored, missing })
}

fn phase_summary(name: &str, result: &PhaseResult) {
    println!(
        "  {name}: {:.0}/s accepted in the window, p50 {:.2} ms, p99 {:.2} ms; whole phase: {} accepted, {} rejected, {} failed",
        result.rate,
        result.percentile_ms(50.0),
        result.percentile_ms(99.0),
        result.accepted,
        result.rejected,
        result.failed
    );
    println!("    CPU used (cores): {}; waited for a CPU (ms/s): {}", result.cpu.iter().map(|u| format!("{} {:.2}", u.name, u.cores)).collect::<Vec<_>>().join(", "), cpu_waits(&result.cpu));
}

/// Concurrency steps of the ramp that finds where a sink saturates.
const RAMP: [usize; 5] = [32, 64, 128, 256, 512];

/// The closed-loop steps that chose a sink's concurrency, and what its queue held after them.
#[derive(Default)]
struct Ramp {
    concurrency: usize,
    steps: Vec<(usize, PhaseResult)>,
    drained: Drained,
}

impl Ramp {
    fn accepted(&self) -> u64 {
        self.steps.iter().map(|(_, r)| r.accepted).sum()
    }

    fn describe(&self) -> String {
        self.steps.iter().map(|(c, r)| format!("{c} → {:.0}/s", r.rate)).collect::<Vec<_>>().join(", ")
    }
}

/// The same ramp for the relay and the baseline: 1 s + 2 s closed-loop steps through [`RAMP`],
/// each drained and checked; the concurrency is the smallest step within 5 % of the best one
/// (or `BENCH_CONCURRENCY`, without a ramp).
async fn ramp(settings: &Settings, sink: &Sink, secret: &Secret, addr: SocketAddr, probe: &CpuProbe, control: &Channel, queue: &str) -> Result<Ramp, String> {
    if let Some(concurrency) = settings.concurrency {
        return Ok(Ramp { concurrency, ..Default::default() });
    }
    let mut ramp = Ramp::default();
    let (step_warmup, step_window) = (Duration::from_secs(1), Duration::from_secs(2));
    for c in RAMP {
        let pool = build_pool(secret, addr, closed_pool_size(step_warmup + step_window, 40_000.0, c), true);
        let result = load::closed_loop(sink, pool.clone(), c, step_warmup, step_window, probe).await.map_err(|e| e.to_string())?;
        if pool.reused() > 0 {
            return Err(format!("the ramp's pool of {} deliveries ran out at {c} connections", pool.taken() - pool.reused()));
        }
        ramp.drained += drain(control, queue, &result.accepted_ids).await?;
        println!("  ramp: {c:>3} connections → {:.0}/s (p50 {:.2} ms, p99 {:.2} ms)", result.rate, result.percentile_ms(50.0), result.percentile_ms(99.0));
        ramp.steps.push((c, result));
    }
    let best = ramp.steps.iter().map(|(_, r)| r.rate).fold(0.0, f64::max);
    ramp.concurrency = ramp.steps.iter().find(|(_, r)| r.rate >= 0.95 * best).map_or(64, |(c, _)| *c);
    Ok(ramp)
}

/// A closed loop at the ramp's concurrency, then an open loop at `rate` (or half the closed
/// loop's rate) over as many connections, each drained and checked.
#[allow(clippy::too_many_arguments)]
async fn closed_then_open(
    settings: &Settings,
    sink: &Sink,
    secret: &Secret,
    addr: SocketAddr,
    probe: &CpuProbe,
    control: &Channel,
    queue: &str,
    c: usize,
    rate: Option<f64>,
    reused: &mut usize,
) -> Result<(Measured, Measured), String> {
    println!("  closed loop with {c} connections");
    let pool = build_pool(secret, addr, closed_pool_size(settings.warmup + settings.window, 40_000.0, c), false);
    let result = load::closed_loop(sink, pool.clone(), c, settings.warmup, settings.window, probe).await.map_err(|e| e.to_string())?;
    *reused += pool.reused();
    drop(pool);
    phase_summary("closed loop", &result);
    let drained = drain(control, queue, &result.accepted_ids).await?;
    let closed = Measured { result, rate_asked: None, drained, store: None };
    let rate = rate.unwrap_or((closed.result.rate / 2.0).max(1.0));
    let pool = build_pool(secret, addr, (rate * 12.0) as usize + 1000, false);
    // Around the whole open loop, its 1 s warm-up included.
    let store_before = StoreTimes::scrape(addr).await;
    let result = load::open_loop(sink, pool.clone(), rate, c, Duration::from_secs(1), settings.window, probe).await.map_err(|e| e.to_string())?;
    *reused += pool.reused();
    drop(pool);
    phase_summary(&format!("open loop at {rate:.0}/s"), &result);
    let store = match (store_before, StoreTimes::scrape(addr).await) {
        (Some(before), Some(after)) => Some(after.since(&before)),
        _ => None,
    };
    let drained = drain(control, queue, &result.accepted_ids).await?;
    Ok((closed, Measured { result, rate_asked: Some(rate), drained, store }))
}

/// A receiver process (the relay, or the bare receiver) driven over HTTP, then stopped.
struct Driven {
    ramp: Ramp,
    closed: Measured,
    open: Measured,
    rss_kib: u64,
}

/// Waits for `process` to be ready, ramps it, runs its closed and open loops (the open one at
/// `rate`, or half the closed loop's), each drained from `queue` and checked, and stops it;
/// prints its last log lines when a request was not accepted.
#[allow(clippy::too_many_arguments)]
async fn drive_receiver(
    settings: &Settings,
    mut process: RelayProcess,
    http: &reqwest::Client,
    secret: &Secret,
    broker: &[String],
    control: &Channel,
    queue: &str,
    rate: Option<f64>,
    reused: &mut usize,
) -> Result<Driven, String> {
    process.wait_ready(http).await?;
    let (addr, sink) = (process.addr, Sink::Http(process.addr));
    let probe = CpuProbe::new().with("relay", vec![process.pid().to_string()]).with("broker", broker.to_vec()).with("generator", vec![std::process::id().to_string()]);
    let ramp = ramp(settings, &sink, secret, addr, &probe, control, queue).await?;
    let (closed, open) = closed_then_open(settings, &sink, secret, addr, &probe, control, queue, ramp.concurrency, rate, reused).await?;
    let rss_kib = process.peak_rss_kib().unwrap_or(0);
    let tail = process.log_tail();
    process.stop().await;
    let not_accepted = [&closed.result, &open.result].iter().map(|r| r.rejected + r.failed).sum::<u64>();
    if not_accepted > 0 && !tail.is_empty() {
        println!("  last log lines:\n    {}", tail.join("\n    "));
    }
    Ok(Driven { ramp, closed, open, rss_kib })
}

async fn phases(settings: &Settings, binary: &std::path::Path, control: &Channel, names: &Names) -> Result<Report, String> {
    let secret_text = secret_text();
    let secret = Secret::parse(&secret_text).map_err(|e| e.to_string())?;
    let broker = procs::broker_pids();
    let me = vec![std::process::id().to_string()];
    let mut reused = 0;

    // 1. Ingest: the relay as a receiver, driven over keep-alive HTTP/1.1.
    let phase_started = Instant::now();
    println!("phase 1/4: relay ingest (--role receiver)");
    let http = reqwest::Client::new();
    let addr = procs::free_port();
    let relay_env = |topology: &Topology| {
        vec![
            ("OPENAI_WEBHOOK_SECRET", secret_text.clone()),
            ("OPENAI_API_KEY", "sk-bench".to_owned()),
            ("AMQP_URL", settings.amqp_url.clone()),
            ("RELAY_EXCHANGE", topology.exchange.clone()),
            ("RELAY_INBOX_QUEUE", topology.inbox.clone()),
            ("RELAY_REQUEST_QUEUE", String::new()),
        ]
    };
    let receiver = RelayProcess::spawn(binary, "receiver", addr, &relay_env(&names.ingest))?;
    let ingest = drive_receiver(settings, receiver, &http, &secret, &broker, control, &names.ingest.inbox, None, &mut reused).await?;
    println!("  (ingest phase took {:.1} s)", phase_started.elapsed().as_secs_f64());

    // 2. Baselines: the bare receiver (the relay's HTTP and broker work, nothing else), then
    // the broker alone; same bodies, same kind of queue, same generator design.
    let phase_started = Instant::now();
    println!("phase 2/4: baselines, a bare axum + lapin receiver, then raw lapin publishes to a quorum queue");
    let connection = Connection::connect(&settings.amqp_url, ConnectionProperties::default()).await.map_err(|e| e.to_string())?;
    let publisher = connection.create_channel().await.map_err(|e| e.to_string())?;
    publisher.confirm_select(ConfirmSelectOptions::default()).await.map_err(|e| e.to_string())?;
    // Declared as the relay declares its inbox (quorum, reject-publish, at-least-once
    // dead-lettering, delivery limit), so that all three store into the same kind of queue.
    for queue in [&names.bare, &names.baseline] {
        let topology = Topology { exchange: String::new(), inbox: queue.clone(), requests: None };
        let spec = topology.queue_specs().into_iter().find(|spec| &spec.name == queue).ok_or("no inbox among the relay's queues")?;
        publisher.queue_declare(queue.as_str().into(), QueueDeclareOptions { durable: true, ..Default::default() }, spec.field_table()).await.map_err(|e| e.to_string())?;
    }
    let bare_env = [("AMQP_URL", settings.amqp_url.clone()), ("RELAY_INBOX_QUEUE", names.bare.clone())];
    let this_bench = std::env::current_exe().map_err(|e| e.to_string())?;
    let bare = RelayProcess::spawn(&this_bench, bare::ROLE, procs::free_port(), &bare_env)?;
    let bare = drive_receiver(settings, bare, &http, &secret, &broker, control, &names.bare, ingest.open.rate_asked, &mut reused).await?;
    let _ = control.queue_delete(names.bare.as_str().into(), QueueDeleteOptions::default()).await;
    let sink = Sink::Amqp { channel: publisher.clone(), queue: names.baseline.as_str().into() };
    let probe = CpuProbe::new().with("broker", broker.clone()).with("generator", me.clone());
    let nowhere: SocketAddr = "127.0.0.1:9".parse().expect("address");
    let baseline_ramp = ramp(settings, &sink, &secret, nowhere, &probe, control, &names.baseline).await?;
    // The relay's open-loop rate: both open loops get the same offered load.
    let (baseline_closed, baseline_open) =
        closed_then_open(settings, &sink, &secret, nowhere, &probe, control, &names.baseline, baseline_ramp.concurrency, ingest.open.rate_asked, &mut reused).await?;
    let _ = connection.close(200, "baseline done".into()).await;
    let _ = control.queue_delete(names.baseline.as_str().into(), QueueDeleteOptions::default()).await;
    println!("  (baseline phase took {:.1} s)", phase_started.elapsed().as_secs_f64());

    // 3. Worker: drain a pre-filled inbox against an API that answers after 100 ms, then
    // rounds of the relay against one that answers at once, raw lapin doing the same broker
    // work, and raw lapin that also fetches.
    let phase_started = Instant::now();
    println!("phase 3/4: worker");
    let (n, fast_n, fetches) = (settings.worker_events, settings.worker_fast_events, settings.fetch_concurrency);
    let env = relay_env(&names.worker);
    let worker = worker::relay(&settings.amqp_url, binary, control, &names.worker, &secret, n, fetches, FETCH_DELAY, &env, &broker, &http).await?;
    let generator = CpuProbe::new().with("broker", broker.clone()).with("generator", me.clone());
    let mut worker_rounds = Vec::with_capacity(settings.worker_rounds);
    for round in 0..settings.worker_rounds {
        println!("  fast round {}/{}", round + 1, settings.worker_rounds);
        let mut results: [Option<WorkerResult>; 3] = [None, None, None];
        // The order rotates, so that each of the three starts one round.
        for which in (0..3).map(|k| (round + k) % 3) {
            results[which] = Some(match which {
                0 => worker::relay(&settings.amqp_url, binary, control, &names.worker, &secret, fast_n, fetches, Duration::ZERO, &env, &broker, &http).await?,
                1 => worker::baseline(&settings.amqp_url, control, &names.worker_baseline, &secret, fast_n, fetches, false, &generator).await?,
                _ => worker::baseline(&settings.amqp_url, control, &names.worker_baseline, &secret, fast_n, fetches, true, &generator).await?,
            });
        }
        let [Some(relay), Some(baseline), Some(fetching)] = results else { unreachable!("each of the three ran") };
        worker_rounds.push(worker::Round { relay, baseline, fetching });
    }
    println!("  (worker phase took {:.1} s)", phase_started.elapsed().as_secs_f64());

    // 4. Gateway: requests to the fake OpenAI API through RabbitMQ, and their replies.
    let phase_started = Instant::now();
    let gateway = gateway::phase(
        &settings.amqp_url,
        binary,
        &names.gateway,
        &names.tag,
        settings.gateway_requests,
        &secret_text,
        &relay_env(&names.gateway),
        &broker,
        &http,
    )
    .await?;
    println!("  (gateway phase took {:.1} s)", phase_started.elapsed().as_secs_f64());

    Ok(Report {
        body_bytes: Pool::build(&secret, addr, 1).body_len(),
        concurrency_chosen: settings.concurrency.is_none(),
        ingest,
        bare,
        baseline_ramp,
        baseline_closed,
        baseline_open,
        reused,
        worker,
        worker_rounds,
        gateway,
    })
}

/// `part` as a share of `whole`; 0 when there is no whole (a phase that measured nothing).
fn share(part: f64, whole: f64) -> f64 {
    if whole > 0.0 { part / whole } else { 0.0 }
}

fn cpu_cores(cpu: &[Usage], name: &str) -> f64 {
    cpu.iter().find(|u| u.name == name).map_or(0.0, |u| u.cores)
}

/// The table's four CPU columns: relay, broker, generator, others.
fn cpu_cells(cpu: &[Usage]) -> String {
    ["relay", "broker", "generator", "others"].map(|name| cpu_cell(cpu, name)).join(" | ")
}

fn cpu_cell(cpu: &[Usage], name: &str) -> String {
    cpu.iter().find(|u| u.name == name).map_or_else(|| "–".to_owned(), |u| format!("{:.2}", u.cores))
}

fn cpu_waits(cpu: &[Usage]) -> String {
    cpu.iter().filter(|u| u.name != "others").map(|u| format!("{} {:.0}", u.name, u.cpu_wait_ms_per_s)).collect::<Vec<_>>().join(", ")
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

impl Report {
    /// Prints the table and the verdicts; the summary line comes last.
    fn print(&self, settings: &Settings) -> ExitCode {
        let (c, baseline_c) = (self.ingest.ramp.concurrency, self.baseline_ramp.concurrency);
        let secs = settings.window.as_secs();
        let worker_bound = settings.fetch_concurrency as f64 / FETCH_DELAY.as_secs_f64();
        let w = &self.worker;
        println!();
        println!(
            "Results: {} B signed event envelopes; closed loop {secs} s after {} s warm-up, open loop {secs} s after 1 s, each on an empty queue; CPU in cores during the window.",
            self.body_bytes,
            settings.warmup.as_secs()
        );
        if self.concurrency_chosen {
            println!("Concurrency: the smallest step within 5 % of the best in the same ramp of 3 s closed-loop steps for each:");
            println!(
                "  relay {c} ({}); bare receiver {} ({}); baseline {baseline_c} ({}).",
                self.ingest.ramp.describe(),
                self.bare.ramp.concurrency,
                self.bare.ramp.describe(),
                self.baseline_ramp.describe()
            );
        } else {
            println!("Concurrency {c}: set by BENCH_CONCURRENCY.");
        }
        println!("Relay, RabbitMQ and the load generator share this machine's CPU cores: every figure is for all three on one box.");
        println!();
        println!("| phase | load | accepted/s | p50 ms | p99 ms | p99.9 ms | max ms | not accepted | relay CPU | broker CPU | generator CPU | other CPU |");
        println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        let row = |phase: &str, m: &Measured, c: usize| {
            let r = &m.result;
            let load = match m.rate_asked {
                None => format!("closed, {c} in flight"),
                Some(rate) => format!("open, {rate:.0}/s"),
            };
            println!(
                "| {phase} | {load} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} |",
                r.rate,
                r.percentile_ms(50.0),
                r.percentile_ms(99.0),
                r.percentile_ms(99.9),
                r.percentile_ms(100.0),
                r.rejected + r.failed,
                cpu_cells(&r.cpu),
            );
        };
        row("relay ingest, HTTP → verify → quorum inbox", &self.ingest.closed, c);
        row("relay ingest, HTTP → verify → quorum inbox", &self.ingest.open, c);
        row("bare receiver, HTTP → quorum queue (axum + lapin only)", &self.bare.closed, self.bare.ramp.concurrency);
        row("bare receiver, HTTP → quorum queue (axum + lapin only)", &self.bare.open, self.bare.ramp.concurrency);
        row("baseline, lapin → quorum queue", &self.baseline_closed, baseline_c);
        row("baseline, lapin → quorum queue", &self.baseline_open, baseline_c);
        let worker_row = |phase: &str, w: &WorkerResult| {
            println!(
                "| {phase} | {} deliveries, {} at a time | {:.0} | – | – | – | – | {} | {} |",
                w.events,
                settings.fetch_concurrency,
                w.eps,
                w.events - w.published,
                cpu_cells(&w.cpu),
            );
        };
        worker_row("relay worker, fetch answers after 100 ms", w);
        for (i, round) in self.worker_rounds.iter().enumerate() {
            worker_row(&format!("round {}: relay worker, fetch answers at once", i + 1), &round.relay);
            worker_row(&format!("round {}: baseline, lapin consume → publish → ack", i + 1), &round.baseline);
            worker_row(&format!("round {}: baseline, lapin consume → fetch at once → publish → ack", i + 1), &round.fetching);
        }
        let g = &self.gateway;
        println!(
            "| relay gateway, request → POST → webhook → fetch → reply | {} requests | {:.0} | {:.2} | {:.2} | – | – | {} | {} |",
            g.requests,
            g.rps,
            g.p50_ms,
            g.p99_ms,
            g.requests - g.terminal,
            cpu_cells(&g.cpu),
        );
        println!(
            "| baseline, lapin request → reply | {} requests | {:.0} | – | – | – | – | – | – | {} | {} | {} |",
            g.requests,
            g.baseline_rps,
            cpu_cell(&g.baseline_cpu, "broker"),
            cpu_cell(&g.baseline_cpu, "generator"),
            cpu_cell(&g.baseline_cpu, "others"),
        );
        println!();
        println!(
            "Open-loop latency runs from each request's scheduled send time (no coordinated omission). Requests left late (all {c} connections busy, or the generator not scheduled in time) by {:.2} ms at p99 and {:.2} ms at most (bare receiver {:.2} / {:.2} ms, baseline {:.2} / {:.2} ms): a long one is a stall of the whole pipeline, e.g. RabbitMQ rolling over its quorum-queue write-ahead log.",
            self.ingest.open.result.send_lag_p99_us as f64 / 1000.0,
            self.ingest.open.result.send_lag_max_us as f64 / 1000.0,
            self.bare.open.result.send_lag_p99_us as f64 / 1000.0,
            self.bare.open.result.send_lag_max_us as f64 / 1000.0,
            self.baseline_open.result.send_lag_p99_us as f64 / 1000.0,
            self.baseline_open.result.send_lag_max_us as f64 / 1000.0
        );
        let store_p99 = self.ingest.open.store.as_ref().and_then(|store| store.percentile_ms(99.0));
        match (&self.ingest.open.store, store_p99) {
            (Some(store), Some(p99)) => {
                let (bound, slower) = store.slower_than_ms(50.0);
                println!(
                    "The relay's own publish-to-confirm time over its whole open loop (relay_inbox_store_seconds, by bucket bound, so within a factor of two): p50 <= {:.2} ms, p99 <= {p99:.2} ms; {slower} of {} publishes over {bound:.0} ms. Near the HTTP p99, the time goes in lapin and the broker's confirms (or in waiting for a CPU meanwhile); far below it, in the relay's HTTP side.",
                    store.percentile_ms(50.0).unwrap_or_default(),
                    store.total()
                );
            }
            _ => println!("WARNING: the relay's /metrics could not be read around its open loop (or counted no publish): store_p99_ms=none."),
        }
        let missing = |ramp: &Ramp, closed: &Measured, open: &Measured| ramp.drained.missing + closed.drained.missing + open.drained.missing;
        let ingest_lost = missing(&self.ingest.ramp, &self.ingest.closed, &self.ingest.open);
        let baseline_lost = missing(&self.baseline_ramp, &self.baseline_closed, &self.baseline_open) + missing(&self.bare.ramp, &self.bare.closed, &self.bare.open);
        let fast_results = || self.worker_rounds.iter().flat_map(worker::Round::results);
        let worker_lost = std::iter::once(w).chain(fast_results()).map(|w| (w.events - w.published) as u64).sum::<u64>();
        let gateway_lost = (g.requests - g.terminal) as u64;
        let lost = ingest_lost + worker_lost + gateway_lost;
        let held = |accepted: u64, drained: &Drained| format!("{accepted} / {} / {}", drained.stored, drained.missing);
        println!(
            "Accounting, per id (accepted / held by the queue / accepted ids it did not hold): relay ramp {}, closed {}, open {}; bare receiver ramp {}, closed {}, open {}; baseline ramp {}, closed {}, open {}; slow worker published {} of {} deliveries ({} duplicates), {} left in its inbox; fast rounds (relay and baselines) published {} of {} ({} duplicates), the relay left {} in its inbox; gateway terminal replies {} of {} requests ({} queued replies, {} duplicate POSTs, {} webhooks); ids re-sent because a pool ran out: {}.",
            held(self.ingest.ramp.accepted(), &self.ingest.ramp.drained),
            held(self.ingest.closed.result.accepted, &self.ingest.closed.drained),
            held(self.ingest.open.result.accepted, &self.ingest.open.drained),
            held(self.bare.ramp.accepted(), &self.bare.ramp.drained),
            held(self.bare.closed.result.accepted, &self.bare.closed.drained),
            held(self.bare.open.result.accepted, &self.bare.open.drained),
            held(self.baseline_ramp.accepted(), &self.baseline_ramp.drained),
            held(self.baseline_closed.result.accepted, &self.baseline_closed.drained),
            held(self.baseline_open.result.accepted, &self.baseline_open.drained),
            w.published,
            w.events,
            w.duplicates,
            w.left_in_inbox,
            fast_results().map(|r| r.published).sum::<usize>(),
            fast_results().map(|r| r.events).sum::<usize>(),
            fast_results().map(|r| r.duplicates).sum::<usize>(),
            self.worker_rounds.iter().map(|r| r.relay.left_in_inbox).sum::<u64>(),
            g.terminal,
            g.requests,
            g.queued,
            g.duplicate_posts,
            g.webhooks,
            self.reused
        );
        if baseline_lost > 0 {
            println!("WARNING: the broker lost {baseline_lost} confirmed publishes of the baselines; RabbitMQ itself is misbehaving, so no figure of this run is meaningful.");
        }
        let others = [&self.ingest.closed, &self.ingest.open, &self.bare.closed, &self.bare.open, &self.baseline_closed, &self.baseline_open]
            .iter()
            .flat_map(|m| m.result.cpu.iter())
            .chain(w.cpu.iter())
            .chain(fast_results().flat_map(|r| r.cpu.iter()))
            .chain(g.cpu.iter())
            .chain(g.baseline_cpu.iter())
            .filter(|u| u.name == "others")
            .map(|u| u.cores)
            .fold(0.0, f64::max);
        if others > 0.15 {
            println!("WARNING: other processes used up to {others:.2} cores during a measured window; this run is disturbed, repeat it on a quiet machine.");
        }
        println!(
            "Peak RSS (VmHWM): receiver {:.1} MiB, worker {:.1} MiB, bare receiver {:.1} MiB.",
            mib(self.ingest.rss_kib),
            mib(fast_results().map(|r| r.rss_kib).fold(w.rss_kib, u64::max)),
            mib(self.bare.rss_kib)
        );

        let ingest_rps = self.ingest.closed.result.rate;
        let baseline_rps = self.baseline_closed.result.rate;
        let ratio = share(ingest_rps, baseline_rps);
        let p50 = self.ingest.open.result.percentile_ms(50.0);
        let p99 = self.ingest.open.result.percentile_ms(99.0);
        let rss_mb = mib(self.ingest.rss_kib.max(w.rss_kib));
        // The relay's CPU per delivery it accepted in the closed loop's window.
        let relay_us = cpu_cores(&self.ingest.closed.result.cpu, "relay") / ingest_rps.max(1.0) * 1e6;
        // The floor under it: what lapin alone costs the generator per confirmed publish.
        let lapin_us = cpu_cores(&self.baseline_closed.result.cpu, "generator") / baseline_rps.max(1.0) * 1e6;
        // The same three figures for the bare receiver: what axum and lapin alone reach here.
        let bare_rps = self.bare.closed.result.rate;
        let bare_ratio = share(bare_rps, baseline_rps);
        let bare_us = cpu_cores(&self.bare.closed.result.cpu, "relay") / bare_rps.max(1.0) * 1e6;
        let bare_p99 = self.bare.open.result.percentile_ms(99.0);
        // And raw lapin's at the same offered load: the broker's confirm tail, with no HTTP.
        let baseline_p99 = self.baseline_open.result.percentile_ms(99.0);
        // Medians over the rounds; the ratios are each round's own, not ratios of medians.
        let rounds = &self.worker_rounds;
        let of_rounds = |f: fn(&worker::Round) -> f64| worker::median(rounds.iter().map(f).collect());
        let listed = |f: fn(&worker::Round) -> f64| rounds.iter().map(|r| format!("{:.3}", f(r))).collect::<Vec<_>>().join(", ");
        let worker_ratio = of_rounds(worker::Round::ratio);
        // What a plain worker that fetches reaches of the baseline here.
        let fetch_ceiling = of_rounds(worker::Round::ceiling);
        let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
        println!(
            "Targets: ratio {ratio:.3} >= 0.9 {} (bare receiver {bare_ratio:.3}); relay {relay_us:.1} µs/delivery <= 10 {} (bare receiver {bare_us:.1}); worker fast {worker_ratio:.3} of its baseline >= 0.8 {} (median of rounds {}; a raw worker that fetches reaches {fetch_ceiling:.3}, rounds {}); p99 {p99:.2} ms <= 5 {} (bare receiver {bare_p99:.2}, raw lapin {baseline_p99:.2}); worker {:.0}/s >= {:.0} (0.9 x {:.0}) {}; RSS {rss_mb:.1} MiB <= 50 {}.",
            verdict(ratio >= 0.9),
            verdict(relay_us <= 10.0),
            verdict(worker_ratio >= 0.8),
            listed(worker::Round::ratio),
            listed(worker::Round::ceiling),
            verdict(p99 <= 5.0),
            w.eps,
            0.9 * worker_bound,
            worker_bound,
            verdict(w.eps >= 0.9 * worker_bound),
            verdict(rss_mb <= 50.0),
        );
        println!("lost={lost}");
        let gateway_ratio = share(g.rps, g.baseline_rps);
        println!(
            "ingest_rps={ingest_rps:.0} baseline_rps={baseline_rps:.0} ratio={ratio:.3} concurrency={c} baseline_concurrency={baseline_c} relay_us_per_delivery={relay_us:.1} baseline_us_per_publish={lapin_us:.1} p50_ms={p50:.2} p99_ms={p99:.2} bare_rps={bare_rps:.0} bare_concurrency={} bare_ratio={bare_ratio:.3} bare_us_per_delivery={bare_us:.1} bare_p99_ms={bare_p99:.2} baseline_p99_ms={baseline_p99:.2} store_p99_ms={} worker_eps={:.0} worker_bound_eps={worker_bound:.0} worker_fast_eps={:.0} worker_baseline_eps={:.0} worker_ratio={worker_ratio:.3} worker_fetch_baseline_eps={:.0} worker_fetch_ceiling={fetch_ceiling:.3} worker_rounds={} worker_us_per_event={:.1} rss_mb={:.0} gateway_rps={:.0} gateway_baseline_rps={:.0} gateway_ratio={gateway_ratio:.3}",
            self.bare.ramp.concurrency,
            store_p99.map_or_else(|| "none".to_owned(), |ms| format!("{ms:.2}")),
            w.eps,
            of_rounds(|r| r.relay.eps),
            of_rounds(|r| r.baseline.eps),
            of_rounds(|r| r.fetching.eps),
            rounds.len(),
            of_rounds(|r| r.relay.us_per_event),
            rss_mb.ceil(),
            g.rps,
            g.baseline_rps
        );
        if lost > 0 {
            eprintln!("FAILED: {lost} accepted deliveries or requests are missing");
            return ExitCode::FAILURE;
        }
        ExitCode::SUCCESS
    }
}
