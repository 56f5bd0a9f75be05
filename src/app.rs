//! Assembling a relay process from its [`Config`] and running it until shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::config::Config;
use crate::fetch::ApiClient;
use crate::http::{AppState, ConnectionLimits, ReceiverProject, router, serve};
use crate::inbox::Inbox;
use crate::metrics::Metrics;
use crate::publish::EventPublisher;
use crate::verify::Verifier;
use crate::worker::retry::RetryPolicy;
use crate::worker::dedup::{Memory, Shared};
use crate::worker::{Dedup, Worker, WorkerProject};

/// A built relay: listener bound, broker supervisor started, worker ready to run.
pub struct App {
    listener: TcpListener,
    router: axum::Router,
    limits: ConnectionLimits,
    broker: Broker,
    worker: Option<Worker>,
    /// Cancelled first on a stop signal: `/readyz` turns 503 while requests are still served.
    draining: CancellationToken,
    drain_delay: Duration,
    shutdown_timeout: Duration,
}

impl App {
    /// Binds `RELAY_LISTEN` and builds.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let addr = config.args.listen;
        let listener = listen(addr).with_context(|| format!("RELAY_LISTEN: cannot listen on {addr}"))?;
        Self::with_listener(config, listener).await
    }

    /// Builds on an already bound listener (tests bind port 0).
    pub async fn with_listener(config: Config, listener: TcpListener) -> anyhow::Result<Self> {
        let args = &config.args;
        let metrics = Arc::new(Metrics::default());
        let topology = config.topology();
        let broker = Broker::start(config.nodes.clone(), topology.clone(), args.role.works(), config.confirm_timeout(), metrics.clone());
        let draining = CancellationToken::new();
        // The request head, and then again the body.
        let header_timeout = Duration::from_secs(args.header_timeout_secs);
        let state = AppState {
            broker: broker.clone(),
            metrics: metrics.clone(),
            draining: draining.clone(),
            projects: Arc::new(
                config
                    .projects
                    .iter()
                    .map(|p| {
                        let project = ReceiverProject { verifier: Verifier::new(p.secrets.clone(), args.tolerance_secs), source: p.source(&args.event_source) };
                        (p.name.clone(), project)
                    })
                    .collect(),
            ),
            inbox: Inbox::new(broker.clone(), &topology.inbox, metrics.clone()),
            publisher: event_publisher(&config, broker.clone(), metrics.clone()),
            body_limit: args.body_limit_bytes,
            body_timeout: header_timeout,
            in_flight: Arc::new(Semaphore::new(args.max_in_flight)),
        };
        // A backstop: the handler's own deadlines (the body's, then the confirm's) answer first.
        let request_timeout = header_timeout + config.confirm_timeout();
        let router = router(state, args.role.receives(), request_timeout);
        let worker = if args.role.works() { Some(worker(&config, broker.clone(), metrics)?) } else { None };
        let limits = ConnectionLimits { max_connections: args.max_connections, header_timeout };
        Ok(Self {
            listener,
            router,
            limits,
            broker,
            worker,
            draining,
            drain_delay: Duration::from_secs(args.drain_delay_secs),
            shutdown_timeout: Duration::from_secs(args.shutdown_timeout_secs),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener has an address")
    }

    /// Serves until `signal` resolves, then shuts down in order: report not-ready for
    /// `RELAY_DRAIN_DELAY_SECS` while still serving (the load balancer stops sending), stop
    /// accepting and let requests in flight finish, let the worker finish the deliveries it holds (bounded by
    /// `RELAY_SHUTDOWN_TIMEOUT_SECS`; unfinished ones are redelivered later), close the broker.
    pub async fn run_until(self, signal: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Self { listener, router, limits, broker, worker, draining, drain_delay, shutdown_timeout } = self;
        let shutdown = CancellationToken::new();
        tracing::info!(addr = %listener.local_addr()?, worker = worker.is_some(), "listening");
        let server = tokio::spawn(serve(listener, router, limits, shutdown.clone()));
        let worker = worker.map(|w| tokio::spawn(Arc::new(w).run(shutdown.clone())));

        signal.await;
        tracing::info!(?drain_delay, "draining: /readyz now answers 503");
        draining.cancel();
        tokio::time::sleep(drain_delay).await;
        tracing::info!("shutting down");
        shutdown.cancel();
        let drained = tokio::time::timeout(shutdown_timeout, async {
            let served = server.await;
            if let Some(worker) = worker {
                let _ = worker.await;
            }
            served
        })
        .await;
        broker.close().await;
        match drained {
            Ok(Ok(())) => {
                tracing::info!("stopped cleanly");
                Ok(())
            }
            Ok(Err(e)) => Err(e).context("HTTP server task panicked"),
            Err(_) => {
                tracing::warn!(?shutdown_timeout, "shutdown timed out; unfinished deliveries will be redelivered");
                Ok(())
            }
        }
    }
}

/// Connections the kernel queues before the relay accepts them. The default of 128 overflows
/// when many senders connect at once (measured: 10 000 connections took ~20 s to open).
const LISTEN_BACKLOG: u32 = 4096;

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

fn event_publisher(config: &Config, broker: Broker, metrics: Arc<Metrics>) -> EventPublisher {
    EventPublisher::new(broker, &config.args.exchange, metrics, config.realtime_expiration())
}

/// The worker role: an API client, the publisher, dedup (Redis when configured) and each
/// project's key and CloudEvent source.
fn worker(config: &Config, broker: Broker, metrics: Arc<Metrics>) -> anyhow::Result<Worker> {
    let args = &config.args;
    let topology = config.topology();
    let fetch_timeout = Duration::from_secs(args.fetch_timeout_secs);
    // A fetch and up to three publishes, each bounded by its own timeout, with room to spare.
    let handle_limit = fetch_timeout + config.confirm_timeout() * 3 + Duration::from_secs(30);
    let memory = Memory::new(Duration::from_secs(args.dedup_window_secs), args.dedup_capacity);
    let dedup = match args.dedup_redis_url.clone() {
        None => Dedup::memory(memory),
        Some(url) => {
            // A claim outlives the longest handling of one delivery, so that it is released
            // by its handler rather than expire under it; a dead replica's claim expires.
            let pending_ttl = handle_limit + Duration::from_secs(10);
            let ttl = Duration::from_secs(args.dedup_ttl_secs);
            Dedup::redis(memory, move || Shared::connect(url.clone(), ttl, pending_ttl), metrics.dedup_fallback.clone())
        }
    };
    let projects = config
        .projects
        .iter()
        .map(|p| {
            let key = p.api_key.clone().expect("validated: the worker role has a key per project");
            (p.name.clone(), WorkerProject { api_key: key, source: p.source(&args.event_source) })
        })
        .collect();
    Ok(Worker {
        api: ApiClient::new(args.openai_base_url.parse().context("OPENAI_BASE_URL")?, fetch_timeout, args.max_object_bytes, metrics.clone()),
        publisher: event_publisher(config, broker.clone(), metrics.clone()),
        broker,
        metrics,
        dedup,
        policy: RetryPolicy {
            max_attempts: args.fetch_max_attempts,
            initial: Duration::from_millis(args.retry_initial_delay_ms),
            max: Duration::from_millis(args.retry_max_delay_ms),
        },
        projects,
        concurrency: usize::from(args.fetch_concurrency),
        max_message_bytes: args.max_message_bytes,
        handle_limit,
        topology: topology.clone(),
        gateway: topology.requests.as_ref().map(|_| crate::gateway::Settings {
            reconcile_after: (args.reconcile_after_secs > 0).then(|| Duration::from_secs(args.reconcile_after_secs)),
        }),
    })
}
