//! Declaring the topology over whatever an older version of the relay left behind.
//!
//! Two kinds of leftovers exist:
//! - the classic retry tiers `<inbox>.retry.<tier>ms` of versions before the quorum delay
//!   queues, possibly holding parked retries: each message is moved (confirmed, then acked)
//!   into the delay queue for its own TTL, and the old queue is deleted once empty;
//! - a queue declared under other arguments (the inbox and `<inbox>.dead` before they
//!   declared delivery limits and at-least-once dead-lettering). Redeclaring it fails with
//!   406, and RabbitMQ cannot change a queue's arguments, so it is rebuilt in place:
//!   messages moved to `<queue>.migrating`, the queue deleted and declared anew, messages
//!   moved back. That is only safe while nobody consumes the queue (RabbitMQ cannot check
//!   for unacked messages on a quorum queue delete), so with consumers attached the queue is
//!   used as it is, reported in metrics and logs, and the rebuild is tried again later.
//!
//! Every move is copy-then-ack, so a crash in the middle duplicates a message at worst; a
//! relay that finds a `<queue>.migrating` at start finishes the move.

use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ErrorKind};

use super::{DELAY_TIERS, QueueSpec, Topology};

/// Messages moved per confirm round trip.
const BATCH: usize = 256;
/// Longest wait for one batch to be confirmed.
const BATCH_TIMEOUT: Duration = Duration::from_secs(30);

/// What [`declare`] found.
#[derive(Debug, Default)]
pub struct Declared {
    /// Queues that exist under an older version's arguments and are in use as they are.
    pub outdated: Vec<String>,
    /// Messages moved out of old queues.
    pub moved: u64,
}

/// Declares the exchange and every queue of `topology`, migrating what an older version
/// left; safe to repeat on every (re)connect.
pub async fn declare(connection: &Connection, topology: &Topology) -> lapin::Result<Declared> {
    let mut declared = Declared::default();
    let mut channel = connection.create_channel().await?;
    topology.declare_exchange(&channel).await?;
    // The delay queues first, and the old tiers emptied into them, before the inbox may be
    // rebuilt: a classic tier dead-letters at-most-once, so one of its messages expiring
    // while the inbox is being rebuilt would be dropped, whereas the new delay queues hold
    // theirs until the inbox is back.
    let (delays, others): (Vec<QueueSpec>, Vec<QueueSpec>) = topology.queue_specs().into_iter().partition(|spec| spec.arguments_target() == Some(topology.inbox.as_str()));
    for spec in &delays {
        spec.declare(&channel).await?;
    }
    for tier in DELAY_TIERS {
        let old = format!("{}.retry.{}ms", topology.inbox, tier.as_millis());
        if exists(connection, &old).await?.is_none() {
            continue;
        }
        // A parked retry keeps its own TTL (its `expiration`), so it lands in the new tier for
        // that delay; one without goes to the tier of the queue it sat in.
        declared.moved += drain(connection, &old, |properties| {
            let delay = properties.expiration().as_ref().and_then(|e| e.as_str().parse().ok()).map_or(tier, Duration::from_millis);
            topology.delay_queue(delay)
        })
        .await?;
        if delete_if_idle(connection, &old).await? {
            tracing::info!(queue = %old, "old classic retry queue emptied and deleted");
        }
    }
    for spec in others {
        match spec.declare(&channel).await {
            Ok(()) => {}
            Err(error) if soft_code(&error) == Some(AMQPSoftError::PRECONDITIONFAILED) => {
                // The 406 closed the channel.
                channel = connection.create_channel().await?;
                if !rebuild(connection, &spec).await? {
                    declared.outdated.push(spec.name.clone());
                    continue;
                }
            }
            Err(error) => return Err(error),
        }
        // A rebuild interrupted by a crash left its messages here.
        let staging = staging_name(&spec.name);
        if exists(connection, &staging).await?.is_some() {
            declared.moved += drain(connection, &staging, |_| spec.name.clone()).await?;
            delete_if_idle(connection, &staging).await?;
        }
    }
    let _ = channel.close(200, "topology declared".into()).await;
    Ok(declared)
}

fn staging_name(queue: &str) -> String {
    format!("{queue}.migrating")
}

/// Rebuilds `spec`'s queue under its new arguments when nobody consumes it; `false` when it
/// has to stay as it is for now.
async fn rebuild(connection: &Connection, spec: &QueueSpec) -> lapin::Result<bool> {
    let Some((_, consumers)) = exists(connection, &spec.name).await? else { return Ok(true) };
    if consumers > 0 {
        tracing::warn!(queue = %spec.name, consumers, "queue was declared by an older version with other arguments and has consumers; using it as it is until no other process consumes it");
        return Ok(false);
    }
    let staging = staging_name(&spec.name);
    let channel = connection.create_channel().await?;
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    let quorum = super::table([("x-queue-type", lapin::types::AMQPValue::LongString("quorum".into()))]);
    channel.queue_declare(staging.as_str().into(), durable, quorum).await?;
    let moved = drain(connection, &spec.name, |_| staging.clone()).await?;
    if !delete_if_idle(connection, &spec.name).await? {
        // Someone started consuming or publishing meanwhile: their messages stay there, ours
        // go back at the next connect.
        return Ok(false);
    }
    spec.declare(&channel).await?;
    // Its messages go back from the staging queue right after (counted there).
    tracing::warn!(queue = %spec.name, moved, "queue rebuilt with the current arguments");
    Ok(true)
}

