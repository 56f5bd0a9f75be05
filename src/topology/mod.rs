//! The RabbitMQ objects the relay relies on, their names and arguments, and their
//! idempotent declaration.
//!
//! ```text
//! <inbox>                quorum  verified deliveries, consumed by the worker
//! <inbox>.delay.<tier>   quorum  parked retries; the worker moves each back to <inbox> when due
//! <inbox>.dead           quorum  deliveries that ran out of attempts or cannot succeed
//! <exchange>             topic   normalized CloudEvents, routing key = OpenAI event type
//!
//! with the gateway on (`RELAY_REQUEST_QUEUE`, see `gateway`):
//! <requests>                      quorum  requests to OpenAI, consumed by the worker
//! <requests>.delay.<tier>         quorum  parked request retries; released back to <requests>
//! <requests>.dead                 quorum  refused requests and expired watches, with the reason
//! <requests>.watch                quorum  safety-net watches that came due
//! <requests>.watch.delay.<tier>   quorum  parked watches; released into <requests>.watch
//! ```
//!
//! Every queue is a quorum queue: replicated on a cluster, so a parked retry survives a
//! broker restart or a node loss exactly like an inbox message. Parked messages have no TTL:
//! the worker releases them (`worker::release`, which says why), a copy confirmed in the
//! target before the original is acked. The dead-letter arguments remain for what the
//! broker itself dead-letters (a message over the delivery limit), at-least-once, which
//! needs `x-overflow: reject-publish`; that also means a length limit an operator adds by
//! policy refuses new messages (the receiver answers 503) instead of silently dropping the
//! oldest.
//!
//! `deploy/rabbitmq/definitions.json` declares the same objects for operators who
//! pre-provision; a test keeps the two equal. [`migrate`] moves what an older version left
//! under other names or arguments.

pub mod migrate;

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

/// Retry delays are parked in one queue per tier. A message waits in the smallest tier at
/// least as long as its delay, with its due time in a header. The worker holds up to 256
/// messages of a tier at once, each until its own due time; a message behind them waits
/// for a slot, and the factor of 4 between tiers bounds that wait: a retry is due after its
/// delay and at most 4x its delay (the tiers above 10 minutes are looked at every 10 s).
pub const DELAY_TIERS: [Duration; 9] = [
    Duration::from_millis(100),
    Duration::from_millis(400),
    Duration::from_millis(1_600),
    Duration::from_millis(6_400),
    Duration::from_millis(25_600),
    Duration::from_millis(102_400),
    Duration::from_millis(409_600),
    Duration::from_millis(1_638_400),
    Duration::from_millis(6_553_600),
];

/// The longest delay the relay parks a retry for (about 1 h 49 min).
pub const MAX_DELAY: Duration = DELAY_TIERS[DELAY_TIERS.len() - 1];

/// Times the broker may hand out one inbox message before it dead-letters it to
/// `<inbox>.dead` (reason `delivery_limit`). RabbitMQ 4.x otherwise applies 20 and then
/// drops the message. Every return counts (a relay crash, a lost connection, a shutdown
/// with prefetched messages), so the limit is high; a message that crashes the worker
/// process every time still ends in `<inbox>.dead`, never nowhere.
pub const INBOX_DELIVERY_LIMIT: i64 = 100;

/// The same for `<inbox>.dead`, which only operators read (`replay-dead`), and for the delay
/// queues, whose head the worker's sweep looks at and hands back every few seconds: high
/// enough never to be reached (RabbitMQ 4.0–4.2 count every return, and would otherwise
/// release a long delay early after 20 looks).
pub const DEAD_DELIVERY_LIMIT: i64 = 1_000_000;

#[derive(Debug, Clone)]
pub struct Topology {
    /// Output topic exchange (`RELAY_EXCHANGE`).
    pub exchange: String,
    /// Inbox queue (`RELAY_INBOX_QUEUE`); the delay and dead-letter queues derive from it.
    pub inbox: String,
    /// Request queue of the gateway (`RELAY_REQUEST_QUEUE`); `None` when the gateway is off.
    /// Every queue of the gateway starts with `<requests>.`.
    pub requests: Option<String>,
}

