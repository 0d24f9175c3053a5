//! Provider health: per-class outcome policies, holds that keep a slot after a failure, and the circuit breaker.
//!
//! # Holds
//! A release may leave its slot *held*: it counts against the limit of every level of the lease's chain,
//! exactly like a lease, until the hold ends; then the level's release cooldown applies. Three holds exist,
//! each off (zero) by default:
//! - `failure_hold` after [`Outcome::Error`];
//! - `cancel_cooldown` after [`Outcome::Cancelled`];
//! - `phantom_hold` after `error`, `rate_limited` or `overloaded`: the provider still counts the dead request,
//!   so the slot stays held for `min(max(retry_after, phantom_hold·(1+consecutive)), phantom_hold_max)`, where
//!   `consecutive` counts the pool's failures since its last success.
//!
//! When two apply (an error with both `failure_hold` and `phantom_hold`), the longer one wins.
//!
//! # The breaker
//! See [`BreakerConfig`] for the settings and [`BreakerState`] for the states. The breaker of a level is fed
//! by the outcome of every lease whose chain contains it; the gate ([`Health::gate`]) is one more conjunct of
//! [`Pool::gate`](super::pool::Pool). Each transition starts a new *epoch*; a result from a lease granted
//! before the current epoch began is stale and ignored (only the probe's result moves a half-open breaker).

use std::{
    collections::{BTreeSet, VecDeque},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::{
    Decisions, Error, Event, Fact, Lease, LeaseEnd, LeaseId, Outcome, PoolId, Scheduler, WaiterId,
    admin::PauseApplied, ids, pool::Closed, time,
};

// ------------------------------------------------------------------------------------------------
// Settings
// ------------------------------------------------------------------------------------------------

/// What one outcome class does to its pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClassPolicy {
    /// Pause the pool (for the provider's Retry-After, else `default_pause`). Every agent's pause is capped by
    /// the pool's `max_agent_retry_after`.
    pub pause: bool,
    /// Pause length when the provider named no Retry-After; unset means the pool's `default_retry_after`.
    #[serde(with = "humantime_serde")]
    pub default_pause: Option<Duration>,
    /// The outcome counts as a failure for the circuit breaker.
    pub trips_breaker: bool,
}

impl ClassPolicy {
    const fn new(pause: bool, default_pause: Option<Duration>, trips_breaker: bool) -> Self {
        Self { pause, default_pause, trips_breaker }
    }
}

impl Default for ClassPolicy {
    fn default() -> Self {
        Self::new(false, None, false)
    }
}

/// The policy of each outcome class (`ok` has none: it is the success every breaker counts).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutcomePolicies {
    /// `error` (5xx, transport): default no pause, trips the breaker.
    pub error: ClassPolicy,
    /// `cancelled`: default no pause, does not trip the breaker.
    pub cancelled: ClassPolicy,
    /// `rate_limited` (429): default pause (with adaptive headroom), does not trip the breaker.
    pub rate_limited: ClassPolicy,
    /// `overloaded` (529/503, provider-wide): default pause, trips the breaker.
    pub overloaded: ClassPolicy,
    /// `quota_exhausted` (402, `insufficient_quota`): default pause for [`OutcomePolicies::DEFAULT_QUOTA_PAUSE`]
    /// (capped like every agent's pause), does not trip the breaker (retrying never helps, probing neither).
    pub quota_exhausted: ClassPolicy,
}

impl OutcomePolicies {
    /// Default pause after `quota_exhausted` without a Retry-After: an hour, cut to the pool's
    /// `max_agent_retry_after` (raise that to let a quota failure stop the pool longer).
    pub const DEFAULT_QUOTA_PAUSE: Duration = Duration::from_secs(3600);

    /// The policy of a class; `None` for `ok`.
    pub fn of(&self, outcome: &Outcome) -> Option<&ClassPolicy> {
        match outcome {
            Outcome::Ok => None,
            Outcome::Error => Some(&self.error),
            Outcome::Cancelled => Some(&self.cancelled),
            Outcome::RateLimited(_) => Some(&self.rate_limited),
            Outcome::Overloaded(_) => Some(&self.overloaded),
            Outcome::QuotaExhausted(_) => Some(&self.quota_exhausted),
        }
    }
}

impl Default for OutcomePolicies {
    fn default() -> Self {
        Self {
            error: ClassPolicy::new(false, None, true),
            cancelled: ClassPolicy::new(false, None, false),
            rate_limited: ClassPolicy::new(true, None, false),
            overloaded: ClassPolicy::new(true, None, true),
            quota_exhausted: ClassPolicy::new(true, Some(Self::DEFAULT_QUOTA_PAUSE), false),
        }
    }
}

/// What requests do while a breaker is open.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenOpen {
    /// Wait in the queue (the half-open probe goes to the head).
    #[default]
    Wait,
    /// Refuse new requests (and reject queued ones when it opens) with UNAVAILABLE and a retry-after.
    FailFast,
}

