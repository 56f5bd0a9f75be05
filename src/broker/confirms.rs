//! Telling each publish on the shared channel its own fate: stored, returned, or refused.
//!
//! A `basic.return` names no delivery tag. lapin hands a returned message to whichever
//! confirm the next ack frame completes first, and with a multiple ack that is any publish
//! of the batch: an unroutable publish is then told "acked" while a routed one is told
//! "returned" (seen here: 6 of 4000 concurrent publishes, half of them unroutable ones
//! reported stored, which is an acknowledged webhook lost). So the returned message itself
//! says whose it is: a publish is identified by what it carries (exchange, routing key,
//! `message_id`, body), and a collector task that owns every pending confirm of the channel
//! matches returns to publishes by that identity. Two publishes with the same identity are
//! the same message, so a return counted against either loses nothing.
//!
//! Two facts make the match complete. RabbitMQ sends a message's return before its ack, and
//! acks returned messages in publish order, so a return has been handed to some confirm by
//! the time its own publish is acked. And lapin completes all confirms of one ack frame
//! while holding its acknowledgement lock, which `wait_for_confirms` also takes: once the
//! collector got through that lock, every confirm of the frame is complete. The collector
//! then hears from every publish registered before that moment, looks at every completed
//! confirm, and only then gives verdicts. The test `concurrent_publishes_get_their_own_return`
//! checks all of this against the real broker.

use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use lapin::message::BasicReturnMessage;
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation, PublisherConfirm};
use tokio::sync::{mpsc, oneshot};

/// What became of one publish.
#[derive(Debug)]
pub enum Verdict {
    /// Confirmed, and not returned: stored in every queue it was routed to.
    Stored,
    /// Confirmed, but no queue took it (a `mandatory` publish).
    Returned,
    /// The broker refused it.
    Nacked,
    /// The channel failed before the broker answered.
    Failed(lapin::Error),
}

/// A confirm-mode channel whose publishes learn their own verdict.
pub struct ConfirmedChannel {
    channel: Channel,
    /// Publishes handed out so far; each sends exactly one [`Published`] to the collector.
    registered: Arc<AtomicU64>,
    published: mpsc::UnboundedSender<Published>,
}

/// A publish as the collector hears of it: its confirm, or why there is none.
struct Published {
    seq: u64,
    identity: u64,
    confirm: lapin::Result<PublisherConfirm>,
    verdict: oneshot::Sender<Verdict>,
}

impl ConfirmedChannel {
    /// Takes over `channel` (already in confirm mode) and starts its collector, which ends
    /// once this is dropped and the last pending confirm has its verdict.
    pub fn new(channel: Channel) -> Arc<Self> {
        let (published, heard) = mpsc::unbounded_channel();
        let registered = Arc::new(AtomicU64::new(0));
        let collector = Collector {
            channel: channel.clone(),
            registered: registered.clone(),
            heard,
            pending: FuturesUnordered::new(),
            heard_upto: 0,
            heard_above: BTreeSet::new(),
            returns: HashMap::new(),
        };
        tokio::spawn(collector.run());
        Arc::new(Self { channel, registered, published })
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Publishes, and resolves to the verdict. The publish runs in its own task: a caller
    /// that stops waiting (a timeout) must not drop a confirm that may hold another
    /// publish's return.
    pub fn publish(
        self: &Arc<Self>,
        exchange: &str,
        routing_key: &str,
        options: BasicPublishOptions,
        body: &[u8],
        properties: BasicProperties,
    ) -> oneshot::Receiver<Verdict> {
        let (verdict, outcome) = oneshot::channel();
        let identity = identity(exchange, routing_key, properties.message_id().as_ref().map(ShortString::as_str), body);
        let seq = self.registered.fetch_add(1, Ordering::SeqCst);
        let (this, exchange, routing_key, body) = (self.clone(), exchange.into(), routing_key.into(), body.to_vec());
        tokio::spawn(async move {
            let confirm = this.channel.basic_publish(exchange, routing_key, options, &body, properties).await;
            // The collector lives as long as any sender: this cannot fail.
            let _ = this.published.send(Published { seq, identity, confirm, verdict });
        });
        outcome
    }
}

/// What a message carries, hashed: the same for a publish and for its return.
fn identity(exchange: &str, routing_key: &str, message_id: Option<&str>, body: &[u8]) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    (exchange, routing_key, message_id, body).hash(&mut hasher);
    hasher.finish()
}

