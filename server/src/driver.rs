//! The one task that owns the [`Scheduler`], sleeps until its next deadline and routes its decisions.
//!
//! gRPC handlers talk to it through a [`DriverHandle`]: stream messages go over a bounded channel
//! (backpressure reaches the client's TCP window), stream closes over an unbounded one (a `Drop` can
//! always send them). Each session's events go out on its own bounded channel; a client that stops
//! reading until that channel is full is disconnected, which releases its leases.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    sync::{broadcast, mpsc, oneshot},
    time::Instant,
};
use tokio_util::sync::PollSender;
use tracing::{debug, info, warn};

use crate::scheduler::{
    Decisions, Ended, Error, Event, ExpiryReason, Lease, LeaseId, NewRequest, Observed, Outcome,
    PauseApplied, PoolConfig, PoolDeleted, PoolId, PoolPatch, PoolSnapshot, ResumeRequest, Scheduler,
    SessionId, Snapshot,
};

/// What a session's event channel carries: an event, or the error that ends the stream.
///
/// Boxed because a tokio channel allocates its slots 32 at a time: unboxed, that block (about 4 KiB)
/// was the largest single cost of an idle session; boxed it is 256 bytes.
pub type Outbound = Box<Result<Event, Error>>;

/// A change published to Watch subscribers (see [`DriverHandle::watch`]).
#[derive(Clone, Debug)]
pub enum WatchEvent {
    /// A lease was granted.
    Granted(Lease),
    /// A lease was released by its holder (or its stream closed: `outcome` is `None`).
    Released(Lease, Option<Outcome>),
    /// A lease expired, was revoked or lost its pool.
    Expired(Lease, ExpiryReason),
    /// A pool was paused (or its pause extended).
    Paused {
        /// The pool.
        pool: PoolId,
        /// Until when.
        until: Instant,
        /// Why.
        reason: Arc<str>,
        /// The pool after the change.
        status: Option<PoolSnapshot>,
    },
    /// A pool's pause ended.
    Resumed {
        /// The pool.
        pool: PoolId,
        /// The pool after the change.
        status: Option<PoolSnapshot>,
    },
    /// A pool was created, changed or removed, or its effective limit moved.
    LimitChanged {
        /// The pool.
        pool: PoolId,
        /// What happened.
        detail: String,
        /// The pool after the change; `None` once removed.
        status: Option<PoolSnapshot>,
    },
    /// A request was refused or gave up.
    Rejected {
        /// Its pool, when the error names one.
        pool: Option<PoolId>,
        /// Why.
        error: Error,
    },
}

impl WatchEvent {
    /// The pool it concerns, when there is one (for Watch's pool filter).
    pub fn pool(&self) -> Option<&PoolId> {
        match self {
            WatchEvent::Granted(l) | WatchEvent::Released(l, _) | WatchEvent::Expired(l, _) => Some(&l.pool),
            WatchEvent::Paused { pool, .. }
            | WatchEvent::Resumed { pool, .. }
            | WatchEvent::LimitChanged { pool, .. } => Some(pool),
            WatchEvent::Rejected { pool, .. } => pool.as_ref(),
        }
    }
}

/// Every pool's settings, by name.
pub type Pools = BTreeMap<PoolId, PoolConfig>;

/// A published change and when it happened.
pub type Published = (Instant, WatchEvent);

/// A message from one stream to the scheduler.
#[derive(Debug)]
pub enum StreamOp {
    /// Ask for a slot.
    Request(NewRequest),
    /// Withdraw a queued request.
    Cancel(String),
    /// Renew leases (all when empty).
    Heartbeat(Vec<LeaseId>),
    /// Give a lease back.
    Release(LeaseId, Outcome),
    /// Re-attach a lease.
    Resume(ResumeRequest),
    /// Input that failed conversion: deliver this event (in order with the others) and change nothing.
    Invalid(Event),
}

