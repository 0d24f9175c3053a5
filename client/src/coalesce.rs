//! [`Coalesce`]: single-flight for identical concurrent calls, keyed by a caller-supplied key.

use std::{
    collections::HashMap,
    fmt,
    future::Future,
    hash::Hash,
    sync::{Arc, Mutex, MutexGuard},
};

use tokio::sync::watch;

/// Single-flight: concurrent [`run`](Coalesce::run)s with the same key share one execution. The first
/// caller (the *leader*) runs its closure (typically: take a lease and call the provider); every caller
/// that arrives while it runs (a *follower*) waits and gets a clone of the leader's result. So identical
/// concurrent calls take one lease and make one provider call.
///
/// Only calls that overlap are merged: once the leader finishes, the next call with that key starts a
/// new flight (this is not a cache).
///
/// Cheap to clone (an `Arc`); share one per kind of call. `T` is cloned once per follower: wrap large
/// results (or non-`Clone` errors) in an `Arc`.
///
/// ```no_run
/// # async fn f(client: slotd_client::Client) -> Result<(), slotd_client::Error> {
/// use slotd_client::Coalesce;
/// let flights: Coalesce<String, Result<String, String>> = Coalesce::new();
/// let prompt = "summarize README.md".to_owned();
/// let answer = flights
///     .run(prompt.clone(), || async {
///         let lease = client.acquire("anthropic").await.map_err(|e| e.to_string())?;
///         let answer = format!("answer to {prompt}"); // the provider call, under the lease
///         lease.release(slotd_client::Outcome::Ok).await.map_err(|e| e.to_string())?;
///         Ok(answer)
///     })
///     .await;
/// # let _ = answer; Ok(()) }
/// ```
pub struct Coalesce<K, T> {
    inner: Arc<Mutex<Flights<K, T>>>,
}

struct Flights<K, T> {
    by_key: HashMap<K, (u64, watch::Receiver<Option<T>>)>,
    next: u64,
}

impl<K, T> Clone for Coalesce<K, T> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone() }
    }
}

impl<K, T> Default for Coalesce<K, T> {
    fn default() -> Self {
        Self { inner: Arc::new(Mutex::new(Flights { by_key: HashMap::new(), next: 0 })) }
    }
}

impl<K, T> fmt::Debug for Coalesce<K, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Coalesce").field("in_flight", &lock(&self.inner).by_key.len()).finish()
    }
}

fn lock<K, T>(m: &Mutex<Flights<K, T>>) -> MutexGuard<'_, Flights<K, T>> {
    // The map is consistent between statements: a panic elsewhere cannot leave it half-changed.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The leader's hold on its flight: removes it when the leader finishes or is dropped, so that a
/// dropped leader's followers see the channel close and one of them takes over.
struct Leading<K: Eq + Hash, T> {
    flights: Arc<Mutex<Flights<K, T>>>,
    key: Option<K>,
    id: u64,
    tx: watch::Sender<Option<T>>,
}

impl<K: Eq + Hash, T> Drop for Leading<K, T> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            let mut flights = lock(&self.flights);
            if flights.by_key.get(&key).is_some_and(|(id, _)| *id == self.id) {
                flights.by_key.remove(&key);
            }
        }
    }
}

enum Role<K: Eq + Hash, T> {
    Leader(Leading<K, T>),
    Follower(watch::Receiver<Option<T>>),
}

impl<K, T> Coalesce<K, T>
where
    K: Eq + Hash + Clone,
    T: Clone,
{
    /// No flights yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many keys have a call in flight.
    pub fn in_flight(&self) -> usize {
        lock(&self.inner).by_key.len()
    }

    /// Runs `f` for `key`, unless a call with the same key is in flight: then waits for that call and
    /// returns a clone of its result. `f` is called at most once, and only if this caller runs the call.
    ///
    /// # Cancel safety
    /// Dropping a follower only stops its wait. Dropping the leader drops `f`'s future (and with it
    /// the lease it holds, which goes back as cancelled); one of the waiting followers then takes over
    /// and runs its own `f`, so no follower is left without a result.
    pub async fn run<F, Fut>(&self, key: K, f: F) -> T
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        let mut f = Some(f);
        loop {
            match self.join(&key) {
                Role::Leader(mut leading) => {
                    let f = f.take().expect("a caller runs the call at most once: it returns after");
                    let value = f().await;
                    leading.finish(value.clone());
                    return value;
                }
                Role::Follower(mut rx) => loop {
                    if let Some(v) = rx.borrow_and_update().as_ref() {
                        return v.clone();
                    }
                    if rx.changed().await.is_err() {
                        // The leader went away: its result, if it sent one just before, is still
                        // readable; otherwise run the call (or follow whoever got there first).
                        if let Some(v) = rx.borrow().as_ref() {
                            return v.clone();
                        }
                        break;
                    }
                },
            }
        }
    }

    fn join(&self, key: &K) -> Role<K, T> {
        let mut flights = lock(&self.inner);
        if let Some((_, rx)) = flights.by_key.get(key) {
            return Role::Follower(rx.clone());
        }
        flights.next += 1;
        let id = flights.next;
        let (tx, rx) = watch::channel(None);
        flights.by_key.insert(key.clone(), (id, rx));
        Role::Leader(Leading { flights: self.inner.clone(), key: Some(key.clone()), id, tx })
    }
}

