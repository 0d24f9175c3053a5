//! The scheduler core: pools, queues and leases as plain synchronous state, driven by explicit instants.
//!
//! Nothing here does I/O, reads a clock or spawns a task. Every operation takes `now` and returns the
//! [`Decisions`] it made (grants, queue positions, rejections, pauses, expiries), addressed to sessions.
//! The driver task carries them out; tests read them.
//!
//! # Invariants
//! These hold whenever a public method returns (the property tests check them after every step):
//! 1. **Accounting**: for every pool `P`, `P.in_flight` equals the number of leases whose pool is `P` or
//!    a descendant of `P`.
//! 2. **Limit**: a grant happens only when every level of the pool's chain passes its gates (not paused,
//!    `in_flight + cooling < effective_limit`), and takes a slot on all levels at once. So no level ever
//!    exceeds its effective limit through a grant. Lowering a limit never revokes a lease; it only stops
//!    grants until `in_flight` drops below it.
//! 3. **Fixpoint**: no pool with a non-empty queue passes its gates. Dispatch runs until nothing more
//!    can be granted, always granting the best head (smallest key) among the pools that can grant.
//! 4. **Order**: within a pool, waiters are served strictly in key order (see [`queue`] for the key and
//!    its aging rule); a pool's waiters all face the same gates, so only its head is ever a candidate.
//! 5. **Ownership**: every waiter is in exactly one pool queue and one session's request map; every
//!    lease is in exactly one session's lease set. Closing a session removes both, at once.
//! 6. **Fencing**: tokens strictly increase per pool, across resumes too.
//! 7. **Bad input changes nothing**: a refused operation produces a `Rejected` or `LeaseError` event and
//!    leaves the state as it was. No input makes a method panic.

pub mod error;
pub mod ids;
pub mod lease;
#[cfg(any(test, feature = "testing"))]
pub mod model;
pub mod pool;
#[cfg(test)]
mod proptests;
pub mod queue;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio::time::Instant;

pub use self::{
    error::Error,
    ids::{FencingToken, LeaseId, PoolId, Priority, RequestId, SessionId},
    lease::{Ended, Lease},
    pool::{Closed, Overflow, PoolConfig},
    queue::{WaitKey, WaiterId},
};
use self::{lease::LeaseTable, pool::Pool};

/// The pseudo-session that holds leases whose stream closed with a resume grace.
const ORPHANS: SessionId = SessionId(0);

/// Settings of the scheduler as a whole.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// One priority level is worth this much waiting (see [`queue`]).
    pub aging_step: Duration,
    /// After a restart, grant nothing new for this long so that earlier leases can resume first.
    pub learning_period: Duration,
    /// Most open requests plus leases on one stream.
    pub max_per_session: usize,
    /// The first fencing token of every pool (the driver derives it from the wall clock so tokens keep
    /// increasing across restarts).
    pub first_token: u64,
    /// Seed for lease ids; `None` seeds from the OS.
    pub seed: Option<u64>,
}

impl SchedulerConfig {
    /// Default `aging_step`.
    pub const DEFAULT_AGING_STEP: Duration = Duration::from_secs(30);
    /// Default `max_per_session`.
    pub const DEFAULT_MAX_PER_SESSION: usize = 4096;
    /// `started_at` older than this is clamped, so a client cannot buy unbounded precedence.
    pub const MAX_TURN_AGE: Duration = Duration::from_secs(3600);
    /// Longest pause a single 429 can cause.
    pub const MAX_PAUSE: Duration = Duration::from_secs(24 * 3600);
    /// Longest `max_wait` honoured; longer waits are treated as this.
    pub const MAX_WAIT: Duration = Duration::from_secs(30 * 24 * 3600);
    /// Highest fencing token a resume may re-create a lease with. Tokens start at the wall clock in
    /// microseconds (about 2^51), so real ones are far below; a larger one would leave the pool's
    /// counter no room to grow (the next grant would overflow it).
    pub const MAX_RESUME_TOKEN: u64 = u64::MAX / 2;
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            aging_step: Self::DEFAULT_AGING_STEP,
            learning_period: Duration::ZERO,
            max_per_session: Self::DEFAULT_MAX_PER_SESSION,
            first_token: 1,
            seed: None,
        }
    }
}

/// A request for a slot, validated for syntax by the caller.
#[derive(Clone, Debug)]
pub struct NewRequest {
    /// Client-chosen id.
    pub request_id: RequestId,
    /// The pool.
    pub pool: PoolId,
    /// Priority.
    pub priority: Priority,
    /// The agent's turn start; `None` means now.
    pub started_at: Option<Instant>,
    /// Lease TTL; `None` means the pool's default.
    pub ttl: Option<Duration>,
    /// Wait limit; `None` means the pool's default.
    pub max_wait: Option<Duration>,
    /// Holder name.
    pub holder: Arc<str>,
}

impl NewRequest {
    /// A request with default priority, TTL and wait.
    pub fn new(request_id: RequestId, pool: PoolId) -> Self {
        Self {
            request_id,
            pool,
            priority: Priority::DEFAULT,
            started_at: None,
            ttl: None,
            max_wait: None,
            holder: Arc::from(""),
        }
    }
}

/// A request to re-attach a lease granted on an earlier stream.
#[derive(Clone, Debug)]
pub struct ResumeRequest {
    /// The lease.
    pub lease_id: LeaseId,
    /// Its fencing token.
    pub token: FencingToken,
    /// Its pool.
    pub pool: PoolId,
    /// Its priority.
    pub priority: Priority,
    /// New TTL; `None` means the pool's default.
    pub ttl: Option<Duration>,
    /// Holder name.
    pub holder: Arc<str>,
}

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
    fn push(&mut self, session: SessionId, event: Event) {
        self.events.push((session, event));
    }
}

