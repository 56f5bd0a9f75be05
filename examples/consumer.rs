//! A downstream consumer to copy: binds `response.*` on the relay's exchange, handles each
//! CloudEvent once (delivery is at-least-once, so it deduplicates by the CloudEvent `id`),
//! and acks only after its work is done.
//!
//! ```sh
//! cargo run --example consumer            # runs until Ctrl-C
//! cargo run --example consumer -- 10      # stops after 10 events
//! ```
//! Environment: `AMQP_URL`, `RELAY_EXCHANGE` (default `openai.events`), `CONSUMER_QUEUE`
//! (default `example.responses`).

use std::collections::HashSet;

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let env = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_owned());
    let url = env("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
    let exchange = env("RELAY_EXCHANGE", "openai.events");
    let queue = env("CONSUMER_QUEUE", "example.responses");
    let limit: Option<usize> = std::env::args().nth(1).map(|n| n.parse()).transpose()?;

    let connection = Connection::connect(&url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    // A durable queue of your own keeps events while your consumer is down.
    channel.queue_declare(queue.as_str().into(), QueueDeclareOptions { durable: true, ..Default::default() }, FieldTable::default()).await?;
    channel
        .queue_bind(queue.as_str().into(), exchange.as_str().into(), "response.*".into(), QueueBindOptions::default(), FieldTable::default())
        .await?;
    channel.basic_qos(16, BasicQosOptions::default()).await?;
    let mut deliveries = channel.basic_consume(queue.as_str().into(), "example-consumer".into(), BasicConsumeOptions::default(), FieldTable::default()).await?;
    println!("waiting for response.* events on {exchange} via queue {queue}");

    // In production, keep seen ids where your results live (a unique key in your database).
    let mut seen = HashSet::new();
    let mut handled = 0;
    while let Some(delivery) = deliveries.next().await {
        let delivery = delivery?;
        let event: serde_json::Value = serde_json::from_slice(&delivery.data)?;
        let id = event["id"].as_str().unwrap_or_default().to_owned();
        if seen.insert(id.clone()) {
            let text = event["data"]["output_text"].as_str().unwrap_or("(no text)");
            let status = event["data"]["response"]["status"].as_str().unwrap_or("(not fetched)");
            println!("{} {} {} status={status} output_text={text:.60}", event["type"], event["subject"], id);
        }
        delivery.ack(BasicAckOptions::default()).await?;
        handled += 1;
        if limit.is_some_and(|limit| handled >= limit) {
            break;
        }
    }
    connection.close(200, "done".into()).await?;
    Ok(())
}
