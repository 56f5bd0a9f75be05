//! The worker role: consumes the inbox and, for each delivery, fetches the object, normalizes
//! it into a CloudEvent, publishes it, and only then acks the inbox message.
//!
//! Up to `RELAY_FETCH_CONCURRENCY` deliveries are handled at once, each in its own task, so
//! a slow fetch never holds up the ones behind it. Every delivery ends in exactly one of:
//! published (ack), duplicate (ack), parked for retry (ack after the copy is confirmed),
//! or dead-lettered (ack after the copy is confirmed). A delivery is never acked before a
//! copy of it is confirmed somewhere, and never nacked while the process runs: when the
//! broker fails, the worker keeps the delivery and tries to park it again until it succeeds
//! or the delivery's channel is gone (then the broker has put it back already).

pub mod dedup;
pub mod release;
pub mod retry;

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use secrecy::SecretString;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, Span};

pub use dedup::{Claim, Dedup, Held, Store};
use retry::{Failure, RetryPolicy};

use crate::broker::{Broker, Link, PublishError};
use crate::envelope::{self, Envelope, EnvelopeError, ObjectKind};
use crate::gateway::reply;
use crate::fetch::{ApiClient, Fetched};
use crate::inbox::{HEADER_ATTEMPTS, HEADER_PROJECT, HEADER_TRACEPARENT, header, int_header};
use crate::metrics::{InFlight, Metrics, label};
use crate::normalize::{Enrichment, Object, normalize};
use crate::publish::{Context, EventPublisher};
use crate::telemetry;
use crate::topology::Topology;
use crate::verify::HEADER_ID;

/// Longest pause between two attempts to park a delivery while the broker fails.
const MOVE_RETRY_MAX: Duration = Duration::from_secs(30);

pub struct Worker {
    pub broker: Broker,
    pub topology: Topology,
    pub api: ApiClient,
    pub publisher: EventPublisher,
    pub metrics: Arc<Metrics>,
    pub dedup: Dedup,
    pub policy: RetryPolicy,
    /// API key and CloudEvent source by project (`None`: the default project).
    pub projects: HashMap<Option<String>, WorkerProject>,
    pub concurrency: usize,
    /// Largest CloudEvent the broker takes (`RELAY_MAX_MESSAGE_BYTES`).
    pub max_message_bytes: usize,
    /// The background-mode gateway, when `RELAY_REQUEST_QUEUE` is set.
    pub gateway: Option<crate::gateway::Settings>,
    /// Longest handling of one delivery (its fetches and publishes each have their own
    /// timeout, so only a hang reaches this): past it the handling is abandoned, its claims
    /// released, and the delivery retried like any failure.
    pub handle_limit: Duration,
}

/// What the worker needs of one OpenAI project.
pub struct WorkerProject {
    pub api_key: SecretString,
    pub source: String,
}

/// Which queue a delivery came from, and so how it is handled and where it is parked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lane {
    /// Verified webhooks.
    Inbox,
    /// Gateway requests (`<requests>`).
    Requests,
    /// Safety-net watches that came due (`<requests>.watch`).
    Watch,
}

/// How one delivery ended.
pub(crate) enum Disposition {
    Published,
    /// Settled by its handler (a watch parked again, a cancel of a response that had ended):
    /// ack, and the dedup claim is released rather than completed.
    Done,
    Duplicate,
    /// Another replica holds the claim on this delivery: look again later, no attempt used.
    Busy,
    Retry(Failure),
    Dead(Failure),
    /// The broker could not take the event (not connected, blocked by a resource alarm, not
    /// confirmed in time): park it
    /// without using an attempt, since nothing about the event itself failed.
    BrokerUnavailable(PublishError),
}