enum Command {
    Open {
        events: mpsc::Sender<Outbound>,
        grace: Duration,
        reply: oneshot::Sender<SessionId>,
    },
    Op {
        session: SessionId,
        op: StreamOp,
    },
    RateLimit {
        pool: PoolId,
        retry_after: Option<Duration>,
        reason: String,
        reply: oneshot::Sender<Result<PauseApplied, Error>>,
    },
    Status {
        pool: Option<PoolId>,
        reply: oneshot::Sender<Result<Snapshot, Error>>,
    },
    SetPools {
        pools: BTreeMap<PoolId, PoolConfig>,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    Shutdown {
        reply: oneshot::Sender<usize>,
    },
    Admin(AdminOp),
}

/// An operator's command (the Admin service).
enum AdminOp {
    Upsert {
        pool: PoolId,
        patch: PoolPatch,
        max_pools: usize,
        reply: oneshot::Sender<Result<PoolUpserted, Error>>,
    },
    Delete {
        pool: PoolId,
        reply: oneshot::Sender<Result<(PoolDeleted, Pools), Error>>,
    },
    Pause {
        pool: PoolId,
        duration: Duration,
        reason: String,
        reply: oneshot::Sender<Result<Instant, Error>>,
    },
    Resume {
        pool: PoolId,
        reply: oneshot::Sender<Result<bool, Error>>,
    },
    Revoke {
        lease: LeaseId,
        reply: oneshot::Sender<Result<Lease, Error>>,
    },
    Drain {
        on: bool,
        reply: oneshot::Sender<DrainCounts>,
    },
    Counts {
        reply: oneshot::Sender<DrainCounts>,
    },
    Watch {
        pool: Option<PoolId>,
        reply: oneshot::Sender<Result<(Snapshot, broadcast::Receiver<Published>), Error>>,
    },
}

/// What an upsert did.
#[derive(Clone, Debug)]
pub struct PoolUpserted {
    /// The pool did not exist before.
    pub created: bool,
    /// The pool now.
    pub status: PoolSnapshot,
    /// Every pool's settings now (what the state file records).
    pub pools: Pools,
}

/// How far a drain has come.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct DrainCounts {
    /// Leases still held.
    pub leases: usize,
    /// Requests still queued.
    pub queued: usize,
}

/// Why a stream ended, sent on the close channel.
#[derive(Debug)]
struct Close {
    session: SessionId,
    error: Option<Error>,
}

/// A cheap, cloneable handle to the driver task.
#[derive(Clone, Debug)]
pub struct DriverHandle {
    commands: mpsc::Sender<Command>,
    closes: mpsc::UnboundedSender<Close>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Command")
    }
}

impl DriverHandle {
    /// Registers a stream whose events go to `events`. With a non-zero `grace`, its leases outlive the
    /// stream for that long so that a reconnecting client can resume them.
    ///
    /// # Cancel safety
    /// Cancel safe in effect: if cancelled after the driver registered the session, the session's
    /// event channel is dropped with the future, and the driver closes the session on its next send.
    pub async fn open(&self, events: mpsc::Sender<Outbound>, grace: Duration) -> Result<SessionId, Error> {
        let (reply, rx) = oneshot::channel();
        self.call(Command::Open { events, grace, reply }, rx).await
    }

    /// A sink for `session`'s stream messages that can be driven from a `poll` function, so one task
    /// can both read a stream and write its events (see `grpc::session`).
    pub fn op_sink(&self, session: SessionId) -> OpSink {
        OpSink { commands: PollSender::new(self.commands.clone()), session }
    }

    /// Ends a stream: its waiters leave the queues and its leases are released (or kept for the grace).
    /// Never blocks; safe to call from `Drop`, and more than once.
    pub fn close(&self, session: SessionId, error: Option<Error>) {
        let _ = self.closes.send(Close { session, error });
    }

    /// Pauses a pool after a 429 seen outside a lease.
    ///
    /// # Cancel safety
    /// Not cancel safe: once sent, the report is applied even if the caller stops waiting.
    pub async fn report_rate_limit(
        &self,
        pool: PoolId,
        retry_after: Option<Duration>,
        reason: String,
    ) -> Result<PauseApplied, Error> {
        let (reply, rx) = oneshot::channel();
        self.call(Command::RateLimit { pool, retry_after, reason, reply }, rx).await?
    }

    /// A snapshot of the scheduler.
    ///
    /// # Cancel safety
    /// Cancel safe: it changes nothing.
    pub async fn status(&self, pool: Option<PoolId>) -> Result<Snapshot, Error> {
        let (reply, rx) = oneshot::channel();
        self.call(Command::Status { pool, reply }, rx).await?
    }

    /// Replaces the pool set (config reload).
    ///
    /// # Cancel safety
    /// Not cancel safe: once sent, the change is applied even if the caller stops waiting.
    pub async fn set_pools(&self, pools: BTreeMap<PoolId, PoolConfig>) -> Result<(), Error> {
        let (reply, rx) = oneshot::channel();
        self.call(Command::SetPools { pools, reply }, rx).await?
    }

