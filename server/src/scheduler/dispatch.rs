//! The grant decision: timers (`advance`), the gates over a pool chain (`chain_gate`), granting to a
//! fixpoint (`settle`), and the bookkeeping of waiters, leases and pauses that it relies on.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
    time::Duration,
};

use rand::Rng;
use tokio::time::Instant;

use super::{
    Decisions, Error, Event, ExpiryReason, Fact, FencingToken, Lease, LeaseEnd, LeaseId, PoolId, Priority,
    Scheduler, SchedulerConfig, SessionId, WaitKey, Waiter, WaiterId,
    pool::{Closed, Pool},
    time,
};

impl Scheduler {
    pub(super) fn key_of(&self, started: Instant, priority: Priority) -> WaitKey {
        // Saturating: an offset beyond ±292 years cannot occur (instants are bounded), but must not wrap.
        let nanos = |d: Duration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
        let offset =
            if started >= self.epoch { nanos(started - self.epoch) } else { -nanos(self.epoch - started) };
        let step = self.cfg.aging_step.as_nanos().min(i64::MAX as u128 / 16) as i64;
        offset.saturating_sub(step.saturating_mul(i64::from(priority.get())))
    }

    /// The conjunction of every gate over the pool's chain. New gates (RPM/TPM budgets, a circuit
    /// breaker) slot in here, or in [`Pool::gate`] when they are per level.
    pub(super) fn chain_gate(&self, pool: &Pool, now: Instant) -> Result<(), Closed> {
        if self.shutting_down || self.draining {
            return Err(Closed::Draining);
        }
        self.learning_gate(&pool.chain)?;
        self.fence_gate(now)?;
        pool.chain.iter().try_for_each(|p| self.pools[p].gate(now))
    }

    pub(super) fn pause_remaining(&self, pool: &PoolId, now: Instant) -> Option<Duration> {
        self.pools
            .get(pool)?
            .chain
            .iter()
            .filter_map(|p| self.pools[p].paused_until)
            .max()
            .filter(|u| *u > now)
            .map(|u| u - now)
    }

    pub(super) fn insert_waiter(&mut self, wid: WaiterId, w: Waiter) {
        if let Some(d) = w.deadline {
            self.deadlines.insert((d, wid));
        }
        self.sessions.get_mut(&w.session).expect("caller checked").requests.insert(w.request_id.clone(), wid);
        for (pool, _) in w.pools() {
            self.pools.get_mut(pool).expect("caller checked").add_interest(w.session);
        }
        self.waiters.insert(wid, w);
    }

    /// Removes a waiter from every index (every queue it waits in); lets a blocked waiter into its queue.
    pub(super) fn drop_waiter(&mut self, wid: WaiterId) -> Option<Waiter> {
        let w = self.waiters.remove(&wid)?;
        if let Some(d) = w.deadline {
            self.deadlines.remove(&(d, wid));
        }
        if let Some(s) = self.sessions.get_mut(&w.session) {
            s.requests.remove(&w.request_id);
        }
        for (pool, _) in w.pools() {
            if let Some(pool) = self.pools.get_mut(pool) {
                pool.queue.remove(w.key, wid);
                pool.queue.admit_blocked(pool.cfg.max_queue_depth as usize);
                pool.drop_interest(w.session);
            }
        }
        Some(w)
    }

