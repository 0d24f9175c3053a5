//! The circuit breaker: tripping in a sliding window, open timeouts 1×, 2×, 4×, exactly one probe,
//! stale results, cancelled probes, 429s, fail-fast, operator force.

use super::*;

fn breaker(failures: u32, window: Duration) -> BreakerConfig {
    BreakerConfig {
        enabled: true,
        failures,
        window,
        open_base: secs(10),
        open_max: secs(100),
        ..Default::default()
    }
}

/// A pool with this breaker and no pauses from any class (to isolate the breaker).
fn pool_with(n: u32, b: BreakerConfig) -> PoolConfig {
    let mut health = HealthConfig { breaker: b, ..Default::default() };
    for c in [
        &mut health.outcomes.rate_limited,
        &mut health.outcomes.overloaded,
        &mut health.outcomes.quota_exhausted,
    ] {
        c.pause = false;
    }
    PoolConfig { health, adaptive: false, max_ttl: secs(3600), default_ttl: secs(600), ..limit(n) }
}

#[track_caller]
fn fail(s: &mut Scheduler, now: Instant, session: SessionId, id: &str, o: Outcome) -> Decisions {
    let l = granted(&s.request(now, session, req(id, "p")), session, id);
    s.release(now, session, l, o)
}

fn state(s: &Scheduler) -> BreakerState {
    pool_snap(s, "p").breaker.state
}

fn probe_of(d: &Decisions) -> Option<(SessionId, LeaseId)> {
    d.events.iter().find_map(|(s, e)| match e {
        Event::Granted { lease_id, probe: true, .. } => Some((*s, *lease_id)),
        _ => None,
    })
}

#[test]
fn n_failures_within_the_window_open_it_and_older_ones_age_out() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", pool_with(4, breaker(3, secs(10))))], t0);
    let a = s.open_session();
    fail(&mut s, t0, a, "f1", Outcome::Error);
    fail(&mut s, t0 + secs(2), a, "f2", Outcome::Error);
    // The first failure ages out of the 10 s window before the third arrives.
    fail(&mut s, t0 + secs(11), a, "f3", Outcome::Error);
    assert_eq!(state(&s), BreakerState::Closed);
    assert_eq!(pool_snap(&s, "p").breaker.failures, 2);
    let d = fail(&mut s, t0 + secs(11), a, "f4", Outcome::Overloaded(None));
    assert_eq!(state(&s), BreakerState::Open { until: Some(t0 + secs(21)) });
    assert!(d.facts.iter().any(|f| matches!(f, Fact::Breaker { .. })));
}

#[test]
fn a_failure_ratio_over_a_minimum_count_opens_it() {
    let t0 = Instant::now();
    let b = BreakerConfig { failures: 0, failure_percent: 60, min_outcomes: 4, ..breaker(0, secs(60)) };
    let mut s = sched(&[("p", pool_with(2, b))], t0);
    let a = s.open_session();
    fail(&mut s, t0, a, "f1", Outcome::Error);
    fail(&mut s, t0, a, "f2", Outcome::Error);
    assert_eq!(state(&s), BreakerState::Closed, "100% but below the minimum count");
    for o in ["o1", "o2", "o3"] {
        fail(&mut s, t0, a, o, Outcome::Ok);
    }
    fail(&mut s, t0, a, "f3", Outcome::Error);
    fail(&mut s, t0, a, "f4", Outcome::Error);
    assert_eq!(state(&s), BreakerState::Closed, "4 of 7 failed: 57% < 60%");
    fail(&mut s, t0, a, "f5", Outcome::Error);
    assert!(matches!(state(&s), BreakerState::Open { .. }), "5 of 8: 62.5%");
}

#[test]
fn a_429_and_cancellations_do_not_trip_it() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", pool_with(1, breaker(2, secs(60))))], t0);
    let a = s.open_session();
    for i in 0..5 {
        fail(&mut s, t0, a, &format!("r{i}"), Outcome::RateLimited(Some(ms(1))));
        fail(&mut s, t0, a, &format!("c{i}"), Outcome::Cancelled);
        fail(&mut s, t0, a, &format!("q{i}"), Outcome::QuotaExhausted(None));
    }
    assert_eq!(state(&s), BreakerState::Closed);
    assert_eq!(pool_snap(&s, "p").breaker.outcomes, 0);
}