/// A partial change to a pool's settings (`UpsertPool`): `None` keeps the current value, or the
/// default for a new pool.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolPatch {
    /// See [`PoolConfig::max_concurrent`].
    pub max_concurrent: Option<u32>,
    /// `Some(None)` makes the pool a root.
    pub parent: Option<Option<PoolId>>,
    /// See [`PoolConfig::max_queue_depth`].
    pub max_queue_depth: Option<u32>,
    /// See [`PoolConfig::on_overflow`].
    pub on_overflow: Option<Overflow>,
    /// See [`PoolConfig::cooldown`].
    pub cooldown: Option<Duration>,
    /// See [`PoolConfig::default_ttl`].
    pub default_ttl: Option<Duration>,
    /// See [`PoolConfig::max_ttl`].
    pub max_ttl: Option<Duration>,
    /// `Some(None)` clears the wait limit.
    pub max_wait: Option<Option<Duration>>,
    /// See [`PoolConfig::default_retry_after`].
    pub default_retry_after: Option<Duration>,
    /// See [`PoolConfig::adaptive`].
    pub adaptive: Option<bool>,
    /// See [`PoolConfig::headroom_recovery`].
    pub headroom_recovery: Option<Duration>,
}

impl PoolPatch {
    /// `base` with the set fields replaced.
    pub fn apply(&self, mut base: PoolConfig) -> PoolConfig {
        fn set<T: Clone>(dst: &mut T, v: &Option<T>) {
            if let Some(v) = v {
                *dst = v.clone();
            }
        }
        set(&mut base.max_concurrent, &self.max_concurrent);
        set(&mut base.parent, &self.parent);
        set(&mut base.max_queue_depth, &self.max_queue_depth);
        set(&mut base.on_overflow, &self.on_overflow);
        set(&mut base.cooldown, &self.cooldown);
        set(&mut base.default_ttl, &self.default_ttl);
        set(&mut base.max_ttl, &self.max_ttl);
        set(&mut base.max_wait, &self.max_wait);
        set(&mut base.default_retry_after, &self.default_retry_after);
        set(&mut base.adaptive, &self.adaptive);
        set(&mut base.headroom_recovery, &self.headroom_recovery);
        base
    }
}

/// What [`Scheduler::delete_pool`] did.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PoolDeleted {
    /// Waiters rejected.
    pub rejected_waiters: u32,
    /// Leases expired.
    pub expired_leases: u32,
}

/// What a rate-limit report did to its pool.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PauseApplied {
    /// When the pause ends (never earlier than before).
    pub until: Instant,
    /// The pool's effective limit now.
    pub effective_limit: u32,
}

/// One pool in a [`Snapshot`].
#[derive(Clone, Debug)]
pub struct PoolSnapshot {
    /// Name.
    pub id: PoolId,
    /// Settings.
    pub config: PoolConfig,
    /// Effective limit.
    pub effective_limit: u32,
    /// Leases on it and its descendants.
    pub in_flight: u32,
    /// Waiters on it (blocked ones included).
    pub queued: u32,
    /// Pause end, while paused.
    pub paused_until: Option<Instant>,
    /// Pause reason.
    pub pause_reason: Arc<str>,
    /// Slots cooling down.
    pub cooling: u32,
    /// Next fencing token.
    pub next_token: u64,
}

/// The state at one instant, for `Status`.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// Pools, parents before children.
    pub pools: Vec<PoolSnapshot>,
    /// Leases, oldest first.
    pub leases: Vec<Lease>,
    /// In the post-restart learning period.
    pub learning: bool,
    /// Shutting down.
    pub shutting_down: bool,
    /// An operator's drain is on.
    pub draining: bool,
}

#[derive(Debug)]
struct Waiter {
    session: SessionId,
    request_id: RequestId,
    pool: PoolId,
    priority: Priority,
    key: WaitKey,
    ttl: Duration,
    enqueued_at: Instant,
    deadline: Option<Instant>,
    holder: Arc<str>,
}

#[derive(Debug, Default)]
struct Session {
    requests: HashMap<RequestId, WaiterId>,
    leases: HashSet<LeaseId>,
}

/// The scheduler. See the module docs for its invariants.
#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    epoch: Instant,
    pools: HashMap<PoolId, Pool>,
    waiters: HashMap<WaiterId, Waiter>,
    deadlines: BTreeSet<(Instant, WaiterId)>,
    sessions: HashMap<SessionId, Session>,
    leases: LeaseTable,
    next_waiter: u64,
    next_session: u64,
    rng: StdRng,
    learning_until: Option<Instant>,
    /// The next fencing token of each removed pool, so that a pool added again under the same name
    /// never reissues a token (invariant 6).
    retired_tokens: HashMap<PoolId, u64>,
    shutting_down: bool,
    /// An operator's drain: nothing new is granted; waiters stay queued until undrained.
    draining: bool,
    /// Fill [`Decisions::observed`] (someone watches).
    observing: bool,
}

impl Scheduler {
    /// A scheduler with these pools, starting at `now`.
    pub fn new(
        cfg: SchedulerConfig,
        pools: BTreeMap<PoolId, PoolConfig>,
        now: Instant,
    ) -> Result<Self, Error> {
        validate_tree(&pools)?;
        let rng = match cfg.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        let learning_until = (!cfg.learning_period.is_zero()).then(|| now + cfg.learning_period);
        let mut s = Self {
            epoch: now,
            pools: HashMap::new(),
            waiters: HashMap::new(),
            deadlines: BTreeSet::new(),
            sessions: HashMap::new(),
            leases: LeaseTable::default(),
            next_waiter: 0,
            next_session: 0,
            rng,
            learning_until,
            retired_tokens: HashMap::new(),
            shutting_down: false,
            draining: false,
            observing: false,
            cfg,
        };
        s.sessions.insert(ORPHANS, Session::default());
        for (id, pc) in pools {
            s.pools.insert(id.clone(), Pool::new(id, pc, s.cfg.first_token));
        }
        s.rebuild_chains();
        Ok(s)
    }

    // ----------------------------------------------------------------------------------------
    // Sessions
    // ----------------------------------------------------------------------------------------

    /// Registers a new stream.
    pub fn open_session(&mut self) -> SessionId {
        self.next_session += 1;
        let id = SessionId(self.next_session);
        self.sessions.insert(id, Session::default());
        id
    }

