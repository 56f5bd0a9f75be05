//! The worker role: consumes the inbox and, for each delivery, fetches the object, normalizes
//! it into a CloudEvent, publishes it, and only then acks the inbox message.
//!
//! Up to `RELAY_FETCH_CONCURRENCY` deliveries are handled at once, each in its own task, so
//! a slow fetch never holds up the ones behind it. Every delivery ends in exactly one of:
//! published (ack), duplicate (ack), parked for retry (ack after the copy is confirmed),
//! dead-lettered (ack after the copy is confirmed), or, when the broker itself fails,
//! left unacked so RabbitMQ redelivers it.

pub mod dedup;
pub mod retry;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use secrecy::SecretString;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, Span};

pub use dedup::{Claim, Dedup};
use retry::{Failure, RetryPolicy};

use crate::broker::{Broker, Link, PublishError};
use crate::envelope::{self, Envelope};
use crate::fetch::{ApiClient, Fetched};
use crate::inbox::{HEADER_ATTEMPTS, HEADER_PROJECT, HEADER_TRACEPARENT, header, int_header};
use crate::metrics::{InFlight, Metrics, label};
use crate::normalize::{Enrichment, normalize};
use crate::publish::EventPublisher;
use crate::topology::Topology;
use crate::verify::HEADER_ID;

/// Pause before a delivery that met a broker failure is handed back, so a broken broker
/// does not turn into a hot redelivery loop.
const BROKER_FAILURE_PAUSE: Duration = Duration::from_secs(1);

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
}

/// What the worker needs of one OpenAI project.
pub struct WorkerProject {
    pub api_key: SecretString,
    pub source: String,
}

/// How one delivery ended.
enum Disposition {
    Published,
    Duplicate,
    /// Another replica holds the claim on this delivery: look again later, no attempt used.
    Busy,
    Retry(Failure),
    Dead(Failure),
    BrokerFailed(PublishError),
}

