//! A downstream consumer to copy: binds `response.*` on the relay's exchange, handles each
//! CloudEvent once (delivery is at-least-once, so it deduplicates by the CloudEvent `id`),
//! and acks only after its work is done.
//!
//! ```sh
//! cargo run --example consumer            # runs until Ctrl-C
//! cargo run --example consumer -- 10      # stops after handling 10 distinct events
//! ```
//! Environment: `AMQP_URL`, `RELAY_EXCHANGE` (default `openai.events`), `CONSUMER_QUEUE`
//! (default `example.responses`). The messages are described in `docs/asyncapi.yaml`.

use std::collections::HashSet;

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions, QueueBindOptions, QueueDeclareOptions};
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
    while let Some(delivery) = deliveries.next().await {
        let delivery = delivery?;
        let Ok(event) = serde_json::from_slice::<serde_json::Value>(&delivery.data) else {
            // Not a CloudEvent: requeueing would only bring it back. Dead-letter or drop it.
            eprintln!("rejected a message that is not JSON");
            delivery.reject(BasicRejectOptions { requeue: false }).await?;
            continue;
        };
        let id = event["id"].as_str().unwrap_or_default().to_owned();
        if seen.insert(id.clone()) {
            // Your work goes here. The event: `type`, `subject` (the response id), `source`
            // (`openai/<project>` for a named project), and in `data` the full `response`
            // with its `output_text`, or `fetch_error` when the response was gone.
            let data = &event["data"];
            let status = data["response"]["status"].as_str().unwrap_or("(not fetched)");
            let text = data["output_text"].as_str().unwrap_or("(no text)");
            println!("{} {} {id} status={status} output_text={text:.60}", str(&event["type"]), str(&event["subject"]));
        } else {
            println!("duplicate {id} skipped");
        }
        delivery.ack(BasicAckOptions::default()).await?;
        if limit.is_some_and(|limit| seen.len() >= limit) {
            break;
        }
    }
    connection.close(200, "done".into()).await?;
    Ok(())
}

fn str(value: &serde_json::Value) -> &str {
    value.as_str().unwrap_or("-")
}
