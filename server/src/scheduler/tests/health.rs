//! Provider health, outcome classes and holds: what each class does to its pool, and how holds keep a
//! slot (Retry-After, the cap, the streak, the release cooldown after the hold).

use super::*;

fn with_health(n: u32, health: HealthConfig) -> PoolConfig {
    PoolConfig { health, adaptive: false, ..limit(n) }
}

/// Grants `id` on `pool` at `now` and returns the lease.
#[track_caller]
fn take(s: &mut Scheduler, now: Instant, session: SessionId, id: &str, pool: &str) -> LeaseId {
    granted(&s.request(now, session, req(id, pool)), session, id)
}

#[test]
fn each_class_follows_its_default_policy() {
    let t0 = Instant::now();
    let pool = PoolConfig { default_retry_after: secs(7), max_agent_retry_after: secs(120), ..limit(1) };
    let mut s = sched(&[("p", pool)], t0);
    let a = s.open_session();

    // ok, error, cancelled: no pause.
    for (i, o) in [Outcome::Ok, Outcome::Error, Outcome::Cancelled].into_iter().enumerate() {
        let l = take(&mut s, t0, a, &format!("r{i}"), "p");
        s.release(t0, a, l, o);
        assert_eq!(pool_snap(&s, "p").paused_until, None, "{o:?} paused");
    }
    // overloaded without Retry-After: the pool's default_retry_after, and no adaptive decrease.
    let l = take(&mut s, t0, a, "o", "p");
    s.release(t0, a, l, Outcome::Overloaded(None));
    let p = pool_snap(&s, "p");
    assert_eq!((p.paused_until, p.effective_limit), (Some(t0 + secs(7)), 1));
    assert!(p.pause_reason.contains("overloaded"), "{}", p.pause_reason);

    // quota_exhausted: the long default pause, cut to max_agent_retry_after, with a clear reason.
    let t1 = t0 + secs(8);
    let l = take(&mut s, t1, a, "q", "p");
    s.release(t1, a, l, Outcome::QuotaExhausted(None));
    let p = pool_snap(&s, "p");
    assert_eq!(p.paused_until, Some(t1 + secs(120)));
    assert!(p.pause_reason.contains("quota exhausted (402)"), "{}", p.pause_reason);
}

#[test]
fn a_class_policy_can_turn_its_pause_off_or_set_its_length() {
    let t0 = Instant::now();
    let mut health = HealthConfig::default();
    health.outcomes.overloaded.pause = false;
    health.outcomes.error = ClassPolicy { pause: true, default_pause: Some(secs(2)), trips_breaker: true };
    let mut s = sched(&[("p", with_health(1, health))], t0);
    let a = s.open_session();
    let l = take(&mut s, t0, a, "o", "p");
    s.release(t0, a, l, Outcome::Overloaded(Some(secs(30))));
    assert_eq!(pool_snap(&s, "p").paused_until, None);
    let l = take(&mut s, t0, a, "e", "p");
    s.release(t0, a, l, Outcome::Error);
    assert_eq!(pool_snap(&s, "p").paused_until, Some(t0 + secs(2)));
}

#[test]
fn a_failure_hold_keeps_the_slot_then_the_release_cooldown_follows() {
    let t0 = Instant::now();
    let health = HealthConfig { failure_hold: secs(2), ..Default::default() };
    let mut s = sched(&[("p", PoolConfig { cooldown: secs(1), ..with_health(1, health) })], t0);
    let (a, b) = (s.open_session(), s.open_session());
    let l = take(&mut s, t0, a, "x", "p");
    assert_only(&s.request(t0, b, req("w", "p")), b, queued("w", 0));

    let d = s.release(t0, a, l, Outcome::Error);
    assert!(grants(&d).is_empty(), "the held slot counts like a lease");
    assert!(
        d.facts.iter().any(
            |f| matches!(f, Fact::Held { kind: HoldKind::Failure, until, .. } if *until == t0 + secs(2))
        )
    );
    let p = pool_snap(&s, "p");
    assert_eq!((p.in_flight, p.held, p.held_until, p.cooling), (0, 1, Some(t0 + secs(2)), 0));
    assert_eq!(s.next_deadline(), Some(t0 + secs(2)));

    // The hold ends: the slot cools down for the pool's cooldown, then the waiter gets it.
    let d = s.tick(t0 + secs(2));
    assert!(grants(&d).is_empty());
    let p = pool_snap(&s, "p");
    assert_eq!((p.held, p.cooling), (0, 1));
    assert_eq!(s.next_deadline(), Some(t0 + secs(3)));
    granted(&s.tick(t0 + secs(3)), b, "w");
    s.check_invariants(t0 + secs(3));
}

