//! Taking over from an earlier leader: its runtime state (pauses merged with max, headroom, breakers)
//! and learning per pool, ending early once the pool's leases are back.

use super::*;

fn resume_req(s: &Scheduler, lease_id: LeaseId, token: u64, pool: &str) -> ResumeRequest {
    let credential = s.cfg.lease_key.credential(lease_id, FencingToken(token), &pid(pool), "");
    ResumeRequest {
        lease_id,
        token: FencingToken(token),
        pool: pid(pool),
        priority: Priority::DEFAULT,
        ttl: None,
        holder: "".into(),
        credential,
    }
}

#[track_caller]
fn readopt(s: &mut Scheduler, now: Instant, session: SessionId, lease: u128, token: u64, pool: &str) {
    let r = resume_req(s, LeaseId(lease), token, pool);
    let d = s.resume(now, session, r);
    assert!(
        d.events.iter().any(|(_, e)| matches!(e, Event::LeaseResumed { .. })),
        "lease {lease} on {pool} not re-adopted: {d:?}"
    );
}

fn learning(s: &Scheduler, pool: &str) -> Option<PoolLearning> {
    pool_snap(s, pool).learning
}

/// Held counts as the previous leader published them.
fn counts(list: &[(&str, u32)]) -> RuntimeState {
    RuntimeState {
        pools: list
            .iter()
            .map(|(p, n)| (pid(p), PoolRuntime { held: Some(*n), ..PoolRuntime::default() }))
            .collect(),
    }
}

/// What the old leader publishes comes back as its held counts (a parent's is its subtree's),
/// pauses, headroom and breakers, at the instant asked.
#[test]
fn the_runtime_state_lists_pauses_headroom_breakers_and_subtree_counts() {
    let t0 = Instant::now();
    let mut s = sched(&[("g", limit(4)), ("a", child("g", 3)), ("b", child("g", 3))], t0);
    let x = s.open_session();
    granted(&s.request(t0, x, req("r1", "a")), x, "r1");
    granted(&s.request(t0, x, req("r2", "a")), x, "r2");
    granted(&s.request(t0, x, req("r3", "b")), x, "r3");
    s.pause_pool(t0, &pid("b"), secs(5), "maintenance").unwrap();
    s.report_rate_limit(t0, &pid("a"), Some(secs(1)), "").unwrap();
    s.force_breaker(t0, &pid("g"), ForceBreaker::Open, "").unwrap();

    let st = s.runtime_state(t0 + secs(1));
    let (g, a, b) = (&st.pools[&pid("g")], &st.pools[&pid("a")], &st.pools[&pid("b")]);
    assert_eq!((g.held, a.held, b.held), (Some(3), Some(2), Some(1)), "a parent's count is its subtree's");
    assert_eq!(b.paused_until, Some(t0 + secs(5)));
    assert_eq!(&*b.pause_reason, "paused by an operator: maintenance");
    assert_eq!(a.paused_until, None, "a pause that ended is not published");
    assert_eq!(a.effective, Some(2), "adaptive headroom learned one step down");
    assert!(a.recover_at.is_some());
    assert_eq!(g.breaker, BreakerRuntime::Open { until: None }, "forced open");
    assert_eq!(b.breaker, BreakerRuntime::Closed);
    assert_eq!(s.runtime_state(t0 + secs(1)), st, "the same state compares equal (publish on change)");
}