    /// Creates a pool or changes some of its settings.
    ///
    /// # Cancel safety
    /// Not cancel safe: once sent, the change is applied even if the caller stops waiting.
    pub async fn upsert_pool(
        &self,
        pool: PoolId,
        patch: PoolPatch,
        max_pools: usize,
    ) -> Result<PoolUpserted, Error> {
        let (reply, rx) = oneshot::channel();
        self.call(Command::Admin(AdminOp::Upsert { pool, patch, max_pools, reply }), rx).await?
    }

    /// Removes a pool that has no children; returns what it did and every remaining pool's settings.
    ///
    /// # Cancel safety
    /// Not cancel safe: once sent, the change is applied even if the caller stops waiting.
    pub async fn delete_pool(&self, pool: PoolId) -> Result<(PoolDeleted, Pools), Error> {
        let (reply, rx) = oneshot::channel();
        self.call(Command::Admin(AdminOp::Delete { pool, reply }), rx).await?
    }

    /// Pauses a pool by hand; returns when the pause ends.
    ///
    /// # Cancel safety
    /// Not cancel safe: once sent, the pause is applied even if the caller stops waiting.
    pub async fn pause_pool(
        &self,
        pool: PoolId,
        duration: Duration,
        reason: String,
    ) -> Result<Instant, Error> {
        let (reply, rx) = oneshot::channel();
        self.call(Command::Admin(AdminOp::Pause { pool, duration, reason, reply }), rx).await?
    }

    /// Ends a pool's pause; returns whether it was paused.
    ///
    /// # Cancel safety
    /// Not cancel safe: once sent, the pause ends even if the caller stops waiting.
    pub async fn resume_pool(&self, pool: PoolId) -> Result<bool, Error> {
        let (reply, rx) = oneshot::channel();
        self.call(Command::Admin(AdminOp::Resume { pool, reply }), rx).await?
    }

    /// Ends a lease now; returns it as it was.
    ///
    /// # Cancel safety
    /// Not cancel safe: once sent, the lease ends even if the caller stops waiting.
    pub async fn revoke(&self, lease: LeaseId) -> Result<Lease, Error> {
        let (reply, rx) = oneshot::channel();
        self.call(Command::Admin(AdminOp::Revoke { lease, reply }), rx).await?
    }

    /// Starts (`true`) or ends an operator's drain; returns the counts at that moment.
    ///
    /// # Cancel safety
    /// Not cancel safe: once sent, the drain starts or ends even if the caller stops waiting.
    pub async fn set_draining(&self, on: bool) -> Result<DrainCounts, Error> {
        let (reply, rx) = oneshot::channel();
        self.call(Command::Admin(AdminOp::Drain { on, reply }), rx).await
    }

    /// Leases held and requests queued, in all.
    ///
    /// # Cancel safety
    /// Cancel safe: it changes nothing.
    pub async fn counts(&self) -> Result<DrainCounts, Error> {
        let (reply, rx) = oneshot::channel();
        self.call(Command::Admin(AdminOp::Counts { reply }), rx).await
    }

    /// Subscribes to changes: a snapshot (of `pool`, or everything) and a receiver of every change
    /// after it, taken at the same instant so nothing falls between them.
    ///
    /// # Cancel safety
    /// Cancel safe: a subscription nobody receives is dropped with the reply.
    pub async fn watch(
        &self,
        pool: Option<PoolId>,
    ) -> Result<(Snapshot, broadcast::Receiver<Published>), Error> {
        let (reply, rx) = oneshot::channel();
        self.call(Command::Admin(AdminOp::Watch { pool, reply }), rx).await?
    }

    /// Stops granting, rejects waiters with UNAVAILABLE and ends every stream.
    ///
    /// # Cancel safety
    /// Not cancel safe: once sent, shutdown proceeds.
    /// Returns how many leases were still held when granting stopped.
    pub async fn shutdown(&self) -> usize {
        let (reply, rx) = oneshot::channel();
        self.call(Command::Shutdown { reply }, rx).await.unwrap_or(0)
    }

    async fn call<T>(&self, cmd: Command, rx: oneshot::Receiver<T>) -> Result<T, Error> {
        self.commands.send(cmd).await.map_err(|_| Error::ShuttingDown)?;
        rx.await.map_err(|_| Error::ShuttingDown)
    }
}