/// A queue argument value, as RabbitMQ stores it (and as `definitions.json` writes it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arg {
    Str(String),
    Int(i64),
}

/// A durable queue and the arguments it is declared with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSpec {
    pub name: String,
    pub arguments: Vec<(&'static str, Arg)>,
}

impl QueueSpec {
    /// A durable quorum queue that dead-letters to `target` through the default exchange,
    /// at-least-once.
    fn quorum(name: String, target: &str, delivery_limit: Option<i64>) -> Self {
        let mut arguments = vec![
            ("x-queue-type", Arg::Str("quorum".into())),
            ("x-overflow", Arg::Str("reject-publish".into())),
            ("x-dead-letter-exchange", Arg::Str(String::new())),
            ("x-dead-letter-routing-key", Arg::Str(target.to_owned())),
            ("x-dead-letter-strategy", Arg::Str("at-least-once".into())),
        ];
        if let Some(limit) = delivery_limit {
            arguments.push(("x-delivery-limit", Arg::Int(limit)));
        }
        Self { name, arguments }
    }

    /// The queue this one dead-letters to.
    pub fn arguments_target(&self) -> Option<&str> {
        self.arguments.iter().find_map(|(key, value)| match (*key, value) {
            ("x-dead-letter-routing-key", Arg::Str(target)) => Some(target.as_str()),
            _ => None,
        })
    }

    pub fn field_table(&self) -> FieldTable {
        let mut table = FieldTable::default();
        for (key, value) in &self.arguments {
            let value = match value {
                Arg::Str(s) => AMQPValue::LongString(s.as_str().into()),
                Arg::Int(n) => AMQPValue::LongLongInt(*n),
            };
            table.insert((*key).into(), value);
        }
        table
    }

    /// Declares the queue; a queue of this name with other arguments fails with 406 and
    /// closes `channel`.
    pub async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        let durable = QueueDeclareOptions { durable: true, ..Default::default() };
        channel.queue_declare(self.name.as_str().into(), durable, self.field_table()).await.map(drop)
    }
}

/// A delay queue, the queue it releases into, and its tier.
#[derive(Debug, Clone)]
pub struct DelayQueue {
    pub source: String,
    pub target: String,
    pub tier: Duration,
}

/// The delay queue for `delay` in front of `target`: the smallest tier that holds it.
pub fn delay_queue(target: &str, delay: Duration) -> String {
    let tier = DELAY_TIERS.iter().find(|tier| **tier >= delay).unwrap_or(&MAX_DELAY);
    format!("{target}.delay.{}ms", tier.as_millis())
}

impl Topology {
    pub fn dead(&self) -> String {
        format!("{}.dead", self.inbox)
    }

    /// The delay queue that parks an inbox delivery for `delay`.
    pub fn delay_queue(&self, delay: Duration) -> String {
        delay_queue(&self.inbox, delay)
    }

    /// Every queue the relay declares, with its arguments.
    pub fn queue_specs(&self) -> Vec<QueueSpec> {
        let dead = self.dead();
        let mut specs = vec![
            QueueSpec::quorum(dead.clone(), &dead, Some(DEAD_DELIVERY_LIMIT)),
            QueueSpec::quorum(self.inbox.clone(), &dead, Some(INBOX_DELIVERY_LIMIT)),
        ];
        specs.extend(DELAY_TIERS.iter().map(|tier| QueueSpec::quorum(self.delay_queue(*tier), &self.inbox, Some(DEAD_DELIVERY_LIMIT))));
        specs.extend(self.gateway_specs());
        specs
    }

    /// `<requests>.dead`.
    pub fn requests_dead(&self) -> Option<String> {
        self.requests.as_ref().map(|r| format!("{r}.dead"))
    }

    /// `<requests>.watch`: where the safety net's parked watches arrive when due.
    pub fn watch(&self) -> Option<String> {
        self.requests.as_ref().map(|r| format!("{r}.watch"))
    }

