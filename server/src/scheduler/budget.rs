//! Rate budgets: per-pool requests, input-token and output-token buckets, reserved at grant and settled at release.
//!
//! # The refill rule: an exact token bucket
//! Each budget is a token bucket of `burst` tokens that refills continuously at `per_minute` tokens per
//! `window` (one minute unless configured shorter). The level is kept in integer units of
//! `token × window_ns`, so refilling `rate` units per nanosecond is exact: no rounding drift, and the
//! instant a level reaches a cost is computed exactly (`ceil(missing / rate)` nanoseconds), which is
//! the wake-up the driver sleeps until. A full bucket stays full (the level never exceeds `burst`).
//!
//! # Reserve, settle, debt
//! - A grant takes its cost from every budget on every level of the pool's chain at once, together
//!   with the slot; the gate admits it only when every such budget holds the whole cost (capped at
//!   the bucket's burst, so that a provider lowering a limit never blocks a waiter forever). Nothing is
//!   taken while any level is short, so no level is held while waiting on another.
//! - The cost is 1 request, the request's `input_tokens` and its `max_output_tokens`; without an
//!   estimate, the first budget-carrying level's `default_input_tokens` / `default_output_tokens`
//!   apply (a fixed estimate: the daemon does not learn one from usage). An estimate above any level's
//!   burst is refused (INVALID_ARGUMENT): it could never be granted.
//! - A release carrying usage settles: the unused part goes back (up to `burst`), usage above the
//!   reservation is taken as debt: the level goes below zero, and the next grant waits until refill
//!   paid it back. Debt is floored at `-burst` (the debt cap): usage beyond that is not charged.
//!   Charged input is `input_tokens + cache_creation_tokens`; cache reads are free, as Anthropic
//!   counts them.
//! - A lease that ends without usage (expired, stream closed, revoked, released without usage) keeps
//!   its whole reservation charged.
//!
//! # The provider's word
//! A provider's rate-limit headers (on a release or `ReportUsage`) clamp the budget of the first level
//! of the chain that has the matching kind: its level drops to at most `remaining`, and its rate and
//! burst to at most `limit` until a later report says otherwise. A combined `tokens` limit clamps the
//! input and the output levels both. The daemon is never more optimistic than the provider's last word.
//!
//! # Shadow mode
//! With `shadow = true` a pool's budgets are reserved and settled as usual but never block: a grant
//! that would have waited is counted, with how long, in a [`BudgetFact::ShadowWait`].

use std::{collections::HashMap, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::{
    Decisions, Error, Fact, LeaseId, PoolId, Scheduler,
    pool::{Closed, Pool},
    report::{LimitKind, ProviderLimit, Usage},
};

/// One of the three budgets a pool can have.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BudgetKind {
    /// Requests per window.
    Requests,
    /// Input tokens per window.
    InputTokens,
    /// Output tokens per window.
    OutputTokens,
}

impl BudgetKind {
    /// Every kind, in index order.
    pub const ALL: [BudgetKind; 3] =
        [BudgetKind::Requests, BudgetKind::InputTokens, BudgetKind::OutputTokens];
    /// Each kind's snake_case label (metrics, Watch, logs), by index.
    pub const LABELS: [&'static str; 3] = ["requests", "input_tokens", "output_tokens"];

    /// Index in [`BudgetKind::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// snake_case label.
    pub fn label(self) -> &'static str {
        Self::LABELS[self.index()]
    }

    /// The budgets a provider limit of this kind speaks about.
    fn of_limit(kind: LimitKind) -> &'static [BudgetKind] {
        match kind {
            LimitKind::Requests => &[BudgetKind::Requests],
            LimitKind::InputTokens => &[BudgetKind::InputTokens],
            LimitKind::OutputTokens => &[BudgetKind::OutputTokens],
            LimitKind::Tokens => &[BudgetKind::InputTokens, BudgetKind::OutputTokens],
        }
    }
}