/// Pauses merge with max: a later pause the new leader already has stays, an earlier one is
/// extended. Headroom and breakers are restored.
#[test]
fn a_takeover_merges_pauses_with_max_and_restores_headroom_and_breakers() {
    let t0 = Instant::now();
    let list = [("p", limit(4)), ("q", limit(4)), ("r", limit(4)), ("h", limit(4)), ("f", limit(4))];
    let mut s = sched(&list, t0);
    let x = s.open_session();
    // The new leader's own pauses: q's ends later than the stored one, p's earlier.
    s.pause_pool(t0, &pid("p"), secs(2), "mine").unwrap();
    s.pause_pool(t0, &pid("q"), secs(9), "mine").unwrap();
    let paused = |until: Instant, why: &str| PoolRuntime {
        paused_until: Some(until),
        pause_reason: why.into(),
        ..PoolRuntime::default()
    };
    let mut st = RuntimeState::default();
    st.pools.insert(pid("p"), paused(t0 + secs(5), "old p"));
    st.pools.insert(pid("q"), paused(t0 + secs(6), "old q"));
    st.pools.insert(
        pid("r"),
        PoolRuntime { effective: Some(2), recover_at: Some(t0 + secs(30)), ..PoolRuntime::default() },
    );
    st.pools.insert(
        pid("h"),
        PoolRuntime {
            breaker: BreakerRuntime::Open { until: Some(t0 + secs(3)) },
            opens: 2,
            ..PoolRuntime::default()
        },
    );
    st.pools.insert(
        pid("f"),
        PoolRuntime { breaker: BreakerRuntime::Open { until: None }, ..PoolRuntime::default() },
    );
    st.pools.insert(pid("gone"), paused(t0 + secs(5), "a pool this leader does not have"));

    s.take_over(t0 + ms(1), Some(&st));
    assert_eq!(pool_snap(&s, "p").paused_until, Some(t0 + secs(5)), "the later stored pause wins");
    assert_eq!(&*pool_snap(&s, "p").pause_reason, "old p");
    assert_eq!(pool_snap(&s, "q").paused_until, Some(t0 + secs(9)), "the later own pause stays");
    assert_eq!(pool_snap(&s, "r").effective_limit, 2);
    let h = pool_snap(&s, "h").breaker;
    assert_eq!((h.state, h.opens, h.forced), (BreakerState::Open { until: Some(t0 + secs(3)) }, 2, false));
    let f = pool_snap(&s, "f").breaker;
    assert_eq!((f.state, f.forced), (BreakerState::Open { until: None }, true));
    s.check_invariants(t0 + ms(1));

    // The restored limits gate grants: r grants 2, h nothing until half-open, p nothing until 5 s.
    for i in 0..3 {
        s.request(t0 + ms(2), x, req(&format!("r{i}"), "r"));
    }
    assert_eq!(load(&s, "r").0, 2);
    assert!(grants(&s.request(t0 + ms(2), x, req("h", "h"))).is_empty());
    assert!(grants(&s.request(t0 + ms(2), x, req("p", "p"))).is_empty());
    assert_eq!(grants(&s.tick(t0 + secs(3))), vec![(x, "h".to_owned())], "the probe after the open timeout");
    assert_eq!(grants(&s.tick(t0 + secs(5))), vec![(x, "p".to_owned())]);
    // Headroom recovers from the stored instant on.
    assert_eq!(grants(&s.tick(t0 + secs(30))), vec![(x, "r2".to_owned())]);
}

/// A stored open breaker whose timeout ran out comes back half-open; a pool the new leader already
/// has open keeps its own state (its open count merges with max).
#[test]
fn an_expired_stored_breaker_comes_back_half_open() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", limit(2)), ("q", limit(2))], t0);
    s.force_breaker(t0, &pid("q"), ForceBreaker::Open, "").unwrap();
    let mut st = RuntimeState::default();
    let open =
        |until| PoolRuntime { breaker: BreakerRuntime::Open { until }, opens: 4, ..PoolRuntime::default() };
    st.pools.insert(pid("p"), open(Some(t0)));
    st.pools.insert(pid("q"), open(Some(t0 + secs(60))));
    s.take_over(t0 + ms(1), Some(&st));
    assert_eq!(pool_snap(&s, "p").breaker.state, BreakerState::HalfOpen { probe: None });
    let q = pool_snap(&s, "q").breaker;
    assert_eq!((q.state, q.forced, q.opens), (BreakerState::Open { until: None }, true, 4));
}