    /// Grants the waiter on the first pool it lists whose gates pass, its budgets included (for a
    /// single-pool request: its pool). The caller knows one does. An `acquire_any` request's cost (its
    /// estimate, or its first pool's default) is the same on whichever pool grants it.
    pub(super) fn grant(&mut self, now: Instant, wid: WaiterId, out: &mut Decisions) {
        let Some(w) = self.waiters.get(&wid) else {
            return;
        };
        let Some((pool, ttl)) = w
            .pools()
            .find(|(p, _)| self.pools.get(*p).is_some_and(|pool| self.grant_gate(pool, &w.cost, now).is_ok()))
            .map(|(p, t)| (p.clone(), t))
        else {
            return;
        };
        let Some(mut w) = self.drop_waiter(wid) else {
            return;
        };
        w.pool = pool;
        w.ttl = ttl;
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
        let expires_at = time::after(now, w.ttl);
        self.budget_reserve(now, id, &w.pool, w.cost, out);
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
        let waited = now.saturating_duration_since(w.enqueued_at);
        let credential = self.cfg.lease_key.credential(id, token, &lease.pool, &lease.holder);
        let probe = self.take_probe(&w.pool, id, out);
        out.facts.push(Fact::Granted { lease: lease.clone(), waited, probe });
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
                waited,
                credential,
                probe,
            },
        );
    }

    /// Removes a lease and frees its slot on every level (each level's cooldown applies). Records the
    /// fact; telling the holder is the caller's part.
    pub(super) fn end_lease(
        &mut self,
        now: Instant,
        id: &LeaseId,
        end: LeaseEnd,
        out: &mut Decisions,
    ) -> Option<Lease> {
        let lease = self.leases.remove(id, end.tombstone())?;
        // Without a settlement before (a release with usage), the whole reservation stays charged.
        self.budget_settle(now, *id, &lease.pool, None, out);
        out.facts.push(Fact::Ended { lease: lease.clone(), end });
        if let Some(s) = self.sessions.get_mut(&lease.session) {
            s.leases.remove(id);
        }
        if let Some(pool) = self.pools.get_mut(&lease.pool) {
            pool.drop_interest(lease.session);
        }
        // Provider health: the breakers of the chain learn the result; the slot may stay held.
        let hold = self.on_lease_end(now, &lease, end, out);
        self.free_or_hold(now, &lease, hold, out);
        Some(lease)
    }

    pub(super) fn own_lease(&self, session: SessionId, id: &LeaseId) -> Result<(), Error> {
        match self.leases.get(id) {
            Some(l) if l.session == session => Ok(()),
            Some(_) => Err(Error::NotYourLease(*id)),
            None => match self.leases.ended(id) {
                Some(how) => Err(Error::LeaseEnded { id: *id, how: how.describe() }),
                None => Err(Error::UnknownLease(*id)),
            },
        }
    }

    /// Pauses a pool until `max(current end, now + wait)` and tells everyone interested; the fact is
    /// recorded even when the pause did not move (so every 429 and operator pause is seen). An agent's
    /// 429 (`adaptive_step`) also starts an episode of adaptive headroom, and its wait is capped by the
    /// pool's `max_agent_retry_after`; a manual pause does neither, since it says nothing about the
    /// provider's capacity and comes from an operator.
    pub(super) fn pause(
        &mut self,
        now: Instant,
        pool_id: &PoolId,
        retry_after: Option<Duration>,
        reason: String,
        adaptive_step: bool,
        out: &mut Decisions,
    ) {
        let Some(pool) = self.pools.get_mut(pool_id) else {
            return;
        };
        let wait = retry_after.unwrap_or(pool.cfg.default_retry_after).min(SchedulerConfig::MAX_PAUSE);
        // Every agent holds the same token: one report must not stop a pool for longer than the
        // operator allows. An operator's pause is not capped.
        let wait = if adaptive_step { wait.min(pool.cfg.max_agent_retry_after) } else { wait };
        let until = time::after(now, wait);
        let new_episode = pool.paused_until.is_none_or(|u| u <= now);
        if adaptive_step && new_episode && pool.cfg.adaptive && pool.effective > 1 {
            pool.effective -= 1;
            out.facts.push(Fact::Effective { pool: pool_id.clone(), limit: pool.effective });
        }
        // A zero retry_after still counts as a 429 episode but pauses nothing: recording a pause that
        // ends now would announce Paused and Resumed for nothing and leave a timer due already.
        let extended = until > now && pool.paused_until.is_none_or(|u| until > u);
        if extended {
            pool.paused_until = Some(until);
            pool.pause_reason = Arc::from(reason);
        }
        if adaptive_step && pool.cfg.adaptive && pool.effective < pool.cfg.max_concurrent {
            pool.recover_at = Some(time::after(pool.paused_until.unwrap_or(until), pool.cfg.recovery_step()));
        }
        let reason = pool.pause_reason.clone();
        let current = pool.paused_until.filter(|u| *u > now).unwrap_or(now);
        out.facts.push(Fact::Paused {
            pool: pool_id.clone(),
            until: current,
            reason: reason.clone(),
            extended,
        });
        if extended {
            for s in self.interested(pool_id) {
                out.push(s, Event::Paused { pool: pool_id.clone(), until, reason: reason.clone() });
            }
        }
    }

    /// Sessions waiting on or holding this pool or any descendant of it.
    pub(super) fn interested(&self, pool: &PoolId) -> BTreeSet<SessionId> {
        self.pools
            .values()
            .filter(|p| p.chain.contains(pool))
            .flat_map(|p| p.interest.keys().copied())
            .collect()
    }

    /// Applies timers due by `now`, without granting.
    pub(super) fn advance(&mut self, now: Instant, out: &mut Decisions) {
        self.last_now = self.last_now.max(now);
        if let Some(until) = self.learning_until.filter(|t| *t <= now) {
            self.learning_until = None;
            self.finish_learning(until);
        }
        self.advance_health(now, out);
        let mut resumed = Vec::new();
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
                    .then(|| time::after(at, pool.cfg.recovery_step()));
            }
            if pool.effective != before {
                out.facts.push(Fact::Effective { pool: pool.id.clone(), limit: pool.effective });
            }
        }
        for id in resumed {
            out.facts.push(Fact::Resumed { pool: id.clone() });
            for s in self.interested(&id) {
                out.push(s, Event::Resumed { pool: id.clone() });
            }
        }
        while let Some(id) = self.leases.first_expired(now) {
            let reason = ExpiryReason::Ttl;
            if let Some(lease) = self.end_lease(now, &id, LeaseEnd::Expired(reason), out) {
                out.push(lease.session, Event::Expired { lease_id: id, pool: lease.pool, reason });
            }
        }
        self.expire_waits(now, out);
    }

    /// Grants to a fixpoint, then rejects waiters past their deadline.
    pub(super) fn settle(&mut self, now: Instant, out: &mut Decisions) {
        loop {
            let mut best: Option<(WaitKey, WaiterId)> = None;
            for pool in self.pools.values() {
                let Some(head) = pool.queue.head() else {
                    continue;
                };
                if best.is_some_and(|b| b <= head) {
                    continue;
                }
                let cost = self.waiters[&head.1].cost;
                if self.grant_gate(pool, &cost, now).is_ok() {
                    best = Some(head);
                }
            }
            let Some((_, wid)) = best else { break };
            self.grant(now, wid, out);
        }
        self.expire_waits(now, out);
    }

    pub(super) fn expire_waits(&mut self, now: Instant, out: &mut Decisions) {
        while let Some(&(at, wid)) = self.deadlines.first().filter(|(t, _)| *t <= now) {
            self.deadlines.remove(&(at, wid));
            if let Some(w) = self.drop_waiter(wid) {
                let error = Error::WaitTimeout {
                    waited: now.saturating_duration_since(w.enqueued_at),
                    retry_after: self.pause_remaining(&w.pool, now),
                    pool: w.pool,
                };
                out.push(w.session, Event::Rejected { request_id: w.request_id.to_string(), error });
            }
        }
    }

    /// Recomputes every pool's ancestor chain and in-flight count from the lease table.
    pub(super) fn rebuild_chains(&mut self) {
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
        self.rebuild_holds();
    }
}

pub(super) fn check_ttl(pool: &Pool, ttl: Option<Duration>) -> Result<Duration, Error> {
    let ttl = ttl.unwrap_or(pool.cfg.default_ttl);
    if ttl.is_zero() || ttl > pool.cfg.max_ttl {
        return Err(Error::InvalidTtl { pool: pool.id.clone(), got: ttl, max: pool.cfg.max_ttl });
    }
    Ok(ttl)
}