/// A pool's rate budgets (`[pools.NAME.budget]`); every budget is optional and off by default.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetConfig {
    /// Requests per window (usually a minute); unset: no request budget.
    pub requests_per_minute: Option<u64>,
    /// Largest request burst; default: `requests_per_minute`.
    pub requests_burst: Option<u64>,
    /// Input tokens per window; unset: no input-token budget.
    pub input_tokens_per_minute: Option<u64>,
    /// Largest input-token burst (and largest input estimate); default: `input_tokens_per_minute`.
    pub input_tokens_burst: Option<u64>,
    /// Output tokens per window; unset: no output-token budget.
    pub output_tokens_per_minute: Option<u64>,
    /// Largest output-token burst (and largest `max_output_tokens`); default: `output_tokens_per_minute`.
    pub output_tokens_burst: Option<u64>,
    /// The period the `*_per_minute` figures refer to: one minute, shorter only to test quickly.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Input estimate of a request that gives none.
    pub default_input_tokens: u64,
    /// Output estimate of a request that gives none.
    pub default_output_tokens: u64,
    /// Decide as usual but never block; record what would have waited.
    pub shadow: bool,
}

impl BudgetConfig {
    /// Default `window`.
    pub const DEFAULT_WINDOW: Duration = Duration::from_secs(60);
    /// Shortest accepted `window`.
    pub const MIN_WINDOW: Duration = Duration::from_millis(100);
    /// Longest accepted `window`.
    pub const MAX_WINDOW: Duration = Duration::from_secs(3600);
    /// Largest accepted rate or burst: [`Usage::MAX_TOKENS`].
    pub const MAX_PER_WINDOW: u64 = Usage::MAX_TOKENS;
    /// Default `default_input_tokens`.
    pub const DEFAULT_INPUT_ESTIMATE: u64 = 1_000;
    /// Default `default_output_tokens`.
    pub const DEFAULT_OUTPUT_ESTIMATE: u64 = 1_000;

    /// Whether any budget is set.
    pub fn is_set(&self) -> bool {
        BudgetKind::ALL.iter().any(|k| self.limit(*k).is_some())
    }

    /// `(rate, burst)` of one budget, when set.
    pub fn limit(&self, kind: BudgetKind) -> Option<(u64, u64)> {
        let (rate, burst) = match kind {
            BudgetKind::Requests => (self.requests_per_minute, self.requests_burst),
            BudgetKind::InputTokens => (self.input_tokens_per_minute, self.input_tokens_burst),
            BudgetKind::OutputTokens => (self.output_tokens_per_minute, self.output_tokens_burst),
        };
        rate.map(|r| (r, burst.unwrap_or(r)))
    }

    /// Checks the budgets of pool `name`.
    pub fn validate(&self, name: &PoolId) -> Result<(), String> {
        if !(Self::MIN_WINDOW..=Self::MAX_WINDOW).contains(&self.window) {
            return Err(format!(
                "pool {name}: budget.window = {} out of range {}..={}",
                humantime::format_duration(self.window),
                humantime::format_duration(Self::MIN_WINDOW),
                humantime::format_duration(Self::MAX_WINDOW)
            ));
        }
        for kind in BudgetKind::ALL {
            let Some((rate, burst)) = self.limit(kind) else { continue };
            for (what, v) in [("per_minute", rate), ("burst", burst)] {
                if !(1..=Self::MAX_PER_WINDOW).contains(&v) {
                    return Err(format!(
                        "pool {name}: budget {}_{what} = {v} out of range 1..={}",
                        kind.label(),
                        Self::MAX_PER_WINDOW
                    ));
                }
            }
            let default = match kind {
                BudgetKind::Requests => 1,
                BudgetKind::InputTokens => self.default_input_tokens,
                BudgetKind::OutputTokens => self.default_output_tokens,
            };
            if default > burst {
                return Err(format!(
                    "pool {name}: budget default estimate of {} ({default}) is above its burst {burst}",
                    kind.label()
                ));
            }
        }
        Ok(())
    }
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            requests_per_minute: None,
            requests_burst: None,
            input_tokens_per_minute: None,
            input_tokens_burst: None,
            output_tokens_per_minute: None,
            output_tokens_burst: None,
            window: Self::DEFAULT_WINDOW,
            default_input_tokens: Self::DEFAULT_INPUT_ESTIMATE,
            default_output_tokens: Self::DEFAULT_OUTPUT_ESTIMATE,
            shadow: false,
        }
    }
}