/// One stream's way to the driver, driven by polling: [`OpSink::poll_reserve`] until ready, then
/// [`OpSink::send`]. Reserve only with a message in hand: a reserved place is taken from the command
/// buffer that every stream shares.
#[derive(Debug)]
pub struct OpSink {
    commands: PollSender<Command>,
    session: SessionId,
}

impl OpSink {
    /// Waits for room for one message in the driver's command buffer.
    pub fn poll_reserve(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.commands.poll_reserve(cx).map_err(|_| Error::ShuttingDown)
    }

    /// Sends `op` into the place [`OpSink::poll_reserve`] reserved.
    pub fn send(&mut self, op: StreamOp) -> Result<(), Error> {
        self.commands.send_item(Command::Op { session: self.session, op }).map_err(|_| Error::ShuttingDown)
    }
}

struct SessionOut {
    events: mpsc::Sender<Outbound>,
    grace: Duration,
}

/// The driver task's state.
pub struct Driver {
    sched: Scheduler,
    sessions: HashMap<SessionId, SessionOut>,
    commands: mpsc::Receiver<Command>,
    closes: mpsc::UnboundedReceiver<Close>,
    /// Sessions whose channel overflowed during routing; closed after the current batch.
    overflowed: Vec<SessionId>,
    /// Prometheus counters, fed from the routed events (see [`Driver::with_metrics`]).
    metrics: Option<crate::metrics::Recorder>,
    /// Watch subscribers. Events are built only while someone subscribes.
    watch: broadcast::Sender<Published>,
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
        let driver = Self {
            sched,
            sessions: HashMap::new(),
            commands,
            closes,
            overflowed: Vec::new(),
            watch,
            metrics: None,
        };
        (driver, DriverHandle { commands: ctx, closes: close_tx })
    }

    /// Records Prometheus counters into `metrics` from now on.
    pub fn with_metrics(mut self, metrics: crate::metrics::Metrics) -> Self {
        self.metrics = Some(crate::metrics::Recorder::new(metrics));
        self
    }

    /// Counts the leases that closing `session` without a grace releases (no event tells of them).
    fn count_stream_closed(&mut self, session: SessionId) {
        if let Some(m) = &mut self.metrics {
            for pool in self.sched.session_lease_pools(session) {
                m.stream_closed(pool, 1);
            }
        }
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
            // Cheap enough per wake-up, and it keeps the grant path free of watch work when nobody
            // watches.
            self.sched.set_observing(self.watch.receiver_count() > 0);
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
        }
    }

    fn handle(&mut self, cmd: Command) {
        let now = Instant::now();
        match cmd {
            Command::Open { events, grace, reply } => {
                let session = self.sched.open_session();
                self.sessions.insert(session, SessionOut { events, grace });
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
                        Decisions { events: vec![(session, event)], ..Default::default() }
                    }
                };
                self.route(d);
            }
            Command::RateLimit { pool, retry_after, reason, reply } => {
                info!(%pool, ?retry_after, %reason, "rate limit reported");
                let res =
                    self.sched.report_rate_limit(now, &pool, retry_after, &reason).map(|(applied, d)| {
                        self.route(d);
                        applied
                    });
                if let (Ok(_), Some(m)) = (&res, &mut self.metrics) {
                    m.pause(&pool);
                }
                let _ = reply.send(res);
            }
            Command::Status { pool, reply } => {
                let d = self.sched.tick(now);
                self.route(d);
                let _ = reply.send(self.sched.snapshot(pool.as_ref()));
            }
            Command::SetPools { pools, reply } => {
                let n = pools.len();
                let before = self.sched.pool_configs();
                let res = self.sched.set_pools(now, pools).map(|d| {
                    info!(pools = n, "pool configuration applied");
                    self.route(d);
                });
                if res.is_ok() && self.watch.receiver_count() > 0 {
                    let after = self.sched.pool_configs();
                    let ids: std::collections::BTreeSet<&PoolId> =
                        before.keys().chain(after.keys()).collect();
                    for id in ids {
                        let detail = match (before.get(id), after.get(id)) {
                            (None, Some(_)) => "created by a configuration reload",
                            (Some(_), None) => "removed by a configuration reload",
                            (Some(a), Some(b)) if a != b => "changed by a configuration reload",
                            _ => continue,
                        };
                        self.pool_changed(now, id, detail.to_owned());
                    }
                }
                let _ = reply.send(res);
            }
            Command::Admin(op) => self.handle_admin(now, op),
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
                    self.count_stream_closed(session);
                    let _ = self.sched.close_session(now, session, Duration::ZERO);
                }
                let _ = reply.send(held);
            }
        }
    }

    fn handle_admin(&mut self, now: Instant, op: AdminOp) {
        match op {
            AdminOp::Upsert { pool, patch, max_pools, reply } => {
                let res = self.sched.upsert_pool(now, pool.clone(), &patch, max_pools).map(|(created, d)| {
                    info!(%pool, created, "pool upserted by an operator");
                    self.route(d);
                    let status = self.pool_status(&pool).expect("the pool was just upserted");
                    self.pool_changed(now, &pool, if created { "created" } else { "changed" }.into());
                    PoolUpserted { created, status, pools: self.sched.pool_configs() }
                });
                let _ = reply.send(res);
            }
            AdminOp::Delete { pool, reply } => {
                let res = self.sched.delete_pool(now, &pool).map(|(done, d)| {
                    info!(%pool, ?done, "pool deleted by an operator");
                    self.route(d);
                    self.pool_changed(now, &pool, "removed".into());
                    (done, self.sched.pool_configs())
                });
                let _ = reply.send(res);
            }
            AdminOp::Pause { pool, duration, reason, reply } => {
                info!(%pool, ?duration, %reason, "pool paused by an operator");
                let res = self.sched.pause_pool(now, &pool, duration, &reason).map(|(until, d)| {
                    self.route(d);
                    until
                });
                if let (Ok(_), Some(m)) = (&res, &mut self.metrics) {
                    m.pause(&pool);
                }
                let _ = reply.send(res);
            }
            AdminOp::Resume { pool, reply } => {
                let res = self.sched.resume_pool(now, &pool).map(|(was, d)| {
                    info!(%pool, was_paused = was, "pool resumed by an operator");
                    self.route(d);
                    was
                });
                let _ = reply.send(res);
            }
            AdminOp::Revoke { lease, reply } => {
                let res = self.sched.revoke(now, lease).map(|(l, d)| {
                    warn!(lease_id = %lease, pool = %l.pool, holder = %l.holder, "lease revoked by an operator");
                    self.route(d);
                    l
                });
                let _ = reply.send(res);
            }
            AdminOp::Drain { on, reply } => {
                info!(draining = on, "operator drain");
                let d = self.sched.set_draining(now, on);
                self.route(d);
                let _ = reply.send(self.counts());
            }
            AdminOp::Counts { reply } => {
                let d = self.sched.tick(now);
                self.route(d);
                let _ = reply.send(self.counts());
            }
            AdminOp::Watch { pool, reply } => {
                let d = self.sched.tick(now);
                self.route(d);
                let res = self.sched.snapshot(pool.as_ref()).map(|s| (s, self.watch.subscribe()));
                let _ = reply.send(res);
            }
        }
    }

    fn counts(&self) -> DrainCounts {
        DrainCounts { leases: self.sched.lease_count(), queued: self.sched.waiter_count() }
    }

    fn pool_status(&self, pool: &PoolId) -> Option<PoolSnapshot> {
        self.sched.snapshot(Some(pool)).ok().and_then(|s| s.pools.into_iter().next())
    }

    /// Publishes a pool change (nothing is built when nobody watches).
    fn pool_changed(&self, now: Instant, pool: &PoolId, detail: String) {
        if self.watch.receiver_count() > 0 {
            let status = self.pool_status(pool);
            let _ = self.watch.send((now, WatchEvent::LimitChanged { pool: pool.clone(), detail, status }));
        }
    }

    /// Publishes what a batch of decisions changed, to Watch subscribers.
    fn publish(&self, d: &Decisions) {
        if self.watch.receiver_count() == 0 {
            return;
        }
        let now = Instant::now();
        let send = |e: WatchEvent| {
            let _ = self.watch.send((now, e));
        };
        for o in &d.observed {
            match o {
                Observed::Granted(l) => send(WatchEvent::Granted(l.clone())),
                Observed::Ended(l, how) => send(match how {
                    Ended::Released => WatchEvent::Released(l.clone(), Some(released_outcome(d, l.id))),
                    Ended::StreamClosed => WatchEvent::Released(l.clone(), None),
                    Ended::Expired => WatchEvent::Expired(l.clone(), ExpiryReason::Ttl),
                    Ended::Revoked => WatchEvent::Expired(l.clone(), expiry_reason(d, l.id)),
                }),
                Observed::Paused { pool, until, reason } => send(WatchEvent::Paused {
                    pool: pool.clone(),
                    until: *until,
                    reason: reason.clone(),
                    status: self.pool_status(pool),
                }),
                Observed::Resumed { pool } => {
                    send(WatchEvent::Resumed { pool: pool.clone(), status: self.pool_status(pool) })
                }
                Observed::Effective { pool, limit } => send(WatchEvent::LimitChanged {
                    pool: pool.clone(),
                    detail: format!("effective limit now {limit} (adaptive headroom)"),
                    status: self.pool_status(pool),
                }),
            }
        }
        for (_, e) in &d.events {
            if let Event::Rejected { error, .. } = e {
                send(WatchEvent::Rejected { pool: error_pool(error), error: error.clone() });
            }
        }
    }

    fn handle_close(&mut self, close: Close) {
        let Some(out) = self.sessions.remove(&close.session) else {
            return;
        };
        if let Some(error) = close.error {
            let _ = out.events.try_send(Box::new(Err(error)));
        }
        if out.grace.is_zero() {
            self.count_stream_closed(close.session);
        }
        let d = self.sched.close_session(Instant::now(), close.session, out.grace);
        debug!(session = close.session.0, "stream closed");
        self.route(d);
    }

    fn route(&mut self, d: Decisions) {
        self.publish(&d);
        let mut logged_pool: Option<PoolId> = None;
        for (session, event) in d.events {
            log_event(session, &event, &mut logged_pool);
            if let Some(m) = &mut self.metrics {
                m.event(&event);
            }
            let Some(out) = self.sessions.get(&session) else {
                continue;
            };
            if let Err(mpsc::error::TrySendError::Full(_)) = out.events.try_send(Box::new(Ok(event))) {
                self.overflowed.push(session);
            }
        }
    }
}

