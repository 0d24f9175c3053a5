//! The handle to the driver task: one method per command, each a request with a oneshot reply.

use std::{
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    sync::{broadcast, mpsc, oneshot, watch},
    time::Instant,
};
use tokio_util::sync::PollSender;

use crate::scheduler::{
    BreakerView, Error, Event, Fact, ForceBreaker, Lease, LeaseId, NewRequest, Outcome, PauseApplied,
    PoolConfig, PoolDeleted, PoolId, PoolPatch, PoolSnapshot, Report, ResumeRequest, SessionId, Snapshot,
};

/// What a session's event channel carries: an event, or the error that ends the stream.
///
/// Boxed because a tokio channel allocates its slots 32 at a time: unboxed, that block (about 4 KiB)
/// was the largest single cost of an idle session; boxed it is 256 bytes.
pub type Outbound = Box<Result<Event, Error>>;

/// Every pool's settings, by name.
pub type Pools = std::collections::BTreeMap<PoolId, PoolConfig>;

/// A fact published to Watch subscribers (see [`DriverHandle::watch`]).
#[derive(Clone, Debug)]
pub struct Published {
    /// When it happened.
    pub at: Instant,
    /// What happened.
    pub fact: Fact,
    /// The pool it concerns after the change, for pool-level facts; `None` once removed.
    pub status: Option<PoolSnapshot>,
}

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
    Release(LeaseId, Report),
    /// Re-attach a lease.
    Resume(ResumeRequest),
    /// Input that failed conversion: deliver this event (in order with the others) and change nothing.
    Invalid(Event),
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
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct DrainCounts {
    /// Leases still held.
    pub leases: usize,
    /// Requests still queued.
    pub queued: usize,
}

pub(super) type Reply<T> = oneshot::Sender<T>;

/// A command to the driver task.
pub(super) enum Command {
    Open {
        events: mpsc::Sender<Outbound>,
        grace: Duration,
        reply: Reply<SessionId>,
    },
    Op {
        session: SessionId,
        op: StreamOp,
    },
    RateLimit {
        pool: PoolId,
        retry_after: Option<Duration>,
        reason: String,
        reply: Reply<Result<PauseApplied, Error>>,
    },
    ReportOutcome {
        pool: PoolId,
        outcome: Outcome,
        reason: String,
        reply: Reply<Result<PauseApplied, Error>>,
    },
    ForceBreaker {
        pool: PoolId,
        to: ForceBreaker,
        reason: String,
        reply: Reply<Result<BreakerView, Error>>,
    },
    Status {
        pool: Option<PoolId>,
        reply: Reply<Result<Snapshot, Error>>,
    },
    SetPools {
        pools: Pools,
        reply: Reply<Result<Pools, Error>>,
    },
    Upsert {
        pool: PoolId,
        patch: PoolPatch,
        max_pools: usize,
        reply: Reply<Result<PoolUpserted, Error>>,
    },
    Delete {
        pool: PoolId,
        reply: Reply<Result<(PoolDeleted, Pools), Error>>,
    },
    Pause {
        pool: PoolId,
        duration: Duration,
        reason: String,
        reply: Reply<Result<Instant, Error>>,
    },
    Resume {
        pool: PoolId,
        reply: Reply<Result<bool, Error>>,
    },
    Revoke {
        lease: LeaseId,
        reply: Reply<Result<Lease, Error>>,
    },
    Drain {
        on: bool,
        reply: Reply<DrainCounts>,
    },
    Watch {
        pool: Option<PoolId>,
        reply: Reply<Result<(Snapshot, broadcast::Receiver<Published>), Error>>,
    },
    Shutdown {
        reply: Reply<usize>,
    },
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Command")
    }
}

/// Why a stream ended, sent on the close channel.
#[derive(Debug)]
pub(super) struct Close {
    pub(super) session: SessionId,
    pub(super) error: Option<Error>,
}

/// A cheap, cloneable handle to the driver task.
#[derive(Clone, Debug)]
pub struct DriverHandle {
    pub(super) commands: mpsc::Sender<Command>,
    pub(super) closes: mpsc::UnboundedSender<Close>,
    pub(super) counts: watch::Receiver<DrainCounts>,
}

impl DriverHandle {
    /// Sends the command that `make` builds around a reply channel, and waits for the reply.
    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, Error> {
        let (reply, rx) = oneshot::channel();
        self.commands.send(make(reply)).await.map_err(|_| Error::ShuttingDown)?;
        rx.await.map_err(|_| Error::ShuttingDown)
    }

