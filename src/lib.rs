//! openai-webhook-relay: receives OpenAI webhooks, stores them durably in RabbitMQ, fetches
//! the objects they point at, and publishes them as CloudEvents, so nothing polls.
//!
//! # Layout
//! In the order a delivery moves through the relay:
//!
//! - [`http`]: the HTTP routes; `http::receive` is the webhook endpoint.
//! - [`verify`]: Standard Webhooks signature and timestamp checks → `Verified`.
//! - [`envelope`]: the event envelope, and which object an event type points at.
//! - [`inbox`]: stores a verified delivery in the durable inbox queue (then 200).
//! - [`worker`]: consumes the inbox; retries and dead letters live in `worker::retry`,
//!   duplicate detection (memory or Redis) in `worker::dedup`.
//! - [`fetch`]: gets the object from the OpenAI API.
//! - [`normalize`]: builds the CloudEvent (pure).
//! - [`publish`]: publishes it to the output topic exchange.
//! - [`gateway`]: the other direction: requests to OpenAI through RabbitMQ (`request`),
//!   the events the relay makes and the replies (`reply`), and the safety net that fetches
//!   a response whose terminal webhook never came (`reconcile`).
//!
//! Around them: [`broker`] keeps the RabbitMQ connection alive, [`topology`] names and
//! declares the queues and exchange, [`config`] reads flags and environment, [`app`] wires a
//! process together, [`metrics`], [`telemetry`] and [`shutdown`] serve operations,
//! [`cli`] holds the operator subcommands, and [`dev`] the one-command local loop (a
//! private RabbitMQ node and a fake OpenAI API, also what the tests run against).

pub mod app;
pub mod broker;
pub mod cli;
pub mod config;
pub mod dev;
pub mod envelope;
pub mod fetch;
pub mod gateway;
pub mod http;
pub mod inbox;
pub mod metrics;
pub mod normalize;
pub mod publish;
pub mod shutdown;
pub mod telemetry;
pub mod topology;
pub mod verify;
pub mod worker;

pub use app::App;
pub use config::{Cli, Command, Config};