/// Structured logs with the reason on every rejection, reclaim and pause. A pause fans out to many
/// sessions; it is logged once per pool (`last_pool` remembers the one just logged).
fn log_event(session: SessionId, event: &Event, last_pool: &mut Option<PoolId>) {
    let s = session.0;
    match event {
        Event::Granted { request_id, lease_id, pool, token, .. } => {
            debug!(session = s, %request_id, %lease_id, %pool, token = token.0, "granted");
        }
        Event::Rejected { request_id, error } => {
            info!(session = s, %request_id, reason = %error, "request rejected");
        }
        Event::Expired { lease_id, reason, .. } => {
            warn!(session = s, %lease_id, ?reason, "lease reclaimed");
        }
        Event::Paused { pool, reason, until } if last_pool.as_ref() != Some(pool) => {
            let secs = until.saturating_duration_since(Instant::now()).as_secs_f64();
            warn!(%pool, %reason, pause_secs = secs, "pool paused; telling its waiters and holders");
            *last_pool = Some(pool.clone());
        }
        Event::Resumed { pool } if last_pool.as_ref() != Some(pool) => {
            info!(%pool, "pool pause ended");
            *last_pool = Some(pool.clone());
        }
        Event::LeaseError { lease_id, error } => {
            info!(session = s, %lease_id, reason = %error, "lease message refused");
        }
        _ => {}
    }
}

