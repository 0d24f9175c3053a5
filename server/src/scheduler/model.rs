//! The one model of scheduler operations, shared by the property tests (`proptests.rs`) and the fuzz
//! targets (`fuzz/`, through the `testing` feature): an operation list ([`Case`], [`Op`]), a model that
//! follows the events, and [`Invariants`], the checks derived from the public API alone.
//!
//! [`run`] applies a case to a [`Scheduler`] and checks, after every step:
//! - the limit at every level (a grant never takes a level past its effective limit; a level is
//!   over its limit only after the limit was lowered below its holders, never by a grant);
//! - no slot lost or invented (the model's leases are exactly the scheduler's);
//! - queue order: each grant goes to the head of its pool's queue by the documented key
//!   (`started_at - priority × aging_step`, then arrival), blocked waiters enter in arrival order,
//!   `shed_oldest` sheds the oldest arrival, and `Queued` positions match;
//! - timers: no lease outlives its expiry, no waiter its deadline, and neither goes early;
//! - fencing tokens strictly increase per pool, across resumes and removal of the pool;
//! - fixpoint: a pool with waiters cannot grant (learning, draining, shutting down, paused, or full on
//!   some level);
//! - a refused operation changes nothing;
//! - only the grantee resumes: every grant carries the lease's credential, and a resume with a forged
//!   one (Status-level knowledge only) is refused with `BadCredential` and moves no lease or counter;
//!   a takeover tells the stream it was taken from;
//! - after every stream closes (and grace ends), nothing is left.
//!
//! Under `cfg(test)` it also runs the core's own `check_invariants`.

use std::collections::{BTreeMap, HashMap, HashSet};

use tokio::time::Instant;

use super::*;

/// The pool tree: `g` over `a` and `b`, `a1` under `a`.
pub const POOLS: [&str; 4] = ["g", "a", "b", "a1"];
/// Each pool's parent, by index in [`POOLS`].
pub const PARENTS: [Option<&str>; 4] = [None, Some("g"), Some("g"), Some("a")];
const ORPHANS: SessionId = SessionId(0);
const AGING_STEP: Duration = Duration::from_millis(100);
/// Every pool's default TTL.
pub const DEFAULT_TTL: Duration = Duration::from_millis(1000);
/// Every pool's longest TTL.
pub const MAX_TTL: Duration = Duration::from_millis(3000);
/// Every pool's cap on an agent's 429 pause: below the longest `retry_after` the operations use, so
/// the cap is exercised.
pub const MAX_AGENT_RETRY_AFTER: Duration = Duration::from_millis(500);
/// The key of resume credentials (fixed, so runs replay exactly).
const KEY: [u8; LeaseKey::LEN] = [0x5e; LeaseKey::LEN];
/// Every request's holder name.
const HOLDER: &str = "agent";

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn pid(i: usize) -> PoolId {
    PoolId::new(POOLS[i % POOLS.len()])
}

/// A pool tree (settings by index in [`POOLS`]) and the operations to run on it.
#[derive(Clone, Debug)]
pub struct Case {
    /// Each pool's `max_concurrent` (at least 1).
    pub limits: [u32; 4],
    /// Each pool's `max_queue_depth` (at least 1).
    pub depth: [u32; 4],
    /// Each pool's overflow policy.
    pub overflow: [Overflow; 4],
    /// Each pool's cooldown: 50 ms when set.
    pub cooldown: [bool; 4],
    /// Adaptive limits on every pool.
    pub adaptive: bool,
    /// Start in a 300 ms learning period.
    pub learning: bool,
    /// Milliseconds to advance, then the operation.
    pub ops: Vec<(u64, Op)>,
}

/// One operation. Small numbers pick streams, pools and leases by index (modulo what exists); a few
/// values pick a made-up target instead (see [`run`]).
#[derive(Clone, Debug)]
#[allow(missing_docs, reason = "the fields are the operation's arguments, named as in the Scheduler API")]
pub enum Op {
    Open,
    Close {
        s: usize,
        grace: bool,
    },
    Request {
        s: usize,
        pool: usize,
        priority: u8,
        ttl: u8,
        max_wait: Option<u64>,
        back: u8,
        dup: bool,
    },
    Cancel {
        s: usize,
        which: usize,
    },
    Heartbeat {
        s: usize,
        which: Option<usize>,
    },
    Release {
        s: usize,
        which: usize,
        outcome: u8,
        retry: Option<u64>,
    },
    Move {
        s: usize,
        which: usize,
        good_token: bool,
        forged: bool,
    },
    Recreate {
        s: usize,
        pool: usize,
        id: u128,
        token: u64,
        forged: bool,
    },
    RateLimit {
        pool: usize,
        retry: Option<u64>,
    },
    SetPools {
        limits: [u32; 4],
        depth: [u32; 4],
        remove_b: bool,
    },
    Tick,
    PausePool {
        pool: usize,
        dur: u64,
    },
    ResumePool {
        pool: usize,
    },
    Revoke {
        which: usize,
    },
    Drain(bool),
    Shutdown,
    /// Grants only before `now + ms` (`None`: no grant deadline), as an HA leader's keepalive feeds.
    Fence {
        ms: Option<u64>,
    },
    /// A new leadership term whose first token is `bump` above the highest token seen so far.
    BeginTerm {
        bump: u64,
    },
    /// A takeover: a new term with a 300 ms learning period, then the previous leader's runtime
    /// state (`None`: none published) with these held counts by pool index, and a pause of `ms` on
    /// one pool, and a phantom hold and a release cooldown of `ms` on one pool (on top of whatever it
    /// holds: the limit gates grants, not the count).
    TakeOver {
        held: Option<[u8; 4]>,
        pause: Option<(usize, u64)>,
        hold: Option<(usize, u64)>,
    },
    /// One of [`EXTREMES`] (by `value`, modulo) in one duration field, by `target`: 0 a request's
    /// ttl, 1 a request's max_wait, 2 a rate-limited release's retry_after, 3 a ReportRateLimit's
    /// retry_after, 4 an operator pause, 5 a closing stream's grace, 6 every pool's cooldown, 7 every
    /// pool's headroom_recovery, 8 every pool's default_retry_after.
    Extreme {
        s: usize,
        pool: usize,
        target: u8,
        value: usize,
    },
}

/// The durations [`Op::Extreme`] tries: zero, one nanosecond, and values far beyond every bound.
pub const EXTREMES: [Duration; 5] = [
    Duration::ZERO,
    Duration::from_nanos(1),
    Duration::from_secs(i64::MAX as u64),
    Duration::from_secs(u64::MAX),
    Duration::MAX,
];

fn pool_set(case: &Case, limits: [u32; 4], depth: [u32; 4], without_b: bool) -> BTreeMap<PoolId, PoolConfig> {
    (0..4)
        .filter(|&i| !(without_b && POOLS[i] == "b"))
        .map(|i| {
            let cfg = PoolConfig {
                max_concurrent: limits[i],
                parent: PARENTS[i].map(PoolId::new),
                max_queue_depth: depth[i],
                on_overflow: case.overflow[i],
                cooldown: if case.cooldown[i] { ms(50) } else { Duration::ZERO },
                default_ttl: DEFAULT_TTL,
                max_ttl: MAX_TTL,
                max_wait: None,
                default_retry_after: ms(200),
                adaptive: case.adaptive,
                headroom_recovery: ms(300),
                max_agent_retry_after: MAX_AGENT_RETRY_AFTER,
                // Rate budgets have their own property test (proptests.rs, "Rate budgets").
                budget: BudgetConfig::default(),
                health: HealthConfig::default(),
            };
            (pid(i), cfg)
        })
        .collect()
}

#[derive(Clone, Debug)]
struct MLease {
    session: SessionId,
    /// The request it was granted for (`None` for one re-created by a resume).
    request_id: Option<String>,
    pool: PoolId,
    token: u64,
    ttl: Duration,
    expires_at: Instant,
}

#[derive(Clone, Debug)]
struct MWaiter {
    pool: PoolId,
    key: i128,
    arrival: u64,
    blocked: bool,
    deadline: Option<Instant>,
}

impl MWaiter {
    fn order(&self) -> (i128, u64) {
        (self.key, self.arrival)
    }
}

/// What the request being processed looks like to the model.
struct Pending {
    session: SessionId,
    id: String,
    waiter: MWaiter,
    ttl: Duration,
}

