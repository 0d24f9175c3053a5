//! The facts the scheduler emits: what each session is told ([`Event`]) and what observers read.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;

use super::{Error, FencingToken, Lease, LeaseId, PoolId, RequestId, SessionId, lease::Ended};

/// How the call covered by a lease ended.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Success.
    Ok,
    /// A non-rate-limit failure.
    Error,
    /// The caller gave up.
    Cancelled,
    /// A 429: pause the pool for `retry_after` (or the pool's default).
    RateLimited(Option<Duration>),
}

/// Why a lease ended without a release.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ExpiryReason {
    /// No heartbeat within the TTL.
    Ttl,
    /// Revoked by an operator.
    Revoked,
    /// Its pool was removed.
    PoolRemoved,
}

/// Something the scheduler decided, for one session.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A request waits.
    Queued {
        /// The request.
        request_id: RequestId,
        /// 0-based place in the pool's queue.
        position: u32,
        /// Waiting outside a full queue (`on_overflow = "block"`).
        blocked: bool,
    },
    /// A request got its lease.
    Granted {
        /// The request.
        request_id: RequestId,
        /// The lease.
        lease_id: LeaseId,
        /// The lease's pool.
        pool: PoolId,
        /// Its fencing token.
        token: FencingToken,
        /// Its TTL.
        ttl: Duration,
        /// When it expires unless renewed.
        expires_at: Instant,
        /// How long the request waited for it (zero when granted at once); for metrics.
        waited: Duration,
    },
    /// A request was refused or gave up; it is gone.
    Rejected {
        /// The request (as sent).
        request_id: String,
        /// Why.
        error: Error,
    },
    /// A pool this session waits on or holds (or an ancestor of it) is paused.
    Paused {
        /// The paused pool.
        pool: PoolId,
        /// Until when.
        until: Instant,
        /// Why.
        reason: Arc<str>,
    },
    /// A pause ended.
    Resumed {
        /// The pool.
        pool: PoolId,
    },
    /// A lease ended without a release.
    Expired {
        /// The lease.
        lease_id: LeaseId,
        /// Its pool (the lease is gone, so observers such as metrics cannot look it up).
        pool: PoolId,
        /// Why.
        reason: ExpiryReason,
    },
    /// A release was applied.
    Released {
        /// The lease.
        lease_id: LeaseId,
        /// Its pool (for observers such as metrics).
        pool: PoolId,
        /// The outcome the holder reported.
        outcome: Outcome,
    },
    /// A lease-addressed message could not be applied; nothing changed.
    LeaseError {
        /// The lease as named by the client.
        lease_id: String,
        /// Why.
        error: Error,
    },
    /// A resume was accepted.
    LeaseResumed {
        /// The lease.
        lease_id: LeaseId,
        /// Its token.
        token: FencingToken,
        /// When it expires unless renewed.
        expires_at: Instant,
    },
    /// A cancel was applied.
    Cancelled {
        /// The request.
        request_id: RequestId,
    },
    /// A heartbeat was applied.
    HeartbeatAck {
        /// Leases renewed.
        renewed: u32,
    },
}

/// Everything one operation decided, in order.
#[derive(Debug, Default)]
pub struct Decisions {
    /// Events, each for one session.
    pub events: Vec<(SessionId, Event)>,
    /// Pool- and lease-level facts for observers (the driver's Watch), filled only while
    /// [`Scheduler::set_observing`] is on: session events cannot carry them, since a pause of an idle
    /// pool or a lease that ended has nobody (or no pool) to address.
    pub observed: Vec<Observed>,
}

/// A fact for observers, independent of who is told (see [`Decisions::observed`]).
#[derive(Clone, Debug)]
pub enum Observed {
    /// A lease was granted.
    Granted(Lease),
    /// A lease ended, and how (`Revoked` covers both revocation and pool removal).
    Ended(Lease, Ended),
    /// A pool's pause started or was extended.
    Paused {
        /// The pool.
        pool: PoolId,
        /// Until when.
        until: Instant,
        /// Why.
        reason: Arc<str>,
    },
    /// A pool's pause ended.
    Resumed {
        /// The pool.
        pool: PoolId,
    },
    /// A pool's effective limit moved (adaptive headroom).
    Effective {
        /// The pool.
        pool: PoolId,
        /// The new effective limit.
        limit: u32,
    },
}

impl Decisions {
    pub(super) fn push(&mut self, session: SessionId, event: Event) {
        self.events.push((session, event));
    }
}
