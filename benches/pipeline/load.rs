//! The load generator: pre-signed deliveries, a minimal keep-alive HTTP/1.1 client, the
//! baseline's raw lapin publisher, and the closed-loop and open-loop drivers shared by both.
//!
//! The HTTP client is deliberately tiny (one pre-serialized request written per call, the
//! response head parsed by hand): the generator shares the cores with the relay and the
//! broker, so every microsecond it spends is taken from what it measures.

use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation};
use openai_webhook_relay::inbox::{PERSISTENT, unix_now};

use crate::deliveries::{event, webhook_id};
use openai_webhook_relay::verify::{HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP, Secret};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::procs::{CpuProbe, Usage};

/// One signed delivery, kept as the exact HTTP request bytes; the AMQP baseline publishes the
/// same body with the same headers, sliced out of them.
pub struct Delivery {
    http: Vec<u8>,
    id: Range<usize>,
    timestamp: Range<usize>,
    signature: Range<usize>,
    body: Range<usize>,
}

impl Delivery {
    fn text(&self, range: &Range<usize>) -> &str {
        std::str::from_utf8(&self.http[range.clone()]).expect("ASCII header")
    }
    pub fn id(&self) -> &str {
        self.text(&self.id)
    }
    pub fn timestamp(&self) -> &str {
        self.text(&self.timestamp)
    }
    pub fn signature(&self) -> &str {
        self.text(&self.signature)
    }
    pub fn body(&self) -> &[u8] {
        &self.http[self.body.clone()]
    }
    pub fn http(&self) -> &[u8] {
        &self.http
    }

    /// The properties the relay's inbox gives a stored delivery (see `inbox::Inbox::store`).
    pub fn amqp_properties(&self) -> BasicProperties {
        amqp_properties(self.id(), self.timestamp(), self.signature())
    }
}

pub fn amqp_properties(id: &str, timestamp: &str, signature: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (name, value) in [(HEADER_ID, id), (HEADER_TIMESTAMP, timestamp), (HEADER_SIGNATURE, signature)] {
        headers.insert(name.into(), AMQPValue::LongString(value.into()));
    }
    BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_content_type("application/json".into())
        .with_message_id(id.into())
        .with_timestamp(unix_now() as u64)
        .with_headers(headers)
}

/// Deliveries signed before a timed phase starts; handed out in order, each once (a phase
/// that outruns its pool wraps around, which re-sends an id and is reported).
pub struct Pool {
    items: Vec<Delivery>,
    next: AtomicUsize,
}

impl Pool {
    pub fn build(secret: &Secret, host: SocketAddr, count: usize) -> Self {
        let timestamp = unix_now().to_string();
        let items = (0..count)
            .map(|_| {
                let id = webhook_id();
                let body = event("response.completed", &format!("resp_{:024x}", fastrand::u128(..) >> 32));
                let signature = secret.sign(&id, &timestamp, body.as_bytes());
                let mut http = Vec::with_capacity(body.len() + 330);
                let push = |http: &mut Vec<u8>, text: &str| {
                    let start = http.len();
                    http.extend_from_slice(text.as_bytes());
                    start..http.len()
                };
                push(&mut http, &format!("POST /webhooks/openai HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nwebhook-id: ", body.len()));
                let id_range = push(&mut http, &id);
                push(&mut http, "\r\nwebhook-timestamp: ");
                let timestamp_range = push(&mut http, &timestamp);
                push(&mut http, "\r\nwebhook-signature: ");
                let signature_range = push(&mut http, &signature);
                push(&mut http, "\r\n\r\n");
                let body_range = push(&mut http, &body);
                Delivery { http, id: id_range, timestamp: timestamp_range, signature: signature_range, body: body_range }
            })
            .collect();
        Self { items, next: AtomicUsize::new(0) }
    }

    pub fn take(&self) -> &Delivery {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        &self.items[n % self.items.len()]
    }