struct Model {
    t0: Instant,
    pools: BTreeMap<PoolId, PoolConfig>,
    leases: BTreeMap<LeaseId, MLease>,
    waiters: BTreeMap<(SessionId, String), MWaiter>,
    last_token: HashMap<PoolId, u64>,
    sessions: Vec<SessionId>,
    next_request: u64,
    /// The lease an operator is revoking in the current step.
    revoking: Option<LeaseId>,
    /// The scheduler's key, to know the real credential of every lease.
    key: LeaseKey,
}

impl Model {
    fn chain(&self, pool: &PoolId) -> Vec<PoolId> {
        let mut out = vec![pool.clone()];
        let mut cur = self.pools[pool].parent.clone();
        while let Some(p) = cur {
            cur = self.pools[&p].parent.clone();
            out.push(p);
        }
        out
    }

    fn ready(&self, pool: &PoolId) -> impl Iterator<Item = (&(SessionId, String), &MWaiter)> {
        self.waiters.iter().filter(move |(_, w)| &w.pool == pool && !w.blocked)
    }

    /// Blocked waiters enter the queue in arrival order while it has room.
    fn admit(&mut self, pool: &PoolId) {
        let Some(cfg) = self.pools.get(pool) else { return };
        let depth = cfg.max_queue_depth as usize;
        while self.ready(pool).count() < depth {
            let next = self
                .waiters
                .iter_mut()
                .filter(|(_, w)| &w.pool == pool && w.blocked)
                .min_by_key(|(_, w)| w.arrival);
            match next {
                Some((_, w)) => w.blocked = false,
                None => break,
            }
        }
    }

    fn drop_waiter(&mut self, key: &(SessionId, String)) -> Option<MWaiter> {
        let w = self.waiters.remove(key)?;
        self.admit(&w.pool.clone());
        Some(w)
    }

    fn key_of(&self, now: Instant, started_at: Instant, priority: u8) -> i128 {
        let started = started_at.min(now).max(now - SchedulerConfig::MAX_TURN_AGE);
        let offset = if started >= self.t0 {
            (started - self.t0).as_nanos() as i128
        } else {
            -((self.t0 - started).as_nanos() as i128)
        };
        offset - AGING_STEP.as_nanos() as i128 * i128::from(priority)
    }

    /// Closes a stream with this grace, following what the caller knows: its waiters and leases go
    /// (timers due first), or its live leases are kept, detached, until `min(expiry, now + grace)`.
    fn close(&mut self, s: &mut Scheduler, now: Instant, sess: SessionId, grace: Duration) -> Decisions {
        self.sessions.retain(|x| *x != sess);
        let mine: Vec<_> = self.waiters.keys().filter(|(x, _)| *x == sess).cloned().collect();
        for k in mine {
            self.drop_waiter(&k);
        }
        self.leases.retain(|_, l| l.session != sess || (l.expires_at > now && !grace.is_zero()));
        for l in self.leases.values_mut().filter(|l| l.session == sess) {
            l.session = ORPHANS;
            l.expires_at = l.expires_at.min(time::after(now, grace));
        }
        let d = s.close_session(now, sess, grace);
        assert!(d.events.iter().all(|(x, _)| *x != sess));
        d
    }

    /// Applies one operation's events, checking each against the model.
    fn apply(
        &mut self,
        now: Instant,
        d: &Decisions,
        pending: Option<&Pending>,
        recreate_pool: Option<&PoolId>,
    ) {
        let mut shed = false;
        for (s, e) in &d.events {
            match e {
                Event::Queued { request_id, position, blocked, .. } => {
                    let p = pending.expect("only a request queues");
                    assert_eq!((p.session, p.id.as_str()), (*s, request_id.as_str()));
                    let want = if *blocked {
                        self.waiters.values().filter(|w| w.pool == p.waiter.pool).count()
                    } else {
                        self.ready(&p.waiter.pool).filter(|(_, w)| w.order() < p.waiter.order()).count()
                    };
                    assert_eq!(*position as usize, want, "position of {request_id}");
                    // A shed makes room for one, even in a queue left deeper than a lowered limit.
                    if !*blocked && !shed {
                        assert!(
                            self.ready(&p.waiter.pool).count()
                                < self.pools[&p.waiter.pool].max_queue_depth as usize,
                            "queued past the depth"
                        );
                    }
                    let mut w = p.waiter.clone();
                    w.blocked = *blocked;
                    self.waiters.insert((*s, p.id.clone()), w);
                }
                Event::Granted { request_id, lease_id, pool, token, ttl, expires_at, credential, .. } => {
                    let real = self.key.credential(*lease_id, *token, pool, HOLDER);
                    assert!(*credential == real, "grant of {lease_id:?} carries a wrong credential");
                    let key = (*s, request_id.to_string());
                    if let Some(w) = self.waiters.get(&key) {
                        assert_eq!(&w.pool, pool);
                        assert!(!w.blocked, "granted {request_id} while blocked outside the queue");
                        let best = self.ready(pool).map(|(k, w)| (w.order(), k.clone())).min().unwrap();
                        assert_eq!(best.1, key, "grant out of key order in {pool}");
                        self.drop_waiter(&key);
                    } else {
                        let p = pending.expect("a grant without a waiter is a new request");
                        assert_eq!((p.session, p.id.as_str()), (*s, request_id.as_str()));
                        assert!(
                            !self.waiters.values().any(|w| &w.pool == pool),
                            "newcomer {request_id} granted past waiters of {pool}"
                        );
                        assert_eq!(*ttl, p.ttl);
                    }
                    let last = self.last_token.entry(pool.clone()).or_insert(0);
                    assert!(token.0 > *last, "token {} after {} on {pool}", token.0, last);
                    *last = token.0;
                    assert_eq!(*expires_at, now + *ttl);
                    let l = MLease {
                        session: *s,
                        request_id: Some(request_id.to_string()),
                        pool: pool.clone(),
                        token: token.0,
                        ttl: *ttl,
                        expires_at: *expires_at,
                    };
                    assert!(self.leases.insert(*lease_id, l).is_none(), "lease id reused");
                }
                Event::Rejected { request_id, error } => {
                    if matches!(error, Error::DuplicateRequest(_)) {
                        assert!(self.waiters.contains_key(&(*s, request_id.clone())));
                        continue;
                    }
                    let key = (*s, request_id.clone());
                    if matches!(error, Error::UnknownRequest(_)) {
                        assert!(!self.waiters.contains_key(&key), "cancel of {request_id} refused");
                        // Cancelling a request whose lease this stream holds does nothing, silently.
                        assert!(
                            !self
                                .leases
                                .values()
                                .any(|l| l.session == *s
                                    && l.request_id.as_deref() == Some(request_id.as_str())),
                            "cancel of granted {request_id} answered"
                        );
                        continue;
                    }
                    if let Some(w) = self.waiters.get(&key) {
                        match error {
                            Error::WaitTimeout { .. } => {
                                assert!(w.deadline.is_some_and(|d| d <= now), "timed out early")
                            }
                            Error::Shed(_) => {
                                shed = true;
                                let oldest = self.ready(&w.pool).map(|(_, w)| w.arrival).min();
                                assert_eq!(oldest, Some(w.arrival), "shed a waiter that is not the oldest");
                                assert!(!w.blocked);
                            }
                            Error::PoolRemoved(p) => assert_eq!(p, &w.pool),
                            Error::ShuttingDown => {}
                            other => panic!("queued request rejected with {other:?}"),
                        }
                        self.drop_waiter(&key);
                    } else {
                        let p = pending.expect("rejection of an unknown request");
                        assert_eq!((p.session, p.id.as_str()), (*s, request_id.as_str()));
                    }
                }
                Event::Cancelled { request_id } => {
                    self.drop_waiter(&(*s, request_id.to_string())).expect("cancelled a waiter");
                }
                Event::Expired { lease_id, reason, .. } => {
                    let l = self.leases.remove(lease_id).expect("expired a lease");
                    assert_eq!(l.session, *s, "Expired went to the holder");
                    match reason {
                        ExpiryReason::Ttl => assert!(l.expires_at <= now, "expired early"),
                        ExpiryReason::PoolRemoved => assert!(!self.pools.contains_key(&l.pool)),
                        ExpiryReason::Revoked => {
                            assert_eq!(self.revoking, Some(*lease_id), "revoked by nobody")
                        }
                    }
                }
                Event::Released { lease_id, .. } => {
                    let l = self.leases.remove(lease_id).expect("released a lease");
                    assert_eq!(l.session, *s);
                }
                Event::ResumedElsewhere { lease_id, pool } => {
                    let l = self.leases.get(lease_id).expect("took over a live lease");
                    assert_eq!((l.session, &l.pool), (*s, pool), "ResumedElsewhere went to the holder");
                    assert!(*s != ORPHANS && self.sessions.contains(s), "told a stream that is gone");
                    let next = d
                        .events
                        .iter()
                        .skip_while(|(_, e)| {
                            e != &(Event::ResumedElsewhere { lease_id: *lease_id, pool: pool.clone() })
                        })
                        .nth(1);
                    assert!(
                        matches!(next, Some((n, Event::LeaseResumed { lease_id: id, .. })) if id == lease_id && n != s),
                        "ResumedElsewhere without the takeover: {next:?}"
                    );
                }
                Event::LeaseResumed { lease_id, token, expires_at } => {
                    match self.leases.get_mut(lease_id) {
                        Some(l) => {
                            assert_eq!(l.token, token.0);
                            l.session = *s;
                            l.ttl = DEFAULT_TTL;
                        }
                        None => {
                            let pool = recreate_pool.expect("re-created by a resume").clone();
                            let last = self.last_token.entry(pool.clone()).or_insert(0);
                            *last = (*last).max(token.0);
                            let l = MLease {
                                session: *s,
                                request_id: None,
                                pool,
                                token: token.0,
                                ttl: DEFAULT_TTL,
                                expires_at: now,
                            };
                            self.leases.insert(*lease_id, l);
                        }
                    }
                    let l = self.leases.get_mut(lease_id).unwrap();
                    assert_eq!(*expires_at, now + l.ttl);
                    l.expires_at = *expires_at;
                }
                Event::Paused { .. } | Event::Resumed { .. } | Event::LeaseError { .. } => {}
                Event::Breaker { .. } => {}
                Event::HeartbeatAck { .. } => {}
            }
        }
    }

