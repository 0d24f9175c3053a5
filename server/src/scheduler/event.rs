//! What the scheduler emits: the messages each session is told ([`Event`]) and the one stream of
//! facts ([`Fact`]) that metrics, Watch and logs read, both gathered per operation in [`Decisions`].

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;

use super::{
    BudgetFact, Error, FencingToken, Lease, LeaseId, PoolId, RequestId, ResumeCredential, SessionId,
    lease::Ended, pool::Closed,
};

/// How the call covered by a lease ended: its outcome class.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Success.
    Ok,
    /// A failure that is not about capacity: a 5xx, a transport error.
    Error,
    /// The caller gave up.
    Cancelled,
    /// A 429 (this key's rate limit): pause the pool for `retry_after` (or the pool's default).
    RateLimited(Option<Duration>),
    /// The provider is overloaded (529, 503): a provider-wide signal, not about this key's quota.
    Overloaded(Option<Duration>),
    /// The key is out of credit (402, `insufficient_quota`): retrying does not help.
    QuotaExhausted(Option<Duration>),
}

impl Outcome {
    /// Every class's label, in a fixed order (metrics index by [`Outcome::index`]).
    pub const LABELS: [&'static str; 6] =
        ["ok", "error", "cancelled", "rate_limited", "overloaded", "quota_exhausted"];

    /// The class's index in [`Outcome::LABELS`].
    pub fn index(&self) -> usize {
        match self {
            Outcome::Ok => 0,
            Outcome::Error => 1,
            Outcome::Cancelled => 2,
            Outcome::RateLimited(_) => 3,
            Outcome::Overloaded(_) => 4,
            Outcome::QuotaExhausted(_) => 5,
        }
    }

    /// The class's snake_case name, as in metrics labels, Watch and logs.
    pub fn label(&self) -> &'static str {
        Self::LABELS[self.index()]
    }

    /// How a pause reason names the class, for example "rate limited (429)".
    pub fn describe(&self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Cancelled => "cancelled",
            Outcome::RateLimited(_) => "rate limited (429)",
            Outcome::Overloaded(_) => "provider overloaded (529/503)",
            Outcome::QuotaExhausted(_) => "quota exhausted (402)",
        }
    }

    /// For the classes that pause the pool: the provider's Retry-After, if it gave one.
    pub fn pause_hint(&self) -> Option<Option<Duration>> {
        match self {
            Outcome::RateLimited(r) | Outcome::Overloaded(r) | Outcome::QuotaExhausted(r) => Some(*r),
            Outcome::Ok | Outcome::Error | Outcome::Cancelled => None,
        }
    }
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
        /// The gate that holds the pool's queue (closed for its head), when one does.
        gate: Option<Closed>,
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
        /// The secret the grantee presents to resume it; goes to the grantee only (never in a
        /// [`Fact`], so never in Watch, metrics or logs).
        credential: ResumeCredential,
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
        /// Its pool.
        pool: PoolId,
        /// Why.
        reason: ExpiryReason,
    },
    /// A release was applied.
    Released {
        /// The lease.
        lease_id: LeaseId,
        /// Its pool.
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
    /// Another stream resumed (took over) a lease this session held: it no longer holds it.
    ResumedElsewhere {
        /// The lease.
        lease_id: LeaseId,
        /// Its pool.
        pool: PoolId,
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
    /// What each session is told, in order: the messages of its stream.
    pub events: Vec<(SessionId, Event)>,
    /// What happened, each fact once, whoever is told: the one stream that metrics, Watch and logs
    /// read. Session events cannot serve for this: a pause of a pool nobody waits on, or the leases of
    /// a stream that just closed, have nobody to address.
    pub facts: Vec<Fact>,
}

/// One thing that happened, with everything an observer needs (see [`Decisions::facts`]).
#[derive(Clone, Debug)]
pub enum Fact {
    /// A lease was granted.
    Granted {
        /// The lease.
        lease: Lease,
        /// How long its request waited (zero when granted at once).
        waited: Duration,
    },
    /// A lease ended.
    Ended {
        /// The lease as it was.
        lease: Lease,
        /// How.
        end: LeaseEnd,
    },
    /// A pool was asked to pause (a 429 or an operator): every such request, whether or not it moved
    /// the pause's end.
    Paused {
        /// The pool.
        pool: PoolId,
        /// When its pause ends now (`now` itself when it is not paused: a zero `retry_after`).
        until: Instant,
        /// Why the pool is paused.
        reason: Arc<str>,
        /// The pause started or now ends later; `false` when an existing pause already lasted longer.
        extended: bool,
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
    /// A pool was created, changed or removed.
    PoolChanged {
        /// The pool.
        pool: PoolId,
        /// What happened.
        change: PoolChange,
        /// Through a configuration reload ([`Scheduler::set_pools`](super::Scheduler::set_pools)),
        /// rather than an operator's upsert or delete.
        reload: bool,
    },
    /// A request was refused or gave up.
    Rejected {
        /// The session it came from.
        session: SessionId,
        /// The request (as sent).
        request_id: String,
        /// Why.
        error: Error,
    },
    /// A rate budget moved: a reservation, a settlement, a shadow-mode wait, the provider's word.
    Budget {
        /// The pool.
        pool: PoolId,
        /// What happened.
        fact: BudgetFact,
    },
    /// A lease-addressed message was refused; nothing changed.
    LeaseRefused {
        /// The session it came from.
        session: SessionId,
        /// The lease as named by the client.
        lease_id: String,
        /// Why.
        error: Error,
    },
}

impl Fact {
    /// The pool it concerns, when there is one.
    pub fn pool(&self) -> Option<&PoolId> {
        match self {
            Fact::Granted { lease, .. } | Fact::Ended { lease, .. } => Some(&lease.pool),
            Fact::Paused { pool, .. }
            | Fact::Resumed { pool }
            | Fact::Effective { pool, .. }
            | Fact::PoolChanged { pool, .. }
            | Fact::Budget { pool, .. } => Some(pool),
            Fact::Rejected { error, .. } | Fact::LeaseRefused { error, .. } => error.pool(),
        }
    }
}

/// How a lease ended.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum LeaseEnd {
    /// Its holder released it, reporting this outcome.
    Released(Outcome),
    /// Its stream closed without a resume grace.
    StreamClosed,
    /// It ended without a release.
    Expired(ExpiryReason),
}

impl LeaseEnd {
    /// What the lease table remembers of it.
    pub(super) fn tombstone(self) -> Ended {
        match self {
            LeaseEnd::Released(_) => Ended::Released,
            LeaseEnd::StreamClosed => Ended::StreamClosed,
            LeaseEnd::Expired(ExpiryReason::Ttl) => Ended::Expired,
            LeaseEnd::Expired(ExpiryReason::Revoked | ExpiryReason::PoolRemoved) => Ended::Revoked,
        }
    }
}

/// What happened to a pool's settings.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum PoolChange {
    /// It was created.
    Created,
    /// Its settings were replaced.
    Changed,
    /// It was removed.
    Removed,
}

impl Decisions {
    /// Tells `session` of `event`. A refusal is a fact as well, so observers see it.
    pub fn push(&mut self, session: SessionId, event: Event) {
        match &event {
            Event::Rejected { request_id, error } => self.facts.push(Fact::Rejected {
                session,
                request_id: request_id.clone(),
                error: error.clone(),
            }),
            Event::LeaseError { lease_id, error } => self.facts.push(Fact::LeaseRefused {
                session,
                lease_id: lease_id.clone(),
                error: error.clone(),
            }),
            _ => {}
        }
        self.events.push((session, event));
    }
}
