//! One pool's budget: limit, adaptive effective limit, in-flight count, pause and release cooldown.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::{
    SchedulerConfig,
    budget::{BudgetConfig, BudgetKind, BudgetState},
    health::{Health, HealthConfig},
    ids::{PoolId, SessionId},
    queue::Queue,
};

/// What a pool does with a request that would have to wait while its queue is full.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overflow {
    /// Refuse the new request with RESOURCE_EXHAUSTED.
    #[default]
    Reject,
    /// Refuse the request that has waited longest, and queue the new one.
    ShedOldest,
    /// Let the new request wait, outside the queue and in arrival order, until the queue has room.
    Block,
}

/// A pool's settings. Durations are written like `"200ms"` or `"30s"` in TOML; each has a documented
/// maximum (`PoolConfig::MAX_*`), checked by [`PoolConfig::validate`] for the config file, Admin's
/// `UpsertPool` and the state file alike.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Most leases held at once on this pool and all its descendants (>= 1).
    pub max_concurrent: u32,
    /// The parent pool: a lease here also takes a slot there, atomically.
    pub parent: Option<PoolId>,
    /// Most requests waiting in this pool's queue.
    pub max_queue_depth: u32,
    /// What to do when the queue is full.
    pub on_overflow: Overflow,
    /// A released slot can be granted again only after this long (providers whose accounting lags).
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
    /// TTL of a lease whose request does not give one.
    #[serde(with = "humantime_serde")]
    pub default_ttl: Duration,
    /// Largest TTL a request may ask for.
    #[serde(with = "humantime_serde")]
    pub max_ttl: Duration,
    /// Default wait limit for requests that do not give one; unset waits forever.
    #[serde(with = "humantime_serde")]
    pub max_wait: Option<Duration>,
    /// Pause length for a 429 reported without a Retry-After.
    #[serde(with = "humantime_serde")]
    pub default_retry_after: Duration,
    /// Adaptive headroom: each 429 episode lowers the effective limit by one (floor 1).
    pub adaptive: bool,
    /// Quiet period (no 429) after which the effective limit recovers by one step.
    #[serde(with = "humantime_serde")]
    pub headroom_recovery: Duration,
    /// Longest pause an agent's 429 report (`ReportRateLimit`, or a release with
    /// `OUTCOME_RATE_LIMITED`) can cause, whatever Retry-After it names; a longer one is cut to this.
    /// An operator's pause (Admin `PausePool`) is not capped. Zero lets agents' reports lower the
    /// effective limit (adaptive headroom) without pausing anything.
    #[serde(with = "humantime_serde")]
    pub max_agent_retry_after: Duration,
    /// Rate budgets (requests, input and output tokens per window); none by default.
    pub budget: BudgetConfig,
    /// Provider health: per-class outcome policies, holds and the circuit breaker (`[pools.NAME.health]`).
    pub health: HealthConfig,
}

impl PoolConfig {
    /// Default `max_queue_depth`.
    pub const DEFAULT_MAX_QUEUE_DEPTH: u32 = 10_000;
    /// Default `default_ttl`.
    pub const DEFAULT_TTL: Duration = Duration::from_secs(30);
    /// Default `max_ttl`.
    pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(600);
    /// Default `default_retry_after`.
    pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(10);
    /// Default `headroom_recovery`.
    pub const DEFAULT_HEADROOM_RECOVERY: Duration = Duration::from_secs(30);
    /// Default `max_agent_retry_after`: long enough for any provider's real Retry-After, short enough
    /// that one agent (every agent holds the same token) cannot stop a pool for long.
    pub const DEFAULT_MAX_AGENT_RETRY_AFTER: Duration = Duration::from_secs(5 * 60);
    /// Largest accepted `max_ttl` (and so `default_ttl`): 24 h.
    pub const MAX_TTL_LIMIT: Duration = Duration::from_secs(24 * 3600);
    /// Largest accepted `max_concurrent`.
    pub const MAX_CONCURRENT_LIMIT: u32 = 10_000;
    /// Largest accepted `cooldown`: 1 h (a provider's accounting lags by seconds, not hours).
    pub const MAX_COOLDOWN: Duration = Duration::from_secs(3600);
    /// Largest accepted `max_wait`: 30 days, the longest wait the scheduler honours.
    pub const MAX_WAIT_LIMIT: Duration = super::SchedulerConfig::MAX_WAIT;
    /// Largest accepted `default_retry_after`: 24 h, the longest pause a single 429 can cause.
    pub const MAX_RETRY_AFTER: Duration = super::SchedulerConfig::MAX_PAUSE;
    /// Largest accepted `headroom_recovery`: 24 h per step.
    pub const MAX_HEADROOM_RECOVERY: Duration = Duration::from_secs(24 * 3600);

    /// Shortest step of adaptive recovery: a zero `headroom_recovery` recovers one step per
    /// millisecond, so a recovery is never due at the instant the 429 that caused it was handled.
    pub const MIN_RECOVERY_STEP: Duration = Duration::from_millis(1);