    /// Checks the model against the scheduler.
    fn check(&self, s: &Scheduler, now: Instant) {
        #[cfg(test)]
        s.check_invariants(now);
        let snap = s.snapshot(None).unwrap();
        let theirs: BTreeMap<LeaseId, (SessionId, PoolId, u64, Instant)> = snap
            .leases
            .iter()
            .map(|l| (l.id, (l.session, l.pool.clone(), l.token.0, l.expires_at)))
            .collect();
        let ours: BTreeMap<LeaseId, (SessionId, PoolId, u64, Instant)> = self
            .leases
            .iter()
            .map(|(id, l)| (*id, (l.session, l.pool.clone(), l.token, l.expires_at)))
            .collect();
        assert_eq!(theirs, ours, "leases");
        assert!(self.leases.values().all(|l| l.expires_at > now), "a lease outlived its expiry");
        assert_eq!(s.waiter_count(), self.waiters.len(), "waiters");
        assert!(
            self.waiters.values().all(|w| w.deadline.is_none_or(|d| d > now)),
            "a waiter outlived its deadline"
        );
        for p in &snap.pools {
            let queued = self.waiters.values().filter(|w| w.pool == p.id).count();
            assert_eq!(p.queued as usize, queued, "queued on {}", p.id);
            let held = self.leases.values().filter(|l| self.chain(&l.pool).contains(&p.id)).count();
            assert_eq!(p.in_flight as usize, held, "in_flight of {}", p.id);
            assert!(p.effective_limit >= 1 && p.effective_limit <= p.config.max_concurrent);
        }
        assert_eq!(s.session_count(), self.sessions.len());
    }
}

impl Model {
    /// The lease's real credential, or (`forged`) what someone without it could present: nothing, or
    /// a MAC of the same fields under another key.
    fn credential(&self, id: LeaseId, token: FencingToken, pool: &PoolId, forged: bool) -> ResumeCredential {
        match (forged, id.0 % 2) {
            (false, _) => self.key.credential(id, token, pool, HOLDER),
            (true, 0) => ResumeCredential::default(),
            (true, _) => LeaseKey::from_bytes(&[!KEY[0]; LeaseKey::LEN]).credential(id, token, pool, HOLDER),
        }
    }
}

/// A resume without the real credential: its stream is told `BadCredential` (or, once shutting down,
/// `ShuttingDown`) and nothing else, and no lease moves or is re-created (timers due may still fire
/// for others).
#[track_caller]
fn assert_forged_refused(d: &Decisions, sess: SessionId, id: LeaseId) {
    let refusals: Vec<&Error> = d
        .events
        .iter()
        .filter_map(|(s, e)| match e {
            Event::LeaseError { lease_id, error } if *s == sess && *lease_id == id.to_string() => Some(error),
            _ => None,
        })
        .collect();
    assert!(
        matches!(refusals[..], [Error::BadCredential(l)] if *l == id)
            || matches!(refusals[..], [Error::ShuttingDown]),
        "forged resume of {id:?} not refused: {:?}",
        d.events
    );
    assert!(
        !d.events
            .iter()
            .any(|(_, e)| matches!(e, Event::LeaseResumed { .. } | Event::ResumedElsewhere { .. })),
        "a forged resume moved a lease: {:?}",
        d.events
    );
}

fn levels(s: &Scheduler) -> HashMap<PoolId, PoolSnapshot> {
    s.snapshot(None).unwrap().pools.into_iter().map(|p| (p.id.clone(), p)).collect()
}

