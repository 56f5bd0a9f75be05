//! Prometheus metrics for every stage, served at `GET /metrics`.
//!
//! Each `App` owns its own registry (no process-global recorder), so tests that run several
//! relays in one process read their own figures.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label set: a few (name, value) pairs, values from small closed sets (outcomes, reasons,
/// HTTP status codes), never ids.
pub type Labels = Vec<(&'static str, String)>;

pub fn label(name: &'static str, value: impl Into<String>) -> Labels {
    vec![(name, value.into())]
}

fn latency() -> Histogram {
    // 0.25 ms .. ~16 s: broker confirms sit at the low end, API fetches at the high end.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 17))
}

pub struct Metrics {
    registry: Registry,
    /// Webhook deliveries by HTTP outcome.
    pub deliveries: Family<Labels, Counter>,
    /// Verification failures by reason.
    pub verify_failures: Family<Labels, Counter>,
    /// Time from publishing a delivery to the inbox until the broker confirmed it.
    pub inbox_store_seconds: Histogram,
    /// 1 while a broker connection with declared topology is up.
    pub broker_connected: Gauge,
    /// 1 while the broker blocks the relay's publishing (`connection.blocked`: a memory or
    /// disk alarm somewhere in the cluster).
    pub broker_blocked: Gauge,
    /// Broker connections established (the first one included).
    pub broker_connects: Counter,
    /// 1 for the broker node (`host:port`) the relay is connected to, 0 for the ones it was.
    pub broker_node: Family<Labels, Gauge>,
    /// Webhook requests being handled right now.
    pub requests_in_flight: Gauge,
    /// Inbox messages the worker holds right now.
    pub deliveries_in_flight: Gauge,
    /// Object fetches by kind and HTTP status (`timeout`, `connect`, ... when there is none).
    pub fetches: Family<Labels, Counter>,
    /// Fetch latency by kind.
    pub fetch_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    /// Events published to the output exchange, by how they were enriched.
    pub events_published: Family<Labels, Counter>,
    /// Time from publishing a CloudEvent until the broker confirmed it.
    pub publish_confirm_seconds: Histogram,
    /// Deliveries sent to a retry queue, by reason.
    pub retries: Family<Labels, Counter>,
    /// Deliveries dead-lettered, by reason.
    pub dead_letters: Family<Labels, Counter>,
    /// CloudEvents the broker returned because no queue was bound for them.
    pub unroutable: Counter,
    /// Inbox messages skipped because the same `webhook-id` was already handled.
    pub duplicates: Counter,
    /// Acks and nacks of inbox messages that did not reach the broker (channel gone), by
    /// operation: the message is redelivered, a duplicate at worst.
    pub settle_failures: Family<Labels, Counter>,
    /// Deliveries whose handling panicked; each was dead-lettered with the panic message.
    pub panics: Counter,
    /// Deliveries whose handling hung past the worker's time limit; each was retried.
    pub abandoned: Counter,
    /// Queues in use under the arguments of an older version (not yet rebuilt).
    pub queues_outdated: Gauge,
    /// Messages moved out of queues an older version left.
    pub migrated_messages: Counter,
    /// 1 while Redis is configured for dedup but unreachable, so dedup is per process.
    pub dedup_fallback: Gauge,
    /// Parked messages the broker had not released past their due time, moved by the worker.
    pub released: Counter,
    /// Gateway requests by outcome (`created`, `cancelled`, `duplicate`, `refused`, ...).
    pub gateway_requests: Family<Labels, Counter>,
    /// HTTP calls the gateway made to OpenAI, by action and status: with
    /// `gateway_requests{outcome="created"}` it shows duplicate POSTs.
    pub gateway_posts: Family<Labels, Counter>,
    /// Copies of events sent to a request's `reply_to` queue, by outcome (`delivered`, or
    /// `unroutable` when the queue does not exist; not retried).
    pub replies: Family<Labels, Counter>,
    /// Safety-net watches that came due, by outcome (`reconciled`, `webhook_first`,
    /// `rewatched`, `expired`, `gone`).
    pub watches: Family<Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut m = Self {
            registry: Registry::with_prefix("relay"),
            deliveries: Family::default(),
            verify_failures: Family::default(),
            inbox_store_seconds: latency(),
            broker_connected: Gauge::default(),
            broker_blocked: Gauge::default(),
            broker_connects: Counter::default(),
            broker_node: Family::default(),
            requests_in_flight: Gauge::default(),
            deliveries_in_flight: Gauge::default(),
            fetches: Family::default(),
            fetch_seconds: Family::new_with_constructor(latency),
            events_published: Family::default(),
            publish_confirm_seconds: latency(),
            retries: Family::default(),
            dead_letters: Family::default(),
            unroutable: Counter::default(),
            duplicates: Counter::default(),
            settle_failures: Family::default(),
            panics: Counter::default(),
            abandoned: Counter::default(),
            queues_outdated: Gauge::default(),
            migrated_messages: Counter::default(),
            dedup_fallback: Gauge::default(),
            released: Counter::default(),
            gateway_requests: Family::default(),
            gateway_posts: Family::default(),
            replies: Family::default(),
            watches: Family::default(),
        };
        let r = &mut m.registry;
        r.register("deliveries", "Webhook deliveries by outcome", m.deliveries.clone());
        r.register("verify_failures", "Verification failures by reason", m.verify_failures.clone());
        r.register("inbox_store_seconds", "Inbox publish-to-confirm latency", m.inbox_store_seconds.clone());
        r.register("broker_connected", "1 while the broker connection is up", m.broker_connected.clone());
        r.register("broker_blocked", "1 while the broker blocks publishing (resource alarm)", m.broker_blocked.clone());
        r.register("broker_connects", "Broker connections established", m.broker_connects.clone());
        r.register("broker_node", "1 for the broker node the relay is connected to", m.broker_node.clone());
        r.register("requests_in_flight", "Webhook requests in flight", m.requests_in_flight.clone());
        r.register("deliveries_in_flight", "Inbox messages held by the worker", m.deliveries_in_flight.clone());
        r.register("fetches", "Object fetches by kind and status", m.fetches.clone());
        r.register("fetch_seconds", "Object fetch latency", m.fetch_seconds.clone());
        r.register("events_published", "CloudEvents published by enrichment", m.events_published.clone());
        r.register("publish_confirm_seconds", "CloudEvent publish-to-confirm latency", m.publish_confirm_seconds.clone());
        r.register("retries", "Deliveries scheduled for retry by reason", m.retries.clone());
        r.register("dead_letters", "Deliveries dead-lettered by reason", m.dead_letters.clone());
        r.register("unroutable", "CloudEvents returned as unroutable", m.unroutable.clone());
        r.register("duplicates", "Duplicate deliveries skipped", m.duplicates.clone());
        r.register("settle_failures", "Inbox acks or nacks that did not reach the broker, by operation", m.settle_failures.clone());
        r.register("worker_panics", "Deliveries whose handling panicked (dead-lettered)", m.panics.clone());
        r.register("worker_abandoned", "Deliveries whose handling hung past the worker's time limit (retried)", m.abandoned.clone());
        r.register("queues_outdated", "Queues in use under an older version's arguments", m.queues_outdated.clone());
        r.register("migrated_messages", "Messages moved out of queues an older version left", m.migrated_messages.clone());
        r.register("released", "Parked messages the worker moved back to their queue when due", m.released.clone());
        r.register("dedup_fallback", "1 while configured Redis dedup is unreachable and dedup is per process", m.dedup_fallback.clone());
        r.register("gateway_requests", "Gateway requests by outcome", m.gateway_requests.clone());
        r.register("gateway_posts", "Gateway calls to the OpenAI API by action and status", m.gateway_posts.clone());
        r.register("replies", "Event copies sent to reply_to queues by outcome", m.replies.clone());
        r.register("watches", "Safety-net watches that came due by outcome", m.watches.clone());
        m
    }
}

/// Counts one unit in flight on a gauge until dropped.
pub struct InFlight(Gauge);

impl InFlight {
    pub fn track(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        encode(&mut out, &self.registry).expect("encoding metrics into a String");
        out
    }
}