/// A pool's circuit breaker (`[pools.NAME.health.breaker]`); off by default.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Turn the breaker on.
    pub enabled: bool,
    /// Open after this many failures within `window` (0 turns this rule off).
    pub failures: u32,
    /// The sliding window over which outcomes count.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Open when at least this percentage of the outcomes in `window` failed (0 turns this rule off)...
    pub failure_percent: u8,
    /// ...and at least this many outcomes were counted.
    pub min_outcomes: u32,
    /// First open timeout; each re-open after a failed probe doubles it.
    #[serde(with = "humantime_serde")]
    pub open_base: Duration,
    /// Longest open timeout.
    #[serde(with = "humantime_serde")]
    pub open_max: Duration,
    /// Wait or fail fast while open.
    pub when_open: WhenOpen,
}

impl BreakerConfig {
    /// Default `failures`.
    pub const DEFAULT_FAILURES: u32 = 5;
    /// Default `window`.
    pub const DEFAULT_WINDOW: Duration = Duration::from_secs(30);
    /// Default `min_outcomes`.
    pub const DEFAULT_MIN_OUTCOMES: u32 = 20;
    /// Default `open_base`.
    pub const DEFAULT_OPEN_BASE: Duration = Duration::from_secs(5);
    /// Default `open_max`.
    pub const DEFAULT_OPEN_MAX: Duration = Duration::from_secs(300);
    /// Largest accepted `window`, `open_base` and `open_max`: 1 h.
    pub const MAX_DURATION: Duration = Duration::from_secs(3600);
    /// Largest accepted `failures` and `min_outcomes`.
    pub const MAX_COUNT: u32 = 10_000;
    /// Most outcomes remembered in the window (older ones are forgotten early): bounds memory per pool.
    pub const MAX_SAMPLES: usize = 10_000;

    /// The open timeout after `k` consecutive opens: `open_base·2^k`, capped at `open_max`.
    pub fn open_timeout(&self, k: u32) -> Duration {
        let factor = 1u32.checked_shl(k.min(31)).unwrap_or(u32::MAX);
        self.open_base.saturating_mul(factor).min(self.open_max)
    }
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            failures: Self::DEFAULT_FAILURES,
            window: Self::DEFAULT_WINDOW,
            failure_percent: 0,
            min_outcomes: Self::DEFAULT_MIN_OUTCOMES,
            open_base: Self::DEFAULT_OPEN_BASE,
            open_max: Self::DEFAULT_OPEN_MAX,
            when_open: WhenOpen::Wait,
        }
    }
}

/// A pool's provider-health settings (`[pools.NAME.health]`): outcome policies, holds, breaker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Hold the slot this long after `error` (0 = off).
    #[serde(with = "humantime_serde")]
    pub failure_hold: Duration,
    /// Hold the slot this long after `cancelled` (0 = off).
    #[serde(with = "humantime_serde")]
    pub cancel_cooldown: Duration,
    /// Base of the phantom-concurrency hold after `error`, `rate_limited` or `overloaded` (0 = off).
    #[serde(with = "humantime_serde")]
    pub phantom_hold: Duration,
    /// Longest phantom hold.
    #[serde(with = "humantime_serde")]
    pub phantom_hold_max: Duration,
    /// Per-class policies.
    pub outcomes: OutcomePolicies,
    /// The circuit breaker.
    pub breaker: BreakerConfig,
}

impl HealthConfig {
    /// Default `phantom_hold_max`.
    pub const DEFAULT_PHANTOM_HOLD_MAX: Duration = Duration::from_secs(60);
    /// Largest accepted hold setting (every hold and `default_pause`): 1 h.
    pub const MAX_HOLD: Duration = Duration::from_secs(3600);