/// Runs `case` on a fresh scheduler, checking the model and the [`Invariants`] after every step.
///
/// # Panics
///
/// When the scheduler breaks an invariant or disagrees with the model.
pub fn run(case: &Case) {
    // Far enough from the clock's origin that turn starts two hours back exist.
    let t0 = Instant::now() + Duration::from_secs(3 * 3600);
    let cfg = SchedulerConfig {
        aging_step: AGING_STEP,
        learning_period: if case.learning { ms(300) } else { Duration::ZERO },
        seed: Some(7),
        lease_key: LeaseKey::from_bytes(&KEY),
        ..Default::default()
    };
    let all = pool_set(case, case.limits, case.depth, false);
    let mut s = Scheduler::new(cfg, all.clone(), t0).unwrap();
    let mut m = Model {
        t0,
        pools: all,
        leases: BTreeMap::new(),
        waiters: BTreeMap::new(),
        last_token: HashMap::new(),
        sessions: Vec::new(),
        next_request: 0,
        revoking: None,
        key: LeaseKey::from_bytes(&KEY),
    };
    for _ in 0..3 {
        m.sessions.push(s.open_session());
    }
    let mut inv = Invariants::default();
    let mut now = t0;
    // The last instant the scheduler was called with.
    let mut seen = t0;

    for (dt, op) in case.ops.clone() {
        now += ms(dt);
        // An extreme ttl or max_wait is a request like any other, with that one field overridden.
        let (mut ttl_override, mut wait_override) = (None, None);
        let op = match op {
            Op::Extreme { s, pool, target: target @ (0 | 1), value } => {
                let v = EXTREMES[value % EXTREMES.len()];
                if target == 0 {
                    ttl_override = Some(v);
                } else {
                    wait_override = Some(v);
                }
                Op::Request { s, pool, priority: 5, ttl: 0, max_wait: None, back: 0, dup: false }
            }
            op => op,
        };
        let before = levels(&s);
        let print_before = fingerprint(&s);
        let mut pending = None;
        let mut recreate_pool = None;
        let mut resumed = false;
        let mut lowered = false;
        let pick = |m: &Model, i: usize| (!m.sessions.is_empty()).then(|| m.sessions[i % m.sessions.len()]);
        let (d, may_refuse) = match op {
            Op::Open => {
                m.sessions.push(s.open_session());
                (Decisions::default(), false)
            }
            Op::Close { s: i, grace } => {
                let Some(sess) = pick(&m, i) else { continue };
                let grace = if grace { ms(300) } else { Duration::ZERO };
                (m.close(&mut s, now, sess, grace), false)
            }
            Op::Request { s: i, pool, priority, ttl, max_wait, back, dup } => {
                let Some(sess) = pick(&m, i) else { continue };
                let id = match m.waiters.keys().find(|(x, _)| *x == sess).filter(|_| dup) {
                    Some((_, id)) => id.clone(),
                    None => {
                        m.next_request += 1;
                        format!("r{}", m.next_request)
                    }
                };
                m.next_request += 1;
                let pool = pid(pool);
                let ttl = ttl_override.or(match ttl {
                    0 => None,
                    1 => Some(Duration::ZERO),
                    2 => Some(MAX_TTL + ms(1)),
                    3 => Some(MAX_TTL),
                    n => Some(ms(100 * u64::from(n))),
                });
                let max_wait = wait_override.or(max_wait.map(ms));
                let started_at = match back {
                    0 => now,
                    1 => now - ms(250),
                    2 => now - Duration::from_secs(2 * 3600),
                    _ => now + ms(100),
                };
                let req = NewRequest {
                    request_id: RequestId::parse(&id).unwrap(),
                    pool: pool.clone(),
                    priority: Priority::try_from(u32::from(priority)).unwrap(),
                    started_at: Some(started_at),
                    ttl,
                    max_wait,
                    holder: HOLDER.into(),
                    estimate: None,
                    any_of: Vec::new(),
                };
                pending = Some(Pending {
                    session: sess,
                    id,
                    ttl: ttl.unwrap_or(DEFAULT_TTL),
                    waiter: MWaiter {
                        key: if m.pools.contains_key(&pool) {
                            m.key_of(now, started_at, priority)
                        } else {
                            0
                        },
                        pool,
                        arrival: m.next_request,
                        blocked: false,
                        deadline: max_wait.map(|w| time::after(now, w.min(SchedulerConfig::MAX_WAIT))),
                    },
                });
                (s.request(now, sess, req), true)
            }
            Op::Cancel { s: i, which } => {
                let Some(sess) = pick(&m, i) else { continue };
                let mine: Vec<_> =
                    m.waiters.keys().filter(|(x, _)| *x == sess).map(|(_, id)| id.clone()).collect();
                // Sometimes a request already granted whose lease this stream still holds (the
                // cancel crossed the Granted): answered by nothing at all.
                let granted: Vec<String> = m
                    .leases
                    .values()
                    .filter(|l| l.session == sess && l.expires_at > now)
                    .filter_map(|l| l.request_id.clone())
                    .collect();
                let id = match which {
                    7 => "nope".to_owned(),
                    6 if !granted.is_empty() => granted[0].clone(),
                    _ if mine.is_empty() => "nope".to_owned(),
                    w => mine[w % mine.len()].clone(),
                };
                let d = s.cancel(now, sess, &id);
                if granted.contains(&id) && !mine.contains(&id) {
                    let answered = d.events.iter().any(|(x, e)| {
                        *x == sess
                            && match e {
                                Event::Rejected { request_id, .. } => *request_id == id,
                                Event::Cancelled { request_id } => request_id.as_str() == id,
                                _ => false,
                            }
                    });
                    assert!(!answered, "cancel of granted {id} answered: {:?}", d.events);
                }
                (d, true)
            }
            Op::Heartbeat { s: i, which } => {
                let Some(sess) = pick(&m, i) else { continue };
                let ids: Vec<LeaseId> = match which {
                    None => vec![],
                    Some(w) => m.leases.keys().nth(w).copied().into_iter().collect(),
                };
                // Leases renewed: the caller's own, still alive after the timers due now.
                let alive = |l: &MLease| l.session == sess && l.expires_at > now;
                let renew: Vec<LeaseId> = if ids.is_empty() {
                    m.leases.iter().filter(|(_, l)| alive(l)).map(|(id, _)| *id).collect()
                } else {
                    ids.iter().filter(|id| m.leases.get(id).is_some_and(alive)).copied().collect()
                };
                let d = s.heartbeat(now, sess, &ids);
                let acks: Vec<u32> = d
                    .events
                    .iter()
                    .filter_map(|(_, e)| match e {
                        Event::HeartbeatAck { renewed } => Some(*renewed),
                        _ => None,
                    })
                    .collect();
                assert_eq!(acks, vec![renew.len() as u32]);
                for id in renew {
                    let l = m.leases.get_mut(&id).unwrap();
                    l.expires_at = now + l.ttl;
                }
                (d, true)
            }
            Op::Release { s: i, which, outcome, retry } => {
                let Some(sess) = pick(&m, i) else { continue };
                // Mostly the caller's own leases; sometimes anyone's, or a made-up one.
                let mine: Vec<LeaseId> =
                    m.leases.iter().filter(|(_, l)| l.session == sess).map(|(id, _)| *id).collect();
                let id = match which {
                    7 => LeaseId(12345),
                    6 => m.leases.keys().next().copied().unwrap_or(LeaseId(1)),
                    w if !mine.is_empty() => mine[w % mine.len()],
                    _ => LeaseId(99),
                };
                let outcome = match outcome {
                    0 | 1 => Outcome::Ok,
                    2 => Outcome::Error,
                    3 => Outcome::Cancelled,
                    4 => Outcome::Overloaded(retry.map(ms)),
                    5 => Outcome::QuotaExhausted(retry.map(ms)),
                    _ => Outcome::RateLimited(retry.map(ms)),
                };
                lowered = outcome.pause_hint().is_some();
                (s.release(now, sess, id, outcome), true)
            }
            Op::Move { s: i, which, good_token, forged } => {
                let Some(sess) = pick(&m, i) else { continue };
                let Some((id, l)) = m.leases.iter().nth(which % m.leases.len().max(1)) else { continue };
                // The credential of the lease as granted: a wrong token no longer matches it.
                let credential = m.credential(*id, FencingToken(l.token), &l.pool, forged);
                let r = ResumeRequest {
                    lease_id: *id,
                    token: FencingToken(if good_token { l.token } else { l.token.wrapping_add(1) }),
                    pool: l.pool.clone(),
                    priority: Priority::DEFAULT,
                    ttl: None,
                    holder: HOLDER.into(),
                    credential,
                };
                let d = s.resume(now, sess, r);
                if forged || !good_token {
                    assert_forged_refused(&d, sess, *id);
                }
                (d, true)
            }
            Op::Recreate { s: i, pool, id, token, forged } => {
                let Some(sess) = pick(&m, i) else { continue };
                let pool = pid(pool);
                recreate_pool = Some(pool.clone());
                resumed = true;
                // Unforged: a credential the daemon issued before a restart (same key).
                let credential = m.credential(LeaseId(id), FencingToken(token), &pool, forged);
                let r = ResumeRequest {
                    lease_id: LeaseId(id),
                    token: FencingToken(token),
                    pool,
                    priority: Priority::DEFAULT,
                    ttl: None,
                    holder: HOLDER.into(),
                    credential,
                };
                let d = s.resume(now, sess, r);
                if forged {
                    assert_forged_refused(&d, sess, LeaseId(id));
                }
                (d, true)
            }
            Op::RateLimit { pool, retry } => {
                lowered = true;
                match s.report_rate_limit(now, &pid(pool), retry.map(ms), "proptest") {
                    Ok((applied, d)) => {
                        assert!(applied.until >= now);
                        // The pause lasts the report's wait, cut to the pool's cap (or longer, when an
                        // earlier pause already did).
                        // Without a retry_after, the pool's default (which `Op::Extreme` may have changed).
                        let default = m.pools.get(&pid(pool)).map_or(ms(200), |pc| pc.default_retry_after);
                        let wait = retry.map_or(default, ms).min(MAX_AGENT_RETRY_AFTER);
                        assert!(applied.until >= now + wait, "report paused {pool} for less than {wait:?}");
                        (d, false)
                    }
                    Err(e) => {
                        assert_eq!(e, Error::UnknownPool(pid(pool)));
                        assert!(!m.pools.contains_key(&pid(pool)));
                        assert_eq!(fingerprint(&s), print_before);
                        continue;
                    }
                }
            }
            Op::SetPools { limits, depth, remove_b } => {
                lowered = true;
                let new = pool_set(case, limits, depth, remove_b);
                m.pools = new.clone();
                let names: Vec<PoolId> = m.pools.keys().cloned().collect();
                for p in &names {
                    m.admit(p);
                }
                (s.set_pools(now, new).unwrap(), false)
            }
            Op::Tick => (s.tick(now), false),
            Op::PausePool { pool, dur } => match s.pause_pool(now, &pid(pool), ms(dur), "proptest") {
                Ok((until, d)) => {
                    assert!(until >= now + ms(dur));
                    (d, false)
                }
                Err(e) => {
                    assert!(dur == 0 || !m.pools.contains_key(&pid(pool)), "{e}");
                    assert_eq!(fingerprint(&s), print_before);
                    continue;
                }
            },
            Op::ResumePool { pool } => match s.resume_pool(now, &pid(pool)) {
                Ok((_, d)) => (d, false),
                Err(e) => {
                    assert_eq!(e, Error::UnknownPool(pid(pool)));
                    assert_eq!(fingerprint(&s), print_before);
                    continue;
                }
            },
            Op::Revoke { which } => {
                let id = match m.leases.keys().nth(which) {
                    Some(id) if which < 7 => *id,
                    _ => LeaseId(4242),
                };
                match s.revoke(now, id) {
                    Ok((l, d)) => {
                        assert_eq!(l.id, id);
                        m.revoking = Some(id);
                        (d, false)
                    }
                    Err(_) => {
                        assert!(!m.leases.contains_key(&id));
                        assert_eq!(fingerprint(&s), print_before);
                        continue;
                    }
                }
            }
            Op::Drain(on) => (s.set_draining(now, on), false),
            Op::Fence { ms: at } => (s.set_grant_deadline(now, at.map(|m| time::after(now, ms(m)))), false),
            Op::BeginTerm { bump } => {
                let top =
                    s.snapshot(None).expect("snapshot").leases.iter().map(|l| l.token.0).max().unwrap_or(0);
                (
                    s.begin_term(
                        now,
                        top.saturating_add(bump).min(SchedulerConfig::MAX_RESUME_TOKEN),
                        Duration::ZERO,
                    ),
                    false,
                )
            }
            Op::TakeOver { held, pause, hold } => {
                let top =
                    s.snapshot(None).expect("snapshot").leases.iter().map(|l| l.token.0).max().unwrap_or(0);
                let first = top.saturating_add(1).min(SchedulerConfig::MAX_RESUME_TOKEN);
                let mut d = s.begin_term(now, first, ms(300));
                let state = held.map(|h| RuntimeState {
                    pools: (0..4)
                        .map(|i| {
                            let paused_until = pause.filter(|(p, _)| p % 4 == i).map(|(_, d)| now + ms(d));
                            let rt = PoolRuntime {
                                // 3 stands for "no count" (the publisher learned without one).
                                held: (h[i] < 3).then_some(u32::from(h[i])),
                                paused_until,
                                pause_reason: "the previous leader's pause".into(),
                                holds: hold
                                    .filter(|(p, _)| p % 4 == i)
                                    .map(|(_, d)| (now + ms(d), HoldKind::Phantom))
                                    .into_iter()
                                    .collect(),
                                cooling: hold
                                    .filter(|(p, _)| p % 4 == i)
                                    .map(|(_, d)| now + ms(d))
                                    .into_iter()
                                    .collect(),
                                ..PoolRuntime::default()
                            };
                            (pid(i), rt)
                        })
                        .collect(),
                });
                let more = s.take_over(now, state.as_ref());
                d.events.extend(more.events);
                d.facts.extend(more.facts);
                (d, false)
            }
            Op::Shutdown => (s.shutdown(now), false),
            Op::Extreme { s: i, pool, target, value } => {
                let v = EXTREMES[value % EXTREMES.len()];
                match target {
                    2 => {
                        let Some(sess) = pick(&m, i) else { continue };
                        let mine = m.leases.iter().find(|(_, l)| l.session == sess).map(|(id, _)| *id);
                        let Some(id) = mine else { continue };
                        lowered = true;
                        (s.release(now, sess, id, Outcome::RateLimited(Some(v))), true)
                    }
                    3 => {
                        lowered = true;
                        match s.report_rate_limit(now, &pid(pool), Some(v), "extreme") {
                            Ok((applied, d)) => {
                                let longest = time::after(now, SchedulerConfig::MAX_PAUSE);
                                assert!(applied.until >= now && applied.until <= longest, "{applied:?}");
                                (d, false)
                            }
                            Err(e) => {
                                assert_eq!(e, Error::UnknownPool(pid(pool)));
                                assert_eq!(fingerprint(&s), print_before);
                                continue;
                            }
                        }
                    }
                    4 => match s.pause_pool(now, &pid(pool), v, "extreme") {
                        Ok((until, d)) => {
                            assert!(!v.is_zero() && v <= SchedulerConfig::MAX_PAUSE, "paused for {v:?}");
                            assert!(until >= time::after(now, v));
                            (d, false)
                        }
                        Err(e) => {
                            let in_range = !v.is_zero() && v <= SchedulerConfig::MAX_PAUSE;
                            assert!(!in_range || !m.pools.contains_key(&pid(pool)), "{e}");
                            assert_eq!(fingerprint(&s), print_before);
                            continue;
                        }
                    },
                    5 => {
                        let Some(sess) = pick(&m, i) else { continue };
                        (m.close(&mut s, now, sess, v), false)
                    }
                    _ => {
                        let mut new = m.pools.clone();
                        let (valid, field) = match target {
                            6 => (v <= PoolConfig::MAX_COOLDOWN, "cooldown"),
                            7 => (v <= PoolConfig::MAX_HEADROOM_RECOVERY, "headroom_recovery"),
                            _ => (v <= PoolConfig::MAX_RETRY_AFTER, "default_retry_after"),
                        };
                        for pc in new.values_mut() {
                            match target {
                                6 => pc.cooldown = v,
                                7 => pc.headroom_recovery = v,
                                _ => pc.default_retry_after = v,
                            }
                        }
                        if !valid {
                            let e = s.set_pools(now, new).expect_err(field);
                            assert!(e.to_string().contains(field), "{e}");
                            assert_eq!(fingerprint(&s), print_before);
                            continue;
                        }
                        lowered = true;
                        m.pools = new.clone();
                        (s.set_pools(now, new).unwrap(), false)
                    }
                }
            }
        };

        // Skipped operations moved `now` without telling the scheduler; opening a stream reads no
        // clock. Checks use the last instant the scheduler was given.
        let timers_quiet = seen == now;
        if !matches!(op, Op::Open) {
            seen = now;
        }
        m.apply(seen, &d, pending.as_ref(), recreate_pool.as_ref());
        m.revoking = None;
        m.check(&s, seen);
        if s.grant_deadline().is_some_and(|t| seen >= t) {
            let granted = d.events.iter().any(|(_, e)| matches!(e, Event::Granted { .. }));
            assert!(!granted, "granted at or after the grant deadline");
        }
        inv.grants(&d);
        inv.check(&s, seen);

        // Limits, level by level.
        let after = levels(&s);
        let granted_on: HashSet<PoolId> = d
            .events
            .iter()
            .filter_map(|(_, e)| match e {
                Event::Granted { pool, .. } => Some(m.chain(pool)),
                _ => None,
            })
            .flatten()
            .collect();
        let recreated = resumed && d.events.iter().any(|(_, e)| matches!(e, Event::LeaseResumed { .. }));
        // Learning: nothing is granted on a chain with a learning level.
        for id in &granted_on {
            assert!(after[id].learning.is_none(), "granted under {id} while it learns: {:?}", after[id]);
        }
        for (id, p) in &after {
            let b = before.get(id);
            let in_before = b.map_or(0, |b| b.in_flight);
            if granted_on.contains(id) {
                assert!(
                    p.in_flight + p.cooling <= p.effective_limit,
                    "grant took {id} past its limit: {p:?}"
                );
            } else if recreated {
                assert!(
                    p.in_flight <= in_before.max(p.config.max_concurrent),
                    "resume took {id} past its limit"
                );
            } else {
                assert!(p.in_flight <= in_before, "{id} gained a slot without a grant");
            }
            if p.in_flight > p.effective_limit {
                let was_over = b.is_some_and(|b| b.in_flight > b.effective_limit);
                let limit_dropped = b.is_some_and(|b| p.effective_limit < b.effective_limit);
                assert!(
                    was_over || (lowered && limit_dropped) || recreated,
                    "{id} over its limit without a lowered limit: {p:?}"
                );
            }
        }

        // Only an operator's pause outlasts an agent's cap: no 429 report or rate-limited release
        // pauses a pool beyond `now + max_agent_retry_after` (an earlier, longer pause stays).
        if !matches!(op, Op::PausePool { .. } | Op::TakeOver { .. }) {
            for (id, p) in &after {
                let prev = before.get(id).and_then(|b| b.paused_until);
                let cap = seen + MAX_AGENT_RETRY_AFTER;
                assert!(
                    p.paused_until.is_none_or(|u| u <= cap || Some(u) <= prev),
                    "{op:?} paused {id} beyond the agents' cap: {p:?}"
                );
            }
        }

        // A refused operation changes nothing (checked when no timer could have fired).
        let refused = d.events.iter().all(|(_, e)| {
            matches!(
                e,
                Event::Rejected { .. } | Event::LeaseError { .. } | Event::HeartbeatAck { renewed: 0 }
            )
        });
        if may_refuse && timers_quiet && refused {
            assert_eq!(fingerprint(&s), print_before, "a refused {op:?} changed the state");
        }
    }

    // Everyone leaves; grace and learning run out.
    for sess in std::mem::take(&mut m.sessions) {
        let d = s.close_session(now, sess, Duration::ZERO);
        m.waiters.retain(|(x, _), _| *x != sess);
        m.leases.retain(|_, l| l.session != sess);
        let granted = d.events.iter().any(|(_, e)| matches!(e, Event::Granted { .. }));
        assert!(!granted || s.session_count() > 0);
    }
    // Past the longest pause there is, and the adaptive recovery after it.
    now += SchedulerConfig::MAX_PAUSE + Duration::from_secs(3600);
    s.tick(now);
    #[cfg(test)]
    s.check_invariants(now);
    inv.check(&s, now);
    assert_eq!((s.lease_count(), s.waiter_count(), s.session_count()), (0, 0, 0));
    for p in s.snapshot(None).unwrap().pools {
        assert_eq!((p.in_flight, p.queued), (0, 0), "{}", p.id);
        assert_eq!(p.effective_limit, p.config.max_concurrent, "{} recovered", p.id);
    }
    // Slots freed by that tick may still cool down; after that no timer is left.
    now += Duration::from_secs(1);
    assert!(s.tick(now).events.is_empty());
    assert_eq!(s.next_deadline(), None);
}