/// A partial change to a pool's budgets (Admin `UpsertPool`): `None` keeps the current value; for
/// a per-minute figure or a burst, `Some(None)` clears it (no budget; burst = the per-minute figure).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BudgetPatch {
    /// See [`BudgetConfig::requests_per_minute`].
    pub requests_per_minute: Option<Option<u64>>,
    /// See [`BudgetConfig::requests_burst`].
    pub requests_burst: Option<Option<u64>>,
    /// See [`BudgetConfig::input_tokens_per_minute`].
    pub input_tokens_per_minute: Option<Option<u64>>,
    /// See [`BudgetConfig::input_tokens_burst`].
    pub input_tokens_burst: Option<Option<u64>>,
    /// See [`BudgetConfig::output_tokens_per_minute`].
    pub output_tokens_per_minute: Option<Option<u64>>,
    /// See [`BudgetConfig::output_tokens_burst`].
    pub output_tokens_burst: Option<Option<u64>>,
    /// See [`BudgetConfig::window`].
    pub window: Option<Duration>,
    /// See [`BudgetConfig::default_input_tokens`].
    pub default_input_tokens: Option<u64>,
    /// See [`BudgetConfig::default_output_tokens`].
    pub default_output_tokens: Option<u64>,
    /// See [`BudgetConfig::shadow`].
    pub shadow: Option<bool>,
}

impl BudgetPatch {
    /// `base` with the set fields replaced.
    pub fn apply(&self, mut base: BudgetConfig) -> BudgetConfig {
        fn set<T: Clone>(dst: &mut T, v: &Option<T>) {
            if let Some(v) = v {
                *dst = v.clone();
            }
        }
        set(&mut base.requests_per_minute, &self.requests_per_minute);
        set(&mut base.requests_burst, &self.requests_burst);
        set(&mut base.input_tokens_per_minute, &self.input_tokens_per_minute);
        set(&mut base.input_tokens_burst, &self.input_tokens_burst);
        set(&mut base.output_tokens_per_minute, &self.output_tokens_per_minute);
        set(&mut base.output_tokens_burst, &self.output_tokens_burst);
        set(&mut base.window, &self.window);
        set(&mut base.default_input_tokens, &self.default_input_tokens);
        set(&mut base.default_output_tokens, &self.default_output_tokens);
        set(&mut base.shadow, &self.shadow);
        base
    }
}

/// A request's token estimate.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenEstimate {
    /// Input tokens the request sends.
    pub input_tokens: u64,
    /// The request's `max_tokens`: the most output it can use.
    pub max_output_tokens: u64,
}

/// What one grant takes from each budget, by [`BudgetKind::index`].
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Cost(pub [u64; 3]);

/// One token bucket (see the module docs for the units).
#[derive(Clone, Debug)]
struct Bucket {
    /// Configured rate and burst.
    cfg: (u64, u64),
    /// Rate and burst in force: the configured ones, clamped by the provider's last word.
    rate: u64,
    burst: u64,
    /// Level in `token × window_ns` as of `as_of`; `None` means full.
    level: i128,
    as_of: Option<Instant>,
}

impl Bucket {
    fn new(rate: u64, burst: u64, window: i128) -> Self {
        Self { cfg: (rate, burst), rate, burst, level: i128::from(burst) * window, as_of: None }
    }

    fn cap(&self, window: i128) -> i128 {
        i128::from(self.burst) * window
    }

    /// The level at `now`, in scaled units.
    fn level_at(&self, now: Instant, window: i128) -> i128 {
        let cap = self.cap(window);
        let Some(since) = self.as_of else { return cap.min(self.level) };
        let dt = i128::try_from(now.saturating_duration_since(since).as_nanos()).unwrap_or(i128::MAX);
        self.level.saturating_add(dt.saturating_mul(i128::from(self.rate))).min(cap)
    }