fn returned_identity(message: &BasicReturnMessage) -> u64 {
    let delivery = &message.delivery;
    let message_id = delivery.properties.message_id().as_ref().map(ShortString::as_str);
    identity(delivery.exchange.as_str(), delivery.routing_key.as_str(), message_id, &delivery.data)
}

type Completed = (u64, oneshot::Sender<Verdict>, lapin::Result<Confirmation>);

struct Collector {
    channel: Channel,
    registered: Arc<AtomicU64>,
    heard: mpsc::UnboundedReceiver<Published>,
    pending: FuturesUnordered<BoxFuture<'static, Completed>>,
    /// Every publish below this has been heard of; `heard_above` holds those heard of
    /// out of order beyond it.
    heard_upto: u64,
    heard_above: BTreeSet<u64>,
    /// Returns seen whose own publish has no verdict yet, by identity.
    returns: HashMap<u64, u32>,
}

impl Collector {
    async fn run(mut self) {
        loop {
            let first = tokio::select! {
                Some(published) = self.heard.recv() => {
                    self.hear(published);
                    continue;
                }
                Some(done) = self.pending.next(), if !self.pending.is_empty() => done,
                else => return,
            };
            // Through lapin's acknowledgement lock: the ack frame that completed `first` has
            // completed all its confirms, and handed out the returns that came before it.
            let _ = self.channel.wait_for_confirms().now_or_never();
            // A publish registered after this point was sent after that frame; one registered
            // before may hold one of its returns, so hear from each of them first.
            let registered = self.registered.load(Ordering::SeqCst);
            while self.heard_upto < registered {
                match self.heard.recv().await {
                    Some(published) => self.hear(published),
                    None => break,
                }
            }
            let mut batch = vec![first];
            while let Some(Some(done)) = self.pending.next().now_or_never() {
                batch.push(done);
            }
            self.judge(batch);
        }
    }

    fn hear(&mut self, published: Published) {
        self.heard_above.insert(published.seq);
        while self.heard_above.remove(&self.heard_upto) {
            self.heard_upto += 1;
        }
        let Published { identity, confirm, verdict, .. } = published;
        match confirm {
            Ok(confirm) => self.pending.push(confirm.map(move |result| (identity, verdict, result)).boxed()),
            Err(error) => {
                let _ = verdict.send(Verdict::Failed(error));
            }
        }
    }

    /// Gives each completed publish its verdict, once every return among them is counted.
    fn judge(&mut self, batch: Vec<Completed>) {
        for (_, _, result) in &batch {
            if let Ok(Confirmation::Ack(Some(message)) | Confirmation::Nack(Some(message))) = result {
                *self.returns.entry(returned_identity(message)).or_default() += 1;
            }
        }
        for (identity, verdict, result) in batch {
            let returned = self.take_return(identity);
            let outcome = match result {
                Err(error) => Verdict::Failed(error),
                Ok(Confirmation::Nack(_) | Confirmation::NotRequested) => Verdict::Nacked,
                Ok(Confirmation::Ack(_)) if returned => Verdict::Returned,
                Ok(Confirmation::Ack(_)) => Verdict::Stored,
            };
            // The caller may have stopped waiting (its timeout); the verdict then goes nowhere.
            let _ = verdict.send(outcome);
        }
    }

    fn take_return(&mut self, identity: u64) -> bool {
        let Some(count) = self.returns.get_mut(&identity) else { return false };
        *count -= 1;
        if *count == 0 {
            self.returns.remove(&identity);
        }
        true
    }
}