impl Worker {
    /// Consumes until `shutdown`; then stops taking deliveries, lets the ones in hand finish
    /// (the caller bounds how long), and returns.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let tasks = TaskTracker::new();
        let mut lanes = vec![(Lane::Inbox, self.topology.inbox.clone())];
        if let (Some(_), Some(requests), Some(watch)) = (&self.gateway, &self.topology.requests, self.topology.watch()) {
            lanes.push((Lane::Requests, requests.clone()));
            lanes.push((Lane::Watch, watch));
        }
        let consumers = lanes.into_iter().map(|(lane, queue)| Arc::clone(&self).run_lane(lane, queue, shutdown.clone(), tasks.clone()));
        let delay_queues = self.topology.delay_queues();
        tokio::join!(futures::future::join_all(consumers), release::run(&self.broker, &self.metrics, delay_queues, &shutdown, &tasks));
        tasks.close();
        tasks.wait().await;
    }

    /// Consumes `queue` on every link until `shutdown`.
    async fn run_lane(self: Arc<Self>, lane: Lane, queue: String, shutdown: CancellationToken, tasks: TaskTracker) {
        let (this, name, stop, tracker) = (&self, &queue, &shutdown, &tasks);
        let consume = move |link: Link| async move { this.consume(&link, lane, name, stop, tracker).await };
        self.broker.consume_on_every_link(&queue, &shutdown, consume).await;
    }

    async fn consume(self: &Arc<Self>, link: &Link, lane: Lane, queue: &str, shutdown: &CancellationToken, tasks: &TaskTracker) -> lapin::Result<()> {
        let channel = link.connection.create_channel().await?;
        // Twice the concurrency: the next deliveries are already here when a slot frees up.
        let prefetch = u16::try_from(self.concurrency * 2).unwrap_or(u16::MAX);
        channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
        let mut consumer = channel
            .basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await?;
        tracing::info!(%queue, prefetch, "consuming");
        let slots = Arc::new(Semaphore::new(self.concurrency));
        loop {
            let slot = tokio::select! {
                slot = slots.clone().acquire_owned() => slot.expect("semaphore is never closed"),
                () = shutdown.cancelled() => break,
            };
            let delivery = tokio::select! {
                delivery = consumer.next() => delivery,
                () = shutdown.cancelled() => break,
            };
            match delivery {
                Some(Ok(delivery)) => {
                    tasks.spawn(Arc::clone(self).handle(lane, delivery, slot, shutdown.clone()));
                }
                Some(Err(error)) => return Err(error),
                None => return Err(lapin::Error::from(lapin::ErrorKind::InvalidConnectionState(lapin::ConnectionState::Closed))),
            }
        }
        // Shutting down: no new deliveries; the ones in hand finish and ack on this channel.
        // Prefetched ones nobody took return to the queue when the connection closes.
        let _ = channel.basic_cancel(consumer.tag(), BasicCancelOptions::default()).await;
        tasks.close();
        tasks.wait().await;
        Ok(())
    }

    async fn handle(self: Arc<Self>, lane: Lane, delivery: Delivery, _slot: OwnedSemaphorePermit, shutdown: CancellationToken) {
        let _in_flight = InFlight::track(&self.metrics.deliveries_in_flight);
        let properties = &delivery.properties;
        let project = header(properties, HEADER_PROJECT).map(str::to_owned);
        let used = u32::try_from(int_header(properties, HEADER_ATTEMPTS).unwrap_or(0)).unwrap_or(0);
        let project_name = project.as_deref().unwrap_or("default");
        // Each handling boxed: the task's future is moved on spawn and into every wrapper,
        // and unboxed it was kilobytes (the fetch and publish within), a memmove that was an
        // eighth of the worker's CPU.
        let (span, work): (Span, BoxFuture<'_, Disposition>) = match lane {
            // Warn level, so that the ids stay on every warning and error at `RUST_LOG=warn`.
            // Also the trace's consumer span, continuing the trace of the inbox store. Made
            // once the envelope is parsed, with every field at once: the JSON log format
            // re-serializes a span's fields on every later record.
            Lane::Inbox => {
                let envelope = Envelope::parse(&delivery.data);
                let event = envelope.as_ref().ok();
                let webhook_id = header(properties, HEADER_ID);
                let queue = &self.topology.inbox;
                let span = tracing::warn_span!("deliver", otel.kind = telemetry::otel(|| "consumer"), otel.name = telemetry::otel(|| format!("process {queue}")), project = project_name, webhook_id = webhook_id.unwrap_or(""), event_id = event.map(|e| e.id.as_str()), event_type = event.map(|e| e.kind.as_str()), object_id = event.and_then(Envelope::subject), attempt = used + 1);
                telemetry::consumer(&span, queue, &delivery);
                (span, self.process(&delivery, envelope, project, webhook_id).boxed())
            }
            Lane::Requests => (gateway_span(lane, &delivery, project_name, used), crate::gateway::request::process(&self, &delivery, project, used + 1).boxed()),
            Lane::Watch => (gateway_span(lane, &delivery, project_name, used), crate::gateway::reconcile::process(&self, &delivery, project).boxed()),
        };
        async {
            // A panic is this delivery's failure, not the process's: it is dead-lettered with
            // the panic message, and its dedup claim is released on the way (see `claimed`).
            let disposition = match tokio::time::timeout(self.handle_limit, isolated(work, &self.metrics)).await {
                Ok(disposition) => disposition,
                Err(_) => self.abandoned(),
            };
            Box::pin(self.settle(lane, &delivery, used + 1, disposition, &shutdown)).await;
        }
        .instrument(span)
        .await;
    }

    /// A handling that outlived [`Worker::handle_limit`]: something hung (no timeout of ours
    /// fired). Dropping it released its dedup claims; the delivery counts an attempt, so one
    /// that hangs every time ends in the dead-letter queue with this reason.
    fn abandoned(&self) -> Disposition {
        self.metrics.abandoned.inc();
        let message = format!("handling the delivery took over {:?} and was abandoned", self.handle_limit);
        tracing::error!(limit = ?self.handle_limit, "handling the delivery hung; abandoned");
        Disposition::Retry(failure(None, "hung", message, None))
    }

    async fn process(&self, delivery: &Delivery, envelope: Result<Envelope, EnvelopeError>, project: Option<String>, webhook_id: Option<&str>) -> Disposition {
        let envelope = match envelope {
            Ok(envelope) => envelope,
            // The receiver checked this; only a message put into the inbox by hand gets here.
            Err(e) => return Disposition::Dead(failure(None, "invalid_envelope", e.to_string(), None)),
        };
        let Some(settings) = self.projects.get(&project) else {
            // The receivers know a project this worker does not: a deployment mistake that an
            // operator fixes, like a wrong key; retried, then dead-lettered.
            let message = format!("no API key for project {:?} in this worker", project.as_deref().unwrap_or("default"));
            return Disposition::Retry(failure(None, "unknown_project", message, None));
        };
        // The receiver always sets `webhook-id`; a message put into the inbox without one is
        // keyed by its event id rather than sharing one empty key with every other such message.
        let key = match webhook_id {
            Some(id) => format!("{}/{id}", project.as_deref().unwrap_or("")),
            None => format!("{}/event:{}", project.as_deref().unwrap_or(""), envelope.id),
        };
        let work = self.enrich_and_publish(delivery, &envelope, project.as_deref(), settings, webhook_id);
        claimed(self.dedup.store(), &key, work.boxed(), &self.metrics).await
    }

    async fn enrich_and_publish(
        &self,
        delivery: &Delivery,
        envelope: &Envelope,
        project: Option<&str>,
        settings: &WorkerProject,
        webhook_id: Option<&str>,
    ) -> Disposition {
        let raw_event = match envelope::raw(&delivery.data) {
            Ok(raw) => raw,
            // `Envelope::parse` accepts only what `raw` accepts; this stays a dead letter, not a panic.
            Err(e) => return Disposition::Dead(failure(None, "invalid_envelope", e.to_string(), None)),
        };
        let fetched = match envelope.target() {
            None => None,
            Some(target) => match self.api.fetch(target, &settings.api_key).await {
                Ok(fetched) => Some((target.kind, fetched)),
                Err(e) if e.is_retryable() => return Disposition::Retry(failure(e.status(), &e.reason(), e.to_string(), e.retry_after())),
                Err(e) => return Disposition::Dead(failure(e.status(), &e.reason(), e.to_string(), None)),
            },
        };
        let object = match &fetched {
            Some((kind, Fetched::Object(raw))) => Some(Object::read(*kind, raw)),
            _ => None,
        };
        let (enrichment, how) = match (&fetched, &object) {
            (_, Some(object)) => (Enrichment::Object(object), "object"),
            (Some((_, Fetched::Gone { message })), _) => (Enrichment::Gone { status: 404, message }, "gone"),
            _ => (Enrichment::None, "event_only"),
        };
        let cloud_event = match normalize(envelope, raw_event, &settings.source, enrichment, telemetry::traceparent(&Span::current()).as_deref()) {
            Ok(bytes) => bytes,
            Err(e) => return Disposition::Dead(failure(None, "normalize", e.to_string(), None)),
        };
        if cloud_event.len() > self.max_message_bytes {
            // The broker would close the channel on it (RabbitMQ 4.x takes 16 MiB by default):
            // dead-letter the small inbox message instead; it can be replayed once the
            // broker's `max_message_size` and RELAY_MAX_MESSAGE_BYTES allow it.
            let message = format!("the CloudEvent is {} bytes, over RELAY_MAX_MESSAGE_BYTES ({})", cloud_event.len(), self.max_message_bytes);
            return Disposition::Dead(failure(None, "too_large", message, None));
        }
        let traceparent = header(&delivery.properties, HEADER_TRACEPARENT);
        // A terminal event of a response created through the gateway: published once whichever
        // of the webhook and the safety net sees it first, and copied to its reply queue.
        let origin = match (&object, envelope.subject()) {
            (Some(object), Some(id)) if object.kind == ObjectKind::Response && reply::is_terminal(&envelope.kind) => reply::Origin::of(object).map(|o| (id, o)),
            _ => None,
        };
        let metadata = object.as_ref().map_or(&[][..], |object| &object.metadata);
        let context = Context { webhook_id, project, traceparent, metadata };
        let publish = async |reply: Option<&reply::ReplyTo>| match self.publisher.publish(envelope, context, &cloud_event, reply).await {
            Ok(()) => {
                self.metrics.events_published.get_or_create(&label("enrichment", how)).inc();
                // Debug: with its span's fields, this line was a tenth of the worker's CPU, and
                // `relay_events_published_total` counts what it would say.
                tracing::debug!(enrichment = how, "event published");
                Disposition::Published
            }
            Err(e) => publish_failed(e),
        };
        match origin {
            None => publish(None).await,
            Some((id, origin)) => claimed(self.dedup.store(), &reply::terminal_key(id), publish(origin.reply.as_ref()).boxed(), &self.metrics).await,
        }
    }

    /// Parks or dead-letters the delivery as `disposition` says, after `attempts` attempts,
    /// then acks it. A move the broker does not confirm is tried again, with a growing
    /// pause, for as long as the delivery is ours; the delivery is never nacked meanwhile
    /// (each redelivery would fetch again and count towards the inbox's delivery limit).
    async fn settle(&self, lane: Lane, delivery: &Delivery, attempts: u32, disposition: Disposition, shutdown: &CancellationToken) {
        let mut pause = Duration::from_secs(1);
        loop {
            let moved = self.move_out(lane, delivery, attempts, &disposition).await;
            match moved {
                Ok(()) => return self.ack(delivery).await,
                Err(error) if delivery.acker.poisoned() => {
                    // The channel it came on is gone, so the broker has put it back (a
                    // duplicate at most, if an earlier copy did get through).
                    tracing::warn!(%error, "broker failed and the delivery's channel is gone; it will be redelivered");
                    return;
                }
                Err(error) if shutdown.is_cancelled() => {
                    tracing::warn!(%error, "broker failed while shutting down; handing the delivery back");
                    let returned = delivery.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await;
                    return self.settled("nack", returned);
                }
                Err(error) => {
                    tracing::warn!(%error, retry_in = ?pause, "broker failed; keeping the delivery and trying again");
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        () = shutdown.cancelled() => {}
                    }
                    pause = (pause * 2).min(MOVE_RETRY_MAX);
                }
            }
        }
    }

    /// The broker-side half of settling: `Ok` once the delivery no longer needs the inbox.
    async fn move_out(&self, lane: Lane, delivery: &Delivery, attempts: u32, disposition: &Disposition) -> Result<(), PublishError> {
        let (target, dead) = match lane {
            Lane::Inbox => (self.topology.inbox.clone(), self.topology.dead()),
            Lane::Requests => (self.topology.requests.clone().unwrap_or_default(), self.topology.requests_dead().unwrap_or_default()),
            Lane::Watch => (self.topology.watch().unwrap_or_default(), self.topology.requests_dead().unwrap_or_default()),
        };
        let (used, delay, f) = match disposition {
            Disposition::Published | Disposition::Done => return Ok(()),
            Disposition::Duplicate => {
                self.metrics.duplicates.inc();
                tracing::info!("duplicate delivery skipped");
                return Ok(());
            }
            Disposition::Busy => {
                let delay = self.policy.initial.max(Duration::from_secs(1));
                tracing::info!(retry_in = ?delay, "the same delivery is being handled elsewhere; looking again later");
                let f = failure(None, "claimed_elsewhere", "another task or replica holds the dedup claim".into(), None);
                (attempts - 1, delay, f)
            }
            Disposition::BrokerUnavailable(e) => {
                let delay = self.policy.initial.max(Duration::from_secs(1));
                tracing::warn!(error.message = %e, retry_in = ?delay, "broker did not take the event; parking it");
                (attempts - 1, delay, failure(None, "broker_unavailable", e.to_string(), None))
            }
            Disposition::Retry(f) if attempts < self.policy.max_attempts => {
                let delay = self.policy.delay(attempts, f.retry_after);
                tracing::warn!(reason = %f.reason, error.message = %f.message, retry_in = ?delay, "will retry");
                (attempts, delay, f.clone())
            }
            Disposition::Retry(f) | Disposition::Dead(f) => {
                tracing::error!(reason = %f.reason, error.message = %f.message, attempts, "dead-lettered");
                return retry::dead_letter(&self.broker, &dead, &self.metrics, delivery, attempts, f).await;
            }
        };
        retry::park(&self.broker, &target, &self.metrics, delivery, used, delay, &f).await
    }

    async fn ack(&self, delivery: &Delivery) {
        let acked = delivery.acker.ack(BasicAckOptions::default()).await;
        self.settled("ack", acked);
    }

    /// Logs and counts a settle that did not reach the broker: lapin answers `Ok(false)`
    /// when the delivery's channel is gone, and the broker then redelivers the message.
    fn settled(&self, op: &'static str, result: lapin::Result<bool>) {
        let error = match result {
            Ok(true) => return,
            Ok(false) => "the delivery's channel is closed".to_owned(),
            Err(e) => e.to_string(),
        };
        self.metrics.settle_failures.get_or_create(&label("op", op)).inc();
        tracing::warn!(op, %error, "inbox settle did not reach the broker; the message will be redelivered");
    }
}