    /// When the level holds `cost` (capped at the burst): `None` when it does now.
    fn ready_at(&self, cost: u64, now: Instant, window: i128) -> Option<Instant> {
        let need = i128::from(cost.min(self.burst)) * window;
        let missing = need - self.level_at(now, window);
        if missing <= 0 {
            return None;
        }
        let rate = i128::from(self.rate.max(1));
        let nanos = (missing + rate - 1) / rate;
        Some(super::time::after(now, Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))))
    }

    /// Moves the level by `delta` tokens at `now`, within `[-burst, burst]` (the debt cap below).
    fn add(&mut self, now: Instant, delta: i128, window: i128) {
        let cap = self.cap(window);
        let level = self.level_at(now, window).min(cap);
        self.level = level.saturating_add(delta.saturating_mul(window)).clamp(-cap, cap);
        self.as_of = Some(now);
    }

    /// Lowers the level to at most `tokens`.
    fn clamp_to(&mut self, now: Instant, tokens: u64, window: i128) {
        let level = self.level_at(now, window);
        self.level = level.min(i128::from(tokens) * window).max(-self.cap(window));
        self.as_of = Some(now);
    }

    fn tokens(&self, now: Instant, window: i128) -> i64 {
        i64::try_from(self.level_at(now, window).div_euclid(window)).unwrap_or(i64::MAX)
    }
}

/// Per-pool counters of the budgets, cumulative since start.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct BudgetCounters {
    /// Units reserved at grant by leases on this pool, by [`BudgetKind::index`] (every kind, once the
    /// pool's chain has any budget).
    pub reserved: [u64; 3],
    /// Units finally charged at settlement, by kind (the reservation when no usage came back).
    pub settled: [u64; 3],
    /// Sum of `|usage - estimate|` over settlements with usage: input, output.
    pub estimate_error: [u64; 2],
    /// Settlements that carried usage.
    pub settled_with_usage: u64,
    /// Grants that shadow mode let through but that would have waited.
    pub shadow_waits: u64,
    /// Their total would-be wait.
    pub shadow_wait: Duration,
}

/// What the provider last said about one of its limits, and when.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ProviderView {
    /// The limit as reported.
    pub limit: ProviderLimit,
    /// When it was reported.
    pub seen_at: Instant,
}

/// A pool's live budget state: its buckets, open reservations and counters.
#[derive(Debug, Default)]
pub(crate) struct BudgetState {
    buckets: [Option<Bucket>; 3],
    window: i128,
    shadow: bool,
    /// Open reservations of leases granted on this pool itself (not its descendants).
    pub(crate) reservations: HashMap<LeaseId, Cost>,
    counters: BudgetCounters,
    provider: [Option<ProviderView>; 4],
}

fn window_ns(cfg: &BudgetConfig) -> i128 {
    i128::try_from(cfg.window.as_nanos()).unwrap_or(i128::MAX).max(1)
}

impl BudgetState {
    pub(crate) fn new(cfg: &BudgetConfig) -> Self {
        let mut s = Self::default();
        s.reconfigure(cfg);
        s
    }

    /// Applies new settings, keeping each surviving bucket's level (capped at its new burst).
    pub(crate) fn reconfigure(&mut self, cfg: &BudgetConfig) {
        let window = window_ns(cfg);
        for kind in BudgetKind::ALL {
            let slot = &mut self.buckets[kind.index()];
            *slot = match (cfg.limit(kind), slot.take()) {
                (None, _) => None,
                (Some((rate, burst)), None) => Some(Bucket::new(rate, burst, window)),
                (Some((rate, burst)), Some(mut b)) => {
                    // Keep the level's share of a token; a changed window rescales it.
                    b.level = b.level / self.window.max(1) * window;
                    b.cfg = (rate, burst);
                    b.rate = rate;
                    b.burst = burst;
                    b.level = b.level.clamp(-b.cap(window), b.cap(window));
                    Some(b)
                }
            };
        }
        self.window = window;
        self.shadow = cfg.shadow;
    }

    fn bucket(&self, kind: BudgetKind) -> Option<&Bucket> {
        self.buckets[kind.index()].as_ref()
    }

    /// The configured burst of a budget (what an estimate may not exceed).
    fn cfg_burst(&self, kind: BudgetKind) -> Option<u64> {
        self.bucket(kind).map(|b| b.cfg.1)
    }