    /// Registers a stream whose events go to `events`. With a non-zero `grace`, its leases outlive the
    /// stream for that long so that a reconnecting client can resume them.
    ///
    /// # Cancel safety
    /// Cancel safe in effect: if cancelled after the driver registered the session, the session's
    /// event channel is dropped with the future, and the driver closes the session on its next send.
    pub async fn open(&self, events: mpsc::Sender<Outbound>, grace: Duration) -> Result<SessionId, Error> {
        self.call(|reply| Command::Open { events, grace, reply }).await
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
        self.call(|reply| Command::RateLimit { pool, retry_after, reason, reply }).await?
    }

    /// Applies an outcome class seen outside a lease (overloaded, quota exhausted, rate limited): its
    /// class policy and the breakers of the pool's chain.
    ///
    /// # Cancel safety
    /// Not cancel safe: once sent, the report is applied even if the caller stops waiting.
    pub async fn report_outcome(
        &self,
        pool: PoolId,
        outcome: Outcome,
        reason: String,
    ) -> Result<PauseApplied, Error> {
        self.call(|reply| Command::ReportOutcome { pool, outcome, reason, reply }).await?
    }

    /// Forces a pool's circuit breaker open or closed; returns the breaker after the change.
    ///
    /// # Cancel safety
    /// Not cancel safe: once sent, the change applies even if the caller stops waiting.
    pub async fn force_breaker(
        &self,
        pool: PoolId,
        to: ForceBreaker,
        reason: String,
    ) -> Result<BreakerView, Error> {
        self.call(|reply| Command::ForceBreaker { pool, to, reason, reply }).await?
    }

    /// A snapshot of the scheduler.
    ///
    /// # Cancel safety
    /// Cancel safe: it changes nothing.
    pub async fn status(&self, pool: Option<PoolId>) -> Result<Snapshot, Error> {
        self.call(|reply| Command::Status { pool, reply }).await?
    }

    /// Replaces the pool set (config reload); returns every pool's settings now. Callers that keep a
    /// state file go through [`crate::pool_store::PoolStore`].
    ///
    /// # Cancel safety
    /// Not cancel safe: once sent, the change is applied even if the caller stops waiting.
    pub async fn set_pools(&self, pools: Pools) -> Result<Pools, Error> {
        self.call(|reply| Command::SetPools { pools, reply }).await?
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
        self.call(|reply| Command::Upsert { pool, patch, max_pools, reply }).await?
    }

    /// Removes a pool that has no children; returns what it did and every remaining pool's settings.
    ///
    /// # Cancel safety
    /// Not cancel safe: once sent, the change is applied even if the caller stops waiting.
    pub async fn delete_pool(&self, pool: PoolId) -> Result<(PoolDeleted, Pools), Error> {
        self.call(|reply| Command::Delete { pool, reply }).await?
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
        self.call(|reply| Command::Pause { pool, duration, reason, reply }).await?
    }

    /// Ends a pool's pause; returns whether it was paused.
    ///
    /// # Cancel safety
    /// Not cancel safe: once sent, the pause ends even if the caller stops waiting.
    pub async fn resume_pool(&self, pool: PoolId) -> Result<bool, Error> {
        self.call(|reply| Command::Resume { pool, reply }).await?
    }

    /// Ends a lease now; returns it as it was.
    ///
    /// # Cancel safety
    /// Not cancel safe: once sent, the lease ends even if the caller stops waiting.
    pub async fn revoke(&self, lease: LeaseId) -> Result<Lease, Error> {
        self.call(|reply| Command::Revoke { lease, reply }).await?
    }

    /// Starts (`true`) or ends an operator's drain; returns the counts at that moment.
    ///
    /// # Cancel safety
    /// Not cancel safe: once sent, the drain starts or ends even if the caller stops waiting.
    pub async fn set_draining(&self, on: bool) -> Result<DrainCounts, Error> {
        self.call(|reply| Command::Drain { on, reply }).await
    }

    /// Leases held and requests queued, in all, as the driver last published them (after every
    /// command and timer it handles). `changed()` on the receiver waits for the next change.
    pub fn counts(&self) -> watch::Receiver<DrainCounts> {
        self.counts.clone()
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
        self.call(|reply| Command::Watch { pool, reply }).await?
    }

    /// Stops granting, rejects waiters with UNAVAILABLE and ends every stream.
    /// Returns how many leases were still held when granting stopped.
    ///
    /// # Cancel safety
    /// Not cancel safe: once sent, shutdown proceeds.
    pub async fn shutdown(&self) -> usize {
        self.call(|reply| Command::Shutdown { reply }).await.unwrap_or(0)
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