    /// A stream closed: its waiters leave their queues and its leases are released, at once.
    /// Nothing is sent to the closed session; other sessions may be granted the freed slots.
    ///
    /// With a non-zero `grace` (the client asked for one), its leases are instead kept, detached,
    /// until `min(their expiry, now + grace)`, so that a reconnecting client can resume them.
    pub fn close_session(&mut self, now: Instant, session: SessionId, grace: Duration) -> Decisions {
        let mut out = Decisions::default();
        self.advance(now, &mut out);
        if session != ORPHANS
            && let Some(sess) = self.sessions.remove(&session)
        {
            for w in sess.requests.values() {
                self.drop_waiter(*w);
            }
            for l in sess.leases {
                if grace.is_zero() {
                    self.end_lease(now, &l, Ended::StreamClosed, &mut out);
                    continue;
                }
                let lease = self.leases.get(&l).expect("session leases exist");
                let pool = lease.pool.clone();
                let until = lease.expires_at.min(now + grace);
                self.leases.set_session(&l, ORPHANS);
                self.leases.set_expiry(&l, until);
                self.sessions.get_mut(&ORPHANS).expect("always there").leases.insert(l);
                let pool = self.pools.get_mut(&pool).expect("lease pools exist");
                pool.drop_interest(session);
                pool.add_interest(ORPHANS);
            }
        }
        self.settle(now, &mut out);
        out.events.retain(|(s, _)| *s != session);
        out
    }

    // ----------------------------------------------------------------------------------------
    // Stream operations
    // ----------------------------------------------------------------------------------------

    /// Asks for a slot. Grants at once when possible, else queues (or rejects).
    pub fn request(&mut self, now: Instant, session: SessionId, req: NewRequest) -> Decisions {
        let mut out = Decisions::default();
        self.advance(now, &mut out);
        // Slots that timers freed at `now` go to those already waiting, exactly as if the driver
        // had ticked first; this also restores invariant 3, which the fast path relies on.
        self.settle(now, &mut out);
        let rid = req.request_id.as_str().to_owned();
        if let Err(error) = self.try_request(now, session, req, &mut out) {
            out.push(session, Event::Rejected { request_id: rid, error });
        }
        self.settle(now, &mut out);
        out
    }

    fn try_request(
        &mut self,
        now: Instant,
        session: SessionId,
        req: NewRequest,
        out: &mut Decisions,
    ) -> Result<(), Error> {
        if self.shutting_down {
            return Err(Error::ShuttingDown);
        }
        let sess = self.sessions.get(&session).ok_or(Error::ShuttingDown)?;
        if sess.requests.contains_key(&req.request_id) {
            return Err(Error::DuplicateRequest(req.request_id.to_string()));
        }
        if sess.requests.len() + sess.leases.len() >= self.cfg.max_per_session {
            return Err(Error::LimitExceeded(format!(
                "stream has {} open requests and leases (max_per_stream)",
                self.cfg.max_per_session
            )));
        }
        let pool = self.pools.get(&req.pool).ok_or_else(|| Error::UnknownPool(req.pool.clone()))?;
        let ttl = check_ttl(pool, req.ttl)?;
        let max_wait = req.max_wait.or(pool.cfg.max_wait);
        let started = req.started_at.unwrap_or(now).min(now);
        let started = started.max(now.checked_sub(SchedulerConfig::MAX_TURN_AGE).unwrap_or(started));
        let key = self.key_of(started, req.priority);
        let deadline = max_wait.map(|w| now + w.min(SchedulerConfig::MAX_WAIT));
        let gate = self.chain_gate(pool, now);
        let queue_empty = pool.queue.is_empty();

        self.next_waiter += 1;
        let wid = WaiterId(self.next_waiter);
        let waiter = Waiter {
            session,
            request_id: req.request_id.clone(),
            pool: req.pool.clone(),
            priority: req.priority,
            key,
            ttl,
            enqueued_at: now,
            deadline,
            holder: req.holder,
        };
        if queue_empty && gate.is_ok() {
            // Fast path: nobody waits here and every level has room (invariant 3 says no other
            // queued waiter could use this slot), so grant without touching the queue.
            self.insert_waiter(wid, waiter);
            self.grant(now, wid, out);
            return Ok(());
        }
        if deadline.is_some_and(|d| d <= now) {
            return Err(Error::WaitTimeout {
                pool: req.pool,
                waited: Duration::ZERO,
                retry_after: self.pause_remaining(&waiter.pool, now),
            });
        }
        let pool = self.pools.get_mut(&req.pool).expect("checked above");
        let (position, blocked) = if pool.queue.depth() >= pool.cfg.max_queue_depth as usize {
            match pool.cfg.on_overflow {
                Overflow::Reject => {
                    return Err(Error::QueueFull { pool: req.pool, depth: pool.cfg.max_queue_depth });
                }
                Overflow::Block => (pool.queue.push_blocked(key, wid), true),
                Overflow::ShedOldest => {
                    let victim = pool.queue.oldest().expect("a full queue has an oldest waiter");
                    let shed = self.drop_waiter(victim).expect("queued waiters exist");
                    out.push(
                        shed.session,
                        Event::Rejected {
                            request_id: shed.request_id.to_string(),
                            error: Error::Shed(shed.pool),
                        },
                    );
                    let pool = self.pools.get_mut(&req.pool).expect("checked above");
                    (pool.queue.push(key, wid), false)
                }
            }
        } else {
            (pool.queue.push(key, wid), false)
        };
        self.insert_waiter(wid, waiter);
        out.push(session, Event::Queued { request_id: req.request_id, position, blocked });
        // A waiter that arrives during a pause learns of it now, not only when it ends.
        for level in &self.pools[&req.pool].chain {
            let p = &self.pools[level];
            if let Some(until) = p.paused_until.filter(|u| *u > now) {
                let reason = p.pause_reason.clone();
                out.push(session, Event::Paused { pool: level.clone(), until, reason });
            }
        }
        Ok(())
    }

    /// Withdraws a queued request.
    pub fn cancel(&mut self, now: Instant, session: SessionId, request_id: &str) -> Decisions {
        let mut out = Decisions::default();
        self.advance(now, &mut out);
        let wid = self.sessions.get(&session).and_then(|s| s.requests.get(request_id)).copied();
        match wid.and_then(|w| self.drop_waiter(w)) {
            Some(w) => out.push(session, Event::Cancelled { request_id: w.request_id }),
            None => out.push(
                session,
                Event::Rejected {
                    request_id: request_id.to_owned(),
                    error: Error::UnknownRequest(request_id.to_owned()),
                },
            ),
        }
        self.settle(now, &mut out);
        out
    }

