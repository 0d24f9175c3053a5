//! The handle to the scheduler: one method per operation, each run inline under the driver's lock.

use std::{sync::Arc, time::Duration};

use tokio::{
    sync::{broadcast, mpsc, watch},
    time::Instant,
};

use super::{Deferred, Shared};
use crate::scheduler::{
    BreakerView, Error, Event, Fact, ForceBreaker, Lease, LeaseId, NewRequest, Outcome, PauseApplied,
    PoolConfig, PoolDeleted, PoolId, PoolPatch, PoolSnapshot, ProviderLimit, Report, ResumeRequest,
    RuntimeState, SessionId, Snapshot, Usage, budget::BudgetSnapshot,
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

/// A cheap, cloneable handle to the scheduler.
///
/// Every method runs its operation on the caller's thread under the driver's lock, held only for the
/// decision and the routing of its events (a channel `try_send` per event, never an await). The
/// `async` ones complete at their first poll; they stay `async` so callers need not change when an
/// operation gains a wait.
#[derive(Clone)]
pub struct DriverHandle {
    pub(super) shared: Arc<Shared>,
    pub(super) counts: watch::Receiver<DrainCounts>,
}

impl std::fmt::Debug for DriverHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DriverHandle")
    }
}

impl DriverHandle {
    /// Registers a stream whose events go to `events`. With a non-zero `grace`, its leases outlive the
    /// stream for that long so that a reconnecting client can resume them.
    pub fn open(&self, events: mpsc::Sender<Outbound>, grace: Duration) -> Result<SessionId, Error> {
        self.shared.with(|st, now| st.open(now, events, grace))
    }

    /// Applies one of `session`'s stream messages, in order with its others: now, or, when another
    /// thread holds the lock, by that thread before it lets go. Its events (and other sessions' events
    /// that it caused) reach their channels then. Never waits for the lock.
    pub fn op(&self, session: SessionId, op: StreamOp) -> Result<(), Error> {
        self.shared.submit(Deferred::Op(session, op))
    }

    /// Ends a stream: its waiters leave the queues and its leases are released (or kept for the grace),
    /// now or by the lock's holder as for [`DriverHandle::op`]. Never waits for the lock; safe to call
    /// from `Drop`, and more than once.
    pub fn close(&self, session: SessionId, error: Option<Error>) {
        let _ = self.shared.submit(Deferred::Close(session, error));
    }

    /// Pauses a pool after a 429 seen outside a lease.
    ///
    /// # Cancel safety
    /// Completes at its first poll: either nothing was applied or all of it was.
    pub async fn report_rate_limit(
        &self,
        pool: PoolId,
        retry_after: Option<Duration>,
        reason: String,
    ) -> Result<PauseApplied, Error> {
        tracing::info!(%pool, ?retry_after, %reason, "rate limit reported");
        self.shared.with(|st, now| {
            let res = st.sched.report_rate_limit(now, &pool, retry_after, &reason);
            st.routed(res)
        })?
    }

    /// Charges usage seen outside a lease to a pool's budgets and applies the provider's rate-limit
    /// headers; returns the pool's budgets after.
    ///
    /// # Cancel safety
    /// Completes at its first poll: either nothing was applied or all of it was.
    pub async fn report_usage(
        &self,
        pool: PoolId,
        usage: Option<Usage>,
        limits: Vec<ProviderLimit>,
    ) -> Result<Option<BudgetSnapshot>, Error> {
        self.shared.with(|st, now| {
            let res = st.sched.report_usage(now, &pool, usage, &limits);
            st.routed(res)
        })?
    }

    /// Applies an outcome class seen outside a lease (overloaded, quota exhausted, rate limited): its
    /// class policy and the breakers of the pool's chain.
    ///
    /// # Cancel safety
    /// Completes at its first poll: either nothing was applied or all of it was.
    pub async fn report_outcome(
        &self,
        pool: PoolId,
        outcome: Outcome,
        reason: String,
    ) -> Result<PauseApplied, Error> {
        tracing::info!(%pool, outcome = outcome.label(), %reason, "provider outcome reported");
        self.shared.with(|st, now| {
            let res = st.sched.report_outcome(now, &pool, outcome, &reason);
            st.routed(res)
        })?
    }

