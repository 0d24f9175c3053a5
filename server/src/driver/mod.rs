//! The scheduler behind one lock: callers run each decision inline, a timer task keeps the deadlines.
//!
//! A gRPC handler (or an `Acquire` stream's poll) calls the synchronous [`Scheduler`] directly through
//! its [`DriverHandle`] (see [`handle`]), under a mutex held only for the decision and the routing of
//! its events: no hop to another task, so a request costs no cross-thread wake-up unless its events
//! are for another session. Each session's events go out on its own bounded channel; a client that
//! stops reading until that channel is full is disconnected, which releases its leases.
//!
//! The timer task ([`Driver::run`]) only sleeps until the scheduler's next deadline (expiry, wait
//! timeouts, pause ends, aging) and ticks it; an operation that moves the deadline earlier wakes it
//! through a [`Notify`].
//!
//! The scheduler's facts ([`Fact`]) are read once per decision, under the same lock so they stay in
//! order: logged, handed to the [`Observer`]s (metrics), and published to Watch subscribers (see
//! [`watch`]).

mod handle;
mod log_budget;
#[cfg(test)]
mod tests;
pub mod watch;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, Weak},
    time::Duration,
};

use tokio::{
    sync::{Notify, broadcast, mpsc, watch as watch_channel},
    time::Instant,
};
use tracing::{debug, info, warn};

pub use self::handle::{DrainCounts, DriverHandle, Outbound, PoolUpserted, Pools, Published, StreamOp};
use self::log_budget::{LogBudget, Refusals};
use crate::scheduler::{Decisions, Error, Fact, LeaseEnd, PoolId, PoolSnapshot, Scheduler, SessionId};

/// Something that reads every fact the scheduler emits, in order (metrics, for one).
pub trait Observer: Send {
    /// One fact, as the driver routes it.
    fn fact(&mut self, fact: &Fact);
}

struct SessionOut {
    events: mpsc::Sender<Outbound>,
    grace: Duration,
    /// The stream's budget of refusal log lines.
    log: LogBudget,
}

/// What the lock guards: the scheduler and everything that routes its decisions.
struct State {
    sched: Scheduler,
    sessions: HashMap<SessionId, SessionOut>,
    /// Sessions whose channel overflowed during routing; closed after the current decision.
    overflowed: Vec<SessionId>,
    /// Readers of every fact (see [`Driver::with_observer`]).
    observers: Vec<Box<dyn Observer>>,
    /// Watch subscribers. Nothing is built while nobody subscribes.
    watch: broadcast::Sender<Published>,
    /// Leases held and requests queued, republished after every decision (Drain follows it).
    counts: watch_channel::Sender<DrainCounts>,
    /// The deadline the timer task sleeps until; an earlier one wakes it.
    timer_at: Option<Instant>,
}

/// What every handle shares.
pub(crate) struct Shared {
    state: Mutex<State>,
    /// Wakes the timer task: the next deadline moved earlier, or the last handle is gone.
    timer: Arc<Notify>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.timer.notify_one();
    }
}

/// The scheduler's owner until serving starts; [`Driver::run`] is its timer task.
pub struct Driver {
    shared: Arc<Shared>,
}

impl Driver {
    /// Changes buffered per Watch subscriber; one that falls further behind gets a fresh snapshot.
    pub const WATCH_BUFFER: usize = 4096;

    /// A driver for this scheduler and a handle to reach it. Spawn [`Driver::run`].
    pub fn new(sched: Scheduler) -> (Self, DriverHandle) {
        let (watch, _) = broadcast::channel(Self::WATCH_BUFFER);
        let first = DrainCounts { leases: sched.lease_count(), queued: sched.waiter_count() };
        let (counts, counts_rx) = watch_channel::channel(first);
        let state = State {
            sched,
            sessions: HashMap::new(),
            overflowed: Vec::new(),
            observers: Vec::new(),
            watch,
            counts,
            timer_at: None,
        };
        let shared = Arc::new(Shared { state: Mutex::new(state), timer: Arc::new(Notify::new()) });
        (Self { shared: shared.clone() }, DriverHandle { shared, counts: counts_rx })
    }

    /// Hands every fact to `observer` from now on.
    pub fn with_observer(self, observer: impl Observer + 'static) -> Self {
        if let Ok(mut st) = self.shared.state.lock() {
            st.observers.push(Box::new(observer));
        }
        self
    }