impl<K: Eq + Hash, T> Leading<K, T> {
    /// Leaves the map first, so a call arriving now starts a new flight instead of joining a finished
    /// one; then publishes the result to the followers.
    fn finish(&mut self, value: T) {
        if let Some(key) = self.key.take() {
            let mut flights = lock(&self.flights);
            if flights.by_key.get(&key).is_some_and(|(id, _)| *id == self.id) {
                flights.by_key.remove(&key);
            }
        }
        self.tx.send_replace(Some(value));
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::{AtomicUsize, Ordering},
        time::Duration,
    };

    use tokio::time::sleep;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn concurrent_calls_with_one_key_share_one_run() {
        let flights: Coalesce<&str, u32> = Coalesce::new();
        let runs = Arc::new(AtomicUsize::new(0));
        let call = |key: &'static str, v: u32| {
            let (flights, runs) = (flights.clone(), runs.clone());
            tokio::spawn(async move {
                flights
                    .run(key, || async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        sleep(Duration::from_millis(100)).await;
                        v
                    })
                    .await
            })
        };
        let a = [call("k", 1), call("k", 2), call("k", 3)];
        let other = call("other", 9);
        tokio::task::yield_now().await;
        assert_eq!(flights.in_flight(), 2);
        let got: Vec<u32> = futures::future::join_all(a).await.into_iter().map(Result::unwrap).collect();
        // Everyone got the leader's value (the leader is whichever task ran first).
        assert!(got.iter().all(|v| *v == got[0]), "{got:?}");
        assert_eq!(other.await.unwrap(), 9);
        assert_eq!(runs.load(Ordering::SeqCst), 2, "one run per key");
        assert_eq!(flights.in_flight(), 0);
        // A later call is a new flight, not a cached answer.
        assert_eq!(call("k", 4).await.unwrap(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_follower_takes_over_when_the_leader_is_cancelled() {
        let flights: Coalesce<u8, &'static str> = Coalesce::new();
        let runs = Arc::new(AtomicUsize::new(0));
        let leader = {
            let (flights, runs) = (flights.clone(), runs.clone());
            tokio::spawn(async move {
                flights
                    .run(1, || async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        sleep(Duration::from_secs(3600)).await;
                        "leader"
                    })
                    .await
            })
        };
        tokio::task::yield_now().await;
        let follower = {
            let (flights, runs) = (flights.clone(), runs.clone());
            tokio::spawn(async move {
                flights
                    .run(1, || async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        sleep(Duration::from_millis(10)).await;
                        "follower"
                    })
                    .await
            })
        };
        tokio::task::yield_now().await;
        assert_eq!(runs.load(Ordering::SeqCst), 1, "the follower waits");
        leader.abort();
        assert!(leader.await.unwrap_err().is_cancelled());
        assert_eq!(follower.await.unwrap(), "follower", "it ran its own call");
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        assert_eq!(flights.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_follower_does_not_disturb_the_flight() {
        let flights: Coalesce<u8, u8> = Coalesce::new();
        let f2 = flights.clone();
        let leader = tokio::spawn(async move {
            f2.run(1, || async {
                sleep(Duration::from_millis(50)).await;
                7
            })
            .await
        });
        tokio::task::yield_now().await;
        let follower = flights.run(1, || async { 0 });
        let dropped = tokio::time::timeout(Duration::from_millis(10), follower).await;
        assert!(dropped.is_err(), "the follower was still waiting");
        assert_eq!(leader.await.unwrap(), 7);
        assert_eq!(flights.in_flight(), 0);
    }
}