impl Worker {
    /// Consumes until `shutdown`; then stops taking deliveries, lets the ones in hand finish
    /// (the caller bounds how long), and returns.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let tasks = TaskTracker::new();
        let mut links = self.broker.subscribe();
        while !shutdown.is_cancelled() {
            let link = tokio::select! {
                changed = links.wait_for(Option::is_some) => match changed {
                    Ok(link) => link.clone().expect("waited for Some"),
                    Err(_) => break,
                },
                () = shutdown.cancelled() => break,
            };
            if let Err(error) = self.consume(&link, &shutdown, &tasks).await {
                tracing::warn!(%error, "inbox consumer stopped; re-attaching");
                link.report_broken();
                tokio::select! {
                    () = tokio::time::sleep(BROKER_FAILURE_PAUSE) => {}
                    () = shutdown.cancelled() => {}
                }
            }
        }
        tasks.close();
        tasks.wait().await;
    }

    async fn consume(self: &Arc<Self>, link: &Link, shutdown: &CancellationToken, tasks: &TaskTracker) -> lapin::Result<()> {
        let channel = link.connection.create_channel().await?;
        // Twice the concurrency: the next deliveries are already here when a slot frees up.
        let prefetch = u16::try_from(self.concurrency * 2).unwrap_or(u16::MAX);
        channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
        let mut consumer = channel
            .basic_consume(self.topology.inbox.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await?;
        tracing::info!(queue = %self.topology.inbox, prefetch, "consuming the inbox");
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
                    tasks.spawn(Arc::clone(self).handle(delivery, slot));
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

    async fn handle(self: Arc<Self>, delivery: Delivery, _slot: OwnedSemaphorePermit) {
        let _in_flight = InFlight::track(&self.metrics.deliveries_in_flight);
        let properties = &delivery.properties;
        let webhook_id = header(properties, HEADER_ID).unwrap_or_default().to_owned();
        let project = header(properties, HEADER_PROJECT).map(str::to_owned);
        let used = u32::try_from(int_header(properties, HEADER_ATTEMPTS).unwrap_or(0)).unwrap_or(0);
        let span = tracing::info_span!("deliver", project = project.as_deref().unwrap_or("default"), %webhook_id, event_id = tracing::field::Empty, event_type = tracing::field::Empty, object_id = tracing::field::Empty, attempt = used + 1);
        async move {
            let disposition = self.process(&delivery, project, &webhook_id).await;
            self.settle(&delivery, used + 1, disposition).await;
        }
        .instrument(span)
        .await;
    }

    async fn process(&self, delivery: &Delivery, project: Option<String>, webhook_id: &str) -> Disposition {
        let envelope = match Envelope::parse(&delivery.data) {
            Ok(envelope) => envelope,
            // The receiver checked this; only a message put into the inbox by hand gets here.
            Err(e) => return Disposition::Dead(failure(None, "invalid_envelope", e.to_string(), None)),
        };
        let span = Span::current();
        span.record("event_id", envelope.id.as_str());
        span.record("event_type", envelope.kind.as_str());
        if let Some(subject) = envelope.subject() {
            span.record("object_id", subject);
        }
        let Some(settings) = self.projects.get(&project) else {
            // The receivers know a project this worker does not: a deployment mistake that an
            // operator fixes, like a wrong key; retried, then dead-lettered.
            let message = format!("no API key for project {:?} in this worker", project.as_deref().unwrap_or("default"));
            return Disposition::Retry(failure(None, "unknown_project", message, None));
        };
        let key = format!("{}/{webhook_id}", project.as_deref().unwrap_or(""));
        match self.dedup.claim(&key).await {
            Claim::Fresh => {}
            Claim::Duplicate => return Disposition::Duplicate,
            Claim::Busy => return Disposition::Busy,
        }
        let disposition = self.enrich_and_publish(delivery, &envelope, project.as_deref(), settings, webhook_id).await;
        match disposition {
            Disposition::Published => self.dedup.complete(&key).await,
            _ => self.dedup.release(&key).await,
        }
        disposition
    }

    async fn enrich_and_publish(
        &self,
        delivery: &Delivery,
        envelope: &Envelope,
        project: Option<&str>,
        settings: &WorkerProject,
        webhook_id: &str,
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
        let (enrichment, how) = match &fetched {
            None => (Enrichment::None, "event_only"),
            Some((kind, Fetched::Object(object))) => (Enrichment::Object(*kind, object), "object"),
            Some((_, Fetched::Gone { message })) => (Enrichment::Gone { status: 404, message }, "gone"),
        };
        let cloud_event = match normalize(envelope, raw_event, &settings.source, enrichment) {
            Ok(bytes) => bytes,
            Err(e) => return Disposition::Dead(failure(None, "normalize", e.to_string(), None)),
        };
        let traceparent = header(&delivery.properties, HEADER_TRACEPARENT);
        match self.publisher.publish(envelope, webhook_id, project, traceparent, &cloud_event).await {
            Ok(()) => {
                self.metrics.events_published.get_or_create(&label("enrichment", how)).inc();
                tracing::info!(enrichment = how, "event published");
                Disposition::Published
            }
            Err(e @ PublishError::Unroutable(_)) => Disposition::Retry(failure(None, "unroutable", e.to_string(), None)),
            Err(e) => Disposition::BrokerFailed(e),
        }
    }

    /// Acks, parks, dead-letters or hands back the delivery, after `attempts` attempts.
    async fn settle(&self, delivery: &Delivery, attempts: u32, disposition: Disposition) {
        let moved = match disposition {
            Disposition::Published => Ok(()),
            Disposition::Duplicate => {
                self.metrics.duplicates.inc();
                tracing::info!("duplicate delivery skipped");
                Ok(())
            }
            Disposition::Busy => {
                let delay = self.policy.initial.max(Duration::from_secs(1));
                tracing::info!(retry_in = ?delay, "another replica is handling this delivery; looking again later");
                let f = failure(None, "claimed_elsewhere", "another replica holds the dedup claim".into(), None);
                retry::park(&self.broker, &self.topology, &self.metrics, delivery, attempts - 1, delay, &f).await
            }
            Disposition::Retry(f) if attempts < self.policy.max_attempts => {
                let delay = self.policy.delay(attempts, f.retry_after);
                tracing::warn!(reason = %f.reason, error.message = %f.message, retry_in = ?delay, "will retry");
                retry::park(&self.broker, &self.topology, &self.metrics, delivery, attempts, delay, &f).await
            }
            Disposition::Retry(f) | Disposition::Dead(f) => {
                tracing::error!(reason = %f.reason, error.message = %f.message, attempts, "dead-lettered");
                retry::dead_letter(&self.broker, &self.topology, &self.metrics, delivery, attempts, &f).await
            }
            Disposition::BrokerFailed(e) => Err(e),
        };
        match moved {
            Ok(()) => {
                if let Err(error) = delivery.acker.ack(BasicAckOptions::default()).await {
                    // The broker redelivers it; the dedup window or consumers catch the repeat.
                    tracing::warn!(%error, "inbox ack failed");
                }
            }
            Err(error) => {
                tracing::warn!(%error, "broker failed; handing the delivery back");
                tokio::time::sleep(BROKER_FAILURE_PAUSE).await;
                let _ = delivery.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await;
            }
        }
    }
}

fn failure(status: Option<u16>, reason: &str, message: String, retry_after: Option<Duration>) -> Failure {
    Failure { status, reason: reason.to_owned(), message, retry_after }
}