/// The span of a gateway message's handling; warn level like the inbox's `deliver`.
fn gateway_span(lane: Lane, delivery: &Delivery, project: &str, used: u32) -> Span {
    let message_id = delivery.properties.message_id().as_ref().map_or("", |id| id.as_str());
    tracing::warn_span!("gateway", ?lane, project, message_id, response_id = tracing::field::Empty, attempt = used + 1)
}

/// What a failed publish of an event means for its delivery.
pub(crate) fn publish_failed(e: PublishError) -> Disposition {
    match e {
        PublishError::Unroutable(_) => Disposition::Retry(failure(None, "unroutable", e.to_string(), None)),
        // Refused for this message (a consumer's full queue, a channel error): counts as
        // an attempt, so a message the broker never takes ends in the dead-letter queue.
        PublishError::Nacked | PublishError::Channel(_) => Disposition::Retry(failure(None, "broker_refused", e.to_string(), None)),
        PublishError::NotConnected | PublishError::Timeout(_) | PublishError::Blocked(_) => Disposition::BrokerUnavailable(e),
    }
}

/// Runs `work` under the dedup claim on `key`: only a published delivery completes the
/// claim, anything else (a panic, or this future dropped, included) releases it, so that a
/// later copy is handled. `work` comes boxed: unboxed, it would be stored in this future
/// and again in each wrapper within, and moved between them, kilobytes per delivery.
pub(crate) async fn claimed(store: Store<'_>, key: &str, work: BoxFuture<'_, Disposition>, metrics: &Metrics) -> Disposition {
    match store.claim(key).await {
        Claim::Fresh => {}
        Claim::Duplicate => return Disposition::Duplicate,
        Claim::Busy => return Disposition::Busy,
    }
    let held = Held::new(store, key);
    let disposition = isolated(work, metrics).await;
    match disposition {
        Disposition::Published => held.complete().await,
        _ => held.release().await,
    }
    disposition
}