#[test]
fn a_cancel_cooldown_holds_after_a_cancellation_only() {
    let t0 = Instant::now();
    let health = HealthConfig { cancel_cooldown: ms(500), ..Default::default() };
    let mut s = sched(&[("p", with_health(1, health))], t0);
    let a = s.open_session();
    let l = take(&mut s, t0, a, "x", "p");
    s.release(t0, a, l, Outcome::Error);
    assert_eq!(pool_snap(&s, "p").held, 0, "an error is not a cancellation");
    let l = take(&mut s, t0, a, "y", "p");
    s.release(t0, a, l, Outcome::Cancelled);
    let p = pool_snap(&s, "p");
    assert_eq!((p.held, p.held_until), (1, Some(t0 + ms(500))));
    assert!(s.tick(t0 + ms(499)).facts.is_empty());
    take(&mut s, t0 + ms(500), a, "z", "p");
}

#[test]
fn a_phantom_hold_respects_retry_after_grows_with_the_streak_and_is_capped() {
    let t0 = Instant::now();
    let health = HealthConfig { phantom_hold: secs(1), phantom_hold_max: secs(10), ..Default::default() };
    let mut health_no_pause = health.clone();
    health_no_pause.outcomes.rate_limited.pause = false;
    health_no_pause.outcomes.overloaded.pause = false;
    let mut s = sched(&[("p", with_health(1, health_no_pause))], t0);
    let a = s.open_session();
    let mut now = t0;
    // Releases with `o` at `now`, returns the hold's length, and moves `now` to its end.
    let hold_after = |s: &mut Scheduler, now: &mut Instant, o: Outcome, id: &str| {
        let l = take(s, *now, a, id, "p");
        s.release(*now, a, l, o);
        let until = pool_snap(s, "p").held_until.expect("held");
        let d = until - *now;
        *now = until;
        s.tick(*now);
        assert_eq!(pool_snap(s, "p").held, 0, "the hold ended at its end");
        d
    };
    // First failure: base·1. Retry-After longer than that wins.
    assert_eq!(hold_after(&mut s, &mut now, Outcome::Error, "e1"), secs(1));
    assert_eq!(hold_after(&mut s, &mut now, Outcome::RateLimited(Some(secs(4))), "r1"), secs(4));
    // Third consecutive failure: base·3 beats a short Retry-After.
    assert_eq!(hold_after(&mut s, &mut now, Outcome::Overloaded(Some(ms(10))), "o1"), secs(3));
    // A huge Retry-After is capped at phantom_hold_max.
    assert_eq!(hold_after(&mut s, &mut now, Outcome::RateLimited(Some(secs(3600))), "r2"), secs(10));
    // A success resets the streak.
    let l = take(&mut s, now, a, "ok", "p");
    s.release(now, a, l, Outcome::Ok);
    assert_eq!(pool_snap(&s, "p").held, 0);
    assert_eq!(hold_after(&mut s, &mut now, Outcome::Error, "e2"), secs(1));
}

#[test]
fn with_both_holds_an_error_keeps_the_longer() {
    let t0 = Instant::now();
    let health = HealthConfig { failure_hold: secs(5), phantom_hold: secs(2), ..Default::default() };
    let mut s = sched(&[("p", with_health(2, health))], t0);
    let a = s.open_session();
    let l = take(&mut s, t0, a, "x", "p");
    let d = s.release(t0, a, l, Outcome::Error);
    assert!(d.facts.iter().any(|f| matches!(f, Fact::Held { kind: HoldKind::Failure, .. })));
    assert_eq!(pool_snap(&s, "p").held_until, Some(t0 + secs(5)));
}

