//! Pool-wide and operator operations: 429 reports, manual pauses, revocation, drain and pool changes.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    sync::Arc,
    time::Duration,
};

use tokio::time::Instant;

use super::{
    Decisions, Error, Event, ExpiryReason, Fact, Lease, LeaseEnd, LeaseId, PoolChange, PoolConfig, PoolId,
    Scheduler, SchedulerConfig, SessionId, WaiterId,
    budget::BudgetPatch,
    health::HealthPatch,
    ids,
    pool::{Overflow, Pool},
};

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
    /// See [`PoolConfig::max_agent_retry_after`].
    pub max_agent_retry_after: Option<Duration>,
    /// See [`PoolConfig::budget`].
    pub budget: BudgetPatch,
    /// See [`PoolConfig::health`].
    pub health: HealthPatch,
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
        set(&mut base.max_agent_retry_after, &self.max_agent_retry_after);
        base.budget = self.budget.apply(base.budget);
        base.health = self.health.apply(base.health);
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

impl Scheduler {
    // ----------------------------------------------------------------------------------------
    // Pool-wide operations
    // ----------------------------------------------------------------------------------------

    /// A provider answered 429 for this pool: pause it until `max(current end, now + retry_after)`,
    /// with `retry_after` capped by the pool's `max_agent_retry_after` (an agent's report).
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
    /// pause but no adaptive decrease and no `max_agent_retry_after` cap (an operator may pause a pool
    /// for as long as [`SchedulerConfig::MAX_PAUSE`](super::SchedulerConfig::MAX_PAUSE)). Returns when
    /// the pause ends. `duration` must be in `(0, SchedulerConfig::MAX_PAUSE]`.
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
        if duration.is_zero() || duration > SchedulerConfig::MAX_PAUSE {
            return Err(Error::InvalidArgument(format!(
                "pause duration {} out of range: want > 0 and <= {}",
                humantime::format_duration(duration),
                humantime::format_duration(SchedulerConfig::MAX_PAUSE)
            )));
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
            out.facts.push(Fact::Resumed { pool: pool.clone() });
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
        let reason = ExpiryReason::Revoked;
        if let Some(l) = self.end_lease(now, &id, LeaseEnd::Expired(reason), &mut out) {
            out.push(l.session, Event::Expired { lease_id: id, pool: l.pool, reason });
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
    #[cfg(test)]
    pub(crate) fn is_draining(&self) -> bool {
        self.draining
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
        all.insert(id.clone(), patch.apply(current.unwrap_or_default()));
        let (mut out, _) = self.replace_pools(now, all, false)?;
        let change = if created { PoolChange::Created } else { PoolChange::Changed };
        out.facts.push(Fact::PoolChanged { pool: id, change, reload: false });
        Ok((created, out))
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
        let (mut out, done) = self.replace_pools(now, all, false)?;
        out.facts.push(Fact::PoolChanged { pool: id.clone(), change: PoolChange::Removed, reload: false });
        Ok((done, out))
    }

    /// Replaces the pool set (config reload). Raised limits grant at once; lowered ones revoke nothing.
    /// Removed pools reject their waiters and expire their leases. Each pool created, changed or
    /// removed is a [`Fact::PoolChanged`].
    pub fn set_pools(
        &mut self,
        now: Instant,
        pools: BTreeMap<PoolId, PoolConfig>,
    ) -> Result<Decisions, Error> {
        self.replace_pools(now, pools, true).map(|(out, _)| out)
    }

    /// The one way the pool set changes. With `reload`, records a fact per pool that differs.
    fn replace_pools(
        &mut self,
        now: Instant,
        pools: BTreeMap<PoolId, PoolConfig>,
        reload: bool,
    ) -> Result<(Decisions, PoolDeleted), Error> {
        validate_tree(&pools)?;
        let before = if reload { self.pool_configs() } else { BTreeMap::new() };
        let mut out = Decisions::default();
        let mut done = PoolDeleted { rejected_waiters: 0, expired_leases: 0 };
        self.advance(now, &mut out);
        let removed: Vec<PoolId> = self.pools.keys().filter(|p| !pools.contains_key(*p)).cloned().collect();
        for id in &removed {
            let waiters: Vec<WaiterId> = self.pools[id].queue.iter().collect();
            for w in waiters {
                if let Some(w) = self.drop_waiter(w) {
                    let error = Error::PoolRemoved(id.clone());
                    out.push(w.session, Event::Rejected { request_id: w.request_id.to_string(), error });
                    done.rejected_waiters += 1;
                }
            }
            let leases: Vec<(LeaseId, SessionId)> =
                self.leases.values().filter(|l| &l.pool == id).map(|l| (l.id, l.session)).collect();
            for (l, s) in leases {
                let reason = ExpiryReason::PoolRemoved;
                self.end_lease(now, &l, LeaseEnd::Expired(reason), &mut out);
                out.push(s, Event::Expired { lease_id: l, pool: id.clone(), reason });
                done.expired_leases += 1;
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
                    p.reconfigure(pc, now);
                    // A deeper queue has room for blocked waiters now, ahead of later arrivals.
                    p.queue.admit_blocked(p.cfg.max_queue_depth as usize);
                }
                None => {
                    let first = self
                        .retired_tokens
                        .remove(&id)
                        .map_or(self.cfg.first_token, |t| t.max(self.cfg.first_token));
                    let mut pool = Pool::new(id.clone(), pc, first, now);
                    pool.learning = self.learning_for(&id);
                    self.pools.insert(id, pool);
                }
            }
        }
        self.rebuild_chains();
        self.end_learned(now);
        self.settle(now, &mut out);
        if reload {
            let after = self.pool_configs();
            let ids: BTreeSet<&PoolId> = before.keys().chain(after.keys()).collect();
            for id in ids {
                let change = match (before.get(id), after.get(id)) {
                    (None, Some(_)) => PoolChange::Created,
                    (Some(_), None) => PoolChange::Removed,
                    (Some(a), Some(b)) if a != b => PoolChange::Changed,
                    _ => continue,
                };
                out.facts.push(Fact::PoolChanged { pool: id.clone(), change, reload: true });
            }
        }
        Ok((out, done))
    }
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
