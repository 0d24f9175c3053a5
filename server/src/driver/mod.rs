//! The one task that owns the [`Scheduler`], sleeps until its next deadline and routes its decisions.
//!
//! gRPC handlers talk to it through a [`DriverHandle`] (see [`handle`]): stream messages go over a
//! bounded channel (backpressure reaches the client's TCP window), stream closes over an unbounded one
//! (a `Drop` can always send them). Each session's events go out on its own bounded channel; a client
//! that stops reading until that channel is full is disconnected, which releases its leases.
//!
//! The scheduler's facts ([`Fact`]) are read here once per batch: logged, handed to the
//! [`Observer`]s (metrics), and published to Watch subscribers (see [`watch`]).

mod handle;
mod log_budget;
#[cfg(test)]
mod tests;
pub mod watch;

use std::{collections::HashMap, time::Duration};

use tokio::{
    sync::{broadcast, mpsc, watch as watch_channel},
    time::Instant,
};
use tracing::{debug, info, warn};

pub use self::handle::{
    DrainCounts, DriverHandle, OpSink, Outbound, PoolUpserted, Pools, Published, StreamOp,
};
use self::{
    handle::{Close, Command},
    log_budget::{LogBudget, Refusals},
};
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

/// The driver task's state.
pub struct Driver {
    sched: Scheduler,
    sessions: HashMap<SessionId, SessionOut>,
    commands: mpsc::Receiver<Command>,
    closes: mpsc::UnboundedReceiver<Close>,
    /// Sessions whose channel overflowed during routing; closed after the current batch.
    overflowed: Vec<SessionId>,
    /// Readers of every fact (see [`Driver::with_observer`]).
    observers: Vec<Box<dyn Observer>>,
    /// Watch subscribers. Nothing is built while nobody subscribes.
    watch: broadcast::Sender<Published>,
    /// Leases held and requests queued, republished after every wake-up (Drain follows it).
    counts: watch_channel::Sender<DrainCounts>,
}

impl Driver {
    /// Commands buffered between handlers and the driver.
    pub const COMMAND_BUFFER: usize = 8192;
    /// Changes buffered per Watch subscriber; one that falls further behind gets a fresh snapshot.
    pub const WATCH_BUFFER: usize = 4096;

    /// A driver for this scheduler and a handle to reach it. Spawn [`Driver::run`].
    pub fn new(sched: Scheduler) -> (Self, DriverHandle) {
        let (ctx, commands) = mpsc::channel(Self::COMMAND_BUFFER);
        let (close_tx, closes) = mpsc::unbounded_channel();
        let (watch, _) = broadcast::channel(Self::WATCH_BUFFER);
        let first = DrainCounts { leases: sched.lease_count(), queued: sched.waiter_count() };
        let (counts, counts_rx) = watch_channel::channel(first);
        let driver = Self {
            sched,
            sessions: HashMap::new(),
            commands,
            closes,
            overflowed: Vec::new(),
            observers: Vec::new(),
            watch,
            counts,
        };
        (driver, DriverHandle { commands: ctx, closes: close_tx, counts: counts_rx })
    }

    /// Hands every fact to `observer` from now on.
    pub fn with_observer(mut self, observer: impl Observer + 'static) -> Self {
        self.observers.push(Box::new(observer));
        self
    }

