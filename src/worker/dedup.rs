//! Skipping repeated deliveries of the same `webhook-id`.
//!
//! OpenAI may deliver an event twice, and a redelivered inbox message (after a lost ack)
//! would publish twice too. By default each worker process remembers recent ids in memory
//! (bounded by a window and a capacity), so duplicates are caught per process; with
//! `RELAY_DEDUP_REDIS_URL` the claim is shared by every replica. Either way consumers can
//! still see a repeat (delivery is at-least-once) and deduplicate by the CloudEvent `id`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;
use redis::aio::ConnectionManager;

/// What a claim on an id found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Ours to handle.
    Fresh,
    /// Already published: skip it.
    Duplicate,
    /// Another task or replica is handling it right now: try again later (if that replica
    /// dies, its claim expires and ours goes through).
    Busy,
}

/// Where claims go: in-process memory, or Redis once it answers. A relay configured with a
/// Redis that is down at start runs on memory meanwhile (a duplicate across replicas at
/// worst, never a refusal to start) and switches when Redis connects.
pub struct Dedup {
    memory: Memory,
    shared: Arc<OnceLock<Shared>>,
}

/// The store one delivery's claim lives in, fixed for the whole delivery so that its
/// `complete` or `release` reaches the store that holds its claim.
#[derive(Clone, Copy)]
pub enum Store<'a> {
    Memory(&'a Memory),
    Redis(&'a Shared),
}

impl Dedup {
    pub fn memory(memory: Memory) -> Self {
        Self { memory, shared: Arc::default() }
    }

    /// Memory at first, Redis as soon as `connect` succeeds; tried again every
    /// [`REDIS_RETRY`] until it does, with `fallback` at 1 meanwhile.
    pub fn redis<F, Fut>(memory: Memory, connect: F, fallback: Gauge) -> Self
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = redis::RedisResult<Shared>> + Send,
    {
        let shared = Arc::new(OnceLock::new());
        let slot = shared.clone();
        fallback.set(1);
        tokio::spawn(async move {
            loop {
                match tokio::time::timeout(REDIS_RETRY, connect()).await {
                    Ok(Ok(connected)) => {
                        let _ = slot.set(connected);
                        fallback.set(0);
                        tracing::info!("dedup uses Redis");
                        return;
                    }
                    Ok(Err(error)) => tracing::warn!(%error, retry_in = ?REDIS_RETRY, "RELAY_DEDUP_REDIS_URL: cannot reach Redis; dedup is per process until it answers"),
                    Err(_) => tracing::warn!(retry_in = ?REDIS_RETRY, "RELAY_DEDUP_REDIS_URL: Redis did not answer; dedup is per process until it does"),
                }
                tokio::time::sleep(REDIS_RETRY).await;
            }
        });
        Self { memory, shared }
    }

    pub fn store(&self) -> Store<'_> {
        match self.shared.get() {
            Some(shared) => Store::Redis(shared),
            None => Store::Memory(&self.memory),
        }
    }
}

/// A fresh claim in the hands of its handler. Dropped before [`Held::complete`] or
/// [`Held::release`] (its handling was abandoned after the worker's time limit, or its task
/// was dropped), it releases itself: a claim whose handler is gone would otherwise hold
/// every later copy of its delivery back as `Busy`, for good in memory.
pub struct Held<'a> {
    store: Store<'a>,
    key: &'a str,
    settled: bool,
}

impl<'a> Held<'a> {
    pub fn new(store: Store<'a>, key: &'a str) -> Self {
        Self { store, key, settled: false }
    }

    /// The claimed id was published: remember it.
    pub async fn complete(mut self) {
        self.store.complete(self.key).await;
        self.settled = true;
    }

    /// The claimed id was not published (it will be retried or dead-lettered): forget the
    /// claim, so that its next delivery is handled.
    pub async fn release(mut self) {
        self.store.release(self.key).await;
        self.settled = true;
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        match self.store {
            Store::Memory(m) => m.release(self.key),
            Store::Redis(r) => r.release_later(self.key),
        }
    }
}

/// Pause between attempts to reach a configured Redis that did not answer.
pub const REDIS_RETRY: Duration = Duration::from_secs(10);

impl Store<'_> {
    pub async fn claim(self, key: &str) -> Claim {
        match self {
            Self::Memory(m) => m.claim(key),
            Self::Redis(r) => r.claim(key).await,
        }
    }

    async fn complete(self, key: &str) {
        match self {
            Self::Memory(m) => m.complete(key),
            Self::Redis(r) => r.complete(key).await,
        }
    }

    /// Remembers `value` under `key` beside the claims (the gateway records each created
    /// response here before it acks the request), for as long as a published id.
    pub async fn record(self, key: &str, value: &str) {
        match self {
            Self::Memory(m) => m.record(key, value),
            Self::Redis(r) => r.record(key, value).await,
        }
    }

    /// What [`Store::record`] remembered under `key`.
    pub async fn recorded(self, key: &str) -> Option<String> {
        match self {
            Self::Memory(m) => m.recorded(key),
            Self::Redis(r) => r.recorded(key).await,
        }
    }

    async fn release(self, key: &str) {
        match self {
            Self::Memory(m) => m.release(key),
            Self::Redis(r) => r.release(key).await,
        }
    }
}