    /// The quiet period per step of adaptive recovery: `headroom_recovery`, at least
    /// [`PoolConfig::MIN_RECOVERY_STEP`].
    pub(crate) fn recovery_step(&self) -> Duration {
        self.headroom_recovery.max(Self::MIN_RECOVERY_STEP)
    }

    /// A pool with this limit and every other setting at its default.
    pub fn with_limit(max_concurrent: u32) -> Self {
        Self { max_concurrent, ..Self::default() }
    }

    /// Checks the settings that do not depend on other pools.
    pub fn validate(&self, name: &PoolId) -> Result<(), String> {
        if !(1..=Self::MAX_CONCURRENT_LIMIT).contains(&self.max_concurrent) {
            return Err(format!(
                "pool {name}: max_concurrent {} out of range 1..={}",
                self.max_concurrent,
                Self::MAX_CONCURRENT_LIMIT
            ));
        }
        if self.max_queue_depth == 0 {
            return Err(format!("pool {name}: max_queue_depth must be >= 1"));
        }
        if self.default_ttl.is_zero() || self.max_ttl.is_zero() {
            return Err(format!("pool {name}: default_ttl and max_ttl must be > 0"));
        }
        let bounded = [
            ("max_ttl", self.max_ttl, Self::MAX_TTL_LIMIT),
            ("cooldown", self.cooldown, Self::MAX_COOLDOWN),
            ("max_wait", self.max_wait.unwrap_or_default(), Self::MAX_WAIT_LIMIT),
            ("default_retry_after", self.default_retry_after, Self::MAX_RETRY_AFTER),
            ("headroom_recovery", self.headroom_recovery, Self::MAX_HEADROOM_RECOVERY),
        ];
        for (field, value, max) in bounded {
            if value > max {
                return Err(format!(
                    "pool {name}: {field} = {} is above the maximum {}",
                    humantime::format_duration(value),
                    humantime::format_duration(max)
                ));
            }
        }
        if self.default_ttl > self.max_ttl {
            return Err(format!("pool {name}: default_ttl is above max_ttl"));
        }
        if self.max_agent_retry_after > SchedulerConfig::MAX_PAUSE {
            return Err(format!(
                "pool {name}: max_agent_retry_after is above {}",
                humantime::format_duration(SchedulerConfig::MAX_PAUSE)
            ));
        }
        self.budget.validate(name)?;
        self.health.validate(name)?;
        if self.parent.as_ref() == Some(name) {
            return Err(format!("pool {name}: a pool cannot be its own parent"));
        }
        Ok(())
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_concurrent: 1,
            parent: None,
            max_queue_depth: Self::DEFAULT_MAX_QUEUE_DEPTH,
            on_overflow: Overflow::Reject,
            cooldown: Duration::ZERO,
            default_ttl: Self::DEFAULT_TTL,
            max_ttl: Self::DEFAULT_MAX_TTL,
            max_wait: None,
            default_retry_after: Self::DEFAULT_RETRY_AFTER,
            adaptive: true,
            headroom_recovery: Self::DEFAULT_HEADROOM_RECOVERY,
            max_agent_retry_after: Self::DEFAULT_MAX_AGENT_RETRY_AFTER,
            budget: BudgetConfig::default(),
            health: HealthConfig::default(),
        }
    }
}

/// Why a pool cannot grant right now: one failed gate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Closed {
    /// Every slot of this level is held (or cooling down).
    Full(PoolId),
    /// This level is paused until then.
    Paused(PoolId, Instant),
    /// A level of the chain is in its learning period (after a restart or a takeover): only resumes
    /// are accepted until its leases are back or the period ends (see `takeover`).
    Learning,
    /// The daemon is draining or shutting down: nothing new is granted.
    Draining,
    /// High availability: this leader's grant deadline passed (it may no longer be the leader).
    Fenced,
    /// Every slot of this level not held is cooling down; the first enough of them cool at the instant.
    Cooling(PoolId, Instant),
    /// A rate budget of this level is short of the head's cost until the instant (exact refill).
    Budget {
        /// The level whose budget is short.
        pool: PoolId,
        /// Which budget.
        kind: BudgetKind,
        /// When every budget of the chain holds the cost.
        until: Instant,
    },
    /// Every slot of this level is held, cooling down, or kept by a failure, cancel or phantom hold.
    Held(PoolId),
    /// This level's circuit breaker is open (until then, or until an operator closes it: `None`), or
    /// half-open with its probe out (`None`).
    Breaker(PoolId, Option<Instant>),
}