fn fingerprint(s: &Scheduler) -> String {
    format!(
        "{:?} {} {} {} {:?}",
        s.snapshot(None).unwrap(),
        s.lease_count(),
        s.waiter_count(),
        s.session_count(),
        s.next_deadline()
    )
}

/// The invariants re-derived after every step from the public API only (`snapshot()` and the
/// counters), so that the fuzz targets check them in builds without `cfg(test)`:
/// - accounting: every pool's `in_flight` is the number of leases on it and its descendants;
/// - limit: an operation never takes a pool above its limit (only a lowered limit leaves it above);
/// - fixpoint: a pool with waiters is closed (learning on some level, draining, shutting down, past
///   the grant deadline, paused, or full on some level);
/// - learning: a pool learns only while some lease the previous leader reported on its subtree is
///   not back (`back < expected`), or no count was published;
/// - timers: no lease is still listed at or after its expiry;
/// - fencing: a grant's token is above every token its pool has seen, and no two granted leases of a
///   pool share a token.
#[derive(Debug, Default)]
pub struct Invariants {
    /// Each pool's `in_flight` after the previous check.
    in_flight: HashMap<PoolId, u32>,
    /// The highest fencing token each pool has handed out or re-created.
    tokens: HashMap<PoolId, u64>,
}

impl Invariants {
    /// Checks the grants among `d`'s events against every token seen so far (call before
    /// [`Invariants::check`]).
    pub fn grants(&mut self, d: &Decisions) {
        for (_, e) in &d.events {
            if let Event::Granted { pool, token, .. } = e {
                let floor = self.tokens.entry(pool.clone()).or_insert(0);
                assert!(token.0 > *floor, "grant token {token} not above {floor} on {pool}");
                *floor = token.0;
            }
        }
    }