    /// The timer task: ticks the scheduler at each deadline. Runs until every handle is dropped.
    ///
    /// # Panics
    /// When an operation panicked while holding the scheduler's lock (a bug): the scheduler's state
    /// can no longer be trusted, and the serving loop stops the daemon when this task ends.
    ///
    /// # Cancel safety
    /// Dropping this future stops the deadlines: no lease expires and no wait times out any more.
    pub async fn run(self) {
        let timer = self.shared.timer.clone();
        let weak: Weak<Shared> = Arc::downgrade(&self.shared);
        drop(self);
        loop {
            let Some(shared) = weak.upgrade() else { return };
            let next = shared.with(|st, now| {
                if st.sched.next_deadline().is_some_and(|at| at <= now) {
                    let d = st.sched.tick(now);
                    st.route(d);
                }
                st.timer_at = st.sched.next_deadline();
                st.timer_at
            });
            drop(shared);
            let Ok(next) = next else {
                panic!("a scheduler operation panicked; its state is not trustworthy any more");
            };
            match next {
                Some(at) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {}
                        () = timer.notified() => {}
                    }
                }
                None => timer.notified().await,
            }
        }
    }
}

impl Shared {
    /// Runs `f` on the state under the lock, then closes overflowed sessions, republishes the counts
    /// and wakes the timer if the next deadline moved earlier. `Err` only when an earlier operation
    /// panicked under the lock (the daemon is stopping then).
    fn with<T>(&self, f: impl FnOnce(&mut State, Instant) -> T) -> Result<T, Error> {
        let mut st = self.lock()?;
        let now = Instant::now();
        let out = f(&mut st, now);
        st.settle(now, &self.timer);
        Ok(out)
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>, Error> {
        self.state.lock().map_err(|_| {
            // Let the timer task see it and stop the daemon.
            self.timer.notify_one();
            Error::ShuttingDown
        })
    }
}

impl State {
    /// What every decision ends with (see [`Shared::with`]).
    fn settle(&mut self, now: Instant, timer: &Notify) {
        while let Some(session) = self.overflowed.pop() {
            warn!(session = session.0, "client is not reading its stream; disconnecting it");
            let error = Error::LimitExceeded("client fell too far behind reading its stream".into());
            self.close(now, session, Some(error));
        }
        let counts = self.counts();
        self.counts.send_if_modified(|c| std::mem::replace(c, counts) != counts);
        let next = self.sched.next_deadline();
        let earlier = match (next, self.timer_at) {
            (Some(n), Some(t)) => n < t,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if earlier {
            self.timer_at = next;
            timer.notify_one();
        }
    }

    fn open(&mut self, now: Instant, events: mpsc::Sender<Outbound>, grace: Duration) -> SessionId {
        let session = self.sched.open_session();
        self.sessions.insert(session, SessionOut { events, grace, log: LogBudget::new(now) });
        session
    }

    fn op(&mut self, now: Instant, session: SessionId, op: StreamOp) {
        if !self.sessions.contains_key(&session) {
            return;
        }
        let d = match op {
            StreamOp::Request(req) => self.sched.request(now, session, req),
            StreamOp::Cancel(id) => self.sched.cancel(now, session, &id),
            StreamOp::Heartbeat(ids) => self.sched.heartbeat(now, session, &ids),
            StreamOp::Release(id, outcome) => self.sched.release(now, session, id, outcome),
            StreamOp::Resume(req) => self.sched.resume(now, session, req),
            StreamOp::Invalid(event) => {
                let mut d = Decisions::default();
                d.push(session, event);
                d
            }
        };
        self.route(d);
    }

    /// Runs the deadlines that are due, so a read of the state does not show what already ended.
    fn catch_up(&mut self, now: Instant) {
        let d = self.sched.tick(now);
        self.route(d);
    }

    fn shutdown(&mut self, now: Instant) -> usize {
        let held = self.sched.lease_count();
        let d = self.sched.shutdown(now);
        self.route(d);
        // Replacing the sender closes every Watch subscription, so those streams end and graceful
        // shutdown need not wait out drain_timeout for them.
        self.watch = broadcast::channel(1).0;
        let sessions: Vec<(SessionId, SessionOut)> = self.sessions.drain().collect();
        for (session, out) in sessions {
            let _ = out.events.try_send(Box::new(Err(Error::ShuttingDown)));
            let d = self.sched.close_session(now, session, Duration::ZERO);
            self.route(d);
        }
        held
    }

    /// Routes the decisions of an operation that may be refused, and returns its result.
    fn routed<T>(&mut self, res: Result<(T, Decisions), Error>) -> Result<T, Error> {
        res.map(|(value, d)| {
            self.route(d);
            value
        })
    }

    fn counts(&self) -> DrainCounts {
        DrainCounts { leases: self.sched.lease_count(), queued: self.sched.waiter_count() }
    }

    fn pool_status(&self, pool: &PoolId) -> Option<PoolSnapshot> {
        self.sched.snapshot(Some(pool)).ok().and_then(|s| s.pools.into_iter().next())
    }

    fn close(&mut self, now: Instant, session: SessionId, error: Option<Error>) {
        let Some(out) = self.sessions.remove(&session) else {
            return;
        };
        if let Some(error) = error {
            let _ = out.events.try_send(Box::new(Err(error)));
        }
        let d = self.sched.close_session(now, session, out.grace);
        match out.log.suppressed() {
            0 => debug!(session = session.0, "stream closed"),
            suppressed => info!(
                session = session.0,
                suppressed, "stream closed; log lines about its refusals were held back"
            ),
        }
        self.route(d);
    }

    /// Reads the facts once (logs, observers, Watch), then sends each session its events.
    fn route(&mut self, d: Decisions) {
        let now = Instant::now();
        let watching = self.watch.receiver_count() > 0;
        let mut refusals = Refusals::default();
        for fact in d.facts {
            if !refusals.note(&fact) {
                log_fact(&fact, now);
            }
            for o in &mut self.observers {
                o.fact(&fact);
            }
            if watching && watched(&fact) {
                let status = match &fact {
                    Fact::Granted { .. }
                    | Fact::Ended { .. }
                    | Fact::Rejected { .. }
                    | Fact::Budget { .. } => None,
                    _ => fact.pool().and_then(|p| self.pool_status(p)),
                };
                let _ = self.watch.send(Published { at: now, fact, status });
            }
        }
        refusals.log(|s| self.sessions.get_mut(&s).map_or(Some(0), |o| o.log.allow(now)));
        for (session, event) in d.events {
            let Some(out) = self.sessions.get(&session) else {
                continue;
            };
            if let Err(mpsc::error::TrySendError::Full(_)) = out.events.try_send(Box::new(Ok(event))) {
                self.overflowed.push(session);
            }
        }
    }
}

/// Whether Watch shows this fact: a pause that moved nothing and a refused lease message are not
/// changes a dashboard follows.
fn watched(fact: &Fact) -> bool {
    match fact {
        Fact::Paused { extended, .. } => *extended,
        Fact::LeaseRefused { .. } => false,
        Fact::Budget { fact, .. } => !matches!(
            fact,
            crate::scheduler::BudgetFact::Reserved { .. } | crate::scheduler::BudgetFact::Settled { .. }
        ),
        _ => true,
    }
}

/// Structured logs, one line per fact, with the reason on every reclaim and pause. Refusals are
/// summed up per stream and rate-limited instead (see [`log_budget`]).
fn log_fact(fact: &Fact, now: Instant) {
    match fact {
        Fact::Granted { lease: l, .. } => {
            let request_id = l.request_id.as_ref().map_or("", |r| r.as_str());
            debug!(session = l.session.0, %request_id, lease_id = %l.id, pool = %l.pool, token = l.token.0, "granted");
        }
        Fact::Ended { lease: l, end: LeaseEnd::Expired(reason) } => {
            warn!(session = l.session.0, lease_id = %l.id, pool = %l.pool, ?reason, "lease reclaimed");
        }
        Fact::Ended { lease: l, end } => {
            debug!(session = l.session.0, lease_id = %l.id, pool = %l.pool, ?end, "lease ended");
        }
        Fact::Paused { pool, until, reason, extended: true } => {
            let secs = until.saturating_duration_since(now).as_secs_f64();
            warn!(%pool, %reason, pause_secs = secs, "pool paused; telling its waiters and holders");
        }
        Fact::Paused { pool, until, reason, extended: false } => {
            let secs = until.saturating_duration_since(now).as_secs_f64();
            info!(%pool, %reason, pause_secs = secs, "pause requested; the pool's pause already lasts at least that long");
        }
        Fact::Resumed { pool } => info!(%pool, "pool pause ended"),
        Fact::Effective { pool, limit } => info!(%pool, limit, "effective limit moved (adaptive headroom)"),
        Fact::PoolChanged { pool, change, reload } => info!(%pool, ?change, reload, "pool changed"),
        Fact::Budget { pool, fact: crate::scheduler::BudgetFact::ShadowWait { kind, level, would_wait } } => {
            info!(%pool, budget = kind.label(), %level, would_wait_secs = would_wait.as_secs_f64(), "shadow budget would have held a grant");
        }
        Fact::Budget { pool, fact } => debug!(%pool, ?fact, "budget"),
        // Logged through `Refusals` (route).
        Fact::Rejected { .. } | Fact::LeaseRefused { .. } => {}
    }
}
