//! The bare receiver: the floor under the relay's ingest on this machine.
//!
//! It is this bench binary started again as a child process (`--role bare-receiver`), so that
//! its CPU is counted apart from the generator's, like the relay's. It serves with the relay's
//! own accept loop (`http::serve`, axum on hyper), and per request does the broker work the
//! receiver must do before answering: one persistent, mandatory publish of the body with the
//! inbox's properties on one shared confirm channel, then 200 with the relay's JSON once
//! RabbitMQ confirmed it. Nothing else: no signature check, no envelope parse, no spans, logs
//! or metrics, no confirm bookkeeping. What it costs per delivery, and how close to the raw
//! lapin baseline it gets, is what any receiver built on axum, hyper and lapin can reach here;
//! the targets that it misses too are out of the relay's reach on this machine.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection, ConnectionProperties};
use openai_webhook_relay::http::{ConnectionLimits, serve};
use openai_webhook_relay::verify::{HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP};
use tokio_util::sync::CancellationToken;

use crate::load::{Outcome, amqp_properties, publish_confirmed};

pub const ROLE: &str = "bare-receiver";

/// The child process's `main`: the relay's runtime (`#[tokio::main]`'s default), its address
/// from `RELAY_LISTEN`, its queue from `RELAY_INBOX_QUEUE`; runs until killed.
pub fn main() -> ExitCode {
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match runtime.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("bare receiver: {error}");
            ExitCode::FAILURE
        }
    }
}

struct Inbox {
    channel: Channel,
    queue: Arc<str>,
}

async fn run() -> Result<(), String> {
    let var = |name: &str| std::env::var(name).map_err(|_| format!("{name} is not set"));
    let (listen, amqp_url, queue) = (var("RELAY_LISTEN")?, var("AMQP_URL")?, var("RELAY_INBOX_QUEUE")?);
    let connection = Connection::connect(&amqp_url, ConnectionProperties::default()).await.map_err(|e| e.to_string())?;
    let channel = connection.create_channel().await.map_err(|e| e.to_string())?;
    channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(|e| e.to_string())?;
    let inbox = Arc::new(Inbox { channel, queue: queue.into() });
    let router = Router::new().route("/readyz", get(|| async { StatusCode::OK })).route("/webhooks/openai", post(store)).with_state(inbox);
    let listener = tokio::net::TcpListener::bind(&listen).await.map_err(|e| format!("bind {listen}: {e}"))?;
    let limits = ConnectionLimits { max_connections: 4096, header_timeout: Duration::from_secs(10) };
    serve(listener, router, limits, CancellationToken::new()).await;
    Ok(())
}

async fn store(State(inbox): State<Arc<Inbox>>, headers: HeaderMap, body: Bytes) -> Response {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let id = header(HEADER_ID);
    let properties = amqp_properties(id, header(HEADER_TIMESTAMP), header(HEADER_SIGNATURE));
    match publish_confirmed(&inbox.channel, &inbox.queue, &body, properties).await {
        Outcome::Accepted => axum::Json(serde_json::json!({ "status": "stored", "webhook_id": id })).into_response(),
        Outcome::Rejected | Outcome::Failed => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}