    /// Checks the ranges; `name` prefixes the message.
    pub fn validate(&self, name: &PoolId) -> Result<(), String> {
        let b = &self.breaker;
        let pauses = [
            ("error", &self.outcomes.error),
            ("cancelled", &self.outcomes.cancelled),
            ("rate_limited", &self.outcomes.rate_limited),
            ("overloaded", &self.outcomes.overloaded),
            ("quota_exhausted", &self.outcomes.quota_exhausted),
        ];
        let mut bounded = vec![
            ("health.failure_hold", self.failure_hold, Self::MAX_HOLD),
            ("health.cancel_cooldown", self.cancel_cooldown, Self::MAX_HOLD),
            ("health.phantom_hold", self.phantom_hold, Self::MAX_HOLD),
            ("health.phantom_hold_max", self.phantom_hold_max, Self::MAX_HOLD),
            ("health.breaker.window", b.window, BreakerConfig::MAX_DURATION),
            ("health.breaker.open_base", b.open_base, BreakerConfig::MAX_DURATION),
            ("health.breaker.open_max", b.open_max, BreakerConfig::MAX_DURATION),
        ];
        for (class, p) in pauses {
            if let Some(d) = p.default_pause {
                bounded.push((class, d, super::SchedulerConfig::MAX_PAUSE));
            }
        }
        for (field, value, max) in bounded {
            if value > max {
                return Err(format!(
                    "pool {name}: {field} = {} is above the maximum {}",
                    humantime::format_duration(value),
                    humantime::format_duration(max)
                ));
            }
        }
        if b.failures > BreakerConfig::MAX_COUNT || b.min_outcomes > BreakerConfig::MAX_COUNT {
            return Err(format!(
                "pool {name}: health.breaker.failures and min_outcomes must be <= {}",
                BreakerConfig::MAX_COUNT
            ));
        }
        if b.failure_percent > 100 {
            return Err(format!("pool {name}: health.breaker.failure_percent must be <= 100"));
        }
        if b.enabled {
            if b.window.is_zero() || b.open_base.is_zero() || b.open_max < b.open_base {
                return Err(format!(
                    "pool {name}: health.breaker needs window > 0, open_base > 0 and open_max >= open_base"
                ));
            }
            if b.failures == 0 && b.failure_percent == 0 {
                return Err(format!(
                    "pool {name}: health.breaker is enabled but failures and failure_percent are both 0"
                ));
            }
        }
        Ok(())
    }
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            failure_hold: Duration::ZERO,
            cancel_cooldown: Duration::ZERO,
            phantom_hold: Duration::ZERO,
            phantom_hold_max: Self::DEFAULT_PHANTOM_HOLD_MAX,
            outcomes: OutcomePolicies::default(),
            breaker: BreakerConfig::default(),
        }
    }
}

/// A partial change to a pool's health settings (Admin `UpsertPool`): `None` keeps the current value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs, reason = "each field is the HealthConfig / BreakerConfig field of the same name")]
pub struct HealthPatch {
    pub failure_hold: Option<Duration>,
    pub cancel_cooldown: Option<Duration>,
    pub phantom_hold: Option<Duration>,
    pub phantom_hold_max: Option<Duration>,
    pub breaker_enabled: Option<bool>,
    pub breaker_failures: Option<u32>,
    pub breaker_window: Option<Duration>,
    pub breaker_failure_percent: Option<u8>,
    pub breaker_min_outcomes: Option<u32>,
    pub breaker_open_base: Option<Duration>,
    pub breaker_open_max: Option<Duration>,
    pub breaker_when_open: Option<WhenOpen>,
}

impl HealthPatch {
    /// `base` with the set fields replaced (validated with the rest of the pool's settings).
    pub fn apply(&self, mut base: HealthConfig) -> HealthConfig {
        fn set<T: Copy>(dst: &mut T, v: Option<T>) {
            if let Some(v) = v {
                *dst = v;
            }
        }
        set(&mut base.failure_hold, self.failure_hold);
        set(&mut base.cancel_cooldown, self.cancel_cooldown);
        set(&mut base.phantom_hold, self.phantom_hold);
        set(&mut base.phantom_hold_max, self.phantom_hold_max);
        let b = &mut base.breaker;
        set(&mut b.enabled, self.breaker_enabled);
        set(&mut b.failures, self.breaker_failures);
        set(&mut b.window, self.breaker_window);
        set(&mut b.failure_percent, self.breaker_failure_percent);
        set(&mut b.min_outcomes, self.breaker_min_outcomes);
        set(&mut b.open_base, self.breaker_open_base);
        set(&mut b.open_max, self.breaker_open_max);
        set(&mut b.when_open, self.breaker_when_open);
        base
    }
}

// ------------------------------------------------------------------------------------------------
// Live state
// ------------------------------------------------------------------------------------------------

/// Why a slot is held after its lease ended.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HoldKind {
    /// `failure_hold` after an error.
    Failure,
    /// `cancel_cooldown` after a cancellation.
    Cancel,
    /// `phantom_hold`: the provider still counts the failed request.
    Phantom,
}

impl HoldKind {
    /// Every kind.
    pub const ALL: [HoldKind; 3] = [HoldKind::Failure, HoldKind::Cancel, HoldKind::Phantom];

    /// snake_case name, as in Watch, metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            HoldKind::Failure => "failure_hold",
            HoldKind::Cancel => "cancel_cooldown",
            HoldKind::Phantom => "phantom_hold",
        }
    }
}

/// A breaker's state.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub enum BreakerState {
    /// Grants flow; outcomes are counted.
    #[default]
    Closed,
    /// Nothing is granted until `until`; `None` when an operator forced it open (until forced closed).
    Open {
        /// When it turns half-open.
        until: Option<Instant>,
    },
    /// One waiter may be granted a probe lease; its outcome closes or re-opens the breaker.
    HalfOpen {
        /// The probe lease, while it is out.
        probe: Option<LeaseId>,
    },
}

impl BreakerState {
    /// snake_case name.
    pub fn label(&self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open { .. } => "open",
            BreakerState::HalfOpen { .. } => "half_open",
        }
    }
}

