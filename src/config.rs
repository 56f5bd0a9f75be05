//! Command line and environment: every setting is a flag and an environment variable
//! (`--help` is the reference), validated once at start-up into a [`Config`].

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use secrecy::SecretString;

use crate::broker::Nodes;
use crate::topology::Topology;
use crate::verify::{Secret, SecretError};


/// No `Debug`: it holds secrets (also for the argument structs below).
#[derive(Parser)]
#[command(name = "openai-webhook-relay", version, about = "Verify OpenAI webhooks, store them in RabbitMQ, publish the fetched objects as CloudEvents.")]
#[command(args_conflicts_with_subcommands = true, args_override_self = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// `serve` is the default when no subcommand is given.
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once at start-up; size does not matter
pub enum Command {
    /// Run the relay (default).
    Serve(ServeArgs),
    /// Try the whole loop on this machine: `serve`'s flags, plus a private RabbitMQ node when
    /// none answers, a generated secret and a built-in fake OpenAI API unless
    /// OPENAI_API_KEY is set; prints the commands that drive it.
    Dev(ServeArgs),
    /// Sign a delivery exactly as OpenAI does and POST it to a relay.
    Send(crate::cli::SendArgs),
    /// Print the relay's events as they arrive (a temporary queue on the output exchange).
    Tail(crate::cli::TailArgs),
    /// Move dead letters back into the inbox, with a count; `--dry-run` only lists them.
    ReplayDead(crate::cli::ReplayArgs),
    /// Publish a request to the gateway (`--model`/`--input` or `--file`); `--wait` prints
    /// its replies until it ends.
    Request(crate::cli::RequestArgs),
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

#[derive(Clone, Args)]
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
    /// RabbitMQ URL, or a comma-separated list of URLs of one cluster's nodes (same vhost and
    /// credentials): the relay shuffles them, connects to the first that answers and fails
    /// over to the others.
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
    /// Webhook requests handled at once, from reading the body to the answer; more are
    /// answered 503 at once. Bodies in memory are bounded by this × RELAY_BODY_LIMIT_BYTES.
    #[arg(long, env = "RELAY_MAX_IN_FLIGHT", default_value_t = 1024)]
    pub max_in_flight: usize,
    /// Open HTTP connections; more are closed at once.
    #[arg(long, env = "RELAY_MAX_CONNECTIONS", default_value_t = 16_384)]
    pub max_connections: usize,
    /// Seconds a client has to send a request's head (also the keep-alive idle limit), and
    /// then again to send its body (a webhook body not received in time: 408).
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
    #[arg(long, env = "RELAY_MAX_OBJECT_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub max_object_bytes: usize,
    /// Largest message the broker takes (its `max_message_size`; 16 MiB by default since
    /// RabbitMQ 4.0). A CloudEvent over it is dead-lettered as `too_large` instead of sent.
    #[arg(long, env = "RELAY_MAX_MESSAGE_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_message_bytes: usize,
    /// Further OpenAI projects, comma-separated names; each needs OPENAI_WEBHOOK_SECRET_<NAME>
    /// and OPENAI_API_KEY_<NAME> (upper-cased, `-` as `_`) and receives at /webhooks/openai/<name>.
    #[arg(long, env = "RELAY_PROJECTS")]
    pub projects: Option<String>,
    /// Queue of requests to OpenAI (the background-mode gateway, consumed by the worker role);
    /// also the prefix of the gateway's own queues. Empty turns the gateway off.
    #[arg(long, env = "RELAY_REQUEST_QUEUE", default_value = "openai.requests")]
    pub request_queue: String,
    /// Seconds after OpenAI accepted a request through the gateway until the relay fetches
    /// the response itself if no terminal webhook was handled for it (safety net); 0 turns
    /// it off.
    #[arg(long, env = "RELAY_RECONCILE_AFTER_SECS", default_value_t = 300)]
    pub reconcile_after_secs: u64,
    /// Redis for deduplication across replicas (optional; in-process memory otherwise).
    #[arg(long, env = "RELAY_DEDUP_REDIS_URL", hide_env_values = true)]
    pub dedup_redis_url: Option<String>,
    /// How long Redis remembers a published `webhook-id`, in seconds (at least 72 h).
    #[arg(long, env = "RELAY_DEDUP_TTL_SECS", default_value_t = MIN_DEDUP_TTL_SECS)]
    pub dedup_ttl_secs: u64,
    /// How long a handled `webhook-id` is remembered to skip duplicates, in seconds.
    #[arg(long, env = "RELAY_DEDUP_WINDOW_SECS", default_value_t = 3600)]
    pub dedup_window_secs: u64,
    /// Most `webhook-id`s remembered at once (bounds the memory of duplicate detection).
    #[arg(long, env = "RELAY_DEDUP_CAPACITY", default_value_t = 100_000)]
    pub dedup_capacity: usize,
    /// Milliseconds an incoming call's event (`realtime.call.incoming`, published by the
    /// receiver at once) stays in a consumer's queue before it expires unread.
    /// At most 4294967295: RabbitMQ closes the channel on a larger `expiration`.
    #[arg(long, env = "RELAY_REALTIME_EXPIRATION_MS", default_value_t = 30_000)]
    pub realtime_expiration_ms: u32,
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
    Missing(String, &'static str),
    #[error("{0} is unusable")]
    Secret(String, #[source] SecretError),
    #[error("{0} is unusable: {1}")]
    Invalid(String, String),
}

/// One OpenAI project: its signing secrets and API key. The default project (the plain
/// `OPENAI_WEBHOOK_SECRET` / `OPENAI_API_KEY`) has no name and receives at
/// `/webhooks/openai`; a named one at `/webhooks/openai/<name>`.
#[derive(Debug, Clone)]
pub struct Project {
    pub name: Option<String>,
    pub secrets: Vec<Secret>,
    pub api_key: Option<SecretString>,
}

impl Project {
    /// The CloudEvent `source` of this project's events.
    pub fn source(&self, default_source: &str) -> String {
        match &self.name {
            None => default_source.to_owned(),
            Some(name) => format!("openai/{name}"),
        }
    }
}

/// Validated settings of a relay process (no `Debug`: it holds the AMQP and Redis URLs).
#[derive(Clone)]
pub struct Config {
    pub args: ServeArgs,
    pub projects: Vec<Project>,
    /// The broker nodes of `AMQP_URL`.
    pub nodes: Nodes,
}

impl ServeArgs {
    /// Validates against the process environment (where per-project variables live).
    pub fn validate(self) -> Result<Config, ConfigError> {
        self.validate_with(|name| std::env::var(name).ok())
    }

    /// Validates, reading per-project variables through `env`.
    pub fn validate_with(self, env: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let mut projects = Vec::new();
        let names: Vec<String> = self
            .projects
            .as_deref()
            .unwrap_or_default()
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|n| !n.is_empty())
            .map(str::to_owned)
            .collect();
        let given = |value: &Option<String>| value.as_deref().is_some_and(|v| !v.trim().is_empty());
        if given(&self.webhook_secret) || given(&self.api_key) || names.is_empty() {
            let (secret, key) = (self.webhook_secret.clone(), self.api_key.clone());
            projects.push(self.project(None, "OPENAI_WEBHOOK_SECRET", secret, "OPENAI_API_KEY", key)?);
        }
        for name in names {
            if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_') || name.len() > 64 {
                return Err(ConfigError::Invalid("RELAY_PROJECTS".into(), format!("{name:?}: use a-z, 0-9, - and _")));
            }
            if projects.iter().any(|p| p.name.as_deref() == Some(name.as_str())) {
                return Err(ConfigError::Invalid("RELAY_PROJECTS".into(), format!("{name:?} is listed twice")));
            }
            let suffix = name.to_ascii_uppercase().replace('-', "_");
            let (secret_var, key_var) = (format!("OPENAI_WEBHOOK_SECRET_{suffix}"), format!("OPENAI_API_KEY_{suffix}"));
            let (secret, key) = (env(&secret_var), env(&key_var));
            projects.push(self.project(Some(name), &secret_var, secret, &key_var, key)?);
        }
        reqwest::Url::parse(&self.openai_base_url)
            .map_err(|e| ConfigError::Invalid("OPENAI_BASE_URL".into(), e.to_string()))?;
        let nodes = Nodes::parse(&self.amqp_url).map_err(|e| ConfigError::Invalid("AMQP_URL".into(), e))?;
        for (name, value) in [("RELAY_EXCHANGE", &self.exchange), ("RELAY_INBOX_QUEUE", &self.inbox_queue)] {
            // AMQP short strings; leave room for the derived queue suffixes.
            if value.is_empty() || value.len() > 200 {
                return Err(ConfigError::Invalid(name.into(), "must be 1 to 200 bytes".into()));
            }
        }
        if self.request_queue.len() > 200 {
            return Err(ConfigError::Invalid("RELAY_REQUEST_QUEUE".into(), "must be at most 200 bytes".into()));
        }
        if let Some(url) = &self.dedup_redis_url {
            redis::Client::open(url.as_str()).map_err(|e| ConfigError::Invalid("RELAY_DEDUP_REDIS_URL".into(), e.to_string()))?;
        }
        if self.dedup_ttl_secs < MIN_DEDUP_TTL_SECS {
            return Err(ConfigError::Invalid("RELAY_DEDUP_TTL_SECS".into(), format!("must be at least {MIN_DEDUP_TTL_SECS} (OpenAI retries for 72 h)")));
        }
        self.check_non_zero()?;
        if self.retry_max_delay_ms < self.retry_initial_delay_ms {
            return Err(ConfigError::Invalid(
                "RELAY_RETRY_MAX_DELAY_MS".into(),
                format!("must be at least RELAY_RETRY_INITIAL_DELAY_MS ({})", self.retry_initial_delay_ms),
            ));
        }
        Ok(Config { args: self, projects, nodes })
    }