    /// Whether this level has any budget.
    pub(crate) fn is_set(&self) -> bool {
        self.buckets.iter().any(Option::is_some)
    }

    /// The budget that blocks `cost` here at `now`, with when it stops blocking (the latest among
    /// this level's short budgets).
    fn blocked(&self, cost: &Cost, now: Instant) -> Option<(BudgetKind, Instant)> {
        BudgetKind::ALL
            .iter()
            .filter_map(|k| {
                let b = self.bucket(*k)?;
                b.ready_at(cost.0[k.index()], now, self.window).map(|t| (*k, t))
            })
            .max_by_key(|(_, t)| *t)
    }

    /// Lowest level any bucket reached, in tokens, against its debt cap (`-burst`); for the checks.
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn within_debt_cap(&self, now: Instant) -> bool {
        self.buckets.iter().flatten().all(|b| b.tokens(now, self.window) >= -(b.burst as i64))
    }

    fn add(&mut self, now: Instant, kind: BudgetKind, delta: i128) {
        let window = self.window;
        if let Some(b) = self.buckets[kind.index()].as_mut() {
            b.add(now, delta, window);
        }
    }

    /// When each budget is full again at its current rate, by [`BudgetKind::index`]: `None` for a
    /// budget that is full now or not set. It moves only when tokens are taken or given back, not
    /// as they refill, so a leader's published state changes only on use (see [`super::takeover`]).
    pub(crate) fn full_at(&self, now: Instant) -> [Option<Instant>; 3] {
        let mut out = [None; 3];
        for (o, b) in out.iter_mut().zip(&self.buckets) {
            *o = b.as_ref().and_then(|b| b.ready_at(b.burst, now, self.window));
        }
        out
    }

    /// Lowers each budget to at most the level that is full again at `full_at` (an earlier leader's
    /// [`BudgetState::full_at`]): the lower level wins, debt stays within the debt cap. Whether any
    /// level went down.
    pub(crate) fn lower_to(&mut self, now: Instant, full_at: &[Option<Instant>; 3]) -> bool {
        let window = self.window;
        let mut lowered = false;
        for (b, at) in self.buckets.iter_mut().zip(full_at) {
            let (Some(b), Some(at)) = (b.as_mut(), at) else { continue };
            let ahead = i128::try_from(at.saturating_duration_since(now).as_nanos()).unwrap_or(i128::MAX);
            let cap = b.cap(window);
            let target = cap.saturating_sub(ahead.saturating_mul(i128::from(b.rate))).max(-cap);
            let level = b.level_at(now, window);
            if target < level {
                b.level = target;
                b.as_of = Some(now);
                lowered = true;
            }
        }
        lowered
    }

    /// The view for Status.
    pub(crate) fn snapshot(&self, now: Instant) -> Option<BudgetSnapshot> {
        if !self.is_set() && self.provider.iter().all(Option::is_none) {
            return None;
        }
        let mut open = [0u64; 3];
        for c in self.reservations.values() {
            for (o, v) in open.iter_mut().zip(c.0) {
                *o = o.saturating_add(v);
            }
        }
        let levels = BudgetKind::ALL
            .iter()
            .filter_map(|k| {
                let b = self.bucket(*k)?;
                let tokens = b.tokens(now, self.window);
                Some(BudgetLevel {
                    kind: *k,
                    rate: b.rate,
                    burst: b.burst,
                    level: tokens,
                    debt: u64::try_from(-tokens.min(0)).unwrap_or(0),
                    reserved: open[k.index()],
                    full_at: b.ready_at(b.burst, now, self.window),
                })
            })
            .collect();
        Some(BudgetSnapshot {
            levels,
            window: Duration::from_nanos(u64::try_from(self.window).unwrap_or(u64::MAX)),
            shadow: self.shadow,
            reservations: self.reservations.len() as u32,
            counters: self.counters,
            provider: self.provider.iter().flatten().copied().collect(),
        })
    }
}

