//! `send`: sign a delivery exactly as OpenAI does and POST it, to try a deployment without OpenAI.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;

use crate::inbox::unix_now;
use crate::verify::{HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP, Secret};

#[derive(Clone, Args)]
pub struct SendArgs {
    /// Webhook URL of the relay.
    #[arg(long, default_value = "http://127.0.0.1:8080/webhooks/openai")]
    pub url: String,
    /// Signing secret (`whsec_...`); the first one when several are given.
    #[arg(long, env = "OPENAI_WEBHOOK_SECRET", hide_env_values = true)]
    pub secret: String,
    /// Event type, when no payload file is given.
    #[arg(long = "type", default_value = "response.completed")]
    pub event_type: String,
    /// Object id for `data.id`, when no payload file is given.
    #[arg(long, default_value = "resp_test", conflicts_with = "payload")]
    pub object_id: String,
    /// A complete event body to send as is (its bytes are signed unchanged).
    #[arg(long)]
    pub payload: Option<PathBuf>,
    /// `webhook-id` header; a fresh one by default.
    #[arg(long)]
    pub webhook_id: Option<String>,
}

/// Signs and POSTs one delivery; fails unless the relay answers 2xx.
pub async fn send(args: SendArgs) -> anyhow::Result<()> {
    let secret = Secret::parse_list(&args.secret)
        .context("--secret / OPENAI_WEBHOOK_SECRET is unusable; nothing was sent")?
        .remove(0);
    let body = match &args.payload {
        Some(path) => std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?,
        None => serde_json::to_vec(&serde_json::json!({
            "id": format!("evt_{}", random_hex()),
            "object": "event",
            "created_at": unix_now(),
            "type": args.event_type,
            "data": { "id": args.object_id },
        }))?,
    };
    let webhook_id = args.webhook_id.unwrap_or_else(|| format!("wh_{}", random_hex()));
    let timestamp = unix_now().to_string();
    let signature = secret.sign(&webhook_id, &timestamp, &body);
    let response = reqwest::Client::new()
        .post(&args.url)
        .header("content-type", "application/json")
        .header(HEADER_ID, &webhook_id)
        .header(HEADER_TIMESTAMP, &timestamp)
        .header(HEADER_SIGNATURE, signature)
        .body(body)
        .send()
        .await
        .with_context(|| format!("cannot reach {}", args.url))?;
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    println!("{} {webhook_id} {text}", status.as_u16());
    if !status.is_success() {
        bail!("the relay answered {status}");
    }
    Ok(())
}

fn random_hex() -> String {
    format!("{:032x}", fastrand::u128(..))
}