/// A breaker as Status, Watch and metrics show it.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct BreakerView {
    /// The state.
    pub state: BreakerState,
    /// Transitions so far; a result from a lease granted in an earlier epoch is ignored.
    pub epoch: u64,
    /// Consecutive opens without a success (`k` of the open timeout `open_base·2^k`).
    pub opens: u32,
    /// Failures counted in the current window.
    pub failures: u32,
    /// Outcomes counted in the current window.
    pub outcomes: u32,
    /// An operator forced the current state.
    pub forced: bool,
}

/// What an operator asks of a breaker.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ForceBreaker {
    /// Open it until forced closed.
    Open,
    /// Close it and forget its counts and backoff.
    Closed,
}

/// One level's breaker.
#[derive(Debug)]
struct Breaker {
    state: BreakerState,
    epoch: u64,
    /// When the current epoch began.
    since: Instant,
    opens: u32,
    /// Outcomes in the window, oldest first: (when, failed).
    samples: VecDeque<(Instant, bool)>,
    failures: u32,
    forced: bool,
}

/// A pool's live provider-health state: holds, the failure streak and the breaker.
#[derive(Debug)]
pub(crate) struct Health {
    /// Slots held at this level: holds of this pool and of its descendants.
    pub(crate) held: u32,
    /// Holds that started on this pool's own leases: (until, sequence, kind).
    holds: BTreeSet<(Instant, u64, HoldKind)>,
    next_hold: u64,
    /// Failures (`error`, `rate_limited`, `overloaded`) since the last `ok`: the phantom hold's multiplier.
    consecutive: u32,
    breaker: Breaker,
}

impl Health {
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            held: 0,
            holds: BTreeSet::new(),
            next_hold: 0,
            consecutive: 0,
            breaker: Breaker {
                state: BreakerState::Closed,
                epoch: 0,
                since: now,
                opens: 0,
                samples: VecDeque::new(),
                failures: 0,
                forced: false,
            },
        }
    }

    /// The breaker gate of this level.
    pub(crate) fn gate(&self, id: &PoolId, now: Instant) -> Result<(), Closed> {
        match self.breaker.state {
            BreakerState::Open { until } if until.is_none_or(|u| u > now) => {
                Err(Closed::Breaker(id.clone(), until))
            }
            BreakerState::HalfOpen { probe: Some(_) } => Err(Closed::Breaker(id.clone(), None)),
            _ => Ok(()),
        }
    }

    /// The earliest instant this state changes by itself.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let open = match self.breaker.state {
            BreakerState::Open { until } => until,
            _ => None,
        };
        [self.holds.first().map(|h| h.0), open].into_iter().flatten().min()
    }

    /// The breaker as shown to observers.
    pub(crate) fn view(&self) -> BreakerView {
        let b = &self.breaker;
        BreakerView {
            state: b.state,
            epoch: b.epoch,
            opens: b.opens,
            failures: b.failures,
            outcomes: b.samples.len() as u32,
            forced: b.forced,
        }
    }

    /// Starts a hold on this pool's own lease until `until` (the caller counts its slot on the chain).
    fn insert_hold(&mut self, until: Instant, kind: HoldKind) {
        self.next_hold += 1;
        self.holds.insert((until, self.next_hold, kind));
    }

    /// The last end among this pool's own holds.
    pub(crate) fn own_holds(&self) -> impl Iterator<Item = (Instant, HoldKind)> + '_ {
        self.holds.iter().map(|(t, _, k)| (*t, *k))
    }

    /// Restores a breaker a previous leader left (see [`super::takeover`]) on a closed one: its open
    /// count merges with max; an open one whose timeout ran out comes back half-open, one forced open
    /// (no end) stays forced. Returns whether the state changed.
    pub(crate) fn restore(&mut self, state: super::BreakerRuntime, opens: u32, now: Instant) -> bool {
        use super::BreakerRuntime as R;
        self.breaker.opens = self.breaker.opens.max(opens);
        if self.breaker.state != BreakerState::Closed {
            return false;
        }
        let (state, forced) = match state {
            R::Closed => return false,
            R::Open { until: None } => (BreakerState::Open { until: None }, true),
            R::Open { until: Some(u) } if u > now => (BreakerState::Open { until: Some(u) }, false),
            R::Open { .. } | R::HalfOpen => (BreakerState::HalfOpen { probe: None }, false),
        };
        self.set_state(state, now);
        self.breaker.forced = forced;
        true
    }

    /// A new configuration: a disabled breaker (not forced) is closed.
    pub(crate) fn reconfigure(&mut self, cfg: &HealthConfig, now: Instant) {
        if !cfg.breaker.enabled && !self.breaker.forced && self.breaker.state != BreakerState::Closed {
            self.set_state(BreakerState::Closed, now);
            self.breaker.opens = 0;
        }
    }

    fn set_state(&mut self, state: BreakerState, now: Instant) {
        let b = &mut self.breaker;
        b.state = state;
        b.epoch += 1;
        b.since = now;
        b.samples.clear();
        b.failures = 0;
    }

    /// Counts one outcome in the closed breaker's window; returns whether it should open.
    fn count(&mut self, cfg: &BreakerConfig, now: Instant, failed: bool) -> bool {
        let b = &mut self.breaker;
        let horizon = now.checked_sub(cfg.window);
        while let Some(&(t, f)) = b.samples.front() {
            if horizon.is_none_or(|h| t > h) && b.samples.len() < BreakerConfig::MAX_SAMPLES {
                break;
            }
            b.samples.pop_front();
            b.failures -= u32::from(f);
        }
        b.samples.push_back((now, failed));
        b.failures += u32::from(failed);
        let n = b.samples.len() as u64;
        let by_count = cfg.failures > 0 && b.failures >= cfg.failures;
        let by_ratio = cfg.failure_percent > 0
            && n >= u64::from(cfg.min_outcomes.max(1))
            && u64::from(b.failures) * 100 >= u64::from(cfg.failure_percent) * n;
        failed && (by_count || by_ratio)
    }
}