    /// Settings where 0 starts a process that fails every delivery while `/readyz` says 200
    /// (every request 503 or 413, every fetch timed out, connections closed at once, all
    /// retries spent within a second, duplicates never caught, every call expired unread):
    /// refused at start instead.
    fn check_non_zero(&self) -> Result<(), ConfigError> {
        let values: [(&str, u64); 10] = [
            ("RELAY_MAX_IN_FLIGHT", self.max_in_flight as u64),
            ("RELAY_CONFIRM_TIMEOUT_MS", self.confirm_timeout_ms),
            ("RELAY_BODY_LIMIT_BYTES", self.body_limit_bytes as u64),
            ("RELAY_MAX_CONNECTIONS", self.max_connections as u64),
            ("RELAY_HEADER_TIMEOUT_SECS", self.header_timeout_secs),
            ("RELAY_FETCH_TIMEOUT_SECS", self.fetch_timeout_secs),
            ("RELAY_RETRY_INITIAL_DELAY_MS", self.retry_initial_delay_ms),
            ("RELAY_DEDUP_WINDOW_SECS", self.dedup_window_secs),
            ("RELAY_DEDUP_CAPACITY", self.dedup_capacity as u64),
            // Every call event would expire before any consumer saw it.
            ("RELAY_REALTIME_EXPIRATION_MS", u64::from(self.realtime_expiration_ms)),
        ];
        if let Some((name, _)) = values.iter().find(|(_, value)| *value == 0) {
            return Err(ConfigError::Invalid((*name).into(), "must be at least 1".into()));
        }
        Ok(())
    }

