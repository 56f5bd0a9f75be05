//! Releasing parked messages when they are due: the worker moves each one from its delay
//! queue back to the queue it was parked from, a copy confirmed before the original is acked.
//!
//! The broker could do this itself (a per-message TTL that dead-letters into the target), and
//! earlier versions let it. On a cluster that is not safe: when the node holding a delay
//! queue's leader is killed, expired messages can stay in the queue's at-least-once
//! dead-letter state for good (RabbitMQ 3.10.8 in `tests/cluster`: 812 retries held with
//! `messages_ready=0` for more than 5 minutes; rabbitmq-server#12625). And a quorum queue's
//! head sometimes outlives its TTL even on one node (rabbitmq-server#10718). So parked
//! messages carry no TTL, only `x-relay-due-at`, and nothing leaves a delay queue but through
//! the worker's ack.
//!
//! Tiers up to [`HOLD_LIMIT`] are consumed: the worker holds each message until it is due,
//! up to [`PREFETCH`] per queue, so a message is released on time, not behind a longer one.
//! Longer tiers would be held past the broker's `consumer_timeout` (30 min by default), so
//! their heads are looked at every [`POLL`] instead (`basic.get`, handed back when not due).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::retry::{HEADER_DUE_AT, unix_millis, with_headers};
use crate::broker::{Broker, Link, Outgoing, PublishError};
use crate::inbox::int_header;
use crate::metrics::Metrics;
use crate::topology::DelayQueue;

/// The longest tier whose messages are held by a consumer until due.
pub const HOLD_LIMIT: Duration = Duration::from_secs(600);
/// Messages held at once per delay queue and worker process.
const PREFETCH: u16 = 256;
/// How often the heads of the longer tiers are looked at.
const POLL: Duration = Duration::from_secs(10);
/// The first pause between two attempts to move a message.
const PAUSE: Duration = Duration::from_millis(500);
const PAUSE_MAX: Duration = Duration::from_secs(30);

/// Releases due messages from every queue of `queues` until `shutdown`; messages held then
/// go back to their queue when the connection closes.
pub async fn run(broker: &Broker, metrics: &Arc<Metrics>, queues: Vec<DelayQueue>, shutdown: &CancellationToken, tasks: &TaskTracker) {
    let (held, polled): (Vec<_>, Vec<_>) = queues.into_iter().partition(|queue| queue.tier <= HOLD_LIMIT);
    let held = held.into_iter().map(|queue| hold(broker, metrics, queue, shutdown, tasks));
    tokio::join!(futures::future::join_all(held), poll(broker, metrics, &polled, shutdown));
}

/// When `delivery` is due, from now: by its `x-relay-due-at`, and never later than its tier
/// (another replica's clock may run ahead). A message without the header is due now.
fn due_in(delivery: &Delivery, tier: Duration) -> Duration {
    let Some(due) = int_header(&delivery.properties, HEADER_DUE_AT) else { return Duration::ZERO };
    Duration::from_millis(u64::try_from(due.saturating_sub(unix_millis())).unwrap_or(0)).min(tier)
}

/// Copies `delivery` to `target` and waits for the broker's confirm. Rebuilt without any
/// expiration an older version set.
async fn copy(broker: &Broker, metrics: &Metrics, delivery: &Delivery, target: &str) -> Result<(), PublishError> {
    let properties = with_headers(&delivery.properties, []);
    let message = Outgoing { exchange: "", routing_key: target, body: &delivery.data, properties };
    broker.publish(message, &metrics.publish_confirm_seconds).await
}

/// Consumes `queue.source` on every link until `shutdown`.
async fn hold(broker: &Broker, metrics: &Arc<Metrics>, queue: DelayQueue, shutdown: &CancellationToken, tasks: &TaskTracker) {
    let queue = &queue;
    let consume = move |link: Link| async move { consume(broker, metrics, &link, queue, shutdown, tasks).await };
    broker.consume_on_every_link(&queue.source, shutdown, consume).await;
}