/// How one result moves a breaker.
enum Verdict {
    Success,
    Failure,
    /// Neither: a cancellation, an expiry, a closed stream, a class that does not count.
    Neutral,
}

/// A breaker transition to announce.
struct Transition {
    pool: PoolId,
    view: BreakerView,
    reason: String,
}

// ------------------------------------------------------------------------------------------------
// The scheduler's side
// ------------------------------------------------------------------------------------------------

impl Scheduler {
    /// Applies a released outcome's class policy to its pool: the pause, if the class pauses.
    pub(super) fn apply_class_policy(
        &mut self,
        now: Instant,
        pool: &PoolId,
        outcome: Outcome,
        reason: String,
        out: &mut Decisions,
    ) {
        let Some(p) = self.pools.get(pool) else { return };
        let Some(policy) = p.cfg.health.outcomes.of(&outcome).cloned() else { return };
        if !policy.pause {
            return;
        }
        let retry_after = outcome.pause_hint().flatten();
        match outcome {
            // A 429 is about this key's quota: the adaptive-headroom path, as before.
            Outcome::RateLimited(_) => {
                let wait = retry_after.or(policy.default_pause);
                self.pause(now, pool, wait, reason, true, out);
            }
            _ => {
                let wait = retry_after
                    .or(policy.default_pause)
                    .unwrap_or(p.cfg.default_retry_after)
                    .min(p.cfg.max_agent_retry_after);
                self.pause(now, pool, Some(wait), reason, false, out);
            }
        }
    }

    /// A provider answer seen outside a lease (`ReportRateLimit` with an outcome class): the class's pause
    /// and a breaker failure when the class trips it. Only the classes with a pause hint are accepted.
    pub fn report_outcome(
        &mut self,
        now: Instant,
        pool: &PoolId,
        outcome: Outcome,
        reason: &str,
    ) -> Result<(PauseApplied, Decisions), Error> {
        if !self.pools.contains_key(pool) {
            return Err(Error::UnknownPool(pool.clone()));
        }
        if outcome.pause_hint().is_none() {
            return Err(Error::InvalidArgument(format!(
                "outcome {} cannot be reported outside a lease: want rate_limited, overloaded or quota_exhausted",
                outcome.label()
            )));
        }
        let mut out = Decisions::default();
        self.advance(now, &mut out);
        let reason = if reason.is_empty() {
            format!("{} reported", outcome.describe())
        } else {
            format!("{} reported: {}", outcome.describe(), ids::truncate(reason, 256))
        };
        self.apply_class_policy(now, pool, outcome, reason, &mut out);
        let chain = self.pools[pool].chain.clone();
        for level in chain {
            self.feed_breaker(now, &level, None, Some(outcome), &mut out);
        }
        self.settle(now, &mut out);
        let p = &self.pools[pool];
        Ok((PauseApplied { until: p.paused_until.unwrap_or(now), effective_limit: p.effective }, out))
    }