    /// Renews the listed leases of this session (all of them when `lease_ids` is empty).
    pub fn heartbeat(&mut self, now: Instant, session: SessionId, lease_ids: &[LeaseId]) -> Decisions {
        let mut out = Decisions::default();
        self.advance(now, &mut out);
        let ids: Vec<LeaseId> = if lease_ids.is_empty() {
            self.sessions.get(&session).map(|s| s.leases.iter().copied().collect()).unwrap_or_default()
        } else {
            lease_ids.to_vec()
        };
        let mut renewed = 0;
        for id in ids {
            match self.own_lease(session, &id) {
                Ok(()) => {
                    self.leases.renew(&id, now);
                    renewed += 1;
                }
                Err(error) => out.push(session, Event::LeaseError { lease_id: id.to_string(), error }),
            }
        }
        out.push(session, Event::HeartbeatAck { renewed });
        self.settle(now, &mut out);
        out
    }

    /// Gives a lease back. A rate-limited outcome pauses its pool.
    pub fn release(&mut self, now: Instant, session: SessionId, id: LeaseId, outcome: Outcome) -> Decisions {
        let mut out = Decisions::default();
        self.advance(now, &mut out);
        match self.own_lease(session, &id) {
            Ok(()) => {
                let lease = self.end_lease(now, &id, Ended::Released, &mut out).expect("owned lease exists");
                out.push(session, Event::Released { lease_id: id, pool: lease.pool.clone(), outcome });
                if let Outcome::RateLimited(retry_after) = outcome {
                    let reason = format!("rate limited (429) reported on release of lease {id}");
                    self.pause(now, &lease.pool, retry_after, reason, true, &mut out);
                }
            }
            Err(error) => out.push(session, Event::LeaseError { lease_id: id.to_string(), error }),
        }
        self.settle(now, &mut out);
        out
    }

    /// Re-attaches a lease to this session: moves a live lease here, or re-creates one during the
    /// learning period after a restart (when every level still has room under its configured limit).
    pub fn resume(&mut self, now: Instant, session: SessionId, req: ResumeRequest) -> Decisions {
        let mut out = Decisions::default();
        self.advance(now, &mut out);
        let id = req.lease_id;
        match self.try_resume(now, session, req) {
            Ok((token, expires_at)) => {
                out.push(session, Event::LeaseResumed { lease_id: id, token, expires_at });
            }
            Err(error) => out.push(session, Event::LeaseError { lease_id: id.to_string(), error }),
        }
        self.settle(now, &mut out);
        out
    }

    fn try_resume(
        &mut self,
        now: Instant,
        session: SessionId,
        req: ResumeRequest,
    ) -> Result<(FencingToken, Instant), Error> {
        if self.shutting_down {
            return Err(Error::ShuttingDown);
        }
        let id = req.lease_id;
        let pool = self.pools.get(&req.pool).ok_or_else(|| Error::UnknownPool(req.pool.clone()))?;
        let ttl = check_ttl(pool, req.ttl)?;
        if !self.sessions.contains_key(&session) {
            return Err(Error::ShuttingDown);
        }
        if let Some(lease) = self.leases.get(&id) {
            if lease.token != req.token {
                return Err(Error::LeaseMismatch(id, "wrong fencing token"));
            }
            if lease.pool != req.pool {
                return Err(Error::LeaseMismatch(id, "wrong pool"));
            }
            let old = lease.session;
            if old != session {
                if let Some(s) = self.sessions.get_mut(&old) {
                    s.leases.remove(&id);
                }
                let pool = self.pools.get_mut(&req.pool).expect("lease pools exist");
                pool.drop_interest(old);
                pool.add_interest(session);
                self.sessions.get_mut(&session).expect("checked").leases.insert(id);
                self.leases.set_session(&id, session);
            }
            // The resume's TTL applies from now on (the client heartbeats for it).
            self.leases.set_ttl(&id, ttl);
            let lease = self.leases.renew(&id, now).expect("exists");
            return Ok((lease.token, lease.expires_at));
        }
        if let Some(how) = self.leases.ended(&id) {
            return Err(Error::LeaseEnded { id, how: how.describe() });
        }
        if self.learning_until.is_none() {
            return Err(Error::UnknownLease(id));
        }
        if req.token.0 > SchedulerConfig::MAX_RESUME_TOKEN {
            return Err(Error::InvalidArgument(format!(
                "fencing_token {} is out of range (max {})",
                req.token,
                SchedulerConfig::MAX_RESUME_TOKEN
            )));
        }
        let sess = &self.sessions[&session];
        if sess.requests.len() + sess.leases.len() >= self.cfg.max_per_session {
            return Err(Error::LimitExceeded("stream has too many open requests and leases".into()));
        }
        let chain = pool.chain.clone();
        if chain.iter().any(|p| self.pools[p].in_flight >= self.pools[p].cfg.max_concurrent) {
            return Err(Error::ResumeOverLimit(req.pool));
        }
        for p in &chain {
            self.pools.get_mut(p).expect("chain pools exist").in_flight += 1;
        }
        let pool = self.pools.get_mut(&req.pool).expect("checked");
        pool.next_token = pool.next_token.max(req.token.0.saturating_add(1));
        pool.add_interest(session);
        self.sessions.get_mut(&session).expect("checked").leases.insert(id);
        let expires_at = now + ttl;
        self.leases.insert(Lease {
            id,
            pool: req.pool,
            session,
            request_id: None,
            holder: req.holder,
            priority: req.priority,
            token: req.token,
            granted_at: now,
            ttl,
            expires_at,
        });
        Ok((req.token, expires_at))
    }

    // ----------------------------------------------------------------------------------------
    // Pool-wide operations
    // ----------------------------------------------------------------------------------------

    /// A provider answered 429 for this pool: pause it until `max(current end, now + retry_after)`.
    pub fn report_rate_limit(
        &mut self,
        now: Instant,
        pool: &PoolId,
        retry_after: Option<Duration>,
        reason: &str,
    ) -> Result<(PauseApplied, Decisions), Error> {
        if !self.pools.contains_key(pool) {
            return Err(Error::UnknownPool(pool.clone()));
        }
        let mut out = Decisions::default();
        self.advance(now, &mut out);
        let reason = if reason.is_empty() {
            "rate limited (429) reported".to_owned()
        } else {
            format!("rate limited (429) reported: {}", ids::truncate(reason, 256))
        };
        self.pause(now, pool, retry_after, reason, true, &mut out);
        self.settle(now, &mut out);
        let p = &self.pools[pool];
        let applied = PauseApplied { until: p.paused_until.unwrap_or(now), effective_limit: p.effective };
        Ok((applied, out))
    }

