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
    /// returns a clone of its result. `f` is called at most once, and only if this caller leads.
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
                    let f = f.take().expect("a caller leads at most once: it returns after");
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
                        // readable; otherwise lead (or follow whoever got there first).
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