#[test]
fn open_timeouts_run_1x_2x_4x_the_base_and_a_success_resets_them() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", pool_with(1, breaker(1, secs(60))))], t0);
    let a = s.open_session();
    fail(&mut s, t0, a, "f", Outcome::Error);
    let mut now = t0;
    for (k, want) in [(1, secs(10)), (2, secs(20)), (3, secs(40)), (4, secs(80)), (5, secs(100))] {
        let BreakerState::Open { until: Some(until) } = state(&s) else { panic!("open: {:?}", state(&s)) };
        assert_eq!(until - now, want, "open #{k}");
        assert_eq!(pool_snap(&s, "p").breaker.opens, k);
        // Nothing is granted while open; at the timeout the queued request becomes the probe.
        assert!(grants(&s.request(now, a, req(&format!("w{k}"), "p"))).is_empty());
        now = until;
        let d = s.tick(now);
        let (_, probe) = probe_of(&d).expect("a probe at the timeout");
        s.release(now, a, probe, Outcome::Error);
    }
    // A success closes it and resets the backoff: the next open lasts the base again.
    s.tick(now + secs(100));
    now += secs(100);
    let d = s.request(now, a, req("last", "p"));
    let (_, probe) = probe_of(&d).expect("probe");
    let d = s.release(now, a, probe, Outcome::Ok);
    assert_eq!(state(&s), BreakerState::Closed);
    assert!(
        d.facts.iter().any(|f| matches!(f, Fact::Breaker { view, .. } if view.state == BreakerState::Closed))
    );
    fail(&mut s, now, a, "again", Outcome::Error);
    assert_eq!(state(&s), BreakerState::Open { until: Some(now + secs(10)) });
}

#[test]
fn half_open_grants_exactly_one_probe() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", pool_with(5, breaker(1, secs(60))))], t0);
    let ss: Vec<SessionId> = (0..4).map(|_| s.open_session()).collect();
    fail(&mut s, t0, ss[0], "f", Outcome::Error);
    for (i, x) in ss.iter().enumerate() {
        assert!(grants(&s.request(t0, *x, req(&format!("w{i}"), "p"))).is_empty());
    }
    let d = s.tick(t0 + secs(10));
    assert_eq!(grants(&d).len(), 1, "one probe, not five slots");
    let (who, probe) = probe_of(&d).expect("probe");
    assert_eq!(who, ss[0], "the head of the queue probes");
    // Everyone waiting or holding heard that it turned half-open.
    assert!(ss.iter().all(|x| events_of(&d, *x).iter().any(|e| matches!(e, Event::Breaker { .. }))));
    assert_eq!(pool_snap(&s, "p").breaker.state, BreakerState::HalfOpen { probe: Some(probe) });
    // Newcomers and later ticks get nothing while the probe is out.
    assert!(grants(&s.request(t0 + secs(11), ss[1], req("late", "p"))).is_empty());
    assert!(grants(&s.tick(t0 + secs(50))).is_empty());
    // The probe succeeds: closed, and every waiter is granted.
    let d = s.release(t0 + secs(50), who, probe, Outcome::Ok);
    assert_eq!(grants(&d).len(), 4);
    s.check_invariants(t0 + secs(50));
}

#[test]
fn a_stale_result_is_ignored() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", pool_with(3, breaker(1, secs(60))))], t0);
    let a = s.open_session();
    let old = granted(&s.request(t0, a, req("old", "p")), a, "old");
    fail(&mut s, t0, a, "f", Outcome::Error);
    // Half-open: the probe is granted; the lease from before the open fails now — ignored.
    let d = s.request(t0 + secs(10), a, req("probe", "p"));
    let (_, probe) = probe_of(&d).expect("probe");
    s.release(t0 + secs(10), a, old, Outcome::Error);
    assert_eq!(state(&s), BreakerState::HalfOpen { probe: Some(probe) }, "only the probe moves it");
}

#[test]
fn a_result_from_before_the_close_does_not_reopen_it() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", pool_with(3, breaker(1, secs(60))))], t0);
    let a = s.open_session();
    let old = granted(&s.request(t0, a, req("old", "p")), a, "old");
    fail(&mut s, t0, a, "f", Outcome::Error);
    let (_, probe) = probe_of(&s.request(t0 + secs(10), a, req("probe", "p"))).expect("probe");
    s.release(t0 + secs(10), a, probe, Outcome::Ok);
    assert_eq!(state(&s), BreakerState::Closed);
    let epoch = pool_snap(&s, "p").breaker.epoch;
    s.release(t0 + secs(11), a, old, Outcome::Error);
    let b = pool_snap(&s, "p").breaker;
    assert_eq!((b.state, b.epoch, b.failures), (BreakerState::Closed, epoch, 0), "stale failure ignored");
    // A fresh failure does count.
    fail(&mut s, t0 + secs(11), a, "fresh", Outcome::Error);
    assert!(matches!(state(&s), BreakerState::Open { .. }));
}