    // ----------------------------------------------------------------------------------------
    // Operator operations (the Admin service)
    // ----------------------------------------------------------------------------------------

    /// Pauses a pool by hand until `max(current end, now + duration)`, with the same fan-out as a 429
    /// pause but no adaptive decrease. Returns when the pause ends.
    pub fn pause_pool(
        &mut self,
        now: Instant,
        pool: &PoolId,
        duration: Duration,
        reason: &str,
    ) -> Result<(Instant, Decisions), Error> {
        if !self.pools.contains_key(pool) {
            return Err(Error::UnknownPool(pool.clone()));
        }
        if duration.is_zero() {
            return Err(Error::InvalidArgument("pause duration must be > 0".into()));
        }
        let mut out = Decisions::default();
        self.advance(now, &mut out);
        let reason = if reason.is_empty() {
            "paused by an operator".to_owned()
        } else {
            format!("paused by an operator: {}", ids::truncate(reason, 256))
        };
        self.pause(now, pool, Some(duration), reason, false, &mut out);
        self.settle(now, &mut out);
        Ok((self.pools[pool].paused_until.unwrap_or(now), out))
    }

    /// Ends a pool's pause now (Resumed fan-out, then grants). Returns whether it was paused. Adaptive
    /// headroom is left alone: the operator lifts the pause, not the provider's limit.
    pub fn resume_pool(&mut self, now: Instant, pool: &PoolId) -> Result<(bool, Decisions), Error> {
        if !self.pools.contains_key(pool) {
            return Err(Error::UnknownPool(pool.clone()));
        }
        let mut out = Decisions::default();
        self.advance(now, &mut out);
        let p = self.pools.get_mut(pool).expect("checked above");
        let was_paused = p.paused_until.take().is_some();
        if was_paused {
            p.pause_reason = Arc::from("");
            if self.observing {
                out.observed.push(Observed::Resumed { pool: pool.clone() });
            }
            for s in self.interested(pool) {
                out.push(s, Event::Resumed { pool: pool.clone() });
            }
        }
        self.settle(now, &mut out);
        Ok((was_paused, out))
    }

    /// Ends a lease now: its holder gets `Expired{Revoked}` and the slot is freed (cooldown applies).
    /// Returns the lease as it was.
    pub fn revoke(&mut self, now: Instant, id: LeaseId) -> Result<(Lease, Decisions), Error> {
        // Checked before any timer runs, so a refusal changes nothing (invariant 7).
        let Some(lease) = self.leases.get(&id).cloned() else {
            return Err(match self.leases.ended(&id) {
                Some(how) => Error::LeaseEnded { id, how: how.describe() },
                None => Error::UnknownLease(id),
            });
        };
        let mut out = Decisions::default();
        self.advance(now, &mut out);
        // A lease whose TTL ran out at `now` has already been reclaimed (and its holder told so) by
        // `advance`; that ends it just as well.
        if let Some(l) = self.end_lease(now, &id, Ended::Revoked, &mut out) {
            let pool = l.pool.clone();
            out.push(l.session, Event::Expired { lease_id: id, pool, reason: ExpiryReason::Revoked });
        }
        self.settle(now, &mut out);
        Ok((lease, out))
    }

    /// Starts or ends an operator's drain. While draining nothing new is granted (fast path and
    /// queue alike) and waiters stay queued; ending the drain grants them.
    pub fn set_draining(&mut self, now: Instant, on: bool) -> Decisions {
        let mut out = Decisions::default();
        self.advance(now, &mut out);
        self.draining = on;
        self.settle(now, &mut out);
        out
    }

    /// Whether an operator's drain is on.
    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// Fills [`Decisions::observed`] while on. Off by default so the grant path builds nothing for
    /// observers when nobody watches.
    pub fn set_observing(&mut self, on: bool) {
        self.observing = on;
    }

    /// Creates a pool or changes some of its settings, through [`Scheduler::set_pools`] (same
    /// validation, same no-revoke semantics). A new pool may not take the count above `max_pools`.
    /// Returns whether the pool was created.
    pub fn upsert_pool(
        &mut self,
        now: Instant,
        id: PoolId,
        patch: &PoolPatch,
        max_pools: usize,
    ) -> Result<(bool, Decisions), Error> {
        let current = self.pools.get(&id).map(|p| p.cfg.clone());
        let created = current.is_none();
        if created && self.pools.len() >= max_pools {
            return Err(Error::LimitExceeded(format!(
                "{} pools exist; limits.max_pools is {max_pools}",
                self.pools.len()
            )));
        }
        let mut all = self.pool_configs();
        all.insert(id, patch.apply(current.unwrap_or_default()));
        Ok((created, self.set_pools(now, all)?))
    }

    /// Removes a pool that has no children, through [`Scheduler::set_pools`]: its waiters are
    /// rejected and its leases expire.
    pub fn delete_pool(&mut self, now: Instant, id: &PoolId) -> Result<(PoolDeleted, Decisions), Error> {
        if !self.pools.contains_key(id) {
            return Err(Error::UnknownPool(id.clone()));
        }
        let mut children: Vec<&str> = self
            .pools
            .values()
            .filter(|p| p.cfg.parent.as_ref() == Some(id))
            .map(|p| p.id.as_str())
            .collect();
        if !children.is_empty() {
            children.sort_unstable();
            return Err(Error::PoolHasChildren { pool: id.clone(), children: children.join(", ") });
        }
        let mut all = self.pool_configs();
        all.remove(id);
        let out = self.set_pools(now, all)?;
        let mut done = PoolDeleted { rejected_waiters: 0, expired_leases: 0 };
        for (_, e) in &out.events {
            match e {
                Event::Rejected { error: Error::PoolRemoved(p), .. } if p == id => done.rejected_waiters += 1,
                Event::Expired { reason: ExpiryReason::PoolRemoved, .. } => done.expired_leases += 1,
                _ => {}
            }
        }
        Ok((done, out))
    }