async fn consume(broker: &Broker, metrics: &Arc<Metrics>, link: &Link, queue: &DelayQueue, shutdown: &CancellationToken, tasks: &TaskTracker) -> lapin::Result<()> {
    let channel = link.connection.create_channel().await?;
    channel.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(queue.source.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await?;
    loop {
        let delivery = tokio::select! {
            delivery = consumer.next() => delivery,
            () = shutdown.cancelled() => return Ok(()),
        };
        match delivery {
            Some(Ok(delivery)) => {
                let (broker, metrics, channel, shutdown) = (broker.clone(), metrics.clone(), channel.clone(), shutdown.clone());
                let (wait, target) = (due_in(&delivery, queue.tier), queue.target.clone());
                tasks.spawn(async move {
                    tokio::select! {
                        () = tokio::time::sleep(wait) => release(&broker, &metrics, &channel, delivery, &target, &shutdown).await,
                        () = shutdown.cancelled() => {}
                    }
                });
            }
            Some(Err(error)) => return Err(error),
            None => return Err(lapin::Error::from(lapin::ErrorKind::InvalidConnectionState(lapin::ConnectionState::Closed))),
        }
    }
}

/// Moves a held delivery that came due, trying again while the broker fails, for as long as
/// its channel lives.
async fn release(broker: &Broker, metrics: &Metrics, channel: &Channel, delivery: Delivery, target: &str, shutdown: &CancellationToken) {
    let mut pause = PAUSE;
    // Once its channel is gone, the broker has put the message back: a copy would be a
    // duplicate.
    while channel.status().connected() {
        match copy(broker, metrics, &delivery, target).await {
            Ok(()) => {
                if let Err(error) = delivery.acker.ack(BasicAckOptions::default()).await {
                    tracing::warn!(%error, %target, "released a parked message but could not ack it; it will come again");
                }
                metrics.released.inc();
                return;
            }
            Err(error) => tracing::warn!(%error, %target, retry_in = ?pause, "cannot release a parked message yet"),
        }
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = shutdown.cancelled() => return,
        }
        pause = (pause * 2).min(PAUSE_MAX);
    }
    tracing::debug!(%target, "a held parked message's channel is gone; the broker gives it to the next consumer");
}

/// Every [`POLL`], releases the due heads of `queues`.
async fn poll(broker: &Broker, metrics: &Metrics, queues: &[DelayQueue], shutdown: &CancellationToken) {
    if queues.is_empty() {
        return;
    }
    let mut every = tokio::time::interval(POLL);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let Some(link) = broker.link() else { continue };
        let polled = async {
            let channel = link.connection.create_channel().await?;
            for queue in queues {
                release_due_heads(broker, metrics, &channel, queue).await?;
            }
            channel.close(200, "polled".into()).await
        };
        if let Err(error) = polled.await {
            tracing::debug!(%error, "looking at the long delay queues failed; trying again later");
        }
    }
}

/// Releases heads of `queue` while they are due; the first one that is not goes back.
async fn release_due_heads(broker: &Broker, metrics: &Metrics, channel: &Channel, queue: &DelayQueue) -> lapin::Result<()> {
    while let Some(message) = channel.basic_get(queue.source.as_str().into(), BasicGetOptions { no_ack: false }).await? {
        let delivery = message.delivery;
        let requeue = BasicNackOptions { requeue: true, ..Default::default() };
        if due_in(&delivery, queue.tier) > Duration::ZERO {
            return delivery.acker.nack(requeue).await.map(drop);
        }
        if let Err(error) = copy(broker, metrics, &delivery, &queue.target).await {
            tracing::warn!(%error, target = %queue.target, "cannot release a parked message yet");
            return delivery.acker.nack(requeue).await.map(drop);
        }
        delivery.acker.ack(BasicAckOptions::default()).await?;
        metrics.released.inc();
    }
    Ok(())
}