/// Learning is per pool: a pool leaves it once its subtree's leases are back (the count the old
/// leader published), a pool with a published 0 at once, and a child grants only when its whole
/// chain has left learning.
#[test]
fn learning_ends_per_pool_once_its_subtree_leases_are_back() {
    let t0 = Instant::now();
    let list = [("g", limit(4)), ("a", child("g", 2)), ("b", child("g", 2)), ("q", limit(2))];
    let mut s = sched(&list, t0);
    let x = s.open_session();
    s.begin_term(t0, 1 << 32, secs(10));
    s.take_over(t0, Some(&counts(&[("g", 2), ("a", 1), ("b", 1), ("q", 0)])));
    assert!(s.snapshot(None).unwrap().learning, "the term's period still bounds re-creation");
    assert_eq!(learning(&s, "q"), None, "a published 0: no learning");
    assert_eq!(pool_snap(&s, "q").learned_after, Some(Duration::ZERO));
    assert_eq!(grants(&s.request(t0, x, req("q", "q"))), vec![(x, "q".to_owned())]);
    assert_eq!(learning(&s, "g"), Some(PoolLearning { until: t0 + secs(10), expected: Some(2), back: 0 }));

    let d = s.request(t0, x, req("new-a", "a"));
    assert_only(&d, x, queued("new-a", 0));
    assert_eq!(pool_snap(&s, "a").gate, Some(Closed::Learning));
    // a's lease is back: a is done, but g waits for b's.
    readopt(&mut s, t0 + ms(100), x, 1, 5, "a");
    assert_eq!(learning(&s, "a"), None);
    assert_eq!(pool_snap(&s, "a").learned_after, Some(ms(100)));
    assert_eq!(learning(&s, "g").map(|l| (l.expected, l.back)), Some((Some(2), 1)));
    assert!(s.tick(t0 + ms(150)).events.is_empty(), "g still learns");
    s.check_invariants(t0 + ms(150));
    // b's is back too: g leaves learning, and the waiter under it is granted at once.
    let r = resume_req(&s, LeaseId(2), 9, "b");
    let d = s.resume(t0 + ms(200), x, r);
    assert_eq!(grants(&d), vec![(x, "new-a".to_owned())]);
    assert_eq!(s.learning_took(), Some(ms(200)));
    assert_eq!(load(&s, "g").0, 3);
    // Re-creation still works for the rest of the period (a lease granted after the last publish).
    readopt(&mut s, t0 + secs(1), x, 3, 6, "b");
    s.check_invariants(t0 + secs(1));
}

/// Leaving learning never bypasses the limit: with every lease back and the pool full, a new request
/// waits for a release.
#[test]
fn a_pool_out_of_learning_still_grants_only_below_its_limit() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", limit(2))], t0);
    let x = s.open_session();
    s.begin_term(t0, 1 << 32, secs(10));
    s.take_over(t0, Some(&counts(&[("p", 2)])));
    readopt(&mut s, t0, x, 1, 1, "p");
    readopt(&mut s, t0, x, 2, 2, "p");
    assert_eq!(learning(&s, "p"), None);
    let d = s.request(t0, x, req("new", "p"));
    assert_only(&d, x, queued("new", 0));
    assert_eq!(pool_snap(&s, "p").gate, Some(Closed::Full(pid("p"))));
    let d = s.release(t0 + ms(1), x, LeaseId(1), Outcome::Ok);
    assert_eq!(grants(&d), vec![(x, "new".to_owned())]);
}

/// A re-adopted lease that ends still counts as back: the count is cumulative.
#[test]
fn a_released_readopted_lease_still_counts_as_back() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", limit(3))], t0);
    let x = s.open_session();
    s.begin_term(t0, 1 << 32, secs(10));
    s.take_over(t0, Some(&counts(&[("p", 2)])));
    s.request(t0, x, req("new", "p"));
    readopt(&mut s, t0, x, 1, 1, "p");
    assert!(grants(&s.release(t0 + ms(1), x, LeaseId(1), Outcome::Ok)).is_empty());
    let r = resume_req(&s, LeaseId(2), 2, "p");
    assert_eq!(grants(&s.resume(t0 + ms(2), x, r)), vec![(x, "new".to_owned())]);
}

/// Without a published state every pool learns for the whole period, and a pool created during it
/// too; with one, a pool it does not list (the old leader held nothing there) does not learn.
#[test]
fn without_a_published_state_every_pool_learns_the_whole_period() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", limit(2))], t0);
    let x = s.open_session();
    s.begin_term(t0, 1 << 32, secs(10));
    s.take_over(t0, None);
    assert_eq!(learning(&s, "p").map(|l| l.expected), Some(None));
    s.request(t0, x, req("a", "p"));
    readopt(&mut s, t0, x, 1, 1, "p");
    s.set_pools(t0 + ms(1), pools(&[("p", limit(2)), ("n", limit(1))])).unwrap();
    assert!(learning(&s, "n").is_some(), "a pool created while learning without a state learns");
    assert!(grants(&s.tick(t0 + secs(10) - ms(1))).is_empty());
    assert_eq!(grants(&s.tick(t0 + secs(10))), vec![(x, "a".to_owned())]);
    assert_eq!(pool_snap(&s, "p").learned_after, Some(secs(10)));
    assert_eq!(s.learning_took(), Some(secs(10)));

    // With a state that does not list a pool: it does not learn, nor one created during the period.
    let mut s = sched(&[("p", limit(2)), ("q", limit(2))], t0);
    s.begin_term(t0, 1 << 32, secs(10));
    s.take_over(t0, Some(&counts(&[("p", 1)])));
    assert_eq!(learning(&s, "q"), None);
    assert!(learning(&s, "p").is_some());
    s.set_pools(t0 + ms(1), pools(&[("p", limit(2)), ("q", limit(2)), ("n", limit(1))])).unwrap();
    assert_eq!(learning(&s, "n"), None);
    assert_eq!(s.learning_took(), None, "p still learns");
}