    /// Replaces the pool set (config reload). Raised limits grant at once; lowered ones revoke nothing.
    /// Removed pools reject their waiters and expire their leases.
    pub fn set_pools(
        &mut self,
        now: Instant,
        pools: BTreeMap<PoolId, PoolConfig>,
    ) -> Result<Decisions, Error> {
        validate_tree(&pools)?;
        let mut out = Decisions::default();
        self.advance(now, &mut out);
        let removed: Vec<PoolId> = self.pools.keys().filter(|p| !pools.contains_key(*p)).cloned().collect();
        for id in &removed {
            let waiters: Vec<WaiterId> = self.pools[id].queue.iter().collect();
            for w in waiters {
                if let Some(w) = self.drop_waiter(w) {
                    let error = Error::PoolRemoved(id.clone());
                    out.push(w.session, Event::Rejected { request_id: w.request_id.to_string(), error });
                }
            }
            let leases: Vec<(LeaseId, SessionId)> =
                self.leases.values().filter(|l| &l.pool == id).map(|l| (l.id, l.session)).collect();
            for (l, s) in leases {
                self.end_lease(now, &l, Ended::Revoked, &mut out);
                let pool = id.clone();
                out.push(s, Event::Expired { lease_id: l, pool, reason: ExpiryReason::PoolRemoved });
            }
        }
        for id in &removed {
            if let Some(p) = self.pools.remove(id) {
                self.retired_tokens.insert(id.clone(), p.next_token);
            }
        }
        for (id, pc) in pools {
            match self.pools.get_mut(&id) {
                Some(p) => {
                    p.reconfigure(pc);
                    // A deeper queue has room for blocked waiters now, ahead of later arrivals.
                    p.queue.admit_blocked(p.cfg.max_queue_depth as usize);
                }
                None => {
                    let first = self
                        .retired_tokens
                        .remove(&id)
                        .map_or(self.cfg.first_token, |t| t.max(self.cfg.first_token));
                    self.pools.insert(id.clone(), Pool::new(id, pc, first));
                }
            }
        }
        self.rebuild_chains();
        self.settle(now, &mut out);
        Ok(out)
    }

    /// Stops granting and rejects every waiter with UNAVAILABLE. Leases stay until their streams close.
    pub fn shutdown(&mut self, now: Instant) -> Decisions {
        let mut out = Decisions::default();
        self.advance(now, &mut out);
        self.shutting_down = true;
        let all: Vec<WaiterId> = self.waiters.keys().copied().collect();
        for w in all {
            if let Some(w) = self.drop_waiter(w) {
                out.push(
                    w.session,
                    Event::Rejected { request_id: w.request_id.to_string(), error: Error::ShuttingDown },
                );
            }
        }
        out
    }

    /// Applies every timer due by `now` (expiries, wait deadlines, pause ends, cooldowns, recovery)
    /// and grants what became possible.
    pub fn tick(&mut self, now: Instant) -> Decisions {
        let mut out = Decisions::default();
        self.advance(now, &mut out);
        self.settle(now, &mut out);
        out
    }