#[test]
fn a_cancelled_or_expired_probe_frees_the_half_open_admission() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", pool_with(3, breaker(1, secs(60))))], t0);
    let (a, b) = (s.open_session(), s.open_session());
    fail(&mut s, t0, a, "f", Outcome::Error);
    s.request(t0, a, req("pa", "p"));
    s.request(t0, b, req("pb", "p"));
    let (who, probe) = probe_of(&s.tick(t0 + secs(10))).expect("probe");
    assert_eq!(who, a);
    // The probe is cancelled: the next waiter becomes the probe, and the breaker stays half-open.
    let d = s.release(t0 + secs(11), a, probe, Outcome::Cancelled);
    let (who, probe2) = probe_of(&d).expect("a second probe");
    assert_eq!(who, b);
    assert!(matches!(state(&s), BreakerState::HalfOpen { probe: Some(p) } if p == probe2));
    // That one expires (no heartbeat): the admission is free again for a newcomer.
    let ttl = pool_snap(&s, "p").config.default_ttl;
    s.tick(t0 + secs(11) + ttl);
    assert_eq!(state(&s), BreakerState::HalfOpen { probe: None });
    let d = s.request(t0 + secs(11) + ttl, a, req("pc", "p"));
    assert!(probe_of(&d).is_some());
}

#[test]
fn a_failed_probe_reopens_it_for_twice_as_long() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", pool_with(3, breaker(1, secs(60))))], t0);
    let a = s.open_session();
    fail(&mut s, t0, a, "f", Outcome::Error);
    let (_, probe) = probe_of(&s.request(t0 + secs(10), a, req("probe", "p"))).expect("probe");
    s.release(t0 + secs(12), a, probe, Outcome::Overloaded(None));
    assert_eq!(state(&s), BreakerState::Open { until: Some(t0 + secs(32)) });
}

#[test]
fn fail_fast_refuses_with_retry_after_while_open() {
    let t0 = Instant::now();
    let b = BreakerConfig { when_open: WhenOpen::FailFast, ..breaker(1, secs(60)) };
    let mut s = sched(&[("p", pool_with(1, b))], t0);
    let (a, w) = (s.open_session(), s.open_session());
    let l = granted(&s.request(t0, a, req("busy", "p")), a, "busy");
    assert_only(&s.request(t0, w, req("queued", "p")), w, queued("queued", 0));
    // It opens: the queued request is refused at once, and so is a newcomer, with the time left.
    let d = s.release(t0, a, l, Outcome::Error);
    let want = Error::BreakerOpen { pool: pid("p"), retry_after: Some(secs(10)) };
    assert!(events_of(&d, w).contains(&rejected("queued", want.clone())), "{:#?}", d.events);
    let d = s.request(t0 + secs(4), w, req("new", "p"));
    let want = Error::BreakerOpen { pool: pid("p"), retry_after: Some(secs(6)) };
    assert_only(&d, w, rejected("new", want.clone()));
    assert_eq!(want.retry_after(), Some(secs(6)));
    // Half-open: a newcomer is the probe.
    assert!(probe_of(&s.request(t0 + secs(10), w, req("probe", "p"))).is_some());
}

#[test]
fn an_operator_forces_it_open_and_closed() {
    let t0 = Instant::now();
    // The breaker is not even enabled: forcing works anyway.
    let mut s = sched(&[("p", limit(2)), ("c", child("p", 2))], t0);
    let a = s.open_session();
    let (view, d) = s.force_breaker(t0, &pid("p"), ForceBreaker::Open, "maintenance").unwrap();
    assert_eq!((view.state, view.forced), (BreakerState::Open { until: None }, true));
    assert!(
        d.facts.iter().any(|f| matches!(f, Fact::Breaker { reason, .. } if reason.contains("maintenance")))
    );
    // The child waits on its parent's breaker (and is told of it); no timer is set for a forced open.
    let d = s.request(t0, a, req("w", "c"));
    let gated = Event::Queued {
        request_id: RequestId::parse("w").unwrap(),
        position: 0,
        blocked: false,
        gate: Some(Closed::Breaker(pid("p"), None)),
    };
    assert_eq!(d.events[0], (a, gated), "Queued names the parent's breaker as the gate");
    assert!(
        matches!(&d.events[1..], [(_, Event::Breaker { pool, view, .. })] if *pool == pid("p") && view.forced)
    );
    assert_eq!(s.next_deadline(), None);
    assert!(grants(&s.tick(t0 + secs(3600))).is_empty());
    let (view, d) = s.force_breaker(t0 + secs(3600), &pid("p"), ForceBreaker::Closed, "").unwrap();
    assert_eq!((view.state, view.forced, view.opens), (BreakerState::Closed, false, 0));
    granted(&d, a, "w");
    assert!(matches!(s.force_breaker(t0, &pid("zz"), ForceBreaker::Open, ""), Err(Error::UnknownPool(_))));
}

