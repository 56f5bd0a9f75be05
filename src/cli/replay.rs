//! `replay-dead`: move dead letters back into the inbox once their cause is fixed (a
//! rotated API key, a raised size limit), so the worker tries them again from attempt 1.

use anyhow::{Context, bail};
use clap::Args;
use lapin::BasicProperties;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;

use super::BrokerArgs;
use crate::inbox::{HEADER_ATTEMPTS, header, int_header};
use crate::topology::Topology;
use crate::verify::HEADER_ID;
use crate::worker::retry::{HEADER_DEAD_AT, HEADER_ERROR_MESSAGE, HEADER_ERROR_REASON, HEADER_ERROR_STATUS};

#[derive(Clone, Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Inbox queue; dead letters are read from `<inbox>.dead`.
    #[arg(long, env = "RELAY_INBOX_QUEUE", default_value = "openai.webhooks.inbox")]
    pub inbox_queue: String,
    /// Move at most this many.
    #[arg(long)]
    pub limit: Option<u32>,
    /// List what would be moved; move nothing (each listed dead letter goes back to the end
    /// of the queue as it was, so listing neither counts as a delivery nor reorders).
    #[arg(long)]
    pub dry_run: bool,
}

pub async fn replay_dead(args: ReplayArgs) -> anyhow::Result<()> {
    let topology = Topology { exchange: String::new(), inbox: args.inbox_queue.clone(), requests: None };
    let dead = topology.dead();
    let connection = args.broker.connect().await?;
    let channel = connection.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    let waiting = channel
        .queue_declare(dead.as_str().into(), passive, FieldTable::default())
        .await
        .with_context(|| format!("no queue {dead}; is RELAY_INBOX_QUEUE right?"))?
        .message_count();
    let todo = args.limit.map_or(waiting, |limit| limit.min(waiting));
    let mut moved = 0;
    // Each message stays unacked until its copy is confirmed in the inbox (or, in a dry
    // run, at the back of the dead-letter queue). A dry run must not hand the messages back
    // unacked: every return counts towards a quorum queue's delivery limit. Copying each to
    // the back keeps their order when nothing else dead-letters meanwhile (a dead letter
    // that arrives during a dry run ends up before the listed ones). So a dry run goes once
    // round the whole queue, listing the first `todo`.
    let rounds = if args.dry_run { waiting } else { todo };
    for round in 0..rounds {
        let Some(message) = channel.basic_get(dead.as_str().into(), BasicGetOptions { no_ack: false }).await? else { break };
        let delivery = message.delivery;
        let p = &delivery.properties;
        let listed = round < todo;
        if listed {
            println!(
                "{} webhook-id={} reason={} status={} attempts={} message={:?}",
                if args.dry_run { "would replay" } else { "replaying" },
                header(p, HEADER_ID).unwrap_or("?"),
                header(p, HEADER_ERROR_REASON).or_else(|| header(p, HEADER_FIRST_DEATH_REASON)).unwrap_or("?"),
                int_header(p, HEADER_ERROR_STATUS).unwrap_or(0),
                int_header(p, HEADER_ATTEMPTS).unwrap_or(0),
                header(p, HEADER_ERROR_MESSAGE).unwrap_or(""),
            );
        }
        let (to, properties) = if args.dry_run { (&dead, without(p, &[HEADER_DELIVERY_COUNT])) } else { (&args.inbox_queue, fresh(p)) };
        let confirmation = channel
            .basic_publish("".into(), to.as_str().into(), BasicPublishOptions { mandatory: true, ..Default::default() }, &delivery.data, properties)
            .await?
            .await?;
        if !confirmation.is_ack() || confirmation.take_message().is_some() {
            bail!("{to} refused a copy of a dead letter; the dead letter stays in {dead}");
        }
        delivery.acker.ack(BasicAckOptions::default()).await?;
        moved += u32::from(listed);
    }
    connection.close(200, "replay done".into()).await?;
    let verb = if args.dry_run { "would move" } else { "moved" };
    println!("{verb} {moved} of {waiting} dead letters from {dead} to {}", args.inbox_queue);
    Ok(())
}

/// Set by RabbitMQ on a quorum queue message handed out before.
const HEADER_DELIVERY_COUNT: &str = "x-delivery-count";
/// Set by RabbitMQ when it dead-letters a message (here: over the inbox's delivery limit).
const HEADER_DEATHS: &str = "x-death";
const HEADER_FIRST_DEATH_REASON: &str = "x-first-death-reason";

/// The dead letter's properties without the relay's and the broker's bookkeeping headers,
/// so the replayed delivery starts again at attempt 1.
fn fresh(properties: &BasicProperties) -> BasicProperties {
    without(properties, &[
        HEADER_ATTEMPTS,
        HEADER_ERROR_STATUS,
        HEADER_ERROR_REASON,
        HEADER_ERROR_MESSAGE,
        HEADER_DEAD_AT,
        HEADER_DEATHS,
        HEADER_FIRST_DEATH_REASON,
        "x-first-death-queue",
        "x-first-death-exchange",
        HEADER_DELIVERY_COUNT,
    ])
}

fn without(properties: &BasicProperties, names: &[&str]) -> BasicProperties {
    let mut headers = FieldTable::default();
    if let Some(old) = properties.headers() {
        for (name, value) in old.inner() {
            if !names.contains(&name.as_str()) {
                headers.insert(name.clone(), value.clone());
            }
        }
    }
    properties.clone().with_headers(headers)
}
