//! Taking over from an earlier leader (high availability): the runtime state a leader publishes, and
//! how a new leader applies it and learns per pool.
//!
//! # Runtime state
//! [`Scheduler::runtime_state`] returns, as plain data at `now`, what a successor needs beyond the pool
//! configuration: per pool its pause (end and reason), the adaptive headroom it learned (the effective
//! limit, while below the limit, and when it next recovers a step), its breaker (open until when, or
//! forced open; half-open; the open count `k` of the `open_base·2^k` timeout), its **rate budgets**
//! (when each is full again at its rate: a form that moves only when tokens are used, not as they
//! refill), the **holds** on its own leases (failure, cancel and phantom holds: end and kind), the
//! ends of its running **release cooldowns** and its **held count**.
//! The daemon stores it in etcd (`crate::ha::runtime`, with wall-clock times); the core only sees
//! instants.
//!
//! # Applying it ([`Scheduler::take_over`], right after [`Scheduler::begin_term`])
//! - pauses merge with max: a pause already in force (or brought in since) that ends later stays;
//! - headroom merges with min: the lower effective limit wins (adaptive pools only), with the stored
//!   recovery instant;
//! - a breaker not closed is restored on a pool whose breaker is closed (its open count merges with
//!   max); one whose open timeout ran out meanwhile comes back half-open;
//! - rate budgets merge with min: each budget of the pool is lowered to the level that is full again
//!   when the old leader's was, so requests and tokens the old leader granted count against the new
//!   leader's window (refill since the old leader's last publish is credited; what it granted after
//!   that publish is not known, the daemon's publish interval bounds it);
//! - holds are added (a new leader has none of its own): each keeps its slot on the pool's chain
//!   until the same end, so a slot the provider may still count is not granted again meanwhile;
//!   release cooldowns likewise, each on its own level.
//!
//! # Learning per pool
//! A term's learning period (`learning_until`) bounds how long resumes may re-create leases. Within
//! it each pool learns on its own ([`Closed::Learning`] on any level of a chain closes the chain):
//! - the compared count is the pool's **subtree** count: the old leader's held count of pool `P` is
//!   its `in_flight`, the number of leases on `P` and on every descendant of `P`; the new leader's
//!   `back` count of `P` is the number of leases re-created (re-adopted as debt) on `P` or a
//!   descendant during this period, cumulative (a re-adopted lease that ends still counts as back);
//! - `P` leaves learning once `back ≥ expected`; a snapshot that does not list `P` (or lists 0)
//!   means the old leader held nothing there: `P` leaves learning at once;
//! - without any published state (none in etcd, or unreadable), every pool learns for the whole period;
//! - a leader publishes, for a pool still learning, its `in_flight` plus the reported leases not back
//!   yet (`expected − back`), or no count at all when it learns without one: a successor taking over
//!   during learning waits for the earlier leader's leases too;
//! - a pool created during the period learns with the same rule (its count from the snapshot, 0 when
//!   absent, the whole period without a snapshot).
//!
//! Since a child's grant needs its whole chain out of learning, a grant under a parent waits until
//! every lease the old leader held anywhere under that parent is back. Leaving learning never
//! bypasses the limit: a grant still needs `held < limit` on every level (invariant 2), and a resume
//! arriving after its pool left learning is refused when its chain is full (`ResumeOverLimit`).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use tokio::time::Instant;

use super::{
    Decisions, Event, Fact, HoldKind, PoolId, Scheduler,
    health::BreakerState,
    pool::{Closed, Learning},
    time,
};

/// A pool's breaker as a successor restores it.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub enum BreakerRuntime {
    /// Closed (nothing to restore).
    #[default]
    Closed,
    /// Open until then; `None`: forced open by an operator (until forced closed).
    Open {
        /// When it turns half-open.
        until: Option<Instant>,
    },
    /// Half-open: the next grant is its probe.
    HalfOpen,
}

/// One pool's runtime state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolRuntime {
    /// Pause end, while paused.
    pub paused_until: Option<Instant>,
    /// Pause reason (who paused it and why).
    pub pause_reason: Arc<str>,
    /// The effective limit adaptive headroom learned, while below the limit.
    pub effective: Option<u32>,
    /// When that effective limit next recovers one step.
    pub recover_at: Option<Instant>,
    /// The breaker.
    pub breaker: BreakerRuntime,
    /// Consecutive opens without a success (`k` of `open_base·2^k`).
    pub opens: u32,
    /// When each rate budget is full again, by [`super::BudgetKind::index`]; `None`: full (or none).
    pub budget_full_at: [Option<Instant>; 3],
    /// Holds on the pool's own leases that had not ended: end and kind.
    pub holds: Vec<(Instant, HoldKind)>,
    /// Ends of this level's release cooldowns still running.
    pub cooling: Vec<Instant>,
    /// Leases held on this pool and its descendants (its `in_flight`), plus, while it learns, those
    /// the previous leader reported that are not back yet. `None` while it learns without a count
    /// (its successor must then learn for its whole period too).
    pub held: Option<u32>,
}

