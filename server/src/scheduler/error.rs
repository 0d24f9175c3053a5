//! Everything the scheduler can refuse, with what the caller needs to act on it.

use std::time::Duration;

use super::ids::{IdError, LeaseId, PoolId};

/// Why the scheduler refused an operation or gave up on a request.
///
/// Messages are lowercase and name the offending value. [`crate::grpc::status`] is the one place
/// that maps these to gRPC codes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Malformed input: empty or oversized ids, a message with no body, a bad duration.
    #[error("{0}")]
    InvalidArgument(String),
    /// The priority is outside the accepted range.
    #[error("priority {got} out of range 0..={max}")]
    PriorityOutOfRange {
        /// What was asked for.
        got: u32,
        /// The highest allowed.
        max: u8,
    },
    /// The TTL is zero or above the pool's maximum.
    #[error("ttl {} out of range: want > 0 and <= {} for pool {pool}", humantime::format_duration(*.got), humantime::format_duration(*.max))]
    InvalidTtl {
        /// The pool.
        pool: PoolId,
        /// What was asked for.
        got: Duration,
        /// The pool's max_ttl.
        max: Duration,
    },
    /// No such pool.
    #[error("unknown pool {0}")]
    UnknownPool(PoolId),
    /// The session already has an open request with this id.
    #[error("duplicate request_id {0:?}: a request with this id is already open on this stream")]
    DuplicateRequest(String),
    /// Cancel of a request that is not queued on this stream.
    #[error("no queued request {0:?} on this stream")]
    UnknownRequest(String),
    /// A lease id the daemon has never seen (or forgot long ago).
    #[error("unknown lease {0}")]
    UnknownLease(LeaseId),
    /// A lease that existed but has ended.
    #[error("lease {id} already ended: {how}")]
    LeaseEnded {
        /// The lease.
        id: LeaseId,
        /// How it ended, for example "reclaimed after its ttl expired".
        how: &'static str,
    },
    /// A lease held by another stream.
    #[error("lease {0} is held by another stream")]
    NotYourLease(LeaseId),
    /// A resume without the lease's valid resume credential: only the grantee can resume a lease.
    #[error("resume of lease {0} refused: missing or invalid resume credential")]
    BadCredential(LeaseId),
    /// A resume whose fencing token or pool does not match the lease.
    #[error("lease {0} does not match: {1}")]
    LeaseMismatch(LeaseId, &'static str),
    /// The pool's queue is full and its overflow policy is `reject`.
    #[error("queue of pool {pool} is full ({depth} waiting)")]
    QueueFull {
        /// The pool.
        pool: PoolId,
        /// Its max_queue_depth.
        depth: u32,
    },
    /// The request was the oldest in a full queue whose policy is `shed_oldest`.
    #[error("shed from the full queue of pool {0} to make room for a newer request")]
    Shed(PoolId),
    /// Over a per-stream or global bound.
    #[error("{0}")]
    LimitExceeded(String),
    /// A resume after restart that would put a pool over its limit.
    #[error("pool {0} is at its limit; the lease cannot be re-created")]
    ResumeOverLimit(PoolId),
    /// The request waited longer than its max_wait.
    #[error("waited {} for pool {pool} without a grant (max_wait)", humantime::format_duration(*.waited))]
    WaitTimeout {
        /// The pool.
        pool: PoolId,
        /// How long it waited.
        waited: Duration,
        /// When the pool is paused, how long the pause still lasts.
        retry_after: Option<Duration>,
    },
    /// The pool was removed while the request waited.
    #[error("pool {0} was removed")]
    PoolRemoved(PoolId),
    /// A pool cannot be removed while other pools name it as their parent.
    #[error("pool {pool} has child pools ({children}); remove or re-parent them first")]
    PoolHasChildren {
        /// The pool.
        pool: PoolId,
        /// Its children, comma-separated.
        children: String,
    },
    /// The pool's circuit breaker is open and set to fail fast.
    #[error("circuit breaker of pool {pool} is open{}", .retry_after.map(|d| format!(" for another {}", humantime::format_duration(d))).unwrap_or_default())]
    BreakerOpen {
        /// The pool whose breaker is open (the requested pool or an ancestor).
        pool: PoolId,
        /// How long until it turns half-open; for a breaker an operator forced open, its first open
        /// timeout (a hint to check back). Always set on a fail-fast refusal.
        retry_after: Option<Duration>,
    },
    /// The daemon is shutting down.
    #[error("daemon is shutting down")]
    ShuttingDown,
}

impl Error {
    /// How long the caller should wait before trying again, when that is known.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::WaitTimeout { retry_after, .. } | Error::BreakerOpen { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The pool it names, if any (for an unknown pool: the name as the client sent it).
    pub fn pool(&self) -> Option<&PoolId> {
        match self {
            Error::UnknownPool(p)
            | Error::Shed(p)
            | Error::ResumeOverLimit(p)
            | Error::PoolRemoved(p)
            | Error::QueueFull { pool: p, .. }
            | Error::WaitTimeout { pool: p, .. }
            | Error::InvalidTtl { pool: p, .. }
            | Error::PoolHasChildren { pool: p, .. }
            | Error::BreakerOpen { pool: p, .. } => Some(p),
            _ => None,
        }
    }
}

impl From<IdError> for Error {
    /// An out-of-range priority keeps its own variant; every other id error is bad input.
    fn from(e: IdError) -> Self {
        match e {
            IdError::PriorityOutOfRange { got, max } => Error::PriorityOutOfRange { got, max },
            e => Error::InvalidArgument(e.to_string()),
        }
    }
}