/// A leader taking over during learning publishes what its successor must still wait for: its own
/// leases plus those reported but not back yet, or no count when it learns without one.
#[test]
fn a_learning_leader_publishes_the_leases_still_missing() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", limit(4)), ("q", limit(4))], t0);
    let x = s.open_session();
    s.begin_term(t0, 1 << 32, secs(10));
    assert_eq!(s.runtime_state(t0).pools[&pid("p")].held, None, "learning without a count: no count");
    s.take_over(t0, Some(&counts(&[("p", 3)])));
    readopt(&mut s, t0, x, 1, 1, "p");
    let st = s.runtime_state(t0);
    assert_eq!(st.pools[&pid("p")].held, Some(3), "1 back and held, 2 still missing");
    assert_eq!(st.pools[&pid("q")].held, Some(0));

    // Its successor waits for all three.
    let mut next = sched(&[("p", limit(4)), ("q", limit(4))], t0);
    next.begin_term(t0 + ms(1), 2 << 32, secs(10));
    next.take_over(t0 + ms(1), Some(&st));
    assert_eq!(learning(&next, "p").and_then(|l| l.expected), Some(3));
    // A state with no count for a pool: it learns for the whole period.
    let mut unknown = st.clone();
    unknown.pools.get_mut(&pid("p")).unwrap().held = None;
    let mut next = sched(&[("p", limit(4))], t0);
    next.begin_term(t0, 2 << 32, secs(10));
    next.take_over(t0, Some(&unknown));
    assert_eq!(learning(&next, "p"), Some(PoolLearning { until: t0 + secs(10), expected: None, back: 0 }));
}

/// Rate budgets merge with min: what the old leader granted counts against the new leader's window,
/// with the refill since its publish credited; a lower level of the new leader's own stays, and a
/// stored level far below the debt cap stops at the cap.
#[test]
fn a_takeover_carries_rate_budgets_over_with_min() {
    let t0 = Instant::now();
    // One request per second, burst 3.
    let rps = || PoolConfig {
        budget: BudgetConfig { requests_per_minute: Some(60), requests_burst: Some(3), ..Default::default() },
        ..limit(100)
    };
    let list = [("p", rps()), ("q", rps()), ("d", rps())];
    let mut old = sched(&list, t0);
    let x = old.open_session();
    for i in 0..3 {
        granted(&old.request(t0, x, req(&format!("o{i}"), "p")), x, &format!("o{i}"));
    }
    let st = old.runtime_state(t0 + secs(1));
    assert_eq!(st.pools[&pid("p")].budget_full_at, [Some(t0 + secs(3)), None, None]);
    assert_eq!(st.pools[&pid("q")].budget_full_at, [None; 3], "an unused budget is full");
    assert_eq!(old.runtime_state(t0 + ms(2_500)), st, "refill alone does not change the published state");

    let mut new = sched(&list, t0);
    let y = new.open_session();
    for i in 0..3 {
        granted(&new.request(t0, y, req(&format!("n{i}"), "q")), y, &format!("n{i}"));
    }
    let mut st = st;
    // q: the old leader had used one request; the new leader's own lower level stays.
    st.pools.get_mut(&pid("q")).unwrap().budget_full_at = [Some(t0 + secs(1)), None, None];
    // d: a stored end far ahead (say, a clock jump): the level stops at the debt cap, -burst.
    st.pools.insert(
        pid("d"),
        PoolRuntime { budget_full_at: [Some(t0 + secs(3600)), None, None], ..PoolRuntime::default() },
    );
    new.begin_term(t0 + secs(1), 1 << 32, Duration::ZERO);
    new.take_over(t0 + secs(1), Some(&st));
    new.check_invariants(t0 + secs(1));
    new.check_budgets(t0 + secs(1));
    let level = |s: &Scheduler, pool: &str| {
        let snap = s.snapshot(Some(&pid(pool))).unwrap();
        snap.pools[0].budget.as_ref().unwrap().levels[0].level
    };
    assert_eq!((level(&new, "p"), level(&new, "q"), level(&new, "d")), (1, 1, -3));

    // p grants the one request refilled since, then waits for the next second's.
    granted(&new.request(t0 + secs(1), y, req("p1", "p")), y, "p1");
    let d = new.request(t0 + secs(1), y, req("p2", "p"));
    assert!(grants(&d).is_empty(), "{d:?}");
    assert!(
        d.events.iter().any(|(_, e)| matches!(e, Event::Queued { gate: Some(Closed::Budget { .. }), .. })),
        "{d:?}"
    );
    assert_eq!(grants(&new.tick(t0 + secs(2))), vec![(y, "p2".to_owned())]);
    // d pays its debt back first: the next request waits 3 s for the level to come back to 1.
    assert!(grants(&new.request(t0 + secs(2), y, req("d1", "d"))).is_empty());
    assert!(grants(&new.tick(t0 + ms(4_999))).is_empty());
    assert_eq!(grants(&new.tick(t0 + secs(5))), vec![(y, "d1".to_owned())]);
}

