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
    /// List what would be moved; move nothing.
    #[arg(long)]
    pub dry_run: bool,
}

pub async fn replay_dead(args: ReplayArgs) -> anyhow::Result<()> {
    let topology = Topology { exchange: String::new(), inbox: args.inbox_queue.clone() };
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
    // Each message stays unacked until its copy is confirmed in the inbox. In a dry run none
    // is acked, and closing the channel puts them all back in order.
    for _ in 0..todo {
        let Some(message) = channel.basic_get(dead.as_str().into(), BasicGetOptions { no_ack: false }).await? else { break };
        let delivery = message.delivery;
        let p = &delivery.properties;
        println!(
            "{} webhook-id={} reason={} status={} attempts={} message={:?}",
            if args.dry_run { "would replay" } else { "replaying" },
            header(p, HEADER_ID).unwrap_or("?"),
            header(p, HEADER_ERROR_REASON).unwrap_or("?"),
            int_header(p, HEADER_ERROR_STATUS).unwrap_or(0),
            int_header(p, HEADER_ATTEMPTS).unwrap_or(0),
            header(p, HEADER_ERROR_MESSAGE).unwrap_or(""),
        );
        if args.dry_run {
            moved += 1;
            continue;
        }
        let confirmation = channel
            .basic_publish("".into(), args.inbox_queue.as_str().into(), BasicPublishOptions { mandatory: true, ..Default::default() }, &delivery.data, fresh(p))
            .await?
            .await?;
        if !confirmation.is_ack() || confirmation.take_message().is_some() {
            bail!("the inbox refused a replayed message; it stays in {dead}");
        }
        delivery.acker.ack(BasicAckOptions::default()).await?;
        moved += 1;
    }
    connection.close(200, "replay done".into()).await?;
    let verb = if args.dry_run { "would move" } else { "moved" };
    println!("{verb} {moved} of {waiting} dead letters from {dead} to {}", args.inbox_queue);
    Ok(())
}

/// The dead letter's properties without the relay's bookkeeping headers, so the replayed
/// delivery starts again at attempt 1.
fn fresh(properties: &BasicProperties) -> BasicProperties {
    let mut headers = FieldTable::default();
    let relay_headers = [HEADER_ATTEMPTS, HEADER_ERROR_STATUS, HEADER_ERROR_REASON, HEADER_ERROR_MESSAGE, HEADER_DEAD_AT];
    if let Some(old) = properties.headers() {
        for (name, value) in old.inner() {
            if !relay_headers.contains(&name.as_str()) && name.as_str() != "x-death" {
                headers.insert(name.clone(), value.clone());
            }
        }
    }
    properties.clone().with_headers(headers)
}
