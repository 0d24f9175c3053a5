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
//! 8. **Grantee only**: a lease is resumed (moved, or re-created after a restart) only with the resume
//!    credential its grant carried, so only tokens this daemon issued ever reach a pool's counter.
//! 9. **Learning**: during a learning period (after a restart or a takeover) nothing is granted on a
//!    chain with a learning level. A pool `P` learns until its `back` count (leases re-created on `P`
//!    or any descendant during the period) reaches the held count the previous leader last published
//!    for `P` (its `in_flight`: leases on `P` and every descendant), or until the period ends. With a
//!    published state that lists no (or 0) leases for `P`, `P` does not learn; with no published
//!    state (or none for `P`: its publisher was learning without a count), `P` learns for the whole
//!    period. So a learning pool always has `back < expected`
//!    (or no expected count). See [`takeover`].

mod admin;
pub mod budget;
pub mod credential;
mod dispatch;
pub mod error;
mod event;
pub mod health;
pub mod ids;
pub mod lease;
#[cfg(any(test, feature = "testing"))]
pub mod model;
pub mod pool;
#[cfg(test)]
mod proptests;
pub mod queue;
pub mod report;
mod resume;
mod snapshot;
mod takeover;
mod term;
#[cfg(test)]
mod tests;
pub mod time;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use rand::{SeedableRng, rngs::StdRng};
use tokio::time::Instant;

pub use self::{
    admin::{PauseApplied, PoolDeleted, PoolPatch, validate_tree},
    budget::{BudgetConfig, BudgetFact, BudgetKind, BudgetSnapshot, TokenEstimate},
    credential::{LeaseKey, ResumeCredential},
    error::Error,
    event::{Decisions, Event, ExpiryReason, Fact, LeaseEnd, Outcome, PoolChange},
    health::{
        BreakerConfig, BreakerState, BreakerView, ClassPolicy, ForceBreaker, HealthConfig, HealthPatch,
        HoldKind, OutcomePolicies, WhenOpen,
    },
    ids::{FencingToken, IdError, LeaseId, PoolId, Priority, RequestId, SessionId},
    lease::{Ended, Lease},
    pool::{Closed, Overflow, PoolConfig},
    queue::{WaitKey, WaiterId},
    report::{LimitKind, ProviderLimit, Report, Usage},
    resume::ResumeRequest,
    snapshot::{InheritedPause, PoolSnapshot, Snapshot},
    takeover::{BreakerRuntime, PoolLearning, PoolRuntime, RuntimeState},
};
use self::{dispatch::check_ttl, lease::LeaseTable, pool::Pool};

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
    /// The key of resume credentials (see [`credential`]). The daemon keeps it in a file so that
    /// credentials outlive a restart; the default is a random key.
    pub lease_key: LeaseKey,
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
            lease_key: LeaseKey::random(),
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
    /// Token estimate for the rate budgets; `None` means the pool's default estimate.
    pub estimate: Option<TokenEstimate>,
    /// `acquire_any`: further pools after `pool`, in the caller's order. The request waits in every listed
    /// queue at once and is granted on the first listed pool whose gates pass (at most
    /// [`NewRequest::MAX_ANY_POOLS`] pools in all, no pool twice).
    pub any_of: Vec<PoolId>,
}

impl NewRequest {
    /// Most pools one `acquire_any` request may list (`pool` included).
    pub const MAX_ANY_POOLS: usize = 8;

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
            estimate: None,
            any_of: Vec::new(),
        }
    }
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
    /// What a grant takes from the rate budgets.
    cost: budget::Cost,
    /// `acquire_any`: the further pools it waits on, in the caller's order, each with its TTL.
    others: Vec<(PoolId, Duration)>,
}