    /// The hook of every lease end: feeds each level's breaker and returns how long the slot stays held.
    pub(super) fn on_lease_end(
        &mut self,
        now: Instant,
        lease: &Lease,
        end: LeaseEnd,
        out: &mut Decisions,
    ) -> Option<(Instant, HoldKind)> {
        let outcome = match end {
            LeaseEnd::Released(o) => Some(o),
            LeaseEnd::StreamClosed | LeaseEnd::Expired(_) => None,
        };
        let chain = self.pools.get(&lease.pool).map(|p| p.chain.clone()).unwrap_or_default();
        for level in &chain {
            self.feed_breaker(now, level, Some(lease), outcome, out);
        }
        let pool = self.pools.get_mut(&lease.pool)?;
        let outcome = outcome?;
        let h = &pool.cfg.health;
        let phantom_base = (!h.phantom_hold.is_zero()).then_some(h.phantom_hold);
        let consecutive = pool.health.consecutive;
        let phantom = |retry: Option<Duration>| {
            phantom_base.map(|base| {
                let grown = base.saturating_mul(consecutive.saturating_add(1));
                retry.unwrap_or_default().max(grown).min(h.phantom_hold_max)
            })
        };
        let hold = match outcome {
            Outcome::Ok => None,
            Outcome::Error => {
                let failure = (!h.failure_hold.is_zero()).then_some((h.failure_hold, HoldKind::Failure));
                let phantom = phantom(None).map(|d| (d, HoldKind::Phantom));
                failure.into_iter().chain(phantom).max()
            }
            Outcome::Cancelled => {
                (!h.cancel_cooldown.is_zero()).then_some((h.cancel_cooldown, HoldKind::Cancel))
            }
            Outcome::RateLimited(r) | Outcome::Overloaded(r) => phantom(r).map(|d| (d, HoldKind::Phantom)),
            Outcome::QuotaExhausted(_) => None,
        };
        match outcome {
            Outcome::Ok => pool.health.consecutive = 0,
            Outcome::Error | Outcome::RateLimited(_) | Outcome::Overloaded(_) => {
                pool.health.consecutive = consecutive.saturating_add(1);
            }
            Outcome::Cancelled | Outcome::QuotaExhausted(_) => {}
        }
        hold.filter(|(d, _)| !d.is_zero()).map(|(d, kind)| (time::after(now, d), kind))
    }

    /// Frees the lease's slot on every level of its chain, or keeps it held until `hold` ends.
    pub(super) fn free_or_hold(
        &mut self,
        now: Instant,
        lease: &Lease,
        hold: Option<(Instant, HoldKind)>,
        out: &mut Decisions,
    ) {
        let Some(chain) = self.pools.get(&lease.pool).map(|p| p.chain.clone()) else { return };
        for level in &chain {
            let p = self.pools.get_mut(level).expect("chain pools exist");
            match hold {
                Some(_) => {
                    p.in_flight -= 1;
                    p.health.held += 1;
                }
                None => p.free_slot(now),
            }
        }
        if let Some((until, kind)) = hold {
            self.pools.get_mut(&lease.pool).expect("checked above").health.insert_hold(until, kind);
            out.facts.push(Fact::Held { pool: lease.pool.clone(), lease_id: lease.id, kind, until });
        }
    }

    /// Holds a previous leader left on `pool`'s own leases (see [`super::takeover`]): each keeps a
    /// slot on every level of the pool's chain until it ends, as if this leader had started it. Holds
    /// already ended by `now` are skipped.
    pub(super) fn restore_holds(&mut self, now: Instant, pool: &PoolId, holds: &[(Instant, HoldKind)]) {
        let Some(chain) = self.pools.get(pool).map(|p| p.chain.clone()) else { return };
        for &(until, kind) in holds.iter().filter(|(t, _)| *t > now) {
            for level in &chain {
                self.pools.get_mut(level).expect("chain pools exist").health.held += 1;
            }
            self.pools.get_mut(pool).expect("checked above").health.insert_hold(until, kind);
        }
    }

    /// Timers of provider health due by `now`: ended holds (their slots start the release cooldown) and
    /// open breakers whose timeout ran out (they turn half-open).
    pub(super) fn advance_health(&mut self, now: Instant, out: &mut Decisions) {
        let mut ended: Vec<(PoolId, HoldKind)> = Vec::new();
        let mut half_open: Vec<PoolId> = Vec::new();
        for pool in self.pools.values_mut() {
            while let Some(&(t, seq, kind)) = pool.health.holds.first().filter(|h| h.0 <= now) {
                pool.health.holds.remove(&(t, seq, kind));
                ended.push((pool.id.clone(), kind));
            }
            if let BreakerState::Open { until: Some(u) } = pool.health.breaker.state
                && u <= now
            {
                pool.health.set_state(BreakerState::HalfOpen { probe: None }, now);
                half_open.push(pool.id.clone());
            }
        }
        for (id, kind) in ended {
            for level in self.pools[&id].chain.clone() {
                let p = self.pools.get_mut(&level).expect("chain pools exist");
                p.health.held -= 1;
                p.in_flight += 1;
                p.free_slot(now);
            }
            out.facts.push(Fact::HoldEnded { pool: id, kind });
        }
        for id in half_open {
            let view = self.pools[&id].health.view();
            let reason = "open timeout ran out: the next grant is the probe".to_owned();
            self.announce(Transition { pool: id, view, reason }, out);
        }
    }

