//! Single flight: concurrent requests for the same thing share one piece of
//! work (an upstream read for L1, a TDengine query for a kline key).
//!
//! The work runs in its own task, so it finishes (and stores what it
//! fetched, and settles any breaker) even when every waiter has gone away,
//! and it removes its own entry when done: an abandoned flight never stays
//! in the map. A flight is joined only when its tag matches (the cache tags
//! each fill with the key's generation, so a read never joins a fill that
//! started before the last invalidation of its key).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::future::{BoxFuture, FutureExt, Shared};
use parking_lot::Mutex;

/// What every waiter of one flight awaits.
pub type Waiter<V> = Shared<BoxFuture<'static, V>>;

struct Flight<T, V> {
    id: u64,
    tag: T,
    waiter: Waiter<V>,
}

pub struct SingleFlight<K, T, V: Clone> {
    flights: Mutex<HashMap<K, Flight<T, V>>>,
    next_id: AtomicU64,
}

impl<K, T, V> Default for SingleFlight<K, T, V>
where
    V: Clone,
{
    fn default() -> Self {
        SingleFlight {
            flights: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        }
    }
}

impl<K, T, V> SingleFlight<K, T, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    T: PartialEq + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// The running flight for `key`, if its tag is `tag`.
    pub fn join(&self, key: &K, tag: &T) -> Option<Waiter<V>> {
        let flights = self.flights.lock();
        flights
            .get(key)
            .filter(|f| f.tag == *tag)
            .map(|f| f.waiter.clone())
    }

    /// Joins the flight for `key` if one with an equal `tag` is running
    /// (returns true as the second value), or starts `work` as the new one.
    /// `failed` turns a panic of the work into a value for the waiters.
    pub fn run(
        self: &Arc<Self>,
        key: K,
        tag: T,
        work: impl FnOnce() -> BoxFuture<'static, V>,
        failed: fn(String) -> V,
    ) -> (Waiter<V>, bool) {
        let mut flights = self.flights.lock();
        if let Some(f) = flights.get(&key) {
            if f.tag == tag {
                return (f.waiter.clone(), true);
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let task = tokio::spawn(work());
        let this = self.clone();
        let key2 = key.clone();
        let waiter = async move {
            let v = match task.await {
                Ok(v) => v,
                Err(e) => failed(format!("task failed: {e}")),
            };
            let mut flights = this.flights.lock();
            if flights.get(&key2).is_some_and(|f| f.id == id) {
                flights.remove(&key2);
            }
            v
        }
        .boxed()
        .shared();
        flights.insert(
            key,
            Flight {
                id,
                tag,
                waiter: waiter.clone(),
            },
        );
        drop(flights);
        // Someone must drive the removal even if every waiter is dropped.
        tokio::spawn(waiter.clone());
        (waiter, false)
    }

    /// Flights in the map (for tests and stats).
    pub fn len(&self) -> usize {
        self.flights.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn joins_equal_tags_and_cleans_up_abandoned_flights() {
        let sf: Arc<SingleFlight<u32, u64, u32>> = Arc::default();
        let (gate_tx, gate_rx) = tokio::sync::oneshot::channel::<()>();
        let (a, joined_a) = sf.run(
            1,
            7,
            || {
                async move {
                    let _ = gate_rx.await;
                    42
                }
                .boxed()
            },
            |_| 0,
        );
        let (b, joined_b) = sf.run(1, 7, || async { 99 }.boxed(), |_| 0);
        assert!(!joined_a && joined_b);
        // Another tag (an invalidation came in between) starts its own flight.
        let (c, joined_c) = sf.run(1, 8, || async { 5 }.boxed(), |_| 0);
        assert!(!joined_c);
        assert_eq!(c.await, 5);
        // Every waiter of the first flight goes away; the flight still ends
        // and leaves no entry behind.
        drop((a, b));
        gate_tx.send(()).unwrap();
        for _ in 0..100 {
            if sf.is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("an abandoned flight stayed in the map");
    }

    #[tokio::test]
    async fn a_panicking_flight_answers_its_waiters() {
        let sf: Arc<SingleFlight<u32, (), String>> = Arc::default();
        let (w, _) = sf.run(1, (), || async { panic!("boom") }.boxed(), |e| e);
        assert!(w.await.contains("task failed"));
    }
}
