//! Skipping repeated deliveries of the same `webhook-id` within one worker process.
//!
//! OpenAI may deliver an event twice, and a redelivered inbox message (after a lost ack)
//! would publish twice too. Memory is bounded by a window and a capacity; across replicas
//! consumers still deduplicate by the CloudEvent `id` (delivery is at-least-once).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Dedup {
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
}

impl Dedup {
    pub fn new(window: Duration, capacity: usize) -> Self {
        Self { state: Mutex::default(), window, capacity }
    }

    /// Claims `id` for handling; `false` if it is being handled or was published recently.
    pub fn claim(&self, id: &str) -> bool {
        let mut state = self.state.lock().expect("dedup lock");
        let now = Instant::now();
        while let Some((at, _)) = state.published.front() {
            if now.duration_since(*at) <= self.window && state.published.len() <= self.capacity {
                break;
            }
            let (_, old) = state.published.pop_front().expect("front exists");
            state.seen.remove(&old);
        }
        if state.seen.contains_key(id) {
            return false;
        }
        state.seen.insert(id.to_owned(), None);
        true
    }

    /// The claimed id was published: remember it for the window.
    pub fn complete(&self, id: &str) {
        let mut state = self.state.lock().expect("dedup lock");
        let now = Instant::now();
        state.seen.insert(id.to_owned(), Some(now));
        state.published.push_back((now, id.to_owned()));
    }

    /// The claimed id was not published (it will be retried or dead-lettered): forget it,
    /// so that its next delivery is handled.
    pub fn release(&self, id: &str) {
        let mut state = self.state.lock().expect("dedup lock");
        if state.seen.get(id) == Some(&None) {
            state.seen.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_published_id_is_refused_until_the_window_passes() {
        let d = Dedup::new(Duration::from_millis(50), 10);
        assert!(d.claim("wh_1"));
        assert!(!d.claim("wh_1"), "in flight");
        d.complete("wh_1");
        assert!(!d.claim("wh_1"), "published");
        std::thread::sleep(Duration::from_millis(60));
        assert!(d.claim("wh_1"), "window passed");
    }

    #[test]
    fn a_released_id_can_be_claimed_again() {
        let d = Dedup::new(Duration::from_secs(60), 10);
        assert!(d.claim("wh_1"));
        d.release("wh_1");
        assert!(d.claim("wh_1"));
    }

    #[test]
    fn memory_is_bounded_by_capacity() {
        let d = Dedup::new(Duration::from_secs(60), 3);
        for i in 0..10 {
            let id = format!("wh_{i}");
            assert!(d.claim(&id));
            d.complete(&id);
        }
        d.claim("next");
        let state = d.state.lock().unwrap();
        assert!(state.published.len() <= 3, "{}", state.published.len());
        assert!(state.seen.len() <= 4);
    }
}
