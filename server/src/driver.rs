//! The one task that owns the [`Scheduler`], sleeps until its next deadline and routes its decisions.
//!
//! gRPC handlers talk to it through a [`DriverHandle`]: stream messages go over a bounded channel
//! (backpressure reaches the client's TCP window), stream closes over an unbounded one (a `Drop` can
//! always send them). Each session's events go out on its own bounded channel; a client that stops
//! reading until that channel is full is disconnected, which releases its leases.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};
use tracing::{debug, info, warn};

use crate::scheduler::{
    Decisions, Error, Event, LeaseId, NewRequest, Outcome, PauseApplied, PoolConfig, PoolId, ResumeRequest,
    Scheduler, SessionId, Snapshot,
};

/// What a session's event channel carries: an event, or the error that ends the stream.
pub type Outbound = Result<Event, Error>;

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
        reply: oneshot::Sender<()>,
    },
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

    /// Applies one stream message; its answers arrive on the session's event channel.
    ///
    /// # Cancel safety
    /// Cancel safe: the message is either queued to the driver or not sent at all.
    pub async fn op(&self, session: SessionId, op: StreamOp) -> Result<(), Error> {
        self.commands.send(Command::Op { session, op }).await.map_err(|_| Error::ShuttingDown)
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

    /// Stops granting, rejects waiters with UNAVAILABLE and ends every stream.
    ///
    /// # Cancel safety
    /// Not cancel safe: once sent, shutdown proceeds.
    pub async fn shutdown(&self) {
        let (reply, rx) = oneshot::channel();
        let _ = self.call(Command::Shutdown { reply }, rx).await;
    }

    async fn call<T>(&self, cmd: Command, rx: oneshot::Receiver<T>) -> Result<T, Error> {
        self.commands.send(cmd).await.map_err(|_| Error::ShuttingDown)?;
        rx.await.map_err(|_| Error::ShuttingDown)
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
}

impl Driver {
    /// Commands buffered between handlers and the driver.
    pub const COMMAND_BUFFER: usize = 8192;

    /// A driver for this scheduler and a handle to reach it. Spawn [`Driver::run`].
    pub fn new(sched: Scheduler) -> (Self, DriverHandle) {
        let (ctx, commands) = mpsc::channel(Self::COMMAND_BUFFER);
        let (close_tx, closes) = mpsc::unbounded_channel();
        let driver = Self { sched, sessions: HashMap::new(), commands, closes, overflowed: Vec::new() };
        (driver, DriverHandle { commands: ctx, closes: close_tx })
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
                    StreamOp::Invalid(event) => Decisions { events: vec![(session, event)] },
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
                let _ = reply.send(res);
            }
            Command::Status { pool, reply } => {
                let d = self.sched.tick(now);
                self.route(d);
                let _ = reply.send(self.sched.snapshot(pool.as_ref()));
            }
            Command::SetPools { pools, reply } => {
                let n = pools.len();
                let res = self.sched.set_pools(now, pools).map(|d| {
                    info!(pools = n, "pool configuration applied");
                    self.route(d);
                });
                let _ = reply.send(res);
            }
            Command::Shutdown { reply } => {
                let d = self.sched.shutdown(now);
                self.route(d);
                for (session, out) in self.sessions.drain() {
                    let _ = out.events.try_send(Err(Error::ShuttingDown));
                    let _ = self.sched.close_session(now, session, Duration::ZERO);
                }
                let _ = reply.send(());
            }
        }
    }

    fn handle_close(&mut self, close: Close) {
        let Some(out) = self.sessions.remove(&close.session) else {
            return;
        };
        if let Some(error) = close.error {
            let _ = out.events.try_send(Err(error));
        }
        let d = self.sched.close_session(Instant::now(), close.session, out.grace);
        debug!(session = close.session.0, "stream closed");
        self.route(d);
    }

    fn route(&mut self, d: Decisions) {
        let mut logged_pool: Option<PoolId> = None;
        for (session, event) in d.events {
            log_event(session, &event, &mut logged_pool);
            let Some(out) = self.sessions.get(&session) else {
                continue;
            };
            if let Err(mpsc::error::TrySendError::Full(_)) = out.events.try_send(Ok(event)) {
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
        Event::Expired { lease_id, reason } => {
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