    /// Recomputes every level's held count from the holds (after the pool tree changed), and frees the
    /// half-open admission of a level whose probe is no longer on its chain (re-parented away).
    pub(super) fn rebuild_holds(&mut self) {
        let probes: Vec<(PoolId, LeaseId)> = self
            .pools
            .values()
            .filter_map(|p| match p.health.breaker.state {
                BreakerState::HalfOpen { probe: Some(l) } => Some((p.id.clone(), l)),
                _ => None,
            })
            .collect();
        for (level, l) in probes {
            let on_chain = self.leases.get(&l).is_some_and(|l| self.pools[&l.pool].chain.contains(&level));
            if !on_chain {
                self.pools.get_mut(&level).expect("listed above").health.breaker.state =
                    BreakerState::HalfOpen { probe: None };
            }
        }
        for p in self.pools.values_mut() {
            p.health.held = 0;
        }
        let counts: Vec<(PoolId, u32)> =
            self.pools.values().map(|p| (p.id.clone(), p.health.holds.len() as u32)).collect();
        for (id, n) in counts.into_iter().filter(|(_, n)| *n > 0) {
            for level in self.pools[&id].chain.clone() {
                self.pools.get_mut(&level).expect("chain pools exist").health.held += n;
            }
        }
    }

    /// A grant on `pool`: every half-open level of its chain without a probe takes this lease as its
    /// probe. Returns whether it is a probe anywhere.
    pub(super) fn take_probe(&mut self, pool: &PoolId, lease: LeaseId, out: &mut Decisions) -> bool {
        let mut probe = false;
        for level in self.pools[pool].chain.clone() {
            let p = self.pools.get_mut(&level).expect("chain pools exist");
            if p.health.breaker.state == (BreakerState::HalfOpen { probe: None }) {
                p.health.breaker.state = BreakerState::HalfOpen { probe: Some(lease) };
                out.facts.push(Fact::Breaker {
                    pool: level.clone(),
                    view: p.health.view(),
                    reason: format!("probe lease {lease} granted"),
                });
                probe = true;
            }
        }
        probe
    }

    /// Feeds one result to `level`'s breaker. `lease` is `None` for a report outside a lease; `outcome`
    /// is `None` for a lease that ended without a release.
    fn feed_breaker(
        &mut self,
        now: Instant,
        level: &PoolId,
        lease: Option<&Lease>,
        outcome: Option<Outcome>,
        out: &mut Decisions,
    ) {
        let Some(p) = self.pools.get_mut(level) else { return };
        let cfg = p.cfg.health.breaker.clone();
        let verdict = match outcome {
            None | Some(Outcome::Cancelled) => Verdict::Neutral,
            Some(Outcome::Ok) => Verdict::Success,
            Some(o) if p.cfg.health.outcomes.of(&o).is_some_and(|c| c.trips_breaker) => Verdict::Failure,
            // A class that does not count says the provider answered: a probe with it succeeded; in the
            // closed window it is not counted.
            Some(_) if matches!(p.health.breaker.state, BreakerState::HalfOpen { .. }) => Verdict::Success,
            Some(_) => Verdict::Neutral,
        };
        let is_probe =
            lease.is_some_and(|l| p.health.breaker.state == BreakerState::HalfOpen { probe: Some(l.id) });
        let stale = lease.is_some_and(|l| l.granted_at < p.health.breaker.since);
        let h = &mut p.health;
        let transition = match h.breaker.state {
            BreakerState::HalfOpen { probe: Some(_) } if is_probe => match verdict {
                Verdict::Neutral => {
                    h.breaker.state = BreakerState::HalfOpen { probe: None };
                    Some("the probe ended without a result: the next grant is the probe".to_owned())
                }
                Verdict::Success => {
                    h.set_state(BreakerState::Closed, now);
                    h.breaker.opens = 0;
                    Some("the probe succeeded".to_owned())
                }
                Verdict::Failure => {
                    let until = time::after(now, cfg.open_timeout(h.breaker.opens));
                    h.set_state(BreakerState::Open { until: Some(until) }, now);
                    h.breaker.opens = h.breaker.opens.saturating_add(1);
                    Some(format!("the probe failed ({})", outcome.map_or("", |o| o.label())))
                }
            },
            BreakerState::Closed if cfg.enabled && !stale && !h.breaker.forced => {
                let failed = match verdict {
                    Verdict::Success => false,
                    Verdict::Failure => true,
                    Verdict::Neutral => return,
                };
                if h.count(&cfg, now, failed) {
                    let (failures, n) = (h.breaker.failures, h.breaker.samples.len());
                    let until = time::after(now, cfg.open_timeout(h.breaker.opens));
                    h.set_state(BreakerState::Open { until: Some(until) }, now);
                    h.breaker.opens = h.breaker.opens.saturating_add(1);
                    Some(format!(
                        "{failures} failures among {n} outcomes within {}",
                        humantime::format_duration(cfg.window)
                    ))
                } else {
                    None
                }
            }
            _ => None,
        };
        if let Some(reason) = transition {
            let view = self.pools[level].health.view();
            let opened = matches!(view.state, BreakerState::Open { .. });
            self.announce(Transition { pool: level.clone(), view, reason }, out);
            if opened && cfg.when_open == WhenOpen::FailFast {
                self.fail_fast_waiters(now, level, out);
            }
        }
    }

    /// [`Scheduler::announce`] for a breaker restored on takeover.
    pub(super) fn announce_breaker(
        &mut self,
        pool: PoolId,
        view: BreakerView,
        reason: String,
        out: &mut Decisions,
    ) {
        self.announce(Transition { pool, view, reason }, out);
    }