    /// Forces a pool's circuit breaker open or closed; returns the breaker after the change.
    ///
    /// # Cancel safety
    /// Completes at its first poll: either nothing was applied or all of it was.
    pub async fn force_breaker(
        &self,
        pool: PoolId,
        to: ForceBreaker,
        reason: String,
    ) -> Result<BreakerView, Error> {
        tracing::warn!(%pool, ?to, %reason, "circuit breaker forced by an operator");
        self.shared.with(|st, now| {
            let res = st.sched.force_breaker(now, &pool, to, &reason);
            st.routed(res)
        })?
    }

    /// A snapshot of the scheduler. The lock is held only to copy the domain values; converting and
    /// encoding them (most of the cost for a large state) happens outside it.
    ///
    /// # Cancel safety
    /// Cancel safe: it changes nothing but the due deadlines, which the timer would run anyway.
    pub async fn status(&self, pool: Option<PoolId>) -> Result<Snapshot, Error> {
        self.shared.with(|st, now| {
            st.catch_up(now);
            st.sched.snapshot(pool.as_ref())
        })?
    }

    /// Replaces the pool set (config reload); returns every pool's settings now. Callers that keep a
    /// state file go through [`crate::pool_store::PoolStore`].
    ///
    /// # Cancel safety
    /// Completes at its first poll: either nothing was applied or all of it was.
    pub async fn set_pools(&self, pools: Pools) -> Result<Pools, Error> {
        let n = pools.len();
        self.shared.with(|st, now| {
            let res = st.sched.set_pools(now, pools).map(|d| ((), d));
            st.routed(res).map(|()| {
                tracing::info!(pools = n, "pool configuration applied");
                st.sched.pool_configs()
            })
        })?
    }

    /// Creates a pool or changes some of its settings.
    ///
    /// # Cancel safety
    /// Completes at its first poll: either nothing was applied or all of it was.
    pub async fn upsert_pool(
        &self,
        pool: PoolId,
        patch: PoolPatch,
        max_pools: usize,
    ) -> Result<PoolUpserted, Error> {
        self.shared.with(|st, now| {
            let res = st.sched.upsert_pool(now, pool.clone(), &patch, max_pools);
            st.routed(res).map(|created| {
                tracing::info!(%pool, created, "pool upserted by an operator");
                let status = st.pool_status(&pool).expect("the pool was just upserted");
                PoolUpserted { created, status, pools: st.sched.pool_configs() }
            })
        })?
    }

    /// Removes a pool that has no children; returns what it did and every remaining pool's settings.
    ///
    /// # Cancel safety
    /// Completes at its first poll: either nothing was applied or all of it was.
    pub async fn delete_pool(&self, pool: PoolId) -> Result<(PoolDeleted, Pools), Error> {
        self.shared.with(|st, now| {
            let res = st.sched.delete_pool(now, &pool);
            st.routed(res).map(|done| {
                tracing::info!(%pool, ?done, "pool deleted by an operator");
                (done, st.sched.pool_configs())
            })
        })?
    }

    /// Pauses a pool by hand; returns when the pause ends.
    ///
    /// # Cancel safety
    /// Completes at its first poll: either nothing was applied or all of it was.
    pub async fn pause_pool(
        &self,
        pool: PoolId,
        duration: Duration,
        reason: String,
    ) -> Result<Instant, Error> {
        tracing::info!(%pool, ?duration, %reason, "pool paused by an operator");
        self.shared.with(|st, now| {
            let res = st.sched.pause_pool(now, &pool, duration, &reason);
            st.routed(res)
        })?
    }

    /// Ends a pool's pause; returns whether it was paused.
    ///
    /// # Cancel safety
    /// Completes at its first poll: either nothing was applied or all of it was.
    pub async fn resume_pool(&self, pool: PoolId) -> Result<bool, Error> {
        let res = self.shared.with(|st, now| {
            let res = st.sched.resume_pool(now, &pool);
            st.routed(res)
        })?;
        if let Ok(was_paused) = res {
            tracing::info!(%pool, was_paused, "pool resumed by an operator");
        }
        res
    }