    /// One project's secrets and key, required as far as this process's role needs them.
    fn project(&self, name: Option<String>, secret_var: &str, secret: Option<String>, key_var: &str, key: Option<String>) -> Result<Project, ConfigError> {
        let secrets = match (secret.filter(|s| !s.trim().is_empty()), self.role.receives()) {
            (Some(text), _) => Secret::parse_list(&text).map_err(|e| ConfigError::Secret(secret_var.into(), e))?,
            (None, true) => return Err(ConfigError::Missing(secret_var.into(), "receiver")),
            (None, false) => Vec::new(),
        };
        let api_key = key.filter(|k| !k.trim().is_empty()).map(SecretString::from);
        if api_key.is_none() && self.role.works() {
            return Err(ConfigError::Missing(key_var.into(), "worker"));
        }
        Ok(Project { name, secrets, api_key })
    }
}

/// OpenAI retries a delivery for up to 72 hours; a shorter memory lets a late retry through.
pub const MIN_DEDUP_TTL_SECS: u64 = 72 * 3600;

impl Config {
    pub fn topology(&self) -> Topology {
        let requests = (!self.args.request_queue.is_empty()).then(|| self.args.request_queue.clone());
        Topology { exchange: self.args.exchange.clone(), inbox: self.args.inbox_queue.clone(), requests }
    }

    pub fn confirm_timeout(&self) -> Duration {
        Duration::from_millis(self.args.confirm_timeout_ms)
    }

