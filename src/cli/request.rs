//! `request`: publish a request to the gateway's queue from the command line, and with
//! `--wait` follow its replies on a temporary queue until it ends: the quickest way to see
//! the whole loop (request → OpenAI → webhook → reply) work.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use futures::StreamExt;
use lapin::BasicProperties;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Value, json};

use super::BrokerArgs;
use crate::gateway::HEADER_ACTION;
use crate::inbox::{HEADER_PROJECT, PERSISTENT};

#[derive(Clone, Args)]
pub struct RequestArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// The gateway's request queue.
    #[arg(long, env = "RELAY_REQUEST_QUEUE", default_value = "openai.requests")]
    pub request_queue: String,
    /// Model of the response (with `--input`).
    #[arg(long, required_unless_present = "file")]
    pub model: Option<String>,
    /// Input text of the response (with `--model`).
    #[arg(long, requires = "model", conflicts_with = "file")]
    pub input: Option<String>,
    /// A JSON file holding the whole `POST /v1/responses` body instead.
    #[arg(long, conflicts_with = "model")]
    pub file: Option<PathBuf>,
    /// The request's idempotency key (default: a random one).
    #[arg(long)]
    pub message_id: Option<String>,
    /// The project of RELAY_PROJECTS whose key the relay uses (default project if absent).
    #[arg(long)]
    pub project: Option<String>,
    /// Wait for the replies on a temporary queue and print them, one JSON line each, until
    /// the terminal one.
    #[arg(long)]
    pub wait: bool,
    /// With `--wait`: give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_secs: u64,
}

/// Event types after which nothing more comes for a request.
const FINAL: [&str; 5] = ["response.completed", "response.failed", "response.cancelled", "response.incomplete", "request.failed"];

pub async fn request(args: RequestArgs) -> anyhow::Result<()> {
    let body = match (&args.file, &args.model) {
        (Some(file), _) => {
            let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
            serde_json::from_str::<Value>(&text).with_context(|| format!("{} is not JSON", file.display()))?;
            text
        }
        (None, Some(model)) => json!({ "model": model, "input": args.input.clone().unwrap_or_default() }).to_string(),
        (None, None) => bail!("give --model (and --input) or --file"),
    };
    let message_id = args.message_id.clone().unwrap_or_else(|| format!("cli-{:016x}", fastrand::u64(..)));
    let connection = args.broker.connect().await?;
    let channel = connection.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut headers = FieldTable::default();
    headers.insert(HEADER_ACTION.into(), AMQPValue::LongString("create".into()));
    if let Some(project) = &args.project {
        headers.insert(HEADER_PROJECT.into(), AMQPValue::LongString(project.as_str().into()));
    }
    let mut properties = BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_content_type("application/json".into())
        .with_message_id(message_id.as_str().into())
        .with_headers(headers);
    // The temporary reply queue exists before the request is published, so no reply is lost.
    let replies = if args.wait {
        let options = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
        let queue = channel.queue_declare("".into(), options, FieldTable::default()).await?;
        properties = properties.with_reply_to(queue.name().clone()).with_correlation_id(message_id.as_str().into());
        let consume = BasicConsumeOptions { no_ack: true, ..Default::default() };
        Some(channel.basic_consume(queue.name().clone(), "".into(), consume, FieldTable::default()).await?)
    } else {
        None
    };
    let publish = BasicPublishOptions { mandatory: true, ..Default::default() };
    let confirm = channel.basic_publish("".into(), args.request_queue.as_str().into(), publish, body.as_bytes(), properties).await?.await?;
    if !confirm.is_ack() || confirm.take_message().is_some() {
        bail!("queue {:?} did not take the request; is the relay's RELAY_REQUEST_QUEUE right?", args.request_queue);
    }
    eprintln!("published request {message_id} to {}", args.request_queue);
    let Some(mut replies) = replies else {
        connection.close(200, "request published".into()).await?;
        return Ok(());
    };
    let outcome = tokio::time::timeout(Duration::from_secs(args.timeout_secs), async {
        while let Some(delivery) = replies.next().await {
            let delivery = delivery?;
            println!("{}", String::from_utf8_lossy(&delivery.data));
            let kind = delivery.properties.kind().as_ref().map(|k| k.to_string()).unwrap_or_default();
            if FINAL.contains(&kind.as_str()) {
                return Ok::<_, anyhow::Error>(kind);
            }
        }
        bail!("the broker closed the reply queue")
    })
    .await
    .with_context(|| format!("no final reply within {} s", args.timeout_secs))??;
    connection.close(200, "request done".into()).await?;
    match outcome.as_str() {
        "response.completed" => Ok(()),
        other => bail!("the request ended with {other}"),
    }
}