    /// The gateway's queues (none when it is off): the request queue and the watch queue,
    /// each with its delay tiers, and their common dead-letter queue.
    fn gateway_specs(&self) -> Vec<QueueSpec> {
        let (Some(requests), Some(dead), Some(watch)) = (&self.requests, self.requests_dead(), self.watch()) else {
            return Vec::new();
        };
        let mut specs = vec![
            QueueSpec::quorum(dead.clone(), &dead, Some(DEAD_DELIVERY_LIMIT)),
            QueueSpec::quorum(requests.clone(), &dead, Some(INBOX_DELIVERY_LIMIT)),
            QueueSpec::quorum(watch.clone(), &dead, Some(INBOX_DELIVERY_LIMIT)),
        ];
        for target in [requests, &watch] {
            specs.extend(DELAY_TIERS.iter().map(|tier| QueueSpec::quorum(delay_queue(target, *tier), target, Some(DEAD_DELIVERY_LIMIT))));
        }
        specs
    }

    /// Every delay queue, with the queue it releases into.
    pub fn delay_queues(&self) -> Vec<DelayQueue> {
        let targets: Vec<String> = std::iter::once(self.inbox.clone()).chain(self.requests.clone()).chain(self.watch()).collect();
        let queues = targets.iter().flat_map(|target| DELAY_TIERS.iter().map(move |tier| (target, *tier)));
        queues.map(|(target, tier)| DelayQueue { source: delay_queue(target, tier), target: target.clone(), tier }).collect()
    }

    /// Every queue name the relay declares, for operators and test clean-up.
    pub fn queues(&self) -> Vec<String> {
        self.queue_specs().into_iter().map(|spec| spec.name).collect()
    }

    /// Declares the exchange and every queue on `channel`, for a broker where each queue is
    /// new or already has these arguments (a queue under other arguments fails with 406:
    /// the relay itself declares through [`migrate::declare`], which handles that).
    pub async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        self.declare_exchange(channel).await?;
        for spec in self.queue_specs() {
            spec.declare(channel).await?;
        }
        Ok(())
    }

    pub async fn declare_exchange(&self, channel: &Channel) -> lapin::Result<()> {
        channel
            .exchange_declare(
                self.exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions { durable: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
    }
}

pub fn table<const N: usize>(entries: [(&str, AMQPValue); N]) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in entries {
        table.insert(key.into(), value);
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_land_in_the_smallest_tier_that_holds_them() {
        let t = Topology { exchange: "x".into(), inbox: "in".into(), requests: None };
        assert_eq!(t.delay_queue(Duration::from_millis(1)), "in.delay.100ms");
        assert_eq!(t.delay_queue(Duration::from_millis(400)), "in.delay.400ms");
        assert_eq!(t.delay_queue(Duration::from_millis(401)), "in.delay.1600ms");
        assert_eq!(t.delay_queue(Duration::from_secs(86_400)), "in.delay.6553600ms");
        assert_eq!(t.queues().len(), 11);
    }

    #[test]
    fn every_queue_is_quorum_and_dead_letters_at_least_once_with_reject_publish() {
        let t = Topology { exchange: "x".into(), inbox: "in".into(), requests: Some("rq".into()) };
        assert_eq!(t.queues().len(), 11 + 21);
        for spec in t.queue_specs() {
            let arg = |key| spec.arguments.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone());
            assert_eq!(arg("x-queue-type"), Some(Arg::Str("quorum".into())), "{}", spec.name);
            assert_eq!(arg("x-dead-letter-strategy"), Some(Arg::Str("at-least-once".into())), "{}", spec.name);
            assert_eq!(arg("x-overflow"), Some(Arg::Str("reject-publish".into())), "{}", spec.name);
            let expected = match spec.name.split_once(".delay.") {
                Some((target, _)) => target.to_owned(),
                None if spec.name.starts_with("rq") => "rq.dead".to_owned(),
                None => "in.dead".to_owned(),
            };
            assert_eq!(spec.arguments_target(), Some(expected.as_str()), "{}", spec.name);
            assert!(spec.name == "in" || spec.name.starts_with("in.") || spec.name == "rq" || spec.name.starts_with("rq."), "{}", spec.name);
            if !spec.name.contains(".delay.") {
                assert!(matches!(arg("x-delivery-limit"), Some(Arg::Int(n)) if n > 20), "{}: explicit limit above 4.x's 20", spec.name);
            }
        }
    }
}