impl Default for PoolRuntime {
    fn default() -> Self {
        Self {
            paused_until: None,
            pause_reason: Arc::from(""),
            effective: None,
            recover_at: None,
            breaker: BreakerRuntime::Closed,
            opens: 0,
            budget_full_at: [None; 3],
            holds: Vec::new(),
            cooling: Vec::new(),
            held: Some(0),
        }
    }
}

/// Every pool's runtime state, by name.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RuntimeState {
    /// The pools.
    pub pools: BTreeMap<PoolId, PoolRuntime>,
}

/// A pool's learning as Status shows it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PoolLearning {
    /// The latest instant it ends (the term's learning period).
    pub until: Instant,
    /// The previous leader's held count (`None`: no published state).
    pub expected: Option<u32>,
    /// Leases re-adopted on this pool or below so far.
    pub back: u32,
}

impl Scheduler {
    /// The runtime state a successor needs, at `now` (see the module docs).
    pub fn runtime_state(&self, now: Instant) -> RuntimeState {
        let pools = self
            .pools
            .values()
            .map(|p| {
                let paused_until = p.paused_until.filter(|u| *u > now);
                let view = p.health.view();
                let breaker = match view.state {
                    BreakerState::Closed => BreakerRuntime::Closed,
                    BreakerState::Open { until } => BreakerRuntime::Open { until },
                    BreakerState::HalfOpen { .. } => BreakerRuntime::HalfOpen,
                };
                let reduced = p.cfg.adaptive && p.effective < p.cfg.max_concurrent;
                let rt = PoolRuntime {
                    paused_until,
                    pause_reason: if paused_until.is_some() { p.pause_reason.clone() } else { Arc::from("") },
                    effective: reduced.then_some(p.effective),
                    recover_at: if reduced { p.recover_at } else { None },
                    breaker,
                    opens: view.opens,
                    budget_full_at: p.budget.full_at(now),
                    holds: p.health.own_holds().filter(|(t, _)| *t > now).collect(),
                    cooling: p.cooling.iter().copied().filter(|t| *t > now).collect(),
                    held: match p.learning {
                        None => Some(p.in_flight),
                        Some(l) => l.expected.map(|e| p.in_flight.saturating_add(e.saturating_sub(l.back))),
                    },
                };
                (p.id.clone(), rt)
            })
            .collect();
        RuntimeState { pools }
    }

    /// Applies the previous leader's runtime state, right after [`Scheduler::begin_term`]: pauses
    /// merged with max, headroom with min, breakers restored, and each learning pool's expected
    /// count set, so that pools whose leases are all back (or that had none) leave learning now.
    /// `None` (nothing published, or unreadable): every pool learns for the whole period.
    pub fn take_over(&mut self, now: Instant, state: Option<&RuntimeState>) -> Decisions {
        let mut out = Decisions::default();
        self.advance(now, &mut out);
        if let Some(state) = state {
            for (id, rt) in &state.pools {
                self.restore_pool(now, id, rt, &mut out);
            }
            let expected: BTreeMap<PoolId, Option<u32>> =
                state.pools.iter().map(|(id, rt)| (id.clone(), rt.held)).collect();
            if self.learning_until.is_some() {
                for p in self.pools.values_mut() {
                    if let Some(l) = p.learning.as_mut() {
                        l.expected = expected.get(&p.id).copied().unwrap_or(Some(0));
                    }
                }
                self.learning_expected = Some(expected);
            }
            self.end_learned(now);
        }
        self.settle(now, &mut out);
        out
    }