/// One budget in a [`BudgetSnapshot`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BudgetLevel {
    /// Which budget.
    pub kind: BudgetKind,
    /// Refill per window, in force.
    pub rate: u64,
    /// Burst in force.
    pub burst: u64,
    /// Tokens available now (negative while in debt).
    pub level: i64,
    /// Debt still to be paid back by refill.
    pub debt: u64,
    /// Held by open reservations of leases on this pool.
    pub reserved: u64,
    /// When the bucket is full again, if it is not.
    pub full_at: Option<Instant>,
}

/// A pool's budgets at one instant, for Status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BudgetSnapshot {
    /// Each configured budget.
    pub levels: Vec<BudgetLevel>,
    /// The refill window.
    pub window: Duration,
    /// Shadow mode.
    pub shadow: bool,
    /// Open reservations of leases on this pool.
    pub reservations: u32,
    /// Counters since start.
    pub counters: BudgetCounters,
    /// The provider's last word on each of its limits, with when.
    pub provider: Vec<ProviderView>,
}

/// A budget event, for metrics, Watch and logs (in [`Fact::Budget`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BudgetFact {
    /// A grant reserved this cost on every budget of its chain.
    Reserved {
        /// The lease.
        lease: LeaseId,
        /// Requests, input and output tokens.
        cost: Cost,
    },
    /// A lease's reservation was settled.
    Settled {
        /// The lease.
        lease: LeaseId,
        /// What it had reserved.
        reserved: Cost,
        /// What was finally charged (the reservation when no usage came back).
        charged: Cost,
    },
    /// Shadow mode let a grant through that would have waited this long.
    ShadowWait {
        /// The budget that would have blocked.
        kind: BudgetKind,
        /// The pool whose budget it is.
        level: PoolId,
        /// How long.
        would_wait: Duration,
    },
    /// A provider's rate-limit headers were applied.
    ProviderWord {
        /// What it said.
        limits: Vec<ProviderLimit>,
    },
    /// Usage reported outside a lease was charged.
    Charged {
        /// Requests, input and output tokens.
        cost: Cost,
    },
}

fn charged_input(u: &Usage) -> u64 {
    u.input_tokens.saturating_add(u.cache_creation_tokens)
}

impl Scheduler {
    /// A request's cost on `pool`'s chain: its estimate, or the first budget-carrying level's default.
    /// An estimate above any level's burst is refused: it could never be granted.
    pub(super) fn budget_cost(&self, pool: &Pool, estimate: Option<TokenEstimate>) -> Result<Cost, Error> {
        let levels = || pool.chain.iter().map(|p| &self.pools[p]);
        let default = |kind: BudgetKind| {
            levels().find(|p| p.budget.bucket(kind).is_some()).map_or(0, |p| match kind {
                BudgetKind::Requests => 1,
                BudgetKind::InputTokens => p.cfg.budget.default_input_tokens,
                BudgetKind::OutputTokens => p.cfg.budget.default_output_tokens,
            })
        };
        let cost = Cost([
            1,
            estimate.map_or_else(|| default(BudgetKind::InputTokens), |e| e.input_tokens),
            estimate.map_or_else(|| default(BudgetKind::OutputTokens), |e| e.max_output_tokens),
        ]);
        for level in levels() {
            for kind in BudgetKind::ALL {
                if let Some(burst) = level.budget.cfg_burst(kind)
                    && cost.0[kind.index()] > burst
                {
                    return Err(Error::InvalidArgument(format!(
                        "estimate of {} {} is above the burst {burst} of pool {}'s budget: it could never \
                         be granted",
                        cost.0[kind.index()],
                        kind.label(),
                        level.id
                    )));
                }
            }
        }
        Ok(cost)
    }

    /// The budget gate over `pool`'s chain for `cost`: closed while any level's budget (shadow levels
    /// excepted) is short, until the latest instant at which they all hold it.
    pub(super) fn budget_gate(&self, pool: &Pool, cost: &Cost, now: Instant) -> Result<(), Closed> {
        let mut worst: Option<(PoolId, BudgetKind, Instant)> = None;
        for level in pool.chain.iter().map(|p| &self.pools[p]) {
            if level.budget.shadow {
                continue;
            }
            if let Some((kind, until)) = level.budget.blocked(cost, now)
                && worst.as_ref().is_none_or(|w| until > w.2)
            {
                worst = Some((level.id.clone(), kind, until));
            }
        }
        match worst {
            Some((pool, kind, until)) => Err(Closed::Budget { pool, kind, until }),
            None => Ok(()),
        }
    }

