//! Command line and environment: every setting is a flag and an environment variable
//! (`--help` is the reference), validated once at start-up into a [`Config`].

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use secrecy::SecretString;

use crate::topology::Topology;
use crate::verify::{Secret, SecretError};

#[derive(Debug, Parser)]
#[command(name = "openai-webhook-relay", version, about = "Verify OpenAI webhooks, store them in RabbitMQ, publish the fetched objects as CloudEvents.")]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// `serve` is the default when no subcommand is given.
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay (default).
    Serve(ServeArgs),
    /// Sign a delivery exactly as OpenAI does and POST it to a relay.
    Send(crate::cli::SendArgs),
    /// Print the relay's events as they arrive (a temporary queue on the output exchange).
    Tail(crate::cli::TailArgs),
    /// Move dead letters back into the inbox, with a count; `--dry-run` only lists them.
    ReplayDead(crate::cli::ReplayArgs),
}

/// Which halves of the pipeline this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// Receive webhooks into the inbox.
    Receiver,
    /// Fetch and publish from the inbox.
    Worker,
    /// Both (default).
    All,
}

impl Role {
    pub fn receives(self) -> bool {
        matches!(self, Self::Receiver | Self::All)
    }
    pub fn works(self) -> bool {
        matches!(self, Self::Worker | Self::All)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Which roles this process runs.
    #[arg(long, env = "RELAY_ROLE", value_enum, default_value = "all")]
    pub role: Role,
    /// One or more `whsec_...` signing secrets, separated by commas or white space.
    #[arg(long, env = "OPENAI_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,
    /// Bearer key for fetching objects from the OpenAI API.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// API base URL, as in OpenAI's SDKs.
    #[arg(long, env = "OPENAI_BASE_URL", default_value = "https://api.openai.com/v1")]
    pub openai_base_url: String,
    /// RabbitMQ URL.
    #[arg(long, env = "AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f", hide_env_values = true)]
    pub amqp_url: String,
    /// HTTP listen address.
    #[arg(long, env = "RELAY_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Output topic exchange.
    #[arg(long, env = "RELAY_EXCHANGE", default_value = "openai.events")]
    pub exchange: String,
    /// Durable inbox queue; also the prefix of the retry and dead-letter queues.
    #[arg(long, env = "RELAY_INBOX_QUEUE", default_value = "openai.webhooks.inbox")]
    pub inbox_queue: String,
    /// Accepted clock skew of `webhook-timestamp`, both directions, in seconds.
    #[arg(long, env = "RELAY_TOLERANCE_SECS", default_value_t = 300)]
    pub tolerance_secs: u64,
    /// Largest accepted webhook body in bytes (larger: 413).
    #[arg(long, env = "RELAY_BODY_LIMIT_BYTES", default_value_t = 1024 * 1024)]
    pub body_limit_bytes: usize,
    /// Webhook requests handled at once; more are answered 503 at once.
    #[arg(long, env = "RELAY_MAX_IN_FLIGHT", default_value_t = 4096)]
    pub max_in_flight: usize,
    /// Open HTTP connections; more are closed at once.
    #[arg(long, env = "RELAY_MAX_CONNECTIONS", default_value_t = 16_384)]
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers (also the keep-alive idle limit).
    #[arg(long, env = "RELAY_HEADER_TIMEOUT_SECS", default_value_t = 10)]
    pub header_timeout_secs: u64,
    /// Longest wait for the broker's confirm of one publish, in milliseconds.
    #[arg(long, env = "RELAY_CONFIRM_TIMEOUT_MS", default_value_t = 3000)]
    pub confirm_timeout_ms: u64,
    /// Fetch attempts before a delivery is dead-lettered.
    #[arg(long, env = "RELAY_FETCH_MAX_ATTEMPTS", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub fetch_max_attempts: u32,
    /// First retry delay in milliseconds; later ones grow exponentially (capped, jittered).
    #[arg(long, env = "RELAY_RETRY_INITIAL_DELAY_MS", default_value_t = 1000)]
    pub retry_initial_delay_ms: u64,
    /// Largest retry delay in milliseconds (also caps an honoured `Retry-After`).
    #[arg(long, env = "RELAY_RETRY_MAX_DELAY_MS", default_value_t = 300_000)]
    pub retry_max_delay_ms: u64,
    /// Fetches (and so inbox messages) the worker handles at once.
    #[arg(long, env = "RELAY_FETCH_CONCURRENCY", default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..))]
    pub fetch_concurrency: u16,
    /// Timeout of one fetch, in seconds.
    #[arg(long, env = "RELAY_FETCH_TIMEOUT_SECS", default_value_t = 30)]
    pub fetch_timeout_secs: u64,
    /// Largest fetched object in bytes; larger ones are dead-lettered.
    #[arg(long, env = "RELAY_MAX_OBJECT_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub max_object_bytes: usize,
    /// How long a handled `webhook-id` is remembered to skip duplicates, in seconds.
    #[arg(long, env = "RELAY_DEDUP_WINDOW_SECS", default_value_t = 3600)]
    pub dedup_window_secs: u64,
    /// Most `webhook-id`s remembered at once (bounds the memory of duplicate detection).
    #[arg(long, env = "RELAY_DEDUP_CAPACITY", default_value_t = 100_000)]
    pub dedup_capacity: usize,
    /// CloudEvent `source` attribute.
    #[arg(long, env = "RELAY_EVENT_SOURCE", default_value = "openai")]
    pub event_source: String,
    /// Seconds between a stop signal and closing the listener, with `/readyz` at 503 so that
    /// a load balancer stops sending first (use 0 behind a Kubernetes preStop sleep).
    #[arg(long, env = "RELAY_DRAIN_DELAY_SECS", default_value_t = 0)]
    pub drain_delay_secs: u64,
    /// Longest graceful shutdown, in seconds, before in-flight work is abandoned (and redelivered).
    #[arg(long, env = "RELAY_SHUTDOWN_TIMEOUT_SECS", default_value_t = 20)]
    pub shutdown_timeout_secs: u64,
    /// Log format.
    #[arg(long, env = "RELAY_LOG_FORMAT", value_enum, default_value = "json")]
    pub log_format: LogFormat,
}

/// A start-up configuration problem, naming the variable to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0} is required for the {1} role")]
    Missing(&'static str, &'static str),
    #[error("OPENAI_WEBHOOK_SECRET is unusable")]
    Secret(#[from] SecretError),
    #[error("{0} is unusable: {1}")]
    Invalid(&'static str, String),
}

/// Validated settings of a relay process.
#[derive(Debug, Clone)]
pub struct Config {
    pub args: ServeArgs,
    pub secrets: Vec<Secret>,
    pub api_key: Option<SecretString>,
}

impl ServeArgs {
    pub fn validate(self) -> Result<Config, ConfigError> {
        let secrets = match (&self.webhook_secret, self.role.receives()) {
            (Some(text), _) => Secret::parse_list(text)?,
            (None, true) => return Err(ConfigError::Missing("OPENAI_WEBHOOK_SECRET", "receiver")),
            (None, false) => Vec::new(),
        };
        let api_key = self.api_key.clone().filter(|k| !k.trim().is_empty()).map(SecretString::from);
        if api_key.is_none() && self.role.works() {
            return Err(ConfigError::Missing("OPENAI_API_KEY", "worker"));
        }
        reqwest::Url::parse(&self.openai_base_url)
            .map_err(|e| ConfigError::Invalid("OPENAI_BASE_URL", e.to_string()))?;
        self.amqp_url
            .parse::<lapin::uri::AMQPUri>()
            .map_err(|e| ConfigError::Invalid("AMQP_URL", e))?;
        for (name, value) in [("RELAY_EXCHANGE", &self.exchange), ("RELAY_INBOX_QUEUE", &self.inbox_queue)] {
            // AMQP short strings; leave room for the derived queue suffixes.
            if value.is_empty() || value.len() > 200 {
                return Err(ConfigError::Invalid(name, "must be 1 to 200 bytes".into()));
            }
        }
        Ok(Config { args: self, secrets, api_key })
    }
}

impl Config {
    pub fn topology(&self) -> Topology {
        Topology { exchange: self.args.exchange.clone(), inbox: self.args.inbox_queue.clone() }
    }

    pub fn confirm_timeout(&self) -> Duration {
        Duration::from_millis(self.args.confirm_timeout_ms)
    }
}