    /// Ends a lease now; returns it as it was.
    ///
    /// # Cancel safety
    /// Completes at its first poll: either nothing was applied or all of it was.
    pub async fn revoke(&self, lease: LeaseId) -> Result<Lease, Error> {
        self.shared.with(|st, now| {
            let res = st.sched.revoke(now, lease);
            if let Ok((l, _)) = &res {
                tracing::warn!(lease_id = %lease, pool = %l.pool, holder = %l.holder, "lease revoked by an operator");
            }
            st.routed(res)
        })?
    }

    /// Starts (`true`) or ends an operator's drain; returns the counts at that moment.
    ///
    /// # Cancel safety
    /// Completes at its first poll: either nothing was applied or all of it was.
    pub async fn set_draining(&self, on: bool) -> Result<DrainCounts, Error> {
        tracing::info!(draining = on, "operator drain");
        self.shared.with(|st, now| {
            let d = st.sched.set_draining(now, on);
            st.route(d);
            st.counts()
        })
    }

    /// Grants only before `until` (`None`: no deadline): an HA leader's lease on its leadership (see
    /// [`crate::ha`]).
    ///
    /// # Cancel safety
    /// Completes at its first poll: either nothing was applied or all of it was.
    pub async fn set_grant_deadline(&self, until: Option<Instant>) -> Result<(), Error> {
        self.shared.with(|st, now| {
            let d = st.sched.set_grant_deadline(now, until);
            st.route(d);
        })
    }

    /// Starts a leadership term: fencing tokens from `first_token` on, and a learning period; then
    /// applies the previous leader's runtime state (`None`: none published, every pool learns for the
    /// whole period). Both at one instant.
    ///
    /// # Cancel safety
    /// Completes at its first poll: either nothing was applied or all of it was.
    pub async fn begin_term(
        &self,
        first_token: u64,
        learning: Duration,
        runtime: Option<RuntimeState>,
    ) -> Result<(), Error> {
        self.shared.with(|st, now| {
            let d = st.sched.begin_term(now, first_token, learning);
            st.route(d);
            let d = st.sched.take_over(now, runtime.as_ref());
            st.route(d);
        })
    }

    /// The runtime state a successor needs (see [`crate::scheduler::RuntimeState`]), with the instant
    /// it describes.
    ///
    /// # Cancel safety
    /// Cancel safe: it changes nothing but the due deadlines, which the timer would run anyway.
    pub async fn runtime_state(&self) -> Result<(Instant, RuntimeState), Error> {
        self.shared.with(|st, now| {
            st.catch_up(now);
            (now, st.sched.runtime_state(now))
        })
    }

    /// Leases held and requests queued, in all, as last published (after every operation and
    /// deadline). `changed()` on the receiver waits for the next change.
    pub fn counts(&self) -> watch::Receiver<DrainCounts> {
        self.counts.clone()
    }

    /// Subscribes to changes: a snapshot (of `pool`, or everything) and a receiver of every change
    /// after it, taken at the same instant so nothing falls between them.
    ///
    /// # Cancel safety
    /// Cancel safe: it changes nothing but the due deadlines, which the timer would run anyway.
    pub async fn watch(
        &self,
        pool: Option<PoolId>,
    ) -> Result<(Snapshot, broadcast::Receiver<Published>), Error> {
        self.shared.with(|st, now| {
            st.catch_up(now);
            st.sched.snapshot(pool.as_ref()).map(|s| (s, st.watch.subscribe()))
        })?
    }

    /// Stops granting, rejects waiters with UNAVAILABLE and ends every stream.
    /// Returns how many leases were still held when granting stopped.
    ///
    /// # Cancel safety
    /// Completes at its first poll: shutdown has proceeded once it is polled.
    pub async fn shutdown(&self) -> usize {
        self.shared.with(|st, now| st.shutdown(now)).unwrap_or(0)
    }
}