#[test]
fn a_parent_breaker_counts_its_children_and_gates_them() {
    let t0 = Instant::now();
    let g = pool_with(4, breaker(2, secs(60)));
    let mut s = sched(&[("p", g), ("k1", child("p", 2)), ("k2", child("p", 2))], t0);
    let a = s.open_session();
    for (id, pool) in [("a", "k1"), ("b", "k2")] {
        let l = granted(&s.request(t0, a, req(id, pool)), a, id);
        s.release(t0, a, l, Outcome::Overloaded(None));
    }
    assert!(matches!(state(&s), BreakerState::Open { .. }), "provider-wide failures from both keys");
    assert!(grants(&s.request(t0, a, req("c", "k1"))).is_empty());
    // The probe goes through a child; its success closes the parent.
    let d = s.tick(t0 + secs(10));
    let (_, probe) = probe_of(&d).expect("probe");
    s.release(t0 + secs(10), a, probe, Outcome::Ok);
    assert_eq!(state(&s), BreakerState::Closed);
}

#[test]
fn disabling_the_breaker_closes_it() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", pool_with(1, breaker(1, secs(60))))], t0);
    let a = s.open_session();
    fail(&mut s, t0, a, "f", Outcome::Error);
    assert!(matches!(state(&s), BreakerState::Open { .. }));
    s.request(t0, a, req("w", "p"));
    let mut all = s.pool_configs();
    all.get_mut(&pid("p")).unwrap().health.breaker.enabled = false;
    let d = s.set_pools(t0, all).unwrap();
    assert_eq!(state(&s), BreakerState::Closed);
    granted(&d, a, "w");
}

#[test]
fn re_parenting_the_probe_away_frees_the_half_open_admission() {
    let t0 = Instant::now();
    let g = pool_with(4, breaker(1, secs(60)));
    let mut s = sched(&[("p", g), ("c", child("p", 2))], t0);
    let a = s.open_session();
    fail(&mut s, t0, a, "f", Outcome::Error);
    let (_, probe) = probe_of(&s.request(t0 + secs(10), a, req("probe", "c"))).expect("probe through c");
    assert_eq!(state(&s), BreakerState::HalfOpen { probe: Some(probe) });
    let mut all = s.pool_configs();
    all.get_mut(&pid("c")).unwrap().parent = None;
    s.set_pools(t0 + secs(10), all).unwrap();
    assert_eq!(state(&s), BreakerState::HalfOpen { probe: None }, "p can probe again");
    s.check_invariants(t0 + secs(10));
}

#[test]
fn a_waiter_arriving_while_it_is_open_is_told_at_once() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", pool_with(2, breaker(1, secs(60))))], t0);
    let (a, b) = (s.open_session(), s.open_session());
    fail(&mut s, t0, a, "f", Outcome::Error);
    let d = s.request(t0 + secs(1), b, req("w", "p"));
    let told = events_of(&d, b);
    assert_eq!(told[0], queued("w", 0));
    assert!(
        matches!(&told[1], Event::Breaker { pool, view, .. } if *pool == pid("p") && view.state == BreakerState::Open { until: Some(t0 + secs(10)) }),
        "{told:#?}"
    );
}

#[test]
fn an_acquire_any_waiter_is_failed_fast_only_when_every_listed_pool_is() {
    let t0 = Instant::now();
    let fast = BreakerConfig { when_open: WhenOpen::FailFast, ..breaker(1, secs(10)) };
    let mut s = sched(&[("a", pool_with(1, fast.clone())), ("b", pool_with(1, fast))], t0);
    let (h, w) = (s.open_session(), s.open_session());
    granted(&s.request(t0, h, req("ha", "a")), h, "ha");
    granted(&s.request(t0, h, req("hb", "b")), h, "hb");
    let any = NewRequest { any_of: vec![pid("b")], ..req("any", "a") };
    assert!(grants(&s.request(t0, w, any)).is_empty(), "both pools are full: it waits");
    // One listed pool fails fast: the waiter may still be served by the other.
    let d = s.force_breaker(t0, &pid("a"), ForceBreaker::Open, "").unwrap().1;
    assert!(events_of(&d, w).iter().all(|e| !matches!(e, Event::Rejected { .. })), "{:#?}", d.events);
    // Both do: it is refused, with retry info, like a new request would be.
    let d = s.force_breaker(t0, &pid("b"), ForceBreaker::Open, "").unwrap().1;
    let refused = events_of(&d, w).into_iter().find_map(|e| match e {
        Event::Rejected { request_id, error } if request_id == "any" => Some(error),
        _ => None,
    });
    assert!(matches!(refused, Some(Error::BreakerOpen { retry_after: Some(_), .. })), "{:#?}", d.events);
    s.check_invariants(t0);
}
