//! `tail`: print the relay's events as they arrive, one JSON line each, through a
//! temporary queue that disappears when the command ends.

use anyhow::Context;
use clap::Args;
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;

use super::BrokerArgs;

#[derive(Clone, Args)]
pub struct TailArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Output topic exchange.
    #[arg(long, env = "RELAY_EXCHANGE", default_value = "openai.events")]
    pub exchange: String,
    /// Routing-key patterns to follow (repeatable), e.g. `response.*`.
    #[arg(long = "binding", default_value = "#")]
    pub bindings: Vec<String>,
    /// Stop after this many events.
    #[arg(long)]
    pub count: Option<usize>,
    /// Print `type subject id` instead of the whole CloudEvent.
    #[arg(long)]
    pub summary: bool,
}

pub async fn tail(args: TailArgs) -> anyhow::Result<()> {
    let connection = args.broker.connect().await?;
    let channel = connection.create_channel().await?;
    let options = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
    let queue = channel.queue_declare("".into(), options, FieldTable::default()).await?;
    for pattern in &args.bindings {
        channel
            .queue_bind(queue.name().clone(), args.exchange.as_str().into(), pattern.as_str().into(), QueueBindOptions::default(), FieldTable::default())
            .await
            .with_context(|| format!("cannot bind to exchange {:?}; is the relay's RELAY_EXCHANGE right?", args.exchange))?;
    }
    // Auto-ack: this queue is ours alone and temporary; nothing is taken from other consumers.
    let consume = BasicConsumeOptions { no_ack: true, ..Default::default() };
    let mut events = channel.basic_consume(queue.name().clone(), "".into(), consume, FieldTable::default()).await?;
    eprintln!("following {:?} on {}; Ctrl-C to stop", args.bindings, args.exchange);
    let mut seen = 0;
    while args.count.is_none_or(|count| seen < count) {
        let Some(delivery) = events.next().await else { break };
        let delivery = delivery?;
        if args.summary {
            let event: serde_json::Value = serde_json::from_slice(&delivery.data).unwrap_or_default();
            println!("{} {} {}", event["type"].as_str().unwrap_or("?"), event["subject"].as_str().unwrap_or("-"), event["id"].as_str().unwrap_or("?"));
        } else {
            println!("{}", String::from_utf8_lossy(&delivery.data));
        }
        seen += 1;
    }
    connection.close(200, "tail done".into()).await?;
    Ok(())
}
