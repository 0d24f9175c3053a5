//! Extreme durations: every pool duration has a documented maximum, refused above it on every path
//! (new scheduler, reload, upsert); at the maxima, and with extreme values from agents and operators,
//! nothing overflows and the pool keeps granting.

use super::*;

/// Sets one duration of a pool's settings.
type Setter = fn(&mut PoolConfig, Duration);

/// Every bounded pool duration, with a setter and its documented maximum.
fn bounded_fields() -> Vec<(&'static str, Setter, Duration)> {
    vec![
        ("max_ttl", |c, d| c.max_ttl = d, PoolConfig::MAX_TTL_LIMIT),
        ("cooldown", |c, d| c.cooldown = d, PoolConfig::MAX_COOLDOWN),
        ("max_wait", |c, d| c.max_wait = Some(d), PoolConfig::MAX_WAIT_LIMIT),
        ("default_retry_after", |c, d| c.default_retry_after = d, PoolConfig::MAX_RETRY_AFTER),
        ("headroom_recovery", |c, d| c.headroom_recovery = d, PoolConfig::MAX_HEADROOM_RECOVERY),
    ]
}

/// The value: `9223372036854775807s`.
const I64_MAX_SECS: Duration = Duration::from_secs(i64::MAX as u64);

#[test]
fn pool_durations_above_their_maximum_are_refused_on_every_path() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", limit(2))], t0);
    let x = s.open_session();
    granted(&s.request(t0, x, req("h", "p")), x, "h");
    let before = fingerprint(&s);
    for (field, set, max) in bounded_fields() {
        for bad in [max + Duration::from_nanos(1), I64_MAX_SECS, Duration::from_secs(u64::MAX), Duration::MAX]
        {
            let mut pc = limit(2);
            set(&mut pc, bad);
            let err = pc.validate(&pid("p")).unwrap_err();
            assert!(err.contains(field) && err.contains("above the maximum"), "{field}: {err}");
            assert!(Scheduler::new(cfg(), pools(&[("p", pc.clone())]), t0).is_err(), "{field}");
            assert!(s.set_pools(t0, pools(&[("p", pc.clone())])).is_err(), "{field}");
            let patch = PoolPatch {
                max_ttl: (field == "max_ttl").then_some(bad),
                cooldown: (field == "cooldown").then_some(bad),
                max_wait: (field == "max_wait").then_some(Some(bad)),
                default_retry_after: (field == "default_retry_after").then_some(bad),
                headroom_recovery: (field == "headroom_recovery").then_some(bad),
                ..PoolPatch::default()
            };
            for pool in ["p", "new"] {
                let e = s.upsert_pool(t0, pid(pool), &patch, 10).unwrap_err();
                assert!(matches!(&e, Error::InvalidArgument(m) if m.contains(field)), "{field}: {e}");
            }
            assert_eq!(fingerprint(&s), before, "a refused {field} changed the state");
        }
        // The maximum itself is accepted.
        let mut pc = limit(2);
        set(&mut pc, max);
        if field == "max_ttl" {
            pc.default_ttl = secs(1);
        }
        pc.validate(&pid("p")).unwrap_or_else(|e| panic!("{field} at its maximum: {e}"));
    }
}

/// The scenario in the core, at the largest accepted values: a release and a 429 report on a
/// pool whose cooldown and headroom recovery are at their maxima, then extreme values from agents
/// (ttl, max_wait, retry_after, grace) and operators. Nothing panics, invariants hold, and once the
/// timers have run the pool grants again.
#[test]
fn the_largest_accepted_durations_never_overflow_and_the_pool_recovers() {
    let t0 = Instant::now();
    let pc = PoolConfig {
        cooldown: PoolConfig::MAX_COOLDOWN,
        headroom_recovery: PoolConfig::MAX_HEADROOM_RECOVERY,
        default_retry_after: PoolConfig::MAX_RETRY_AFTER,
        max_ttl: PoolConfig::MAX_TTL_LIMIT,
        default_ttl: PoolConfig::MAX_TTL_LIMIT,
        max_wait: Some(PoolConfig::MAX_WAIT_LIMIT),
        max_agent_retry_after: SchedulerConfig::MAX_PAUSE,
        ..limit(2)
    };
    let mut s = sched(&[("p", pc)], t0);
    let x = s.open_session();
    let a = granted(&s.request(t0, x, req("a", "p")), x, "a");
    let b = granted(&s.request(t0, x, req("b", "p")), x, "b");
    s.check_invariants(t0);
    // A release (cooldown) and a 429 with the largest retry_after there is (clamped to MAX_PAUSE).
    s.release(t0, x, a, Outcome::Ok);
    s.release(t0, x, b, Outcome::RateLimited(Some(Duration::MAX)));
    let (applied, _) = s.report_rate_limit(t0, &pid("p"), Some(Duration::MAX), "huge").unwrap();
    assert_eq!(applied.until, t0 + SchedulerConfig::MAX_PAUSE);
    s.check_invariants(t0);
    // Requests with extreme TTLs are refused; extreme waits are clamped.
    for ttl in [Duration::ZERO, I64_MAX_SECS, Duration::MAX] {
        let d = s.request(t0, x, NewRequest { ttl: Some(ttl), ..req("t", "p") });
        assert!(matches!(&d.events[..], [(_, Event::Rejected { error: Error::InvalidTtl { .. }, .. })]));
    }
    let d = s.request(t0, x, NewRequest { max_wait: Some(Duration::MAX), ..req("w", "p") });
    assert!(matches!(&d.events[0], (_, Event::Queued { .. })), "{:#?}", d.events);
    let d = s.request(t0, x, NewRequest { max_wait: Some(Duration::from_nanos(1)), ..req("n", "p") });
    assert!(matches!(&d.events[0], (_, Event::Queued { .. })), "{:#?}", d.events);
    // An operator pause is bounded: out of range is refused and changes nothing.
    let before = fingerprint(&s);
    for bad in [Duration::ZERO, SchedulerConfig::MAX_PAUSE + Duration::from_nanos(1), Duration::MAX] {
        assert!(matches!(s.pause_pool(t0, &pid("p"), bad, "x"), Err(Error::InvalidArgument(_))));
        assert_eq!(fingerprint(&s), before);
    }
    s.pause_pool(t0, &pid("p"), SchedulerConfig::MAX_PAUSE, "max").unwrap();
    s.check_invariants(t0);
    // A stream closed with the largest grace keeps nothing beyond its leases' expiry.
    let y = s.open_session();
    s.close_session(t0, y, Duration::MAX);

    // Every timer runs out within the pause, the cooldown and a step of headroom recovery.
    let later = t0 + SchedulerConfig::MAX_PAUSE + PoolConfig::MAX_HEADROOM_RECOVERY + secs(1);
    let d = s.tick(later);
    s.check_invariants(later);
    assert_eq!(grants(&d), [(x, "w".to_owned())], "the waiter with the clamped max_wait is served");
    let p = pool_snap(&s, "p");
    assert_eq!((p.effective_limit, p.cooling, p.paused_until), (2, 0, None), "{p:?}");
    assert!(s.next_deadline().is_some_and(|t| t > later));
}