/// A panic while handling a delivery is that delivery's failure, not the process's: it is
/// dead-lettered with the panic message instead of sitting unacked until the channel closes.
pub(crate) async fn isolated(work: impl Future<Output = Disposition>, metrics: &Metrics) -> Disposition {
    AssertUnwindSafe(work).catch_unwind().await.unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic without a message".to_owned());
        metrics.panics.inc();
        tracing::error!(panic = %message, "handling the delivery panicked");
        Disposition::Dead(failure(None, "panic", format!("the relay panicked handling this delivery: {message}"), None))
    })
}

pub(crate) fn failure(status: Option<u16>, reason: &str, message: String, retry_after: Option<Duration>) -> Failure {
    Failure { status, reason: reason.to_owned(), message, retry_after }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_dead_letters_its_delivery_and_releases_the_claim() {
        let memory = dedup::Memory::new(Duration::from_secs(60), 10);
        let metrics = Metrics::default();
        let store = Store::Memory(&memory);
        let work = async { panic!("ShortString exceeds maximum length") }.boxed();
        match claimed(store, "p/wh_1", work, &metrics).await {
            Disposition::Dead(f) => {
                assert_eq!(f.reason, "panic");
                assert!(f.message.contains("ShortString exceeds maximum length"), "{}", f.message);
            }
            _ => panic!("a panicking delivery must be dead-lettered"),
        }
        assert_eq!(metrics.panics.get(), 1);
        assert_eq!(store.claim("p/wh_1").await, Claim::Fresh, "the claim was released, so a later copy is handled");
    }

    #[tokio::test]
    async fn a_handling_dropped_midway_releases_its_claims() {
        let memory = dedup::Memory::new(Duration::from_secs(60), 10);
        let metrics = Metrics::default();
        let store = Store::Memory(&memory);
        // An outer claim with an inner one, like a terminal event under its webhook's claim,
        // whose work never ends: the worker's time limit drops it.
        let hung = claimed(store, "p/wh_3", claimed(store, "terminal/resp_3", std::future::pending().boxed(), &metrics).boxed(), &metrics);
        assert!(tokio::time::timeout(Duration::from_millis(20), hung).await.is_err());
        assert_eq!(store.claim("p/wh_3").await, Claim::Fresh, "the delivery's claim went with its handling");
        assert_eq!(store.claim("terminal/resp_3").await, Claim::Fresh, "and so did the nested one");
    }

    #[tokio::test]
    async fn an_id_in_flight_is_busy_and_only_a_published_one_is_a_duplicate() {
        let memory = dedup::Memory::new(Duration::from_secs(60), 10);
        let metrics = Metrics::default();
        let store = Store::Memory(&memory);
        let (release, held) = tokio::sync::oneshot::channel::<()>();
        let first = claimed(store, "p/wh_2", async move {
            let _ = held.await;
            Disposition::Published
        }.boxed(), &metrics);
        let second = async {
            let busy = claimed(store, "p/wh_2", async { Disposition::Published }.boxed(), &metrics).await;
            release.send(()).unwrap();
            busy
        };
        let (first, second) = tokio::join!(first, second);
        assert!(matches!(second, Disposition::Busy), "a copy of a delivery in flight is not acked as a duplicate");
        assert!(matches!(first, Disposition::Published));
        assert!(matches!(claimed(store, "p/wh_2", async { Disposition::Published }.boxed(), &metrics).await, Disposition::Duplicate));
    }
}
