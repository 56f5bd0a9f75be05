//! The RabbitMQ objects the relay relies on, their names, and their idempotent declaration.
//!
//! ```text
//! <inbox>                  quorum   verified deliveries, consumed by the worker
//! <inbox>.retry.<delay>    classic  parked retries; TTL-expired messages dead-letter back to <inbox>
//! <inbox>.dead             quorum   deliveries that ran out of attempts or cannot succeed
//! <exchange>               topic    normalized CloudEvents, routing key = OpenAI event type
//! ```
//! `deploy/rabbitmq/definitions.json` declares the same objects for operators who pre-provision.

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

/// Retry delays are parked in one queue per tier. A message waits in the smallest tier at
/// least as long as its delay, with its own per-message TTL. RabbitMQ only expires messages
/// at the head of a queue, so a message can wait behind a longer one of the same tier; the
/// factor of 4 between tiers bounds that wait to 4x the delay asked for.
pub const RETRY_TIERS: [Duration; 9] = [
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
pub const MAX_RETRY_DELAY: Duration = RETRY_TIERS[RETRY_TIERS.len() - 1];

#[derive(Debug, Clone)]
pub struct Topology {
    /// Output topic exchange (`RELAY_EXCHANGE`).
    pub exchange: String,
    /// Inbox queue (`RELAY_INBOX_QUEUE`); the retry and dead-letter queues derive from it.
    pub inbox: String,
}

impl Topology {
    pub fn dead(&self) -> String {
        format!("{}.dead", self.inbox)
    }

    /// The retry queue for `delay`, and the tier's length.
    pub fn retry_queue(&self, delay: Duration) -> String {
        let tier = RETRY_TIERS.iter().find(|tier| **tier >= delay).unwrap_or(&MAX_RETRY_DELAY);
        format!("{}.retry.{}ms", self.inbox, tier.as_millis())
    }

    /// Every queue the relay declares, for operators and test clean-up.
    pub fn queues(&self) -> Vec<String> {
        let mut queues = vec![self.inbox.clone(), self.dead()];
        queues.extend(RETRY_TIERS.iter().map(|tier| self.retry_queue(*tier)));
        queues
    }

    /// Declares everything; safe to repeat on every (re)connect.
    pub async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        let durable = QueueDeclareOptions { durable: true, ..Default::default() };
        let quorum = table([("x-queue-type", AMQPValue::LongString("quorum".into()))]);
        channel
            .exchange_declare(
                self.exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions { durable: true, ..Default::default() },
                FieldTable::default(),
            )
            .await?;
        channel.queue_declare(self.inbox.as_str().into(), durable, quorum.clone()).await?;
        channel.queue_declare(self.dead().into(), durable, quorum).await?;
        for tier in RETRY_TIERS {
            // Back to the inbox through the default exchange when the message's TTL runs out.
            let args = table([
                ("x-dead-letter-exchange", AMQPValue::LongString("".into())),
                ("x-dead-letter-routing-key", AMQPValue::LongString(self.inbox.as_str().into())),
            ]);
            channel.queue_declare(self.retry_queue(tier).into(), durable, args).await?;
        }
        Ok(())
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
        let t = Topology { exchange: "x".into(), inbox: "in".into() };
        assert_eq!(t.retry_queue(Duration::from_millis(1)), "in.retry.100ms");
        assert_eq!(t.retry_queue(Duration::from_millis(400)), "in.retry.400ms");
        assert_eq!(t.retry_queue(Duration::from_millis(401)), "in.retry.1600ms");
        assert_eq!(t.retry_queue(Duration::from_secs(86_400)), "in.retry.6553600ms");
        assert_eq!(t.queues().len(), 11);
    }
}