    pub fn realtime_expiration(&self) -> Duration {
        Duration::from_millis(u64::from(self.args.realtime_expiration_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_RdvaYFYUXuIFuEbvZHwMfYFhUf7aMYjYcmM24+Aj40c=";

    fn args(extra: &[&str]) -> ServeArgs {
        // Explicit empty values, so that variables exported in the developer's shell
        // (OPENAI_API_KEY is a common one) cannot leak into these tests.
        let mut argv = vec!["relay", "serve", "--amqp-url", "amqp://127.0.0.1:5672/%2f", "--webhook-secret", "", "--api-key", ""];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).unwrap().command {
            Some(Command::Serve(args)) => args,
            _ => unreachable!(),
        }
    }

    fn validate(extra: &[&str], env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        args(extra).validate_with(|name| env.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string()))
    }

    #[test]
    fn a_list_of_broker_urls_is_accepted_and_a_malformed_one_named() {
        let list = "amqp://guest:guest@10.0.0.1:5672/%2f,amqp://guest:guest@10.0.0.2:5672/%2f";
        let config = validate(&["--webhook-secret", SECRET, "--role", "receiver", "--amqp-url", list], &[]).unwrap();
        assert_eq!(config.nodes.len(), 2);
        let err = validate(&["--webhook-secret", SECRET, "--role", "receiver", "--amqp-url", "amqp://guest:guest@h1/%2f,h2"], &[]).err().expect("refused").to_string();
        assert_eq!(err, "AMQP_URL is unusable: entry 2 of 2 does not start with amqp:// or amqps://");
    }

    #[test]
    fn a_missing_secret_or_key_is_named() {
        let err = validate(&["--api-key", "sk"], &[]).err().expect("refused").to_string();
        assert_eq!(err, "OPENAI_WEBHOOK_SECRET is required for the receiver role");
        let err = validate(&["--webhook-secret", SECRET], &[]).err().expect("refused").to_string();
        assert_eq!(err, "OPENAI_API_KEY is required for the worker role");
        assert!(validate(&["--webhook-secret", SECRET, "--role", "receiver"], &[]).is_ok());
    }

    #[test]
    fn each_named_project_needs_its_own_variables() {
        let err = validate(&["--projects", "alpha", "--role", "receiver"], &[]).err().expect("refused").to_string();
        assert_eq!(err, "OPENAI_WEBHOOK_SECRET_ALPHA is required for the receiver role");
        let env = [("OPENAI_WEBHOOK_SECRET_MY_TEAM", SECRET), ("OPENAI_API_KEY_MY_TEAM", "sk")];
        let config = validate(&["--projects", "my-team"], &env).unwrap();
        assert_eq!(config.projects.len(), 1, "no default project without its variables");
        assert_eq!(config.projects[0].source("openai"), "openai/my-team");
        let err = validate(&["--projects", "my-team"], &[("OPENAI_WEBHOOK_SECRET_MY_TEAM", "whsec_short"), ("OPENAI_API_KEY_MY_TEAM", "sk")]).err().expect("refused");
        assert_eq!(err.to_string(), "OPENAI_WEBHOOK_SECRET_MY_TEAM is unusable");
    }

    #[test]
    fn project_names_are_checked() {
        for bad in ["Alpha", "a/b", "alpha,alpha"] {
            let env = [("OPENAI_WEBHOOK_SECRET_ALPHA", SECRET)];
            let err = validate(&["--role", "receiver", "--projects", bad], &env).err().expect("refused").to_string();
            assert!(err.starts_with("RELAY_PROJECTS is unusable"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_dedup_ttl_covers_openais_retry_window() {
        let err = validate(&["--webhook-secret", SECRET, "--api-key", "sk", "--dedup-ttl-secs", "3600"], &[]).err().expect("refused");
        assert!(err.to_string().starts_with("RELAY_DEDUP_TTL_SECS is unusable"));
    }

    #[test]
    fn values_that_fail_every_delivery_are_refused_naming_the_variable() {
        let cases = [
            ("--max-in-flight", "0", "RELAY_MAX_IN_FLIGHT"),
            ("--confirm-timeout-ms", "0", "RELAY_CONFIRM_TIMEOUT_MS"),
            ("--body-limit-bytes", "0", "RELAY_BODY_LIMIT_BYTES"),
            ("--max-connections", "0", "RELAY_MAX_CONNECTIONS"),
            ("--header-timeout-secs", "0", "RELAY_HEADER_TIMEOUT_SECS"),
            ("--fetch-timeout-secs", "0", "RELAY_FETCH_TIMEOUT_SECS"),
            ("--retry-initial-delay-ms", "0", "RELAY_RETRY_INITIAL_DELAY_MS"),
            ("--dedup-window-secs", "0", "RELAY_DEDUP_WINDOW_SECS"),
            ("--dedup-capacity", "0", "RELAY_DEDUP_CAPACITY"),
            ("--realtime-expiration-ms", "0", "RELAY_REALTIME_EXPIRATION_MS"),
            // Below the default initial delay (1000 ms).
            ("--retry-max-delay-ms", "999", "RELAY_RETRY_MAX_DELAY_MS"),
        ];
        for (flag, value, variable) in cases {
            let err = validate(&["--webhook-secret", SECRET, "--api-key", "sk", flag, value], &[]).err().expect("refused").to_string();
            assert!(err.starts_with(&format!("{variable} is unusable: must be at least ")), "{flag} {value}: {err}");
            assert!(validate(&["--webhook-secret", SECRET, "--api-key", "sk", flag, "1000"], &[]).is_ok(), "{flag} 1000");
        }
        let equal = ["--retry-initial-delay-ms", "5000", "--retry-max-delay-ms", "5000"];
        assert!(validate(&[&["--webhook-secret", SECRET, "--api-key", "sk"][..], &equal].concat(), &[]).is_ok(), "max = initial is fine");
    }
}