    /// Every gate for a waiter of `cost` on `pool`: [`Scheduler::chain_gate`], then the budgets.
    pub(super) fn grant_gate(&self, pool: &Pool, cost: &Cost, now: Instant) -> Result<(), Closed> {
        self.chain_gate(pool, now)?;
        self.budget_gate(pool, cost, now)
    }

    /// The cost of a pool's head waiter.
    pub(super) fn head_cost(&self, pool: &Pool) -> Option<Cost> {
        pool.queue.head().and_then(|(_, w)| self.waiters.get(&w)).map(|w| w.cost)
    }

    /// What keeps `pool`'s queue from moving now: the gate closed for its head.
    pub fn queue_gate(&self, pool: &PoolId, now: Instant) -> Option<Closed> {
        let pool = self.pools.get(pool)?;
        let cost = self.head_cost(pool)?;
        self.grant_gate(pool, &cost, now).err()
    }

    /// The earliest instant a budget-blocked head (all its other gates open) becomes grantable.
    pub(super) fn budget_deadline(&self, now: Instant) -> Option<Instant> {
        self.pools
            .values()
            .filter_map(|p| match self.grant_gate(p, &self.head_cost(p)?, now) {
                Err(Closed::Budget { until, .. }) => Some(until),
                _ => None,
            })
            .min()
    }

    /// Takes `cost` from every budget of the chain of the lease's pool, and records the reservation.
    pub(super) fn budget_reserve(
        &mut self,
        now: Instant,
        lease: LeaseId,
        pool: &PoolId,
        cost: Cost,
        out: &mut Decisions,
    ) {
        let chain = self.pools[pool].chain.clone();
        if !chain.iter().any(|p| self.pools[p].budget.is_set()) {
            return;
        }
        for level in &chain {
            let p = self.pools.get_mut(level).expect("chain pools exist");
            if p.budget.shadow
                && let Some((kind, until)) = p.budget.blocked(&cost, now)
            {
                let would_wait = until.saturating_duration_since(now);
                p.budget.counters.shadow_waits += 1;
                p.budget.counters.shadow_wait = p.budget.counters.shadow_wait.saturating_add(would_wait);
                let fact = BudgetFact::ShadowWait { kind, level: level.clone(), would_wait };
                out.facts.push(Fact::Budget { pool: level.clone(), fact });
            }
            for kind in BudgetKind::ALL {
                p.budget.add(now, kind, -i128::from(cost.0[kind.index()]));
            }
        }
        let b = &mut self.pools.get_mut(pool).expect("lease pools exist").budget;
        for (c, v) in b.counters.reserved.iter_mut().zip(cost.0) {
            *c = c.saturating_add(v);
        }
        b.reservations.insert(lease, cost);
        out.facts.push(Fact::Budget { pool: pool.clone(), fact: BudgetFact::Reserved { lease, cost } });
    }

    /// Settles a lease's reservation: with usage, refunds the unused part and charges the excess as
    /// debt on every level of the chain; without, the reservation stays charged. Idempotent: the
    /// reservation is gone afterwards.
    pub(super) fn budget_settle(
        &mut self,
        now: Instant,
        lease: LeaseId,
        pool: &PoolId,
        usage: Option<&Usage>,
        out: &mut Decisions,
    ) {
        let Some(p) = self.pools.get_mut(pool) else { return };
        let Some(reserved) = p.budget.reservations.remove(&lease) else { return };
        let charged = match usage {
            Some(u) => Cost([reserved.0[0], charged_input(u), u.output_tokens]),
            None => reserved,
        };
        if let Some(u) = usage {
            let c = &mut p.budget.counters;
            c.settled_with_usage += 1;
            c.estimate_error[0] =
                c.estimate_error[0].saturating_add(charged_input(u).abs_diff(reserved.0[1]));
            c.estimate_error[1] = c.estimate_error[1].saturating_add(u.output_tokens.abs_diff(reserved.0[2]));
        }
        for kind in BudgetKind::ALL {
            let c = &mut p.budget.counters.settled[kind.index()];
            *c = c.saturating_add(charged.0[kind.index()]);
        }
        if charged != reserved {
            for level in p.chain.clone() {
                let b = &mut self.pools.get_mut(&level).expect("chain pools exist").budget;
                for kind in BudgetKind::ALL {
                    let delta = i128::from(reserved.0[kind.index()]) - i128::from(charged.0[kind.index()]);
                    b.add(now, kind, delta);
                }
            }
        }
        out.facts.push(Fact::Budget {
            pool: pool.clone(),
            fact: BudgetFact::Settled { lease, reserved, charged },
        });
    }