    /// Checks `s` as of `now`, the last instant it was given.
    pub fn check(&mut self, s: &Scheduler, now: Instant) {
        let snap: Snapshot = s.snapshot(None).expect("snapshot of every pool");
        let by_id: HashMap<&PoolId, _> = snap.pools.iter().map(|p| (&p.id, p)).collect();
        let chain = |pool: &PoolId| {
            let mut chain = vec![pool.clone()];
            while let Some(parent) = by_id[chain.last().expect("non-empty")].config.parent.clone() {
                chain.push(parent);
            }
            chain
        };
        let mut counted: HashMap<PoolId, u32> = HashMap::new();
        for l in &snap.leases {
            assert!(
                l.expires_at > now,
                "lease {} still listed {:?} after its expiry",
                l.id,
                now - l.expires_at
            );
            for p in chain(&l.pool) {
                *counted.entry(p).or_default() += 1;
            }
            let seen = self.tokens.entry(l.pool.clone()).or_insert(0);
            *seen = (*seen).max(l.token.0);
        }
        // Granted leases never share a token with any other lease of their pool. (Leases re-created by
        // resumes carry the token their credential names; the model makes up credentials "issued
        // before the restart", so two of them may name the same token.)
        for l in snap.leases.iter().filter(|l| l.request_id.is_some()) {
            let same = snap.leases.iter().filter(|o| o.pool == l.pool && o.token == l.token).count();
            assert_eq!(same, 1, "token {} of granted lease {} is held twice on {}", l.token, l.id, l.pool);
        }
        let mut queued = 0;
        for p in &snap.pools {
            let held = counted.get(&p.id).copied().unwrap_or(0);
            assert_eq!(p.in_flight, held, "in_flight of {} is not its leases' count", p.id);
            let before = self.in_flight.get(&p.id).copied().unwrap_or(0);
            assert!(
                p.in_flight <= p.config.max_concurrent.max(before),
                "pool {} went from {before} to {} in flight, limit {}",
                p.id,
                p.in_flight,
                p.config.max_concurrent
            );
            assert!(p.effective_limit <= p.config.max_concurrent && p.effective_limit >= 1);
            let fenced = s.grant_deadline().is_some_and(|t| now >= t);
            if let Some(l) = p.learning {
                assert!(snap.learning, "pool {} learns outside a learning period", p.id);
                assert!(
                    l.expected.is_none_or(|e| l.back < e),
                    "pool {} learns with its leases back: {l:?}",
                    p.id
                );
            }
            let learning = chain(&p.id).iter().any(|level| by_id[level].learning.is_some());
            if p.queued > 0 && !learning && !snap.shutting_down && !snap.draining && !fenced {
                let closed = chain(&p.id).iter().any(|level| {
                    let l = by_id[level];
                    l.paused_until.is_some_and(|u| u > now)
                        || l.in_flight + l.cooling + l.held >= l.effective_limit
                });
                // --- Rate budgets: a head short of a budget keeps its queue closed. ---
                let closed = closed || matches!(p.gate, Some(Closed::Budget { .. }));
                assert!(closed, "pool {} could grant but has {} waiters", p.id, p.queued);
            }
            queued += p.queued as usize;
        }
        assert_eq!(queued, s.waiter_count(), "queued waiters vs waiter_count");
        // --- Rate budgets: no level below its debt cap; no reservation outlives its lease. ---
        s.check_budgets(now);
        assert_eq!(snap.leases.len(), s.lease_count(), "listed leases vs lease_count");
        self.in_flight = snap.pools.iter().map(|p| (p.id.clone(), p.in_flight)).collect();
    }

    /// Closes every stream in `sessions` (no grace), runs time far past every timer, and checks that
    /// nothing is left.
    pub fn close_all(&mut self, s: &mut Scheduler, sessions: &[SessionId], mut now: Instant) {
        for &id in sessions {
            let d = s.close_session(now, id, Duration::ZERO);
            self.grants(&d);
            self.check(s, now);
        }
        now += Duration::from_secs(3 * 24 * 3600);
        s.tick(now);
        self.check(s, now);
        assert_eq!(s.lease_count(), 0, "leases left after every stream closed");
        assert_eq!(s.waiter_count(), 0, "waiters left after every stream closed");
        assert_eq!(s.session_count(), 0);
        for p in &s.snapshot(None).expect("snapshot").pools {
            assert_eq!((p.in_flight, p.queued), (0, 0), "pool {} not empty at the end", p.id);
        }
    }
}

