//! The one RabbitMQ connection of a relay process, kept alive by a supervisor task.
//!
//! lapin's own auto-recovery has open bugs around broker restarts, so we do it ourselves and
//! keep it boring: connect, declare the topology, open one confirm-mode channel that every
//! publish shares, then wait until anything goes wrong and start over with capped backoff.
//! While there is no link, publishes fail at once (the receiver answers 503) and `/readyz`
//! says 503. Consumers watch [`Broker::subscribe`] and re-attach to each new link.

use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Connection, ConnectionProperties, Event};
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Metrics, label};
use crate::topology::{Topology, migrate};

mod confirms;
pub mod nodes;

use confirms::{ConfirmedChannel, Verdict};
pub use nodes::Nodes;

/// Longest wait for connecting and declaring the topology (a broker that accepts TCP but
/// never answers must not stall the supervisor).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Pause before a consumer re-attaches after its channel failed.
const REATTACH_PAUSE: Duration = Duration::from_secs(1);
/// Longest wait for a replacement publishing channel (open and confirm mode).
const REPLACE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a relay using a queue an older version declared checks whether it can now
/// rebuild it.
const OUTDATED_RECHECK: Duration = Duration::from_secs(60);

/// The longest AMQP short string, in bytes. A `message_id`, a `type` and a routing key are
/// short strings, and lapin panics (instead of returning an error) when given a longer one,
/// so every outside value that becomes one is refused above this before it gets here: the
/// `webhook-id` by `Verifier::verify`, the event's `id` and `type` by `Envelope::parse`.
pub const MAX_SHORT_STRING: usize = lapin::types::MAX_SHORT_STRING_LENGTH;

/// A live connection with declared topology and a confirm-mode channel for publishing.
#[derive(Clone)]
pub struct Link {
    pub connection: Arc<Connection>,
    publisher: Arc<Publisher>,
    /// Cancelled by whoever sees this link fail; the supervisor then replaces it.
    broken: CancellationToken,
    /// The broker's reason while it blocks this connection's publishes (a memory or disk
    /// alarm), set by the supervisor from `connection.blocked` / `connection.unblocked`. A
    /// watch rather than lapin's status flag so that a publish already waiting for its
    /// confirm learns of the block at once: a blocked connection sends nothing, and the
    /// confirm would only come, if at all, after the alarm clears. Per link, so a new
    /// connection starts unblocked.
    blocked: Arc<watch::Sender<Option<String>>>,
}

/// The one publishing channel of a link, replaced on its own when the broker refuses a
/// message or closes the channel: a consumer's full queue or an oversized message is that
/// one publish's failure, not a reason to drop the connection and every consumer on it.
struct Publisher {
    channel: RwLock<Arc<ConfirmedChannel>>,
    /// One replacement at a time: a burst of nacks on one channel opens one new channel.
    replacing: tokio::sync::Mutex<()>,
}

impl Link {
    /// Reports the link as unusable so the supervisor reconnects.
    pub fn report_broken(&self) {
        self.broken.cancel();
    }

    fn channel(&self) -> Arc<ConfirmedChannel> {
        self.publisher.channel.read().expect("publisher lock").clone()
    }

    /// Replaces the publishing channel if it is still `failed`; reports the whole link
    /// broken when the connection itself is gone or no channel can be opened.
    async fn replace_channel(&self, failed: &ConfirmedChannel) {
        let _one = self.publisher.replacing.lock().await;
        if self.channel().channel().id() != failed.channel().id() {
            return; // another publish already replaced it
        }
        // Not closed here: publishes still in flight on it (a receiver's inbox store, say)
        // get their own confirms; lapin closes it when the last of them drops its handle.
        // Bounded: on a connection that dies meanwhile, lapin may never answer the channel's
        // open, and the publish waiting here would hang with its delivery's dedup claim
        // held, so that every redelivered copy of it was parked again as "busy", for good.
        match tokio::time::timeout(REPLACE_TIMEOUT, open_publisher(&self.connection)).await {
            Ok(Ok(channel)) => *self.publisher.channel.write().expect("publisher lock") = channel,
            Ok(Err(error)) => {
                tracing::warn!(%error, "cannot open a new publishing channel; reconnecting");
                self.report_broken();
            }
            Err(_) => {
                tracing::warn!(timeout = ?REPLACE_TIMEOUT, "no new publishing channel in time; reconnecting");
                self.report_broken();
            }
        }
    }
}