    /// Records a transition and tells every session waiting on or holding the pool or a descendant.
    fn announce(&mut self, t: Transition, out: &mut Decisions) {
        for s in self.interested(&t.pool) {
            out.push(
                s,
                Event::Breaker { pool: t.pool.clone(), view: t.view, reason: t.reason.clone().into() },
            );
        }
        out.facts.push(Fact::Breaker { pool: t.pool, view: t.view, reason: t.reason });
    }

    /// A fail-fast breaker opened on `level`: the waiters under it are refused, an `acquire_any`
    /// waiter only once every pool it lists has a fail-fast breaker open on its chain (as for a new
    /// request, see [`Scheduler::fail_fast`]).
    fn fail_fast_waiters(&mut self, now: Instant, level: &PoolId, out: &mut Decisions) {
        let queued: BTreeSet<WaiterId> =
            self.pools.values().filter(|p| p.chain.contains(level)).flat_map(|p| p.queue.iter()).collect();
        let victims: Vec<(WaiterId, Error)> = queued
            .into_iter()
            .filter_map(|wid| {
                let w = self.waiters.get(&wid)?;
                let pools: Vec<&PoolId> = w.pools().map(|(p, _)| p).collect();
                self.fail_fast(&pools, now).map(|error| (wid, error))
            })
            .collect();
        for (wid, error) in victims {
            if let Some(w) = self.drop_waiter(wid) {
                out.push(w.session, Event::Rejected { request_id: w.request_id.to_string(), error });
            }
        }
    }

    /// The retry hint of a fail-fast refusal: the time until half-open, or for a breaker forced open
    /// (no end is known) its first open timeout. Always set, so that clients tell this refusal from
    /// a daemon that is shutting down (also UNAVAILABLE, without a hint).
    fn breaker_retry_after(&self, level: &PoolId, now: Instant) -> Option<Duration> {
        let p = self.pools.get(level)?;
        match p.health.breaker.state {
            BreakerState::Open { until: Some(u) } => Some(u.saturating_duration_since(now)),
            BreakerState::Open { until: None } => Some(p.cfg.health.breaker.open_base),
            _ => None,
        }
    }

    /// For a new request on these pools: the refusal, when every listed pool has a fail-fast breaker open
    /// somewhere on its chain.
    pub(super) fn fail_fast(&self, pools: &[&PoolId], now: Instant) -> Option<Error> {
        let mut first = None;
        for pool in pools {
            let open = self.pools[*pool].chain.iter().find(|level| {
                let p = &self.pools[*level];
                p.cfg.health.breaker.when_open == WhenOpen::FailFast
                    && matches!(p.health.breaker.state, BreakerState::Open { until } if until.is_none_or(|u| u > now))
            });
            match open {
                Some(level) => {
                    first.get_or_insert_with(|| Error::BreakerOpen {
                        pool: level.clone(),
                        retry_after: self.breaker_retry_after(level, now),
                    });
                }
                None => return None,
            }
        }
        first
    }

    /// An operator forces a pool's breaker open (until forced closed) or closed (forgetting counts and
    /// backoff). Works whether or not the pool's breaker is enabled.
    pub fn force_breaker(
        &mut self,
        now: Instant,
        pool: &PoolId,
        to: ForceBreaker,
        reason: &str,
    ) -> Result<(BreakerView, Decisions), Error> {
        if !self.pools.contains_key(pool) {
            return Err(Error::UnknownPool(pool.clone()));
        }
        let mut out = Decisions::default();
        self.advance(now, &mut out);
        let h = &mut self.pools.get_mut(pool).expect("checked above").health;
        let (state, forced, what) = match to {
            ForceBreaker::Open => (BreakerState::Open { until: None }, true, "forced open by an operator"),
            ForceBreaker::Closed => (BreakerState::Closed, false, "forced closed by an operator"),
        };
        h.set_state(state, now);
        h.breaker.forced = forced;
        if to == ForceBreaker::Closed {
            h.breaker.opens = 0;
        }
        let view = h.view();
        let reason = if reason.is_empty() {
            what.to_owned()
        } else {
            format!("{what}: {}", ids::truncate(reason, 256))
        };
        let when_open = self.pools[pool].cfg.health.breaker.when_open;
        self.announce(Transition { pool: pool.clone(), view, reason }, &mut out);
        if to == ForceBreaker::Open && when_open == WhenOpen::FailFast {
            self.fail_fast_waiters(now, pool, &mut out);
        }
        self.settle(now, &mut out);
        Ok((view, out))
    }

    /// The holds counting at `pool`'s level (its own and its descendants'), and the last one's end.
    pub(super) fn holds_at(&self, pool: &PoolId) -> Option<Instant> {
        self.pools
            .values()
            .filter(|p| p.chain.contains(pool))
            .filter_map(|p| p.health.own_holds().map(|(t, _)| t).max())
            .max()
    }
}