/// A pool's live state.
#[derive(Debug)]
pub(crate) struct Pool {
    pub(crate) id: PoolId,
    pub(crate) cfg: PoolConfig,
    /// This pool first, then its parent, grandparent, ... up to the root.
    pub(crate) chain: Vec<PoolId>,
    /// The limit after adaptive headroom: 1..=cfg.max_concurrent.
    pub(crate) effective: u32,
    /// Leases held on this pool or any descendant.
    pub(crate) in_flight: u32,
    /// When each released slot finishes cooling down, oldest first.
    pub(crate) cooling: VecDeque<Instant>,
    pub(crate) paused_until: Option<Instant>,
    pub(crate) pause_reason: Arc<str>,
    /// When the effective limit next recovers one step, while it is below the limit.
    pub(crate) recover_at: Option<Instant>,
    pub(crate) next_token: u64,
    pub(crate) queue: Queue,
    /// Sessions with a waiter or a lease on this pool itself, with how many (for pause fan-out).
    pub(crate) interest: HashMap<SessionId, u32>,
    /// Rate budgets' live state (see [`super::budget`]).
    pub(crate) budget: BudgetState,
    /// Holds, failure streak and circuit breaker.
    pub(crate) health: Health,
    /// While this pool is in its learning period (see [`super::takeover`]).
    pub(crate) learning: Option<Learning>,
    /// How long this pool's learning took in the current term, once it ended.
    pub(crate) learned_after: Option<Duration>,
}

/// A pool's learning period after a restart or takeover: nothing new is granted on it (nor below it)
/// until the leases the previous leader held on its subtree are back, or the period ends.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct Learning {
    /// The previous leader's last published held count of this pool (its leases and its
    /// descendants'); `None` without a published runtime state (then only the period's end ends it).
    pub expected: Option<u32>,
    /// Leases re-adopted on this pool or a descendant during this period (counted when re-created,
    /// not decremented when they end).
    pub back: u32,
}

impl Learning {
    /// Every lease the previous leader reported is back.
    pub fn done(&self) -> bool {
        self.expected.is_some_and(|e| self.back >= e)
    }
}

impl Pool {
    pub(crate) fn new(id: PoolId, cfg: PoolConfig, first_token: u64, now: Instant) -> Self {
        Self {
            id,
            budget: BudgetState::new(&cfg.budget),
            effective: cfg.max_concurrent,
            cfg,
            chain: Vec::new(),
            in_flight: 0,
            cooling: VecDeque::new(),
            paused_until: None,
            pause_reason: Arc::from(""),
            recover_at: None,
            next_token: first_token,
            queue: Queue::default(),
            interest: HashMap::new(),
            health: Health::new(now),
            learning: None,
            learned_after: None,
        }
    }

    /// The concurrency and pause gates of this one level; the caller ANDs them over the chain.
    pub(crate) fn gate(&self, now: Instant) -> Result<(), Closed> {
        if let Some(until) = self.paused_until.filter(|u| *u > now) {
            return Err(Closed::Paused(self.id.clone(), until));
        }
        self.health.gate(&self.id, now)?;
        if self.in_flight >= self.effective {
            return Err(Closed::Full(self.id.clone()));
        }
        if self.in_flight as usize + self.cooling.len() >= self.effective as usize {
            // Enough cooling slots must finish for one to be free: the n-th oldest's instant.
            let n = self.in_flight as usize + self.cooling.len() - self.effective as usize;
            return Err(Closed::Cooling(self.id.clone(), self.cooling[n]));
        }
        if self.in_flight as usize + self.cooling.len() + self.health.held as usize >= self.effective as usize
        {
            return Err(Closed::Held(self.id.clone()));
        }
        Ok(())
    }

    /// A slot was freed: it cools down before it can be granted again.
    pub(crate) fn free_slot(&mut self, now: Instant) {
        self.in_flight -= 1;
        self.start_cooldown(now);
    }

    /// A slot left a lease or a hold: it cools down (if the pool has a cooldown).
    pub(crate) fn start_cooldown(&mut self, now: Instant) {
        if !self.cfg.cooldown.is_zero() {
            self.cooling.push_back(super::time::after(now, self.cfg.cooldown));
        }
    }

    /// Earliest instant at which this pool's own timers change something.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        [self.cooling.front().copied(), self.paused_until, self.recover_at, self.health.next_deadline()]
            .into_iter()
            .flatten()
            .min()
    }

    pub(crate) fn add_interest(&mut self, session: SessionId) {
        *self.interest.entry(session).or_default() += 1;
    }

    pub(crate) fn drop_interest(&mut self, session: SessionId) {
        if let Some(n) = self.interest.get_mut(&session) {
            *n -= 1;
            if *n == 0 {
                self.interest.remove(&session);
            }
        }
    }

    /// Applies a new configuration, keeping any adaptive reduction below the new limit.
    pub(crate) fn reconfigure(&mut self, cfg: PoolConfig, now: Instant) {
        self.health.reconfigure(&cfg.health, now);
        let reduced = self.effective < self.cfg.max_concurrent;
        self.effective = if reduced { self.effective.min(cfg.max_concurrent) } else { cfg.max_concurrent };
        if !cfg.adaptive {
            self.effective = cfg.max_concurrent;
            self.recover_at = None;
        }
        self.budget.reconfigure(&cfg.budget);
        self.cfg = cfg;
    }
}