impl Waiter {
    /// Every pool it waits on, in the caller's order, with the TTL a grant there gets.
    fn pools(&self) -> impl Iterator<Item = (&PoolId, Duration)> {
        std::iter::once((&self.pool, self.ttl)).chain(self.others.iter().map(|(p, t)| (p, *t)))
    }
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
    /// The end of the learning period (a restart's or a leadership term's): resumes may re-create
    /// leases until then; each pool learns on its own within it (see [`takeover`]).
    learning_until: Option<Instant>,
    /// When the current learning period began.
    learning_since: Instant,
    /// The previous leader's held counts, once its runtime state was applied during this period.
    learning_expected: Option<BTreeMap<PoolId, Option<u32>>>,
    /// The next fencing token of each removed pool, so that a pool added again under the same name
    /// never reissues a token (invariant 6).
    retired_tokens: HashMap<PoolId, u64>,
    shutting_down: bool,
    /// An operator's drain: nothing new is granted; waiters stay queued until undrained.
    draining: bool,
    /// Nothing is granted from this instant on (high availability: the leader's lease on its
    /// leadership runs out then; see [`term`]).
    grant_until: Option<Instant>,
    /// The latest instant any operation was given (budget wake-ups are computed from it).
    last_now: Instant,
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
        let learning_until = (!cfg.learning_period.is_zero()).then(|| time::after(now, cfg.learning_period));
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
            learning_since: now,
            learning_expected: None,
            retired_tokens: HashMap::new(),
            shutting_down: false,
            draining: false,
            grant_until: None,
            last_now: now,
            cfg,
        };
        s.sessions.insert(ORPHANS, Session::default());
        for (id, pc) in pools {
            s.pools.insert(id.clone(), Pool::new(id, pc, s.cfg.first_token, now));
        }
        if s.learning_until.is_some() {
            s.start_learning(now);
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
                    self.end_lease(now, &l, LeaseEnd::StreamClosed, &mut out);
                    continue;
                }
                let lease = self.leases.get(&l).expect("session leases exist");
                let pool = lease.pool.clone();
                let until = lease.expires_at.min(time::after(now, grace));
                self.leases.set_session(&l, ORPHANS);
                self.leases.set_expiry(&l, until);
                self.sessions.get_mut(&ORPHANS).expect("always there").leases.insert(l);
                let pool = self.pools.get_mut(&pool).expect("lease pools exist");
                pool.drop_interest(session);
                pool.add_interest(ORPHANS);
            }
        }
        self.settle(now, &mut out);
        // Nobody reads the closed stream; the facts (its leases' ends among them) stay.
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
        if req.any_of.len() >= NewRequest::MAX_ANY_POOLS {
            return Err(Error::InvalidArgument(format!(
                "acquire_any lists {} pools; at most {}",
                req.any_of.len() + 1,
                NewRequest::MAX_ANY_POOLS
            )));
        }
        let pool = self.pools.get(&req.pool).ok_or_else(|| Error::UnknownPool(req.pool.clone()))?;
        let ttl = check_ttl(pool, req.ttl)?;
        let mut others: Vec<(PoolId, Duration)> = Vec::with_capacity(req.any_of.len());
        for p in &req.any_of {
            if *p == req.pool || others.iter().any(|(o, _)| o == p) {
                return Err(Error::InvalidArgument(format!("acquire_any lists pool {p} twice")));
            }
            let other = self.pools.get(p).ok_or_else(|| Error::UnknownPool(p.clone()))?;
            others.push((p.clone(), check_ttl(other, req.ttl)?));
        }
        let max_wait = req.max_wait.or(pool.cfg.max_wait);
        let started = req.started_at.unwrap_or(now).min(now);
        let started = started.max(now.checked_sub(SchedulerConfig::MAX_TURN_AGE).unwrap_or(started));
        let key = self.key_of(started, req.priority);
        let deadline = max_wait.map(|w| time::after(now, w.min(SchedulerConfig::MAX_WAIT)));
        let cost = self.budget_cost(pool, req.estimate)?;
        let listed: Vec<PoolId> =
            std::iter::once(req.pool.clone()).chain(others.iter().map(|(p, _)| p.clone())).collect();
        // Fast path: a listed pool nobody waits on whose every level has room and budget (invariant 3
        // says no other queued waiter could use this slot), so grant without touching the queue.
        // `grant` takes the first such pool in the caller's order.
        let open = listed.iter().any(|p| {
            let pool = &self.pools[p];
            pool.queue.is_empty() && self.grant_gate(pool, &cost, now).is_ok()
        });
        let fail_fast = if open { None } else { self.fail_fast(&listed.iter().collect::<Vec<_>>(), now) };

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
            cost,
            others,
        };
        if open {
            self.insert_waiter(wid, waiter);
            self.grant(now, wid, out);
            return Ok(());
        }
        if let Some(error) = fail_fast {
            return Err(error);
        }
        if deadline.is_some_and(|d| d <= now) {
            return Err(Error::WaitTimeout {
                pool: req.pool,
                waited: Duration::ZERO,
                retry_after: self.pause_remaining(&waiter.pool, now),
            });
        }
        let (position, blocked) = if !waiter.others.is_empty() {
            // acquire_any neither sheds nor blocks: a full listed queue refuses it.
            if let Some(full) = listed
                .iter()
                .map(|p| &self.pools[p])
                .find(|p| p.queue.depth() >= p.cfg.max_queue_depth as usize)
            {
                return Err(Error::QueueFull { pool: full.id.clone(), depth: full.cfg.max_queue_depth });
            }
            let mut position = 0;
            for (i, p) in listed.iter().enumerate() {
                let at = self.pools.get_mut(p).expect("checked above").queue.push(key, wid);
                if i == 0 {
                    position = at;
                }
            }
            (position, false)
        } else {
            let pool = self.pools.get_mut(&req.pool).expect("checked above");
            if pool.queue.depth() >= pool.cfg.max_queue_depth as usize {
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
                                error: Error::Shed(req.pool.clone()),
                            },
                        );
                        let pool = self.pools.get_mut(&req.pool).expect("checked above");
                        (pool.queue.push(key, wid), false)
                    }
                }
            } else {
                (pool.queue.push(key, wid), false)
            }
        };
        self.insert_waiter(wid, waiter);
        let gate = self.queue_gate(&req.pool, now);
        out.push(session, Event::Queued { request_id: req.request_id, position, blocked, gate });
        // A waiter that arrives during a pause (or while a breaker is not closed) learns of it now, not
        // only when it ends.
        let levels: BTreeSet<&PoolId> = listed.iter().flat_map(|p| &self.pools[p].chain).collect();
        for level in levels {
            let p = &self.pools[level];
            if let Some(until) = p.paused_until.filter(|u| *u > now) {
                let reason = p.pause_reason.clone();
                out.push(session, Event::Paused { pool: level.clone(), until, reason });
            }
            let view = p.health.view();
            if view.state != BreakerState::Closed {
                let reason = Arc::from("the circuit breaker is not closed");
                out.push(session, Event::Breaker { pool: level.clone(), view, reason });
            }
        }
        Ok(())
    }

    /// Withdraws a queued request. A request already granted, whose lease this session still holds,
    /// is left alone and nothing is said: the cancel crossed the `Granted` on the wire, and the
    /// client releases the lease once it reads it. Any other unknown request is NOT_FOUND.
    pub fn cancel(&mut self, now: Instant, session: SessionId, request_id: &str) -> Decisions {
        let mut out = Decisions::default();
        self.advance(now, &mut out);
        let wid = self.sessions.get(&session).and_then(|s| s.requests.get(request_id)).copied();
        match wid.and_then(|w| self.drop_waiter(w)) {
            Some(w) => out.push(session, Event::Cancelled { request_id: w.request_id }),
            None if self.holds_grant_of(session, request_id) => {}
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

    /// Whether `session` holds a lease granted for its request `request_id`.
    fn holds_grant_of(&self, session: SessionId, request_id: &str) -> bool {
        self.sessions.get(&session).is_some_and(|s| {
            s.leases.iter().any(|id| {
                self.leases
                    .get(id)
                    .is_some_and(|l| l.request_id.as_ref().is_some_and(|r| r.as_str() == request_id))
            })
        })
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

    /// Gives a lease back with the report of the call it covered. The outcome's class policy applies
    /// (see [`health`]): by default a rate-limited, overloaded or quota-exhausted outcome pauses its
    /// pool; the slot may stay held; the chain's breakers count the result.
    pub fn release(
        &mut self,
        now: Instant,
        session: SessionId,
        id: LeaseId,
        report: impl Into<Report>,
    ) -> Decisions {
        let report = report.into();
        let outcome = report.outcome;
        let mut out = Decisions::default();
        self.advance(now, &mut out);
        match self.own_lease(session, &id) {
            Ok(()) => {
                let pool = self.leases.get(&id).expect("owned lease exists").pool.clone();
                self.budget_settle(now, id, &pool, report.usage.as_ref(), &mut out);
                self.budget_provider_word(now, &pool, &report.limits, &mut out);
                let end = LeaseEnd::Released(outcome);
                let lease = self.end_lease(now, &id, end, &mut out).expect("owned lease exists");
                out.push(session, Event::Released { lease_id: id, pool: lease.pool.clone(), outcome });
                let reason = format!("{} reported on release of lease {id}", outcome.describe());
                self.apply_class_policy(now, &lease.pool, outcome, reason, &mut out);
            }
            Err(error) => out.push(session, Event::LeaseError { lease_id: id.to_string(), error }),
        }
        self.settle(now, &mut out);
        out
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
    /// A waiter blocked only by a rate budget becomes grantable at an instant computed (exact refill)
    /// from the state as of the last operation; it is included.
    pub fn next_deadline(&self) -> Option<Instant> {
        let pools = self.pools.values().filter_map(Pool::next_deadline).min();
        let budgets = self.budget_deadline(self.last_now);
        [
            self.leases.next_expiry(),
            self.deadlines.first().map(|(t, _)| *t),
            pools,
            self.learning_until,
            budgets,
        ]
        .into_iter()
        .flatten()
        .min()
    }
}