    /// Runs until every handle is dropped.
    ///
    /// # Cancel safety
    /// Dropping this future drops the scheduler: every stream ends and every lease is forgotten.
    pub async fn run(mut self) {
        let sleep = tokio::time::sleep_until(Instant::now() + Duration::from_secs(3600));
        tokio::pin!(sleep);
        loop {
            if let Some(at) = self.sched.next_deadline() {
                sleep.as_mut().reset(at);
            } else {
                sleep.as_mut().reset(Instant::now() + Duration::from_secs(3600));
            }
            tokio::select! {
                biased;
                Some(close) = self.closes.recv() => self.handle_close(close),
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => {
                        self.handle(cmd);
                        // Drain what is already waiting, so a burst costs one wake-up.
                        for _ in 0..256 {
                            match self.commands.try_recv() {
                                Ok(cmd) => self.handle(cmd),
                                Err(_) => break,
                            }
                        }
                    }
                    None => break,
                },
                () = &mut sleep => {
                    let d = self.sched.tick(Instant::now());
                    self.route(d);
                }
            }
            while let Some(session) = self.overflowed.pop() {
                warn!(session = session.0, "client is not reading its stream; disconnecting it");
                self.handle_close(Close {
                    session,
                    error: Some(Error::LimitExceeded("client fell too far behind reading its stream".into())),
                });
            }
            let now = self.counts();
            self.counts.send_if_modified(|c| std::mem::replace(c, now) != now);
        }
    }

    fn handle(&mut self, cmd: Command) {
        let now = Instant::now();
        match cmd {
            Command::Open { events, grace, reply } => {
                let session = self.sched.open_session();
                self.sessions.insert(session, SessionOut { events, grace, log: LogBudget::new(now) });
                if reply.send(session).is_err() {
                    self.handle_close(Close { session, error: None });
                }
            }
            Command::Op { session, op } => {
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
            Command::RateLimit { pool, retry_after, reason, reply } => {
                info!(%pool, ?retry_after, %reason, "rate limit reported");
                let res = self.sched.report_rate_limit(now, &pool, retry_after, &reason);
                let _ = reply.send(self.routed(res));
            }
            Command::ReportOutcome { pool, outcome, reason, reply } => {
                info!(%pool, outcome = outcome.label(), %reason, "provider outcome reported");
                let res = self.sched.report_outcome(now, &pool, outcome, &reason);
                let _ = reply.send(self.routed(res));
            }
            Command::ForceBreaker { pool, to, reason, reply } => {
                warn!(%pool, ?to, %reason, "circuit breaker forced by an operator");
                let res = self.sched.force_breaker(now, &pool, to, &reason);
                let _ = reply.send(self.routed(res));
            }
            Command::Status { pool, reply } => {
                let d = self.sched.tick(now);
                self.route(d);
                let _ = reply.send(self.sched.snapshot(pool.as_ref()));
            }
            Command::SetPools { pools, reply } => {
                let n = pools.len();
                let res = self.sched.set_pools(now, pools).map(|d| ((), d));
                let res = self.routed(res).map(|()| {
                    info!(pools = n, "pool configuration applied");
                    self.sched.pool_configs()
                });
                let _ = reply.send(res);
            }
            Command::Upsert { pool, patch, max_pools, reply } => {
                let res = self.sched.upsert_pool(now, pool.clone(), &patch, max_pools);
                let res = self.routed(res).map(|created| {
                    info!(%pool, created, "pool upserted by an operator");
                    let status = self.pool_status(&pool).expect("the pool was just upserted");
                    PoolUpserted { created, status, pools: self.sched.pool_configs() }
                });
                let _ = reply.send(res);
            }
            Command::Delete { pool, reply } => {
                let res = self.sched.delete_pool(now, &pool);
                let res = self.routed(res).map(|done| {
                    info!(%pool, ?done, "pool deleted by an operator");
                    (done, self.sched.pool_configs())
                });
                let _ = reply.send(res);
            }
            Command::Pause { pool, duration, reason, reply } => {
                info!(%pool, ?duration, %reason, "pool paused by an operator");
                let res = self.sched.pause_pool(now, &pool, duration, &reason);
                let _ = reply.send(self.routed(res));
            }
            Command::Resume { pool, reply } => {
                let res = self.sched.resume_pool(now, &pool);
                let res = self.routed(res);
                if let Ok(was_paused) = res {
                    info!(%pool, was_paused, "pool resumed by an operator");
                }
                let _ = reply.send(res);
            }
            Command::Revoke { lease, reply } => {
                let res = self.sched.revoke(now, lease);
                if let Ok((l, _)) = &res {
                    warn!(lease_id = %lease, pool = %l.pool, holder = %l.holder, "lease revoked by an operator");
                }
                let _ = reply.send(self.routed(res));
            }
            Command::Drain { on, reply } => {
                info!(draining = on, "operator drain");
                let d = self.sched.set_draining(now, on);
                self.route(d);
                let _ = reply.send(self.counts());
            }
            Command::Watch { pool, reply } => {
                let d = self.sched.tick(now);
                self.route(d);
                let res = self.sched.snapshot(pool.as_ref()).map(|s| (s, self.watch.subscribe()));
                let _ = reply.send(res);
            }
            Command::Shutdown { reply } => {
                let held = self.sched.lease_count();
                let d = self.sched.shutdown(now);
                self.route(d);
                // Replacing the sender closes every Watch subscription, so those streams end and
                // graceful shutdown need not wait out drain_timeout for them.
                self.watch = broadcast::channel(1).0;
                let sessions: Vec<(SessionId, SessionOut)> = self.sessions.drain().collect();
                for (session, out) in sessions {
                    let _ = out.events.try_send(Box::new(Err(Error::ShuttingDown)));
                    let d = self.sched.close_session(now, session, Duration::ZERO);
                    self.route(d);
                }
                let _ = reply.send(held);
            }
        }
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

    fn handle_close(&mut self, close: Close) {
        let Some(out) = self.sessions.remove(&close.session) else {
            return;
        };
        if let Some(error) = close.error {
            let _ = out.events.try_send(Box::new(Err(error)));
        }
        let d = self.sched.close_session(Instant::now(), close.session, out.grace);
        match out.log.suppressed() {
            0 => debug!(session = close.session.0, "stream closed"),
            suppressed => info!(
                session = close.session.0,
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
                    Fact::Granted { .. } | Fact::Ended { .. } | Fact::Rejected { .. } => None,
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
        Fact::Held { pool, lease_id, kind, until } => {
            let secs = until.saturating_duration_since(now).as_secs_f64();
            debug!(%pool, %lease_id, kind = kind.label(), secs, "slot held");
        }
        Fact::Breaker { pool, view, reason } => {
            info!(%pool, state = view.state.label(), epoch = view.epoch, %reason, "circuit breaker");
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
        Fact::HoldEnded { pool, kind } => debug!(%pool, kind = kind.label(), "hold ended"),
        Fact::Effective { pool, limit } => info!(%pool, limit, "effective limit moved (adaptive headroom)"),
        Fact::PoolChanged { pool, change, reload } => info!(%pool, ?change, reload, "pool changed"),
        // Logged through `Refusals` (route).
        Fact::Rejected { .. } | Fact::LeaseRefused { .. } => {}
    }
}