/// The outcome a release reported, from the session event that answers it.
fn released_outcome(d: &Decisions, id: LeaseId) -> Outcome {
    d.events
        .iter()
        .find_map(|(_, e)| match e {
            Event::Released { lease_id, outcome, .. } if *lease_id == id => Some(*outcome),
            _ => None,
        })
        .unwrap_or(Outcome::Ok)
}

/// Why a lease that ended as `Revoked` ended: an operator, or its pool's removal.
fn expiry_reason(d: &Decisions, id: LeaseId) -> ExpiryReason {
    d.events
        .iter()
        .find_map(|(_, e)| match e {
            Event::Expired { lease_id, reason, .. } if *lease_id == id => Some(*reason),
            _ => None,
        })
        .unwrap_or(ExpiryReason::Revoked)
}

/// The pool an error names, if any.
fn error_pool(e: &Error) -> Option<PoolId> {
    match e {
        Error::UnknownPool(p)
        | Error::Shed(p)
        | Error::ResumeOverLimit(p)
        | Error::PoolRemoved(p)
        | Error::QueueFull { pool: p, .. }
        | Error::WaitTimeout { pool: p, .. }
        | Error::InvalidTtl { pool: p, .. }
        | Error::PoolHasChildren { pool: p, .. } => Some(p.clone()),
        _ => None,
    }
}