async fn open_publisher(connection: &Connection) -> lapin::Result<Arc<ConfirmedChannel>> {
    let channel = connection.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(ConfirmedChannel::new(channel))
}

/// Why a publish did not end in a confirmed, routed message.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("no broker connection")]
    NotConnected,
    #[error("broker channel error: {0}")]
    Channel(#[from] lapin::Error),
    #[error("broker refused the message (nack)")]
    Nacked,
    #[error("no queue is bound for routing key {0:?}")]
    Unroutable(String),
    #[error("broker did not confirm within {0:?}")]
    Timeout(Duration),
    #[error("broker blocks publishing: {0}")]
    Blocked(String),
}

/// A message to publish: where to, and what.
pub struct Outgoing<'a> {
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub body: &'a [u8],
    pub properties: BasicProperties,
}

#[derive(Clone)]
pub struct Broker {
    link: watch::Receiver<Option<Link>>,
    confirm_timeout: Duration,
    closing: CancellationToken,
    supervisor: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl Broker {
    /// Starts the supervisor; the first connection is made in the background, so a relay
    /// can start (and report not-ready) while the broker is still down.
    pub fn start(nodes: Nodes, topology: Topology, consumes_inbox: bool, confirm_timeout: Duration, metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = watch::channel(None);
        let closing = CancellationToken::new();
        let task = tokio::spawn(supervise(Target { nodes: nodes.shuffled(), topology, consumes_inbox }, tx, metrics, closing.clone()));
        Self {
            link: rx,
            confirm_timeout,
            closing,
            supervisor: Arc::new(Mutex::new(Some(task))),
        }
    }

    pub fn link(&self) -> Option<Link> {
        self.link.borrow().clone()
    }

    pub fn is_ready(&self) -> bool {
        self.link.borrow().is_some()
    }

    /// The broker's reason while it blocks publishing on the current link (a resource
    /// alarm): every publish fails at once meanwhile, so readiness reports it too and the
    /// load balancer sends deliveries to a relay whose broker takes them.
    pub fn blocked(&self) -> Option<String> {
        self.link.borrow().as_ref()?.blocked.borrow().clone()
    }

    /// Follows link changes: consumers re-attach whenever a new link appears.
    pub fn subscribe(&self) -> watch::Receiver<Option<Link>> {
        self.link.clone()
    }

    /// Runs the consumer `consume` of `queue` on each link until `shutdown`; when it fails,
    /// pauses and runs it again, on the new link if there is one. Only the consumer's own
    /// channel is judged here: the connection is the supervisor's.
    pub async fn consume_on_every_link<F, Consume>(&self, queue: &str, shutdown: &CancellationToken, mut consume: F)
    where
        F: FnMut(Link) -> Consume,
        Consume: Future<Output = lapin::Result<()>>,
    {
        let mut links = self.subscribe();
        while !shutdown.is_cancelled() {
            let link = tokio::select! {
                changed = links.wait_for(Option::is_some) => match changed {
                    Ok(link) => link.clone().expect("waited for Some"),
                    Err(_) => return,
                },
                () = shutdown.cancelled() => return,
            };
            if let Err(error) = consume(link).await {
                tracing::warn!(%error, %queue, "consumer stopped; re-attaching");
                tokio::select! {
                    () = tokio::time::sleep(REATTACH_PAUSE) => {}
                    () = shutdown.cancelled() => {}
                }
            }
        }
    }

    /// Publishes with `mandatory` and waits for the broker's confirm, at most
    /// `confirm_timeout` for the whole exchange. `Ok` means the message is stored in at least
    /// one queue. A nack or a channel error replaces the publishing channel (seen on RabbitMQ
    /// 3.10: once a quorum queue rejects a publish, the channel keeps getting nacks even after
    /// the queue has room again); a lost connection reports the link broken. A timeout does
    /// neither, because a broker under a resource alarm blocks publishers without any error
    /// and a new channel would be blocked as well. While the broker has announced a block
    /// (`connection.blocked`), a publish fails at once, and one already waiting for its
    /// confirm stops waiting: the caller answers 503 or parks the message instead of holding
    /// a request for the whole confirm timeout.
    pub async fn publish(&self, message: Outgoing<'_>, latency: &Histogram) -> Result<(), PublishError> {
        self.send(message, latency, true).await
    }

    /// [`Broker::publish`] without `mandatory`: for a copy that may go nowhere (a made event
    /// on an exchange nobody binds). The broker returns nothing for it, and a return is never
    /// matched with another publish's confirm on the shared channel.
    pub async fn publish_optional(&self, message: Outgoing<'_>, latency: &Histogram) -> Result<(), PublishError> {
        self.send(message, latency, false).await
    }

    async fn send(&self, message: Outgoing<'_>, latency: &Histogram, mandatory: bool) -> Result<(), PublishError> {
        let link = self.link().ok_or(PublishError::NotConnected)?;
        let mut blocked = link.blocked.subscribe();
        if let Some(reason) = blocked.borrow_and_update().clone() {
            return Err(PublishError::Blocked(reason));
        }
        let channel = link.channel();
        let started = Instant::now();
        let options = BasicPublishOptions { mandatory, ..Default::default() };
        let verdict = channel.publish(message.exchange, message.routing_key, options, message.body, message.properties);
        let block = async move { blocked.wait_for(Option::is_some).await.map(|reason| reason.clone().unwrap_or_default()) };
        let verdict = tokio::select! {
            confirmed = tokio::time::timeout(self.confirm_timeout, verdict) => match confirmed {
                Err(_) => return Err(PublishError::Timeout(self.confirm_timeout)),
                // The channel's collector is gone: nobody knows what became of the message.
                Ok(Err(_)) => return Err(PublishError::NotConnected),
                Ok(Ok(verdict)) => verdict,
            },
            Ok(reason) = block => return Err(PublishError::Blocked(reason)),
        };
        if !matches!(verdict, Verdict::Failed(_)) {
            latency.observe(started.elapsed().as_secs_f64());
        }
        match verdict {
            Verdict::Stored => Ok(()),
            Verdict::Returned => Err(PublishError::Unroutable(message.routing_key.to_owned())),
            Verdict::Nacked => {
                link.replace_channel(&channel).await;
                Err(PublishError::Nacked)
            }
            Verdict::Failed(e) => {
                if link.connection.status().connected() {
                    link.replace_channel(&channel).await;
                } else {
                    link.report_broken();
                }
                Err(PublishError::Channel(e))
            }
        }
    }

    /// Closes the connection once nothing needs it any more (after the worker drained).
    pub async fn close(&self) {
        self.closing.cancel();
        let task = self.supervisor.lock().expect("supervisor lock").take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

/// What the supervisor needs to (re)connect.
struct Target {
    nodes: Nodes,
    topology: Topology,
    /// This process consumes the inbox (the worker role): one inbox consumer is its own.
    consumes_inbox: bool,
}

async fn supervise(target: Target, state: watch::Sender<Option<Link>>, metrics: Arc<Metrics>, closing: CancellationToken) {
    let mut backoff = BACKOFF_START;
    // Which node of the (shuffled) list to try next; every failure or lost link moves on.
    let mut next = 0;
    let mut failed_in_a_row = 0;
    while !closing.is_cancelled() {
        let uri = target.nodes.get(next);
        let node = nodes::node(uri);
        let connected = tokio::select! {
            connected = connect(uri, &target) => connected,
            () = closing.cancelled() => break,
        };
        let (link, mut events, declared) = match connected {
            Ok(connected) => connected,
            Err(error) => {
                next += 1;
                failed_in_a_row += 1;
                if failed_in_a_row < target.nodes.len() {
                    tracing::warn!(%node, %error, "broker node failed; trying the next one");
                    continue;
                }
                // Every node failed once in this round: back off before the next round.
                failed_in_a_row = 0;
                tracing::warn!(%node, %error, retry_in = ?backoff, "broker connection failed");
                let jittered = backoff.mul_f64(0.5 + fastrand::f64() / 2.0);
                tokio::select! {
                    () = tokio::time::sleep(jittered) => {}
                    () = closing.cancelled() => break,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        backoff = BACKOFF_START;
        failed_in_a_row = 0;
        let outdated = declared.outdated;
        tracing::info!(%node, migrated_messages = declared.moved, ?outdated, "broker connected, topology declared");
        metrics.migrated_messages.inc_by(declared.moved);
        metrics.queues_outdated.set(outdated.len() as i64);
        metrics.broker_connects.inc();
        metrics.broker_connected.set(1);
        metrics.broker_blocked.set(i64::from(link.blocked.borrow().is_some()));
        metrics.broker_node.get_or_create(&label("node", node.as_str())).set(1);
        state.send_replace(Some(link.clone()));

        let mut poll = tokio::time::interval(Duration::from_millis(500));
        let mut recheck = tokio::time::interval_at(tokio::time::Instant::now() + OUTDATED_RECHECK, OUTDATED_RECHECK);
        let reason = loop {
            tokio::select! {
                event = events.next() => match event {
                    // lapin reports channel-level refusals here too (a 404 of a passive
                    // declare, a consumer's or the publisher's channel closed by the
                    // broker): those channels are replaced by their owners.
                    Some(Event::Error(error)) if migrate::soft_code(&error).is_some() && link.connection.status().connected() => {
                        tracing::debug!(%error, "a channel was closed by the broker");
                    }
                    Some(Event::Error(error)) => break format!("connection error: {error}"),
                    Some(Event::ConnectionBlocked(why)) => {
                        tracing::warn!(%node, reason = %why, "broker blocked publishing (resource alarm): deliveries get 503 and /readyz 503 until it unblocks");
                        metrics.broker_blocked.set(1);
                        link.blocked.send_replace(Some(why));
                    }
                    Some(Event::ConnectionUnblocked) => {
                        tracing::info!(%node, "broker unblocked publishing");
                        metrics.broker_blocked.set(0);
                        link.blocked.send_replace(None);
                    }
                    Some(_) => {}
                    None => break "connection event stream ended".to_owned(),
                },
                () = link.broken.cancelled() => break "the publishing channel could not be replaced".to_owned(),
                _ = poll.tick() => {
                    if !link.connection.status().connected() {
                        break "connection closed".to_owned();
                    }
                }
                _ = recheck.tick(), if !outdated.is_empty() => {
                    // An outdated queue is rebuilt at connect time once nobody else consumes
                    // it: reconnect when that looks like the case.
                    if migrate::unused_by_others(&link.connection, &outdated, &target.topology.inbox, target.consumes_inbox).await {
                        break "rebuilding queues declared by an older version".to_owned();
                    }
                }
                () = closing.cancelled() => break "shutting down".to_owned(),
            }
        };
        state.send_replace(None);
        metrics.broker_connected.set(0);
        // The block was this connection's; the next one starts unblocked.
        metrics.broker_blocked.set(0);
        metrics.broker_node.get_or_create(&label("node", node.as_str())).set(0);
        // A node that dropped us may be going down: the next connection goes to another.
        next += 1;
        if closing.is_cancelled() {
            tracing::info!("closing broker connection");
        } else {
            tracing::warn!(%reason, "broker link lost; reconnecting");
        }
        // Best effort: the peer may already be gone.
        let _ = tokio::time::timeout(Duration::from_secs(2), link.connection.close(200, "relay reconnecting or stopping".into())).await;
    }
}

type EventStream = std::pin::Pin<Box<dyn futures::Stream<Item = Event> + Send>>;

/// Connects, declares (and migrates) the topology, opens the publishing channel. Only the
/// connection is under [`CONNECT_TIMEOUT`]: moving a large backlog left by an older version
/// takes as long as it takes (each batch has its own timeout, and heartbeats catch a dead
/// broker).
async fn connect(uri: &AMQPUri, target: &Target) -> lapin::Result<(Link, EventStream, migrate::Declared)> {
    let properties = ConnectionProperties::default().with_connection_name("openai-webhook-relay".into());
    let connection = tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect_uri(uri.clone(), properties))
        .await
        .unwrap_or_else(|_| Err(lapin::ErrorKind::IOError(Arc::new(std::io::ErrorKind::TimedOut.into())).into()))?;
    let events: EventStream = Box::pin(connection.events_listener());
    let declared = migrate::declare(&connection, &target.topology).await?;
    let channel = open_publisher(&connection).await?;
    // A block announced before the event listener existed shows only in lapin's status.
    let blocked = connection.status().blocked().then(|| "blocked when the connection opened".to_owned());
    let link = Link {
        connection: Arc::new(connection),
        publisher: Arc::new(Publisher { channel: RwLock::new(channel), replacing: tokio::sync::Mutex::new(()) }),
        broken: CancellationToken::new(),
        blocked: Arc::new(watch::Sender::new(blocked)),
    };
    Ok((link, events, declared))
}