/// In-process memory of recent ids.
pub struct Memory {
    /// A std mutex: it is never held across an `.await`, and each use is a few map operations.
    state: Mutex<State>,
    window: Duration,
    capacity: usize,
}

#[derive(Default)]
struct State {
    /// `None` while a worker task handles the id, `Some(when)` once it was published.
    seen: HashMap<String, Option<Instant>>,
    /// Published ids, oldest first, for expiry.
    published: VecDeque<(Instant, String)>,
    /// Values recorded beside the claims, oldest first, bounded like the published ids.
    records: HashMap<String, String>,
    recorded: VecDeque<(Instant, String)>,
}

impl Memory {
    pub fn new(window: Duration, capacity: usize) -> Self {
        Self { state: Mutex::default(), window, capacity }
    }

    /// Only a published id is a duplicate. A second copy of an id still in flight is
    /// `Busy`: after a lost connection the first copy's ack goes to a dead channel, and if
    /// that copy then fails, the second is the only one left.
    fn claim(&self, id: &str) -> Claim {
        let mut state = self.state.lock().expect("dedup lock");
        let now = Instant::now();
        while let Some((at, _)) = state.published.front() {
            if now.duration_since(*at) <= self.window && state.published.len() <= self.capacity {
                break;
            }
            let (_, old) = state.published.pop_front().expect("front exists");
            state.seen.remove(&old);
        }
        match state.seen.get(id) {
            Some(Some(_)) => return Claim::Duplicate,
            Some(None) => return Claim::Busy,
            None => {}
        }
        state.seen.insert(id.to_owned(), None);
        Claim::Fresh
    }

    fn complete(&self, id: &str) {
        let mut state = self.state.lock().expect("dedup lock");
        let now = Instant::now();
        state.seen.insert(id.to_owned(), Some(now));
        state.published.push_back((now, id.to_owned()));
    }

    fn record(&self, key: &str, value: &str) {
        let mut state = self.state.lock().expect("dedup lock");
        let now = Instant::now();
        while let Some((at, _)) = state.recorded.front() {
            if now.duration_since(*at) <= self.window && state.recorded.len() < self.capacity {
                break;
            }
            let (_, old) = state.recorded.pop_front().expect("front exists");
            state.records.remove(&old);
        }
        if state.records.insert(key.to_owned(), value.to_owned()).is_none() {
            state.recorded.push_back((now, key.to_owned()));
        }
    }

    fn recorded(&self, key: &str) -> Option<String> {
        self.state.lock().expect("dedup lock").records.get(key).cloned()
    }

    fn release(&self, id: &str) {
        let mut state = self.state.lock().expect("dedup lock");
        if state.seen.get(id) == Some(&None) {
            state.seen.remove(id);
        }
    }
}

const KEY_PREFIX: &str = "openai-webhook-relay:dedup:";
const RECORD_PREFIX: &str = "openai-webhook-relay:record:";
const DONE: &str = "done";

/// Claims shared through Redis: `SET key pending:<worker> NX PX <pending_ttl>` before the
/// work, `done` with the long TTL after publishing, deleted (if still ours) on failure.
/// Redis trouble never blocks an event: the claim then counts as fresh (a possible
/// duplicate, never a loss) and a warning is logged.
#[derive(Clone)]
pub struct Shared {
    redis: ConnectionManager,
    /// Distinguishes this process's pending claims from other replicas'.
    owner: String,
    ttl: Duration,
    pending_ttl: Duration,
}

impl Shared {
    pub async fn connect(url: String, ttl: Duration, pending_ttl: Duration) -> redis::RedisResult<Self> {
        let redis = ConnectionManager::new(redis::Client::open(url)?).await?;
        Ok(Self { redis, owner: format!("pending:{:016x}", fastrand::u64(..)), ttl, pending_ttl })
    }