    fn restore_pool(&mut self, now: Instant, id: &PoolId, rt: &PoolRuntime, out: &mut Decisions) {
        let Some(pool) = self.pools.get_mut(id) else { return };
        if let Some(until) = rt.paused_until.filter(|u| *u > now)
            && pool.paused_until.is_none_or(|c| until > c)
        {
            pool.paused_until = Some(until);
            pool.pause_reason = rt.pause_reason.clone();
            let reason = rt.pause_reason.clone();
            out.facts.push(Fact::Paused { pool: id.clone(), until, reason: reason.clone(), extended: true });
            for s in self.interested(id) {
                out.push(s, Event::Paused { pool: id.clone(), until, reason: reason.clone() });
            }
        }
        let pool = self.pools.get_mut(id).expect("checked above");
        pool.budget.lower_to(now, &rt.budget_full_at);
        if let Some(e) = rt.effective.filter(|_| pool.cfg.adaptive) {
            let e = e.clamp(1, pool.cfg.max_concurrent);
            if e < pool.effective {
                pool.effective = e;
                let step = pool.cfg.recovery_step();
                pool.recover_at = (e < pool.cfg.max_concurrent)
                    .then(|| rt.recover_at.unwrap_or_else(|| time::after(now, step)).max(now));
                out.facts.push(Fact::Effective { pool: id.clone(), limit: e });
            }
        }
        if rt.breaker != BreakerRuntime::Closed || rt.opens > 0 {
            let restored = pool.health.restore(rt.breaker, rt.opens, now);
            if restored {
                let view = pool.health.view();
                let reason = "restored from the previous leader's runtime state".to_owned();
                self.announce_breaker(id.clone(), view, reason, out);
            }
        }
        self.restore_holds(now, id, &rt.holds);
        let pool = self.pools.get_mut(id).expect("checked above");
        let mut cooling: Vec<Instant> = rt.cooling.iter().copied().filter(|t| *t > now).collect();
        if !cooling.is_empty() {
            // Kept in order: the earliest end leaves first.
            cooling.extend(pool.cooling.iter().copied());
            cooling.sort_unstable();
            pool.cooling = cooling.into();
        }
    }

    /// The learning a pool created now starts with (see the module docs).
    pub(super) fn learning_for(&self, id: &PoolId) -> Option<Learning> {
        self.learning_until?;
        let expected = self.learning_expected.as_ref().and_then(|m| m.get(id).copied().unwrap_or(Some(0)));
        Some(Learning { expected, back: 0 })
    }

    /// Starts learning on every pool (a restart's or a term's period; `learning_until` is set).
    pub(super) fn start_learning(&mut self, now: Instant) {
        self.learning_since = now;
        self.learning_expected = None;
        for p in self.pools.values_mut() {
            p.learned_after = None;
            p.learning.get_or_insert_with(Learning::default);
        }
    }

    /// A lease was re-created on `pool`: it is back on every level of its chain.
    pub(super) fn readopted(&mut self, now: Instant, pool: &PoolId) {
        let chain = self.pools.get(pool).map(|p| p.chain.clone()).unwrap_or_default();
        for level in chain {
            if let Some(l) = self.pools.get_mut(&level).and_then(|p| p.learning.as_mut()) {
                l.back = l.back.saturating_add(1);
            }
        }
        self.end_learned(now);
    }

    /// Ends the learning of every pool whose leases are all back.
    pub(super) fn end_learned(&mut self, now: Instant) {
        let since = self.learning_since;
        for p in self.pools.values_mut() {
            if p.learning.is_some_and(|l| l.done()) {
                p.learning = None;
                p.learned_after = Some(now.saturating_duration_since(since));
            }
        }
    }

    /// The learning period ended at `until`: every pool still learning stops.
    pub(super) fn finish_learning(&mut self, until: Instant) {
        let since = self.learning_since;
        for p in self.pools.values_mut() {
            if p.learning.take().is_some() {
                p.learned_after = Some(until.saturating_duration_since(since));
            }
        }
        self.learning_expected = None;
    }

    /// The learning gate of a chain: closed while any level learns.
    pub(super) fn learning_gate(&self, chain: &[PoolId]) -> Result<(), Closed> {
        if self.learning_until.is_some() && chain.iter().any(|p| self.pools[p].learning.is_some()) {
            return Err(Closed::Learning);
        }
        Ok(())
    }

    /// A pool's learning, for Status.
    pub(super) fn pool_learning(&self, id: &PoolId) -> Option<PoolLearning> {
        let until = self.learning_until?;
        let l = self.pools.get(id)?.learning?;
        Some(PoolLearning { until, expected: l.expected, back: l.back })
    }

    /// How long the term's learning took so far: until the last pool left it, or still running
    /// (`None`). Zero without learning.
    pub fn learning_took(&self) -> Option<Duration> {
        if self.pools.values().any(|p| p.learning.is_some()) {
            return None;
        }
        Some(self.pools.values().filter_map(|p| p.learned_after).max().unwrap_or_default())
    }
}