    /// Applies a provider's rate-limit headers to `pool`'s chain (see the module docs).
    pub(super) fn budget_provider_word(
        &mut self,
        now: Instant,
        pool: &PoolId,
        limits: &[ProviderLimit],
        out: &mut Decisions,
    ) {
        if limits.is_empty() {
            return;
        }
        let Some(chain) = self.pools.get(pool).map(|p| p.chain.clone()) else { return };
        for l in limits {
            for kind in BudgetKind::of_limit(l.kind) {
                let level = chain
                    .iter()
                    .find(|p| self.pools[*p].budget.bucket(*kind).is_some())
                    .unwrap_or(pool)
                    .clone();
                let b = &mut self.pools.get_mut(&level).expect("chain pools exist").budget;
                let window = b.window;
                b.provider[l.kind as usize] = Some(ProviderView { limit: *l, seen_at: now });
                if let Some(bucket) = b.buckets[kind.index()].as_mut() {
                    if l.kind != LimitKind::Tokens && l.limit > 0 {
                        bucket.rate = bucket.cfg.0.min(l.limit);
                        bucket.burst = bucket.cfg.1.min(l.limit);
                    }
                    bucket.clamp_to(now, l.remaining, window);
                }
            }
        }
        out.facts.push(Fact::Budget {
            pool: pool.clone(),
            fact: BudgetFact::ProviderWord { limits: limits.to_vec() },
        });
    }

    /// Usage and rate-limit headers of a provider call made outside a lease (`ReportUsage`): the usage
    /// is charged to every budget of the pool's chain (one request, its input and output tokens), and
    /// the headers clamp the budgets as on a release.
    pub fn report_usage(
        &mut self,
        now: Instant,
        pool: &PoolId,
        usage: Option<Usage>,
        limits: &[ProviderLimit],
    ) -> Result<(Option<BudgetSnapshot>, Decisions), Error> {
        if !self.pools.contains_key(pool) {
            return Err(Error::UnknownPool(pool.clone()));
        }
        let mut out = Decisions::default();
        self.advance(now, &mut out);
        if let Some(u) = usage {
            let cost = Cost([1, charged_input(&u), u.output_tokens]);
            for level in self.pools[pool].chain.clone() {
                let b = &mut self.pools.get_mut(&level).expect("chain pools exist").budget;
                for kind in BudgetKind::ALL {
                    b.add(now, kind, -i128::from(cost.0[kind.index()]));
                }
            }
            out.facts.push(Fact::Budget { pool: pool.clone(), fact: BudgetFact::Charged { cost } });
        }
        self.budget_provider_word(now, pool, limits, &mut out);
        self.settle(now, &mut out);
        Ok((self.pools[pool].budget.snapshot(now), out))
    }

    /// Checks the budget invariants: no level below its debt cap, and every reservation belongs to a
    /// live lease of its pool.
    #[cfg(any(test, feature = "testing"))]
    pub fn check_budgets(&self, now: Instant) {
        for p in self.pools.values() {
            assert!(p.budget.within_debt_cap(now), "a budget of {} is below its debt cap", p.id);
            for id in p.budget.reservations.keys() {
                let lease = self.leases.get(id);
                assert!(
                    lease.is_some_and(|l| l.pool == p.id),
                    "reservation of {id} on {} outlives its lease",
                    p.id
                );
            }
        }
    }
}