/// Holds on the old leader's leases keep their slots on the new leader until the same end, on every
/// level of the chain; a hold that ended meanwhile is dropped.
#[test]
fn a_takeover_keeps_the_old_leaders_holds() {
    let t0 = Instant::now();
    let cancel = HealthConfig { cancel_cooldown: secs(5), ..Default::default() };
    let list = [("g", limit(2)), ("a", PoolConfig { health: cancel, adaptive: false, ..child("g", 2) })];
    let mut old = sched(&list, t0);
    let x = old.open_session();
    let l = granted(&old.request(t0, x, req("r1", "a")), x, "r1");
    old.release(t0, x, l, Outcome::Cancelled);
    let st = old.runtime_state(t0 + secs(1));
    assert_eq!(st.pools[&pid("a")].holds, vec![(t0 + secs(5), HoldKind::Cancel)]);
    assert!(st.pools[&pid("g")].holds.is_empty(), "a hold is published on its lease's own pool");

    let mut new = sched(&list, t0);
    let y = new.open_session();
    let mut st = st;
    st.pools.get_mut(&pid("a")).unwrap().holds.push((t0 + ms(500), HoldKind::Phantom));
    new.begin_term(t0 + secs(1), 1 << 32, Duration::ZERO);
    new.take_over(t0 + secs(1), Some(&st));
    new.check_invariants(t0 + secs(1));
    let (a, g) = (pool_snap(&new, "a"), pool_snap(&new, "g"));
    assert_eq!((a.held, a.held_until), (1, Some(t0 + secs(5))), "the ended phantom hold is dropped");
    assert_eq!(g.held, 1, "held on every level of the chain");
    // One slot left under g: granted; the next waits for the hold's end.
    granted(&new.request(t0 + secs(1), y, req("n1", "a")), y, "n1");
    assert!(grants(&new.request(t0 + secs(1), y, req("n2", "a"))).is_empty());
    assert!(grants(&new.tick(t0 + ms(4_999))).is_empty());
    assert_eq!(grants(&new.tick(t0 + secs(5))), vec![(y, "n2".to_owned())]);
    new.check_invariants(t0 + secs(5));
}

/// Release cooldowns still running on the old leader keep their slots cooling on the new one, each
/// on its own level, until the same end.
#[test]
fn a_takeover_keeps_the_old_leaders_release_cooldowns() {
    let t0 = Instant::now();
    let cool = PoolConfig { cooldown: secs(5), adaptive: false, ..limit(1) };
    let mut old = sched(&[("p", cool.clone())], t0);
    let x = old.open_session();
    let l = granted(&old.request(t0, x, req("r1", "p")), x, "r1");
    old.release(t0, x, l, Outcome::Ok);
    let st = old.runtime_state(t0 + secs(1));
    assert_eq!(st.pools[&pid("p")].cooling, vec![t0 + secs(5)]);

    let mut new = sched(&[("p", cool)], t0);
    let y = new.open_session();
    new.begin_term(t0 + secs(1), 1 << 32, Duration::ZERO);
    new.take_over(t0 + secs(1), Some(&st));
    new.check_invariants(t0 + secs(1));
    assert_eq!(pool_snap(&new, "p").cooling, 1);
    assert!(grants(&new.request(t0 + secs(1), y, req("n1", "p"))).is_empty(), "the slot still cools");
    assert!(grants(&new.tick(t0 + ms(4_999))).is_empty());
    assert_eq!(grants(&new.tick(t0 + secs(5))), vec![(y, "n1".to_owned())]);
}