    pub fn taken(&self) -> usize {
        self.next.load(Ordering::Relaxed)
    }

    /// Deliveries handed out more than once (0 unless the pool was too small).
    pub fn reused(&self) -> usize {
        self.taken().saturating_sub(self.items.len())
    }

    pub fn body_len(&self) -> usize {
        self.items.first().map_or(0, |d| d.body().len())
    }
}

/// Where the generator sends: the relay over HTTP, or RabbitMQ directly (the baseline).
#[derive(Clone)]
pub enum Sink {
    Http(SocketAddr),
    Amqp { channel: Channel, queue: Arc<str> },
}

/// How one request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx, or a confirmed and routed publish.
    Accepted,
    /// Any other HTTP status, a nack or a returned message.
    Rejected,
    /// Connection or channel error: unknown whether it was stored.
    Failed,
}

pub enum Session {
    Http(Conn),
    Amqp { channel: Channel, queue: Arc<str> },
}

impl Sink {
    pub fn session(&self) -> Session {
        match self {
            Self::Http(addr) => Session::Http(Conn::new(*addr)),
            Self::Amqp { channel, queue } => Session::Amqp { channel: channel.clone(), queue: queue.clone() },
        }
    }
}

impl Session {
    /// Opens the connection ahead of the timed window.
    pub async fn prepare(&mut self) -> io::Result<()> {
        match self {
            Self::Http(conn) => conn.connect().await,
            Self::Amqp { .. } => Ok(()),
        }
    }

    pub async fn send(&mut self, delivery: &Delivery) -> Outcome {
        match self {
            Self::Http(conn) => match conn.request(delivery.http()).await {
                Ok(status) if (200..300).contains(&status) => Outcome::Accepted,
                Ok(_) => Outcome::Rejected,
                Err(_) => Outcome::Failed,
            },
            Self::Amqp { channel, queue } => publish_confirmed(channel, queue, delivery.body(), delivery.amqp_properties()).await,
        }
    }
}

/// One persistent, mandatory publish to `queue` through the default exchange, awaiting its
/// own confirm: the broker work of the baseline and of the bare receiver.
pub async fn publish_confirmed(channel: &Channel, queue: &str, body: &[u8], properties: BasicProperties) -> Outcome {
    let options = BasicPublishOptions { mandatory: true, ..Default::default() };
    match channel.basic_publish("".into(), queue.into(), options, body, properties).await {
        Ok(confirm) => match confirm.await {
            Ok(Confirmation::Ack(None)) => Outcome::Accepted,
            Ok(_) => Outcome::Rejected,
            Err(_) => Outcome::Failed,
        },
        Err(_) => Outcome::Failed,
    }
}

/// One keep-alive HTTP/1.1 connection, one request at a time.
pub struct Conn {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

impl Conn {
    pub fn new(addr: SocketAddr) -> Self {
        Self { addr, stream: None, buf: Vec::with_capacity(4096) }
    }

    async fn connect(&mut self) -> io::Result<()> {
        if self.stream.is_none() {
            let stream = TcpStream::connect(self.addr).await?;
            stream.set_nodelay(true)?;
            self.stream = Some(stream);
        }
        Ok(())
    }

    /// Sends `request` and returns the response status. A failed exchange drops the
    /// connection (it is never retried: the request may have been stored).
    pub async fn request(&mut self, request: &[u8]) -> io::Result<u16> {
        self.connect().await?;
        let result = self.exchange(request).await;
        match result {
            Ok((_, true)) | Err(_) => self.stream = None,
            Ok((_, false)) => {}
        }
        result.map(|(status, _)| status)
    }