    /// When [`Scheduler::tick`] next has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let pools = self.pools.values().filter_map(Pool::next_deadline).min();
        [self.leases.next_expiry(), self.deadlines.first().map(|(t, _)| *t), pools, self.learning_until]
            .into_iter()
            .flatten()
            .min()
    }

    /// A snapshot for `Status`. `pool` limits it to one pool and its leases.
    pub fn snapshot(&self, pool: Option<&PoolId>) -> Result<Snapshot, Error> {
        if let Some(p) = pool.filter(|p| !self.pools.contains_key(*p)) {
            return Err(Error::UnknownPool(p.clone()));
        }
        let mut pools: Vec<PoolSnapshot> = self
            .pools
            .values()
            .filter(|p| pool.is_none_or(|want| &p.id == want))
            .map(|p| PoolSnapshot {
                id: p.id.clone(),
                config: p.cfg.clone(),
                effective_limit: p.effective,
                in_flight: p.in_flight,
                queued: p.queue.len() as u32,
                paused_until: p.paused_until,
                pause_reason: p.pause_reason.clone(),
                cooling: p.cooling.len() as u32,
                next_token: p.next_token,
            })
            .collect();
        pools.sort_by(|a, b| {
            (self.pools[&a.id].chain.len(), &a.id).cmp(&(self.pools[&b.id].chain.len(), &b.id))
        });
        let mut leases: Vec<Lease> =
            self.leases.values().filter(|l| pool.is_none_or(|want| &l.pool == want)).cloned().collect();
        leases.sort_by_key(|l| (l.granted_at, l.id));
        Ok(Snapshot {
            pools,
            leases,
            learning: self.learning_until.is_some(),
            shutting_down: self.shutting_down,
            draining: self.draining,
        })
    }

    /// The configured pools.
    pub fn pool_configs(&self) -> BTreeMap<PoolId, PoolConfig> {
        self.pools.iter().map(|(k, v)| (k.clone(), v.cfg.clone())).collect()
    }

    /// How many leases are held in all.
    pub fn lease_count(&self) -> usize {
        self.leases.len()
    }

    /// How many requests wait in all.
    pub fn waiter_count(&self) -> usize {
        self.waiters.len()
    }

    /// The pool of each lease a session holds (one entry per lease), for example to count what
    /// closing it releases.
    pub fn session_lease_pools(&self, session: SessionId) -> impl Iterator<Item = &PoolId> + '_ {
        self.sessions
            .get(&session)
            .into_iter()
            .flat_map(|s| s.leases.iter())
            .filter_map(|l| self.leases.get(l).map(|l| &l.pool))
    }

    /// How many sessions are open.
    pub fn session_count(&self) -> usize {
        self.sessions.len() - 1
    }

    // ----------------------------------------------------------------------------------------
    // Internals
    // ----------------------------------------------------------------------------------------

    fn key_of(&self, started: Instant, priority: Priority) -> WaitKey {
        let offset = if started >= self.epoch {
            (started - self.epoch).as_nanos() as i64
        } else {
            -((self.epoch - started).as_nanos() as i64)
        };
        let step = self.cfg.aging_step.as_nanos().min(i64::MAX as u128 / 16) as i64;
        offset.saturating_sub(step.saturating_mul(i64::from(priority.get())))
    }

    /// The conjunction of every gate over the pool's chain. New gates (RPM/TPM budgets, a circuit
    /// breaker) slot in here, or in [`Pool::gate`] when they are per level.
    fn chain_gate(&self, pool: &Pool, now: Instant) -> Result<(), Closed> {
        if self.shutting_down || self.draining {
            return Err(Closed::Draining);
        }
        if self.learning_until.is_some() {
            return Err(Closed::Learning);
        }
        pool.chain.iter().try_for_each(|p| self.pools[p].gate(now))
    }

    fn pause_remaining(&self, pool: &PoolId, now: Instant) -> Option<Duration> {
        self.pools[pool]
            .chain
            .iter()
            .filter_map(|p| self.pools[p].paused_until)
            .max()
            .filter(|u| *u > now)
            .map(|u| u - now)
    }

    fn insert_waiter(&mut self, wid: WaiterId, w: Waiter) {
        if let Some(d) = w.deadline {
            self.deadlines.insert((d, wid));
        }
        self.sessions.get_mut(&w.session).expect("caller checked").requests.insert(w.request_id.clone(), wid);
        self.pools.get_mut(&w.pool).expect("caller checked").add_interest(w.session);
        self.waiters.insert(wid, w);
    }

    /// Removes a waiter from every index; lets a blocked waiter into its queue.
    fn drop_waiter(&mut self, wid: WaiterId) -> Option<Waiter> {
        let w = self.waiters.remove(&wid)?;
        if let Some(d) = w.deadline {
            self.deadlines.remove(&(d, wid));
        }
        if let Some(s) = self.sessions.get_mut(&w.session) {
            s.requests.remove(&w.request_id);
        }
        if let Some(pool) = self.pools.get_mut(&w.pool) {
            pool.queue.remove(w.key, wid);
            pool.queue.admit_blocked(pool.cfg.max_queue_depth as usize);
            pool.drop_interest(w.session);
        }
        Some(w)
    }

    fn grant(&mut self, now: Instant, wid: WaiterId, out: &mut Decisions) {
        let Some(w) = self.drop_waiter(wid) else {
            return;
        };
        let mut id = LeaseId(self.rng.random());
        while self.leases.contains(&id) || self.leases.ended(&id).is_some() {
            id = LeaseId(self.rng.random());
        }
        let pool = self.pools.get_mut(&w.pool).expect("waiter pools exist");
        let token = FencingToken(pool.next_token);
        pool.next_token += 1;
        pool.add_interest(w.session);
        for p in pool.chain.clone() {
            self.pools.get_mut(&p).expect("chain pools exist").in_flight += 1;
        }
        let expires_at = now + w.ttl;
        self.sessions.get_mut(&w.session).expect("waiter sessions exist").leases.insert(id);
        let lease = Lease {
            id,
            pool: w.pool.clone(),
            session: w.session,
            request_id: Some(w.request_id.clone()),
            holder: w.holder,
            priority: w.priority,
            token,
            granted_at: now,
            ttl: w.ttl,
            expires_at,
        };
        if self.observing {
            out.observed.push(Observed::Granted(lease.clone()));
        }
        self.leases.insert(lease);
        out.push(
            w.session,
            Event::Granted {
                request_id: w.request_id,
                lease_id: id,
                pool: w.pool,
                token,
                ttl: w.ttl,
                expires_at,
                waited: now.saturating_duration_since(w.enqueued_at),
            },
        );
    }

    /// Removes a lease and frees its slot on every level (each level's cooldown applies).
    fn end_lease(&mut self, now: Instant, id: &LeaseId, how: Ended, out: &mut Decisions) -> Option<Lease> {
        let lease = self.leases.remove(id, how)?;
        if self.observing {
            out.observed.push(Observed::Ended(lease.clone(), how));
        }
        if let Some(s) = self.sessions.get_mut(&lease.session) {
            s.leases.remove(id);
        }
        if let Some(pool) = self.pools.get_mut(&lease.pool) {
            pool.drop_interest(lease.session);
            for p in pool.chain.clone() {
                self.pools.get_mut(&p).expect("chain pools exist").free_slot(now);
            }
        }
        Some(lease)
    }

    fn own_lease(&self, session: SessionId, id: &LeaseId) -> Result<(), Error> {
        match self.leases.get(id) {
            Some(l) if l.session == session => Ok(()),
            Some(_) => Err(Error::NotYourLease(*id)),
            None => match self.leases.ended(id) {
                Some(how) => Err(Error::LeaseEnded { id: *id, how: how.describe() }),
                None => Err(Error::UnknownLease(*id)),
            },
        }
    }

    /// Pauses a pool until `max(current end, now + wait)` and tells everyone interested. A 429
    /// (`adaptive_step`) also starts an episode of adaptive headroom; a manual pause does not, since
    /// it says nothing about the provider's capacity.
    fn pause(
        &mut self,
        now: Instant,
        pool_id: &PoolId,
        retry_after: Option<Duration>,
        reason: String,
        adaptive_step: bool,
        out: &mut Decisions,
    ) {
        let observing = self.observing;
        let Some(pool) = self.pools.get_mut(pool_id) else {
            return;
        };
        let wait = retry_after.unwrap_or(pool.cfg.default_retry_after).min(SchedulerConfig::MAX_PAUSE);
        let until = now + wait;
        let new_episode = pool.paused_until.is_none_or(|u| u <= now);
        if adaptive_step && new_episode && pool.cfg.adaptive && pool.effective > 1 {
            pool.effective -= 1;
            if observing {
                out.observed.push(Observed::Effective { pool: pool_id.clone(), limit: pool.effective });
            }
        }
        // A zero retry_after still counts as a 429 episode but pauses nothing: recording a pause that
        // ends now would announce Paused and Resumed for nothing and leave a timer due already.
        let extended = until > now && pool.paused_until.is_none_or(|u| until > u);
        if extended {
            pool.paused_until = Some(until);
            pool.pause_reason = Arc::from(reason);
        }
        if adaptive_step && pool.cfg.adaptive && pool.effective < pool.cfg.max_concurrent {
            pool.recover_at = Some(pool.paused_until.unwrap_or(until) + pool.cfg.headroom_recovery);
        }
        if extended {
            let reason = pool.pause_reason.clone();
            if observing {
                out.observed.push(Observed::Paused { pool: pool_id.clone(), until, reason: reason.clone() });
            }
            for s in self.interested(pool_id) {
                out.push(s, Event::Paused { pool: pool_id.clone(), until, reason: reason.clone() });
            }
        }
    }

    /// Sessions waiting on or holding this pool or any descendant of it.
    fn interested(&self, pool: &PoolId) -> BTreeSet<SessionId> {
        self.pools
            .values()
            .filter(|p| p.chain.contains(pool))
            .flat_map(|p| p.interest.keys().copied())
            .collect()
    }

    /// Applies timers due by `now`, without granting.
    fn advance(&mut self, now: Instant, out: &mut Decisions) {
        if self.learning_until.is_some_and(|t| t <= now) {
            self.learning_until = None;
        }
        let mut resumed = Vec::new();
        let observing = self.observing;
        for pool in self.pools.values_mut() {
            while pool.cooling.front().is_some_and(|t| *t <= now) {
                pool.cooling.pop_front();
            }
            if pool.paused_until.is_some_and(|t| t <= now) {
                pool.paused_until = None;
                pool.pause_reason = Arc::from("");
                resumed.push(pool.id.clone());
            }
            let before = pool.effective;
            while let Some(at) = pool.recover_at.filter(|t| *t <= now) {
                pool.effective = (pool.effective + 1).min(pool.cfg.max_concurrent);
                pool.recover_at = (pool.effective < pool.cfg.max_concurrent)
                    .then(|| at + pool.cfg.headroom_recovery.max(Duration::from_millis(1)));
            }
            if observing && pool.effective != before {
                out.observed.push(Observed::Effective { pool: pool.id.clone(), limit: pool.effective });
            }
        }
        for id in resumed {
            if observing {
                out.observed.push(Observed::Resumed { pool: id.clone() });
            }
            for s in self.interested(&id) {
                out.push(s, Event::Resumed { pool: id.clone() });
            }
        }
        while let Some(id) = self.leases.first_expired(now) {
            if let Some(lease) = self.end_lease(now, &id, Ended::Expired, out) {
                let reason = ExpiryReason::Ttl;
                out.push(lease.session, Event::Expired { lease_id: id, pool: lease.pool, reason });
            }
        }
        self.expire_waits(now, out);
    }

    /// Grants to a fixpoint, then rejects waiters past their deadline.
    fn settle(&mut self, now: Instant, out: &mut Decisions) {
        loop {
            let mut best: Option<(WaitKey, WaiterId)> = None;
            for pool in self.pools.values() {
                let Some(head) = pool.queue.head() else {
                    continue;
                };
                if best.is_some_and(|b| b <= head) {
                    continue;
                }
                if self.chain_gate(pool, now).is_ok() {
                    best = Some(head);
                }
            }
            let Some((_, wid)) = best else { break };
            self.grant(now, wid, out);
        }
        self.expire_waits(now, out);
    }

    fn expire_waits(&mut self, now: Instant, out: &mut Decisions) {
        while let Some(&(at, wid)) = self.deadlines.first().filter(|(t, _)| *t <= now) {
            self.deadlines.remove(&(at, wid));
            if let Some(w) = self.drop_waiter(wid) {
                let error = Error::WaitTimeout {
                    waited: now - w.enqueued_at,
                    retry_after: self.pause_remaining(&w.pool, now),
                    pool: w.pool,
                };
                out.push(w.session, Event::Rejected { request_id: w.request_id.to_string(), error });
            }
        }
    }

    /// Recomputes every pool's ancestor chain and in-flight count from the lease table.
    fn rebuild_chains(&mut self) {
        let parents: HashMap<PoolId, Option<PoolId>> =
            self.pools.iter().map(|(k, v)| (k.clone(), v.cfg.parent.clone())).collect();
        for (id, pool) in self.pools.iter_mut() {
            let mut chain = vec![id.clone()];
            let mut cur = parents.get(id).cloned().flatten();
            while let Some(p) = cur {
                cur = parents.get(&p).cloned().flatten();
                chain.push(p);
            }
            pool.chain = chain;
            pool.in_flight = 0;
        }
        let held: Vec<PoolId> = self.leases.values().map(|l| l.pool.clone()).collect();
        for p in held {
            for level in self.pools[&p].chain.clone() {
                self.pools.get_mut(&level).expect("chain pools exist").in_flight += 1;
            }
        }
    }

    /// Checks invariants 1, 3 and 5; for tests.
    #[cfg(test)]
    pub(crate) fn check_invariants(&self, now: Instant) {
        let mut counted: HashMap<&PoolId, u32> = HashMap::new();
        for l in self.leases.values() {
            for p in &self.pools[&l.pool].chain {
                *counted.entry(p).or_default() += 1;
            }
            assert!(self.sessions[&l.session].leases.contains(&l.id), "lease {} not in its session", l.id);
        }
        for p in self.pools.values() {
            assert_eq!(p.in_flight, counted.get(&p.id).copied().unwrap_or(0), "in_flight of {}", p.id);
            if p.queue.head().is_some() {
                assert!(self.chain_gate(p, now).is_err(), "pool {} could grant but has waiters", p.id);
            }
        }
        let queued: usize = self.pools.values().map(|p| p.queue.len()).sum();
        assert_eq!(queued, self.waiters.len());
        let in_sessions: usize = self.sessions.values().map(|s| s.requests.len()).sum();
        assert_eq!(in_sessions, self.waiters.len());
    }
}

fn check_ttl(pool: &Pool, ttl: Option<Duration>) -> Result<Duration, Error> {
    let ttl = ttl.unwrap_or(pool.cfg.default_ttl);
    if ttl.is_zero() || ttl > pool.cfg.max_ttl {
        return Err(Error::InvalidTtl { pool: pool.id.clone(), got: ttl, max: pool.cfg.max_ttl });
    }
    Ok(ttl)
}

/// Checks every pool's settings, that parents exist, and that the parent links form no cycle.
pub fn validate_tree(pools: &BTreeMap<PoolId, PoolConfig>) -> Result<(), Error> {
    for (id, pc) in pools {
        pc.validate(id).map_err(Error::InvalidArgument)?;
        let mut seen = HashSet::from([id]);
        let mut cur = pc.parent.as_ref();
        while let Some(p) = cur {
            let Some(parent) = pools.get(p) else {
                return Err(Error::InvalidArgument(format!("pool {id}: parent {p} does not exist")));
            };
            if !seen.insert(p) {
                return Err(Error::InvalidArgument(format!(
                    "pool {id}: parent chain has a cycle through {p}"
                )));
            }
            cur = parent.parent.as_ref();
        }
    }
    Ok(())
}