#[test]
fn a_hold_counts_on_every_level_of_the_chain() {
    let t0 = Instant::now();
    let health = HealthConfig { failure_hold: secs(1), ..Default::default() };
    let c = PoolConfig { health, ..child("g", 2) };
    let mut s = sched(&[("g", limit(1)), ("c", c), ("d", child("g", 1))], t0);
    let (a, b) = (s.open_session(), s.open_session());
    let l = take(&mut s, t0, a, "x", "c");
    s.release(t0, a, l, Outcome::Error);
    assert_eq!((pool_snap(&s, "g").held, pool_snap(&s, "c").held), (1, 1));
    // The sibling waits on the parent's held slot.
    assert_only(&s.request(t0, b, req("w", "d")), b, queued("w", 0));
    s.check_invariants(t0);
    granted(&s.tick(t0 + secs(1)), b, "w");
    assert_eq!(pool_snap(&s, "g").held, 0);
}

#[test]
fn removing_a_pool_with_holds_frees_its_ancestors() {
    let t0 = Instant::now();
    let health = HealthConfig { failure_hold: secs(60), ..Default::default() };
    let mut s = sched(&[("g", limit(1)), ("c", PoolConfig { health, ..child("g", 1) })], t0);
    let a = s.open_session();
    let l = take(&mut s, t0, a, "x", "c");
    s.release(t0, a, l, Outcome::Error);
    assert_eq!(pool_snap(&s, "g").held, 1);
    s.delete_pool(t0, &pid("c")).unwrap();
    assert_eq!(pool_snap(&s, "g").held, 0);
    take(&mut s, t0, a, "y", "g");
    assert_eq!(s.next_deadline(), Some(t0 + PoolConfig::DEFAULT_TTL), "only the new lease's expiry is left");
}

#[test]
fn report_outcome_applies_the_class_outside_a_lease() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", limit(2))], t0);
    let (applied, _) =
        s.report_outcome(t0, &pid("p"), Outcome::Overloaded(Some(secs(3))), "529 seen").unwrap();
    assert_eq!(applied.until, t0 + secs(3));
    assert!(pool_snap(&s, "p").pause_reason.contains("overloaded"));
    let before = fingerprint(&s);
    assert!(matches!(s.report_outcome(t0, &pid("p"), Outcome::Error, ""), Err(Error::InvalidArgument(_))));
    assert!(matches!(
        s.report_outcome(t0, &pid("nope"), Outcome::Overloaded(None), ""),
        Err(Error::UnknownPool(_))
    ));
    assert_eq!(fingerprint(&s), before);
}

#[test]
fn health_settings_are_bounded() {
    let name = pid("p");
    let ok = HealthConfig::default();
    assert!(ok.validate(&name).is_ok());
    let too_long = HealthConfig { failure_hold: HealthConfig::MAX_HOLD + ms(1), ..Default::default() };
    assert!(too_long.validate(&name).unwrap_err().contains("failure_hold"));
    let mut b = HealthConfig {
        breaker: BreakerConfig { enabled: true, open_max: ms(1), open_base: secs(1), ..Default::default() },
        ..Default::default()
    };
    assert!(b.validate(&name).is_err());
    b.breaker = BreakerConfig { enabled: true, failures: 0, failure_percent: 0, ..Default::default() };
    assert!(b.validate(&name).is_err());
    b.breaker = BreakerConfig { failure_percent: 101, ..Default::default() };
    assert!(b.validate(&name).is_err());
    b.breaker = BreakerConfig { window: BreakerConfig::MAX_DURATION * 2, ..Default::default() };
    assert!(b.validate(&name).unwrap_err().contains("window"));
    // Through the scheduler: a bad setting is refused as bad input.
    let bad = PoolConfig { health: too_long, ..limit(1) };
    assert!(matches!(
        Scheduler::new(cfg(), pools(&[("p", bad)]), Instant::now()),
        Err(Error::InvalidArgument(_))
    ));
}