// ================================================================================================
// Provider health and acquire_any: a second, smaller model over pools with holds and breakers.
// ================================================================================================
//
// [`run_health`] applies a [`HealthCase`] and checks, after every step:
// - at most one probe: for every level whose breaker is open or half-open, at most one live lease on
//   its chain was granted since the breaker left `closed` (and that one was granted as a probe);
//   a half-open level's probe is a live lease on its chain whose grant said `probe`;
// - the limit: a level a grant touched has `in_flight + cooling + held <= effective_limit`, and no
//   level ever has more than `max_concurrent` leases and held slots together;
// - holds: every level's `held` is the number of holds (from `Held` / `HoldEnded` facts) of it and its
//   descendants;
// - acquire_any: a request is granted once, on one of its pools; every pool listed before the one it got
//   is closed after the step; the grant goes to the head (by key) of the granted pool's queue, which
//   counts single-pool and multi-pool waiters alike; every pool's queue holds exactly the waiters that
//   list it;
// - nothing leaks: once every stream closes and time runs past every timer, no lease, waiter or hold
//   is left and no timer is due.

/// The health model's pools: `g` over `a` and `b`, and `x` on its own.
pub const HEALTH_POOLS: [&str; 4] = ["g", "a", "b", "x"];
const HEALTH_PARENTS: [Option<&str>; 4] = [None, Some("g"), Some("g"), None];
const HEALTH_TTL: Duration = Duration::from_millis(300);

/// Per-pool provider-health settings of a [`HealthCase`].
#[derive(Clone, Debug)]
pub struct HealthPool {
    /// `max_concurrent` (at least 1).
    pub limit: u32,
    /// The breaker is enabled, with `failures` failures in a `window` ms window and `open_base` ms.
    pub breaker: bool,
    /// Failures that open the breaker (at least 1).
    pub failures: u32,
    /// Window, ms (at least 1).
    pub window: u64,
    /// First open timeout, ms (at least 1).
    pub open_base: u64,
    /// Fail fast while open.
    pub fail_fast: bool,
    /// `failure_hold`, `cancel_cooldown`, `phantom_hold` in ms (0 = off).
    pub holds: [u64; 3],
    /// Release cooldown 20 ms.
    pub cooldown: bool,
}

/// A pool tree with health settings and the operations to run on it.
#[derive(Clone, Debug)]
pub struct HealthCase {
    /// Settings by index in [`HEALTH_POOLS`].
    pub pools: [HealthPool; 4],
    /// Milliseconds to advance, then the operation.
    pub ops: Vec<(u64, HealthOp)>,
}

/// One operation of a [`HealthCase`]; small numbers pick streams, pools and leases modulo what exists.
#[derive(Clone, Debug)]
#[allow(missing_docs, reason = "the fields are the operation's arguments, named as in the Scheduler API")]
pub enum HealthOp {
    Open,
    Close {
        s: usize,
    },
    /// `acquire_any` over the first `n` (1..=3) of `pools` (a pool named twice counts once).
    Request {
        s: usize,
        pools: [usize; 3],
        n: usize,
        priority: u8,
    },
    Release {
        s: usize,
        which: usize,
        outcome: u8,
        retry: Option<u64>,
    },
    Cancel {
        s: usize,
        which: usize,
    },
    Heartbeat {
        s: usize,
    },
    Tick,
    Force {
        pool: usize,
        open: bool,
    },
    Report {
        pool: usize,
        overloaded: bool,
    },
}

fn health_configs(case: &HealthCase) -> BTreeMap<PoolId, PoolConfig> {
    (0..4)
        .map(|i| {
            let h = &case.pools[i];
            let breaker = BreakerConfig {
                enabled: h.breaker,
                failures: h.failures.max(1),
                window: ms(h.window.max(1)),
                open_base: ms(h.open_base.max(1)),
                open_max: ms(h.open_base.max(1) * 4),
                when_open: if h.fail_fast { WhenOpen::FailFast } else { WhenOpen::Wait },
                ..BreakerConfig::default()
            };
            let health = HealthConfig {
                failure_hold: ms(h.holds[0]),
                cancel_cooldown: ms(h.holds[1]),
                phantom_hold: ms(h.holds[2]),
                phantom_hold_max: ms(200),
                breaker,
                ..HealthConfig::default()
            };
            let cfg = PoolConfig {
                max_concurrent: h.limit.max(1),
                parent: HEALTH_PARENTS[i].map(PoolId::new),
                cooldown: if h.cooldown { ms(20) } else { Duration::ZERO },
                default_ttl: HEALTH_TTL,
                max_ttl: HEALTH_TTL,
                default_retry_after: ms(100),
                max_agent_retry_after: ms(150),
                adaptive: false,
                health,
                ..PoolConfig::default()
            };
            (PoolId::new(HEALTH_POOLS[i]), cfg)
        })
        .collect()
}

#[derive(Clone, Debug)]
struct HWaiter {
    pools: Vec<PoolId>,
    key: (i128, u64),
}

#[derive(Clone, Debug)]
struct HLease {
    session: SessionId,
    pool: PoolId,
    /// The step it was granted in, and whether its grant said `probe`.
    step: usize,
    probe: bool,
}

/// Whether `pool` can grant now, from the snapshot alone (an independent copy of the gate rules).
fn open_in(snap: &Snapshot, pool: &PoolId, now: Instant) -> bool {
    let by_id: HashMap<&PoolId, &PoolSnapshot> = snap.pools.iter().map(|p| (&p.id, p)).collect();
    if snap.draining || snap.shutting_down {
        return false;
    }
    let mut cur = Some(pool.clone());
    while let Some(id) = cur {
        let p = by_id[&id];
        let breaker_shut = match p.breaker.state {
            BreakerState::Closed | BreakerState::HalfOpen { probe: None } => false,
            BreakerState::Open { until } => until.is_none_or(|u| u > now),
            BreakerState::HalfOpen { probe: Some(_) } => true,
        };
        if breaker_shut
            || p.learning.is_some()
            || p.paused_until.is_some_and(|u| u > now)
            || p.in_flight + p.cooling + p.held >= p.effective_limit
        {
            return false;
        }
        cur = p.config.parent.clone();
    }
    true
}