    async fn exchange(&mut self, request: &[u8]) -> io::Result<(u16, bool)> {
        let stream = self.stream.as_mut().expect("connected");
        stream.write_all(request).await?;
        self.buf.clear();
        loop {
            if let Some(head) = parse_head(&self.buf)?
                && self.buf.len() >= head.total {
                    return Ok((head.status, head.close));
                }
            if stream.read_buf(&mut self.buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}

struct Head {
    status: u16,
    /// Head plus body length.
    total: usize,
    close: bool,
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// Parses a response head once it is complete; the relay always sends `content-length`.
fn parse_head(buf: &[u8]) -> io::Result<Option<Head>> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else { return Ok(None) };
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| bad("response head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line.get(9..12).and_then(|s| s.parse().ok()).ok_or_else(|| bad("bad status line"))?;
    let mut length = None;
    let mut close = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse::<usize>().map_err(|_| bad("bad content-length"))?);
        } else if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close") {
            close = true;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(bad("chunked responses are not expected from the relay"));
        }
    }
    Ok(Some(Head { status, total: end + 4 + length.unwrap_or(0), close }))
}

/// What a timed phase produced.
#[derive(Debug, Default)]
pub struct PhaseResult {
    /// Accepted within the measured window, per second.
    pub rate: f64,
    /// Latencies (µs) of the requests accepted within the window.
    pub latencies_us: Vec<u32>,
    /// Over the whole phase, warm-up and stragglers included.
    pub accepted: u64,
    pub rejected: u64,
    pub failed: u64,
    /// The `webhook-id` of every accepted delivery (warm-up and stragglers included), each of
    /// which must be found in the queue afterwards.
    pub accepted_ids: Vec<String>,
    /// Open loop: how late the generator sent, at the 99th percentile (µs).
    pub send_lag_p99_us: u32,
    /// Open loop: the longest such delay (µs), i.e. the longest stall of the whole pipeline.
    pub send_lag_max_us: u32,
    /// Cores used during the window, per probed process.
    pub cpu: Vec<Usage>,
}

impl PhaseResult {
    pub fn percentile_ms(&self, p: f64) -> f64 {
        percentile(&self.latencies_us, p) as f64 / 1000.0
    }
}

/// Nearest-rank percentile of already sorted values.
pub fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[derive(Default)]
struct Tally {
    accepted: AtomicU64,
    rejected: AtomicU64,
    failed: AtomicU64,
    in_window: AtomicU64,
}

impl Tally {
    fn count(&self, outcome: Outcome) {
        let counter = match outcome {
            Outcome::Accepted => &self.accepted,
            Outcome::Rejected => &self.rejected,
            Outcome::Failed => &self.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

async fn open_sessions(sink: &Sink, n: usize) -> io::Result<Vec<Session>> {
    let mut sessions = Vec::with_capacity(n);
    for _ in 0..n {
        let mut session = sink.session();
        session.prepare().await?;
        sessions.push(session);
    }
    Ok(sessions)
}

/// Closed loop: `concurrency` tasks, each sending its next request as soon as the previous
/// one is answered, for `warmup + window`; the rate counts answers within the window.
pub async fn closed_loop(
    sink: &Sink,
    pool: Arc<Pool>,
    concurrency: usize,
    warmup: Duration,
    window: Duration,
    probe: &CpuProbe,
) -> io::Result<PhaseResult> {
    let sessions = open_sessions(sink, concurrency).await?;
    let tally = Arc::new(Tally::default());
    let start = Instant::now();
    let (from, until) = (start + warmup, start + warmup + window);
    let tasks: Vec<_> = sessions
        .into_iter()
        .map(|mut session| {
            let (pool, tally) = (pool.clone(), tally.clone());
            tokio::spawn(async move {
                let (mut latencies, mut ids) = (Vec::with_capacity(1 << 16), Vec::with_capacity(1 << 16));
                loop {
                    let sent = Instant::now();
                    if sent >= until {
                        break;
                    }
                    let delivery = pool.take();
                    let outcome = session.send(delivery).await;
                    let done = Instant::now();
                    tally.count(outcome);
                    if outcome == Outcome::Accepted {
                        ids.push(delivery.id().to_owned());
                        if done >= from && done < until {
                            tally.in_window.fetch_add(1, Ordering::Relaxed);
                            latencies.push(micros(done - sent));
                        }
                    }
                }
                (latencies, ids)
            })
        })
        .collect();
    let cpu = probe.measure_between(from, until).await;
    let (mut latencies_us, mut accepted_ids) = (Vec::new(), Vec::new());
    for task in tasks {
        let (l, i) = task.await.expect("load task");
        latencies_us.extend(l);
        accepted_ids.extend(i);
    }
    latencies_us.sort_unstable();
    Ok(PhaseResult {
        rate: tally.in_window.load(Ordering::Relaxed) as f64 / window.as_secs_f64(),
        latencies_us,
        accepted: tally.accepted.load(Ordering::Relaxed),
        rejected: tally.rejected.load(Ordering::Relaxed),
        failed: tally.failed.load(Ordering::Relaxed),
        accepted_ids,
        send_lag_p99_us: 0,
        send_lag_max_us: 0,
        cpu,
    })
}

/// Open loop: requests scheduled at a fixed `rate`, taken by whichever of `connections`
/// is free; each latency runs from the request's scheduled time, so a stall of the system
/// counts for every request it delays (no coordinated omission).
pub async fn open_loop(
    sink: &Sink,
    pool: Arc<Pool>,
    rate: f64,
    connections: usize,
    warmup: Duration,
    window: Duration,
    probe: &CpuProbe,
) -> io::Result<PhaseResult> {
    let sessions = open_sessions(sink, connections).await?;
    let tally = Arc::new(Tally::default());
    let slots = Arc::new(AtomicU64::new(0));
    let total = (rate * (warmup + window).as_secs_f64()).round() as u64;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now() + Duration::from_millis(20);
    let (from, until) = (start + warmup, start + warmup + window);
    let tasks: Vec<_> = sessions
        .into_iter()
        .map(|mut session| {
            let (pool, tally, slots) = (pool.clone(), tally.clone(), slots.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(1 << 14);
                let mut lags = Vec::with_capacity(1 << 14);
                let mut ids = Vec::with_capacity(1 << 14);
                loop {
                    let slot = slots.fetch_add(1, Ordering::Relaxed);
                    if slot >= total {
                        break;
                    }
                    let scheduled = start + interval.mul_f64(slot as f64);
                    tokio::time::sleep_until(scheduled.into()).await;
                    let sent = Instant::now();
                    let delivery = pool.take();
                    let outcome = session.send(delivery).await;
                    let done = Instant::now();
                    tally.count(outcome);
                    if outcome == Outcome::Accepted {
                        ids.push(delivery.id().to_owned());
                    }
                    if scheduled >= from && scheduled < until {
                        lags.push(micros(sent - scheduled));
                        if outcome == Outcome::Accepted {
                            tally.in_window.fetch_add(1, Ordering::Relaxed);
                            latencies.push(micros(done - scheduled));
                        }
                    }
                }
                (latencies, lags, ids)
            })
        })
        .collect();
    let cpu = probe.measure_between(from, until).await;
    let (mut latencies_us, mut lags, mut accepted_ids) = (Vec::new(), Vec::new(), Vec::new());
    for task in tasks {
        let (l, g, i) = task.await.expect("load task");
        latencies_us.extend(l);
        lags.extend(g);
        accepted_ids.extend(i);
    }
    latencies_us.sort_unstable();
    lags.sort_unstable();
    Ok(PhaseResult {
        rate: tally.in_window.load(Ordering::Relaxed) as f64 / window.as_secs_f64(),
        latencies_us,
        accepted: tally.accepted.load(Ordering::Relaxed),
        rejected: tally.rejected.load(Ordering::Relaxed),
        failed: tally.failed.load(Ordering::Relaxed),
        accepted_ids,
        send_lag_p99_us: percentile(&lags, 99.0),
        send_lag_max_us: lags.last().copied().unwrap_or(0),
        cpu,
    })
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}