    async fn claim(&self, key: &str) -> Claim {
        let key = format!("{KEY_PREFIX}{key}");
        let mut redis = self.redis.clone();
        let claimed: redis::RedisResult<Option<String>> = redis::cmd("SET")
            .arg(&key)
            .arg(&self.owner)
            .arg("NX")
            .arg("PX")
            .arg(self.pending_ttl.as_millis() as u64)
            .query_async(&mut redis)
            .await;
        match claimed {
            Ok(Some(_)) => return Claim::Fresh,
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(%error, "dedup claim failed; handling the delivery anyway");
                return Claim::Fresh;
            }
        }
        match redis::cmd("GET").arg(&key).query_async::<Option<String>>(&mut redis).await {
            Ok(Some(value)) if value == DONE => Claim::Duplicate,
            Ok(Some(_)) => Claim::Busy,
            // The other claim expired just now: let the retry take it.
            Ok(None) => Claim::Busy,
            Err(error) => {
                tracing::warn!(%error, "dedup lookup failed; handling the delivery anyway");
                Claim::Fresh
            }
        }
    }

    async fn complete(&self, key: &str) {
        let mut redis = self.redis.clone();
        let done: redis::RedisResult<()> = redis::cmd("SET")
            .arg(format!("{KEY_PREFIX}{key}"))
            .arg(DONE)
            .arg("EX")
            .arg(self.ttl.as_secs())
            .query_async(&mut redis)
            .await;
        if let Err(error) = done {
            tracing::warn!(%error, "dedup could not record a published delivery");
        }
    }

    async fn record(&self, key: &str, value: &str) {
        let mut redis = self.redis.clone();
        let set: redis::RedisResult<()> = redis::cmd("SET").arg(format!("{RECORD_PREFIX}{key}")).arg(value).arg("EX").arg(self.ttl.as_secs()).query_async(&mut redis).await;
        if let Err(error) = set {
            tracing::warn!(%error, "dedup could not record a created response; a redelivery may create another");
        }
    }

    async fn recorded(&self, key: &str) -> Option<String> {
        let mut redis = self.redis.clone();
        match redis::cmd("GET").arg(format!("{RECORD_PREFIX}{key}")).query_async::<Option<String>>(&mut redis).await {
            Ok(value) => value,
            Err(error) => {
                tracing::warn!(%error, "dedup could not look up a created response");
                None
            }
        }
    }

    async fn release(&self, key: &str) {
        // Delete only our own pending claim, never another replica's or a `done`.
        let script = redis::Script::new("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0");
        let mut redis = self.redis.clone();
        let released: redis::RedisResult<i64> = script.key(format!("{KEY_PREFIX}{key}")).arg(&self.owner).invoke_async(&mut redis).await;
        if let Err(error) = released {
            tracing::warn!(%error, "dedup could not release a claim; it expires by itself");
        }
    }

    /// [`Shared::release`] from a destructor, which cannot wait: on its own task, if a runtime
    /// is still there to run it (else the claim expires by itself).
    fn release_later(&self, key: &str) {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (shared, key) = (self.clone(), key.to_owned());
            runtime.spawn(async move { shared.release(&key).await });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_published_id_is_refused_until_the_window_passes() {
        let d = Memory::new(Duration::from_millis(50), 10);
        assert_eq!(d.claim("wh_1"), Claim::Fresh);
        assert_eq!(d.claim("wh_1"), Claim::Busy, "in flight: not yet safe to drop");
        d.complete("wh_1");
        assert_eq!(d.claim("wh_1"), Claim::Duplicate, "published");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(d.claim("wh_1"), Claim::Fresh, "window passed");
    }

    #[test]
    fn a_released_id_can_be_claimed_again() {
        let d = Memory::new(Duration::from_secs(60), 10);
        assert_eq!(d.claim("wh_1"), Claim::Fresh);
        d.release("wh_1");
        assert_eq!(d.claim("wh_1"), Claim::Fresh);
    }

    #[test]
    fn a_recorded_value_is_kept_apart_from_claims_and_bounded() {
        let d = Memory::new(Duration::from_secs(60), 2);
        assert_eq!(d.recorded("rq/1"), None);
        d.record("rq/1", "resp_1");
        assert_eq!(d.claim("rq/1"), Claim::Fresh, "a record is no claim");
        assert_eq!(d.recorded("rq/1").as_deref(), Some("resp_1"));
        d.record("rq/2", "resp_2");
        d.record("rq/3", "resp_3");
        assert_eq!(d.recorded("rq/1"), None, "the oldest record went at the capacity");
        assert_eq!(d.recorded("rq/3").as_deref(), Some("resp_3"));
    }

    #[test]
    fn memory_is_bounded_by_capacity() {
        let d = Memory::new(Duration::from_secs(60), 3);
        for i in 0..10 {
            let id = format!("wh_{i}");
            assert_eq!(d.claim(&id), Claim::Fresh);
            d.complete(&id);
        }
        d.claim("next");
        let state = d.state.lock().unwrap();
        assert!(state.published.len() <= 3, "{}", state.published.len());
        assert!(state.seen.len() <= 4);
    }
}