/// Runs `case` and checks the properties listed above this function's section after every step.
///
/// # Panics
///
/// When the scheduler breaks one of them.
pub fn run_health(case: &HealthCase) {
    let t0 = Instant::now() + Duration::from_secs(3600);
    let cfg = SchedulerConfig { aging_step: AGING_STEP, seed: Some(11), ..Default::default() };
    let configs = health_configs(case);
    let chain = |pool: &PoolId| {
        let mut out = vec![pool.clone()];
        while let Some(p) = configs[out.last().expect("non-empty")].parent.clone() {
            out.push(p);
        }
        out
    };
    let mut s = Scheduler::new(cfg, configs.clone(), t0).expect("valid health pools");
    let mut sessions: Vec<SessionId> = (0..3).map(|_| s.open_session()).collect();
    let mut waiters: BTreeMap<(SessionId, String), HWaiter> = BTreeMap::new();
    let mut leases: BTreeMap<LeaseId, HLease> = BTreeMap::new();
    let mut holds: HashMap<PoolId, i64> = HashMap::new();
    // For each pool: the step in which its breaker last left `closed`, while it is not closed.
    let mut episode: HashMap<PoolId, usize> = HashMap::new();
    let mut next = 0u64;
    let mut now = t0;
    let pick = |v: &[SessionId], i: usize| (!v.is_empty()).then(|| v[i % v.len()]);

    for (step, (dt, op)) in case.ops.iter().cloned().enumerate() {
        now += ms(dt);
        let mut pending: Option<(SessionId, String, HWaiter)> = None;
        let d = match op {
            HealthOp::Open => {
                sessions.push(s.open_session());
                continue;
            }
            HealthOp::Close { s: i } => {
                let Some(sess) = pick(&sessions, i) else { continue };
                sessions.retain(|x| *x != sess);
                waiters.retain(|(x, _), _| *x != sess);
                leases.retain(|_, l| l.session != sess);
                s.close_session(now, sess, Duration::ZERO)
            }
            HealthOp::Request { s: i, pools, n, priority } => {
                let Some(sess) = pick(&sessions, i) else { continue };
                let mut listed: Vec<PoolId> = Vec::new();
                for p in pools.iter().take(n.clamp(1, 3)) {
                    let p = PoolId::new(HEALTH_POOLS[p % 4]);
                    if !listed.contains(&p) {
                        listed.push(p);
                    }
                }
                next += 1;
                let id = format!("r{next}");
                let prio = priority % 10;
                let key = (
                    (now - t0).as_nanos() as i128 - AGING_STEP.as_nanos() as i128 * i128::from(prio),
                    0, // arrival: filled from the order of Queued events below
                );
                let req = NewRequest {
                    priority: Priority::try_from(u32::from(prio)).expect("0..=9"),
                    started_at: Some(now),
                    any_of: listed[1..].to_vec(),
                    ..NewRequest::new(RequestId::parse(&id).expect("valid"), listed[0].clone())
                };
                pending = Some((sess, id, HWaiter { pools: listed, key: (key.0, next) }));
                s.request(now, sess, req)
            }
            HealthOp::Release { s: i, which, outcome, retry } => {
                let Some(sess) = pick(&sessions, i) else { continue };
                let mine: Vec<LeaseId> =
                    leases.iter().filter(|(_, l)| l.session == sess).map(|(id, _)| *id).collect();
                let Some(&id) = mine.get(which % mine.len().max(1)) else { continue };
                let retry = retry.map(ms);
                let outcome = match outcome % 6 {
                    0 => Outcome::Ok,
                    1 => Outcome::Error,
                    2 => Outcome::Cancelled,
                    3 => Outcome::RateLimited(retry),
                    4 => Outcome::Overloaded(retry),
                    _ => Outcome::QuotaExhausted(retry),
                };
                s.release(now, sess, id, outcome)
            }
            HealthOp::Cancel { s: i, which } => {
                let Some(sess) = pick(&sessions, i) else { continue };
                let mine: Vec<String> =
                    waiters.keys().filter(|(x, _)| *x == sess).map(|(_, r)| r.clone()).collect();
                let Some(id) = mine.get(which % mine.len().max(1)) else { continue };
                s.cancel(now, sess, id)
            }
            HealthOp::Heartbeat { s: i } => {
                let Some(sess) = pick(&sessions, i) else { continue };
                s.heartbeat(now, sess, &[])
            }
            HealthOp::Tick => s.tick(now),
            HealthOp::Force { pool, open } => {
                let to = if open { ForceBreaker::Open } else { ForceBreaker::Closed };
                s.force_breaker(now, &PoolId::new(HEALTH_POOLS[pool % 4]), to, "proptest")
                    .expect("pool exists")
                    .1
            }
            HealthOp::Report { pool, overloaded } => {
                let o = if overloaded {
                    Outcome::Overloaded(Some(ms(30)))
                } else {
                    Outcome::QuotaExhausted(None)
                };
                s.report_outcome(now, &PoolId::new(HEALTH_POOLS[pool % 4]), o, "proptest")
                    .expect("pool exists")
                    .1
            }
        };

        let snap = s.snapshot(None).expect("snapshot");
        let by_id: HashMap<PoolId, PoolSnapshot> =
            snap.pools.iter().map(|p| (p.id.clone(), p.clone())).collect();
        for f in &d.facts {
            match f {
                Fact::Held { pool, .. } => *holds.entry(pool.clone()).or_default() += 1,
                Fact::HoldEnded { pool, .. } => *holds.entry(pool.clone()).or_default() -= 1,
                _ => {}
            }
        }
        let mut touched: Vec<PoolId> = Vec::new();
        for (sess, e) in &d.events {
            match e {
                Event::Queued { request_id, .. } => {
                    let (ps, pid_, w) = pending.as_ref().expect("only a request queues");
                    assert_eq!((ps, pid_.as_str()), (sess, request_id.as_str()));
                    waiters.insert((*sess, pid_.clone()), w.clone());
                }
                Event::Granted { request_id, lease_id, pool, probe, .. } => {
                    let key = (*sess, request_id.to_string());
                    let w = match waiters.remove(&key) {
                        Some(w) => {
                            let head =
                                waiters.values().filter(|o| o.pools.contains(pool)).map(|o| o.key).min();
                            assert!(
                                head.is_none_or(|h| h > w.key),
                                "{request_id} granted on {pool} ahead of an earlier waiter"
                            );
                            w
                        }
                        None => {
                            let (ps, pid_, w) =
                                pending.as_ref().expect("a grant without a waiter is a newcomer");
                            assert_eq!(
                                (ps, pid_.as_str()),
                                (sess, request_id.as_str()),
                                "granted twice or unknown"
                            );
                            assert!(
                                !waiters.values().any(|o| o.pools.contains(pool)),
                                "newcomer {request_id} granted past waiters of {pool}"
                            );
                            w.clone()
                        }
                    };
                    let at = w.pools.iter().position(|p| p == pool).expect("granted on a listed pool");
                    for earlier in &w.pools[..at] {
                        assert!(
                            !open_in(&snap, earlier, now),
                            "{request_id} got {pool} while {earlier} (listed first) is open"
                        );
                    }
                    touched.extend(chain(pool));
                    leases.insert(
                        *lease_id,
                        HLease { session: *sess, pool: pool.clone(), step, probe: *probe },
                    );
                }
                Event::Rejected { request_id, .. } => {
                    waiters.remove(&(*sess, request_id.clone()));
                }
                Event::Cancelled { request_id } => {
                    waiters.remove(&(*sess, request_id.to_string())).expect("cancelled a waiter");
                }
                Event::Expired { lease_id, .. } | Event::Released { lease_id, .. } => {
                    leases.remove(lease_id).expect("ended a live lease");
                }
                _ => {}
            }
        }

        // Queues hold exactly the waiters that list them; every lease is known.
        assert_eq!(s.waiter_count(), waiters.len(), "waiters");
        assert_eq!(s.lease_count(), leases.len(), "leases");
        #[cfg(test)]
        s.check_invariants(now);
        for (id, p) in &by_id {
            let listing = waiters.values().filter(|w| w.pools.contains(id)).count();
            assert_eq!(p.queued as usize, listing, "queue of {id}");
            // Holds, level by level.
            let want: i64 = by_id
                .keys()
                .filter(|o| chain(o).contains(id))
                .map(|o| holds.get(o).copied().unwrap_or(0))
                .sum();
            assert_eq!(i64::from(p.held), want, "held at {id}");
            // The limit.
            let live = leases.values().filter(|l| chain(&l.pool).contains(id)).count() as u32;
            assert_eq!(p.in_flight, live, "in_flight of {id}");
            assert!(p.in_flight + p.held <= p.config.max_concurrent, "{id} over its limit: {p:?}");
            if touched.contains(id) {
                assert!(
                    p.in_flight + p.cooling + p.held <= p.effective_limit,
                    "a grant took {id} past its limit"
                );
            }
            // At most one probe per breaker episode.
            match p.breaker.state {
                BreakerState::Closed => {
                    episode.remove(id);
                }
                state => {
                    let since = *episode.entry(id.clone()).or_insert(step);
                    let since_open: Vec<&HLease> = leases
                        .values()
                        .filter(|l| {
                            chain(&l.pool).contains(id) && (l.step > since || (l.step == since && l.probe))
                        })
                        .collect();
                    assert!(
                        since_open.len() <= 1,
                        "{} leases on {id}'s chain since its breaker opened",
                        since_open.len()
                    );
                    assert!(
                        since_open.iter().all(|l| l.probe),
                        "a non-probe grant while {id}'s breaker is {state:?}"
                    );
                    if let BreakerState::HalfOpen { probe: Some(l) } = state {
                        let l = leases.get(&l).expect("the probe is a live lease");
                        assert!(l.probe && chain(&l.pool).contains(id), "probe of {id}: {l:?}");
                    }
                }
            }
        }
    }

    for sess in std::mem::take(&mut sessions) {
        s.close_session(now, sess, Duration::ZERO);
    }
    for pool in HEALTH_POOLS {
        s.force_breaker(now, &PoolId::new(pool), ForceBreaker::Closed, "end").expect("pool exists");
    }
    now += Duration::from_secs(3600);
    s.tick(now);
    // Slots whose holds ended at that tick cool down after it.
    now += Duration::from_secs(1);
    s.tick(now);
    #[cfg(test)]
    s.check_invariants(now);
    assert_eq!((s.lease_count(), s.waiter_count(), s.session_count()), (0, 0, 0));
    for p in s.snapshot(None).expect("snapshot").pools {
        assert_eq!((p.in_flight, p.queued, p.held, p.cooling), (0, 0, 0, 0), "{} left something", p.id);
    }
    assert_eq!(s.next_deadline(), None, "a timer is left");
}