/// `Some((messages ready, consumers))` if `queue` exists. A passive declare of a missing
/// queue closes its channel, hence a channel of its own.
async fn exists(connection: &Connection, queue: &str) -> lapin::Result<Option<(u32, u32)>> {
    let channel = connection.create_channel().await?;
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    match channel.queue_declare(queue.into(), passive, FieldTable::default()).await {
        Ok(found) => {
            let _ = channel.close(200, "checked".into()).await;
            Ok(Some((found.message_count(), found.consumer_count())))
        }
        Err(error) if soft_code(&error) == Some(AMQPSoftError::NOTFOUND) => Ok(None),
        Err(error) => Err(error),
    }
}

/// Deletes `queue` if it holds no ready message and has no consumer, as a passive declare
/// shows them just before (quorum queues support neither `if-empty` nor `if-unused`, and
/// ask for them closes the connection); `true` if it is gone.
async fn delete_if_idle(connection: &Connection, queue: &str) -> lapin::Result<bool> {
    match exists(connection, queue).await? {
        None => Ok(true),
        Some((0, 0)) => {
            let channel = connection.create_channel().await?;
            channel.queue_delete(queue.into(), QueueDeleteOptions::default()).await?;
            let _ = channel.close(200, "deleted".into()).await;
            Ok(true)
        }
        Some(_) => Ok(false),
    }
}

/// Moves every message of `from` to the queue `to` names for it, copy first (confirmed),
/// then ack, a batch at a time. Returns how many moved.
pub async fn drain(connection: &Connection, from: &str, to: impl Fn(&BasicProperties) -> String) -> lapin::Result<u64> {
    let channel = connection.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut moved = 0;
    loop {
        let batch = take(&channel, from).await?;
        if batch.is_empty() {
            break;
        }
        let copied = tokio::time::timeout(BATCH_TIMEOUT, copy(&channel, &batch, &to)).await;
        if !matches!(copied, Ok(Ok(true))) {
            // The originals return to `from` when the channel closes.
            let _ = channel.close(200, "move failed".into()).await;
            return match copied {
                Ok(Err(error)) => Err(error),
                _ => Err(lapin::Error::from(ErrorKind::InvalidChannelState(lapin::ChannelState::Error, "a moved message was not confirmed in time or was refused"))),
            };
        }
        let last = batch.last().expect("non-empty batch");
        last.acker.ack(BasicAckOptions { multiple: true }).await?;
        moved += batch.len() as u64;
    }
    let _ = channel.close(200, "moved".into()).await;
    if moved > 0 {
        tracing::info!(from, moved, "moved messages left by an older version");
    }
    Ok(moved)
}

async fn take(channel: &Channel, from: &str) -> lapin::Result<Vec<Delivery>> {
    let mut batch = Vec::new();
    while batch.len() < BATCH {
        match channel.basic_get(from.into(), BasicGetOptions { no_ack: false }).await? {
            Some(message) => batch.push(message.delivery),
            None => break,
        }
    }
    Ok(batch)
}

/// Publishes a copy of each message; `true` when every copy was confirmed and routed.
async fn copy(channel: &Channel, batch: &[Delivery], to: &impl Fn(&BasicProperties) -> String) -> lapin::Result<bool> {
    let mut confirms = Vec::with_capacity(batch.len());
    for delivery in batch {
        let queue = to(&delivery.properties);
        let options = BasicPublishOptions { mandatory: true, ..Default::default() };
        confirms.push(channel.basic_publish("".into(), queue.as_str().into(), options, &delivery.data, delivery.properties.clone()).await?);
    }
    for confirm in confirms {
        if !matches!(confirm.await?, Confirmation::Ack(None)) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The AMQP soft error (a channel-level refusal such as 404 or 406) behind `error`.
pub fn soft_code(error: &lapin::Error) -> Option<AMQPSoftError> {
    match error.kind() {
        ErrorKind::ProtocolError(e) => match e.kind() {
            AMQPErrorKind::Soft(code) => Some(code.clone()),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

/// Whether no process but this one consumes any of the `outdated` queues, so that a
/// reconnect can rebuild them. `consumes_inbox`: one consumer of `inbox` is this process's.
pub async fn unused_by_others(connection: &Connection, outdated: &[String], inbox: &str, consumes_inbox: bool) -> bool {
    for queue in outdated {
        let own = u32::from(consumes_inbox && queue == inbox);
        match exists(connection, queue).await {
            Ok(Some((_, consumers))) if consumers <= own => {}
            Ok(None) => {}
            _ => return false,
        }
    }
    true
}
