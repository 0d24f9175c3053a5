//! Read-only views of the scheduler: the `Status` snapshot and counts.

use std::{collections::BTreeMap, sync::Arc};

#[cfg(test)]
use std::collections::HashMap;

use tokio::time::Instant;

use super::{BreakerView, BudgetSnapshot, Closed, Error, Lease, PoolConfig, PoolId, PoolLearning, Scheduler};

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
    /// The ancestor whose pause blocks this pool, while one does.
    pub blocked_by: Option<InheritedPause>,
    /// The gate that holds its queue (closed for its head), while it has waiters.
    pub gate: Option<Closed>,
    /// Its rate budgets, when it has any (or the provider spoke about it).
    pub budget: Option<BudgetSnapshot>,
    /// Slots held after their leases ended (failure hold, cancel cooldown, phantom hold), counted at
    /// this level (its own and its descendants').
    pub held: u32,
    /// While slots are held: when the last hold counting here ends.
    pub held_until: Option<Instant>,
    /// The circuit breaker.
    pub breaker: BreakerView,
    /// While it learns (after a restart or takeover): until when at the latest, and its counts.
    pub learning: Option<PoolLearning>,
    /// How long its learning took in the current term, once it ended.
    pub learned_after: Option<std::time::Duration>,
}

/// A pause a pool inherits from an ancestor: which one, until when, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InheritedPause {
    /// The paused ancestor.
    pub pool: PoolId,
    /// When its pause ends.
    pub until: Instant,
    /// Why it is paused.
    pub reason: Arc<str>,
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

impl Scheduler {
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
                blocked_by: self.inherited_pause(&p.id),
                gate: self.queue_gate(&p.id, self.last_now),
                budget: p.budget.snapshot(self.last_now),
                held: p.health.held,
                held_until: self.holds_at(&p.id),
                breaker: p.health.view(),
                learning: self.pool_learning(&p.id),
                learned_after: p.learned_after,
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

    /// The pause `pool` inherits: of its ancestors' pauses (itself excluded), the one ending last.
    /// Pauses end when the clock passes them (`advance` clears them), so a set one is in force.
    pub fn inherited_pause(&self, pool: &PoolId) -> Option<InheritedPause> {
        let ancestors = self.pools.get(pool)?.chain.iter().filter(|p| *p != pool);
        ancestors
            .filter_map(|a| {
                let a = &self.pools[a];
                a.paused_until.map(|until| InheritedPause {
                    pool: a.id.clone(),
                    until,
                    reason: a.pause_reason.clone(),
                })
            })
            .max_by_key(|p| p.until)
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

    /// How many sessions are open.
    #[cfg(any(test, feature = "testing"))]
    pub fn session_count(&self) -> usize {
        self.sessions.len() - 1
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
            if let Some(cost) = self.head_cost(p) {
                assert!(self.grant_gate(p, &cost, now).is_err(), "pool {} could grant but has waiters", p.id);
            }
        }
        let queued: usize = self.pools.values().map(|p| p.queue.len()).sum();
        let listed: usize = self.waiters.values().map(|w| w.pools().count()).sum();
        assert_eq!(queued, listed, "every waiter is in the queue of each pool it lists");
        let in_sessions: usize = self.sessions.values().map(|s| s.requests.len()).sum();
        assert_eq!(in_sessions, self.waiters.len());
    }
}
