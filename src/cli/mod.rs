//! Operator subcommands beside `serve`: `send`, `tail`, `replay-dead` and `request`.

mod replay;
mod request;
mod send;
mod tail;

use clap::Args;
use lapin::{Connection, ConnectionProperties};

pub use replay::{ReplayArgs, replay_dead};
pub use request::{RequestArgs, request};
pub use send::{SendArgs, send};
pub use tail::{TailArgs, tail};

/// The broker, as `serve` finds it.
#[derive(Clone, Args)]
pub struct BrokerArgs {
    /// RabbitMQ URL.
    #[arg(long, env = "AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f", hide_env_values = true)]
    pub amqp_url: String,
}

impl BrokerArgs {
    async fn connect(&self) -> anyhow::Result<Connection> {
        use anyhow::Context;
        Connection::connect(&self.amqp_url, ConnectionProperties::default().with_connection_name("openai-webhook-relay-cli".into()))
            .await
            .context("cannot connect to RabbitMQ at AMQP_URL")
    }
}
