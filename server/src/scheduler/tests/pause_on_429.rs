//! 429 handling: pauses (never shortened, fan-out of Paused/Resumed) and adaptive headroom.

use super::*;

fn paused(pool: &str, until: Instant) -> impl Fn(&Event) -> bool {
    let pool = pid(pool);
    move |e| matches!(e, Event::Paused { pool: p, until: u, .. } if *p == pool && *u == until)
}

#[test]
fn a_429_pauses_the_pool_and_its_descendants_until_the_latest_end() {
    let t0 = Instant::now();
    let fixed = |c: PoolConfig| PoolConfig { adaptive: false, default_retry_after: secs(3), ..c };
    let mut s = sched(&[("p", fixed(limit(2))), ("c", fixed(child("p", 2)))], t0);
    let releaser = s.open_session();
    let holder = s.open_session();
    let waiter = s.open_session();
    let bystander = s.open_session();
    let l = granted(&s.request(t0, releaser, req("x", "p")), releaser, "x");
    let held = granted(&s.request(t0, holder, req("y", "c")), holder, "y");
    assert_only(&s.request(t0, waiter, req("w", "c")), waiter, queued("w", 0));
    s.open_session();

    // Release with a 429: the slot is free but nothing is granted; everyone on `p` or below hears.
    let t1 = t0 + secs(1);
    let d = s.release(t1, releaser, l, Outcome::RateLimited(Some(secs(5))));
    assert_eq!(
        d.events[0],
        (
            releaser,
            Event::Released { lease_id: l, pool: pid("p"), outcome: Outcome::RateLimited(Some(secs(5))) }
        )
    );
    assert!(grants(&d).is_empty());
    let told: Vec<SessionId> = d.events[1..].iter().map(|(s, _)| *s).collect();
    assert_eq!(told, vec![holder, waiter]);
    assert!(d.events[1..].iter().all(|(_, e)| paused("p", t1 + secs(5))(e)));
    assert!(events_of(&d, bystander).is_empty());
    let p = pool_snap(&s, "p");
    assert_eq!((p.paused_until, p.in_flight), (Some(t1 + secs(5)), 1));
    assert!(p.pause_reason.contains("429"), "{}", p.pause_reason);
    s.check_invariants(t1);

    // A newcomer with room on every level still waits, and is told about the pause right away.
    let d = s.request(t1, bystander, req("n", "c"));
    assert_eq!(d.events.len(), 2, "{:#?}", d.events);
    assert_eq!(ungated(&d.events)[0], (bystander, queued("n", 1)));
    assert!(paused("p", t1 + secs(5))(&d.events[1].1) && d.events[1].0 == bystander);
    // A shorter retry_after never shortens the pause and tells nobody.
    let (applied, d) = s.report_rate_limit(t0 + secs(2), &pid("p"), Some(secs(1)), "").unwrap();
    assert_eq!(applied.until, t1 + secs(5));
    assert!(d.events.is_empty(), "{:#?}", d.events);
    // A longer one extends it and tells everyone again.
    let t3 = t0 + secs(3);
    let (applied, d) = s.report_rate_limit(t3, &pid("p"), Some(secs(10)), "upstream said so").unwrap();
    assert_eq!(applied.until, t3 + secs(10));
    assert_eq!(d.events.len(), 3);
    assert!(d.events.iter().all(|(_, e)| paused("p", t3 + secs(10))(e)));
    assert!(pool_snap(&s, "p").pause_reason.contains("upstream said so"));
    assert_eq!(s.next_deadline(), Some(t3 + secs(10)));
    s.check_invariants(t3);

    assert!(s.tick(t3 + secs(10) - ms(1)).events.is_empty());
    let t4 = t3 + secs(10);
    let d = s.tick(t4);
    let resumed = Event::Resumed { pool: pid("p") };
    assert_eq!(&d.events[..3], &[(holder, resumed.clone()), (waiter, resumed.clone()), (bystander, resumed)]);
    assert_eq!(grants(&d), vec![(waiter, "w".to_owned())], "one free slot, to the first waiter");
    assert_eq!(pool_snap(&s, "p").paused_until, None);
    s.check_invariants(t4);

    // No retry_after: the pool's default. The lease was on `c`, so `c` pauses (not `p`), and its
    // holder and waiter hear of it.
    let d = s.release(t4, holder, held, Outcome::RateLimited(None));
    assert_eq!(d.events.len(), 3, "{:#?}", d.events);
    assert!(d.events[1..].iter().all(|(_, e)| paused("c", t4 + secs(3))(e)));
    assert_eq!(pool_snap(&s, "c").paused_until, Some(t4 + secs(3)));
    assert_eq!(pool_snap(&s, "p").paused_until, None);
}

#[test]
fn a_child_pause_leaves_parent_and_siblings_alone() {
    let t0 = Instant::now();
    let mut s = sched(&[("g", limit(3)), ("a", child("g", 1)), ("b", child("g", 1))], t0);
    let x = s.open_session();
    let y = s.open_session();
    // y holds b, which stays usable while its sibling is paused.
    granted(&s.request(t0, y, req("wb", "b")), y, "wb");
    let (applied, d) = s.report_rate_limit(t0, &pid("a"), Some(secs(5)), "").unwrap();
    assert_eq!(applied.until, t0 + secs(5));
    assert!(d.events.is_empty(), "nobody waits on or holds a: {:#?}", d.events);
    assert_queued_in_pause(&s.request(t0, x, req("a1", "a")), x, queued("a1", 0), "a", t0 + secs(5));
    granted(&s.request(t0, x, req("g1", "g")), x, "g1");
    s.check_invariants(t0);
    assert_eq!(pool_snap(&s, "g").paused_until, None);
    assert_eq!(pool_snap(&s, "b").paused_until, None);

    // The waiter hears Resumed and gets its slot when the pause ends.
    let d = s.tick(t0 + secs(5));
    assert_eq!(d.events[0], (x, Event::Resumed { pool: pid("a") }));
    granted(&d, x, "a1");
}

#[test]
fn a_wait_that_times_out_during_a_pause_says_how_long_the_pause_lasts() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", limit(1))], t0);
    let x = s.open_session();
    s.report_rate_limit(t0, &pid("p"), Some(secs(10)), "").unwrap();
    let d = s.request(t0, x, NewRequest { max_wait: Some(secs(1)), ..req("w", "p") });
    assert_queued_in_pause(&d, x, queued("w", 0), "p", t0 + secs(10));
    let d = s.tick(t0 + secs(1));
    let err = Error::WaitTimeout { pool: pid("p"), waited: secs(1), retry_after: Some(secs(9)) };
    assert_eq!(err.retry_after(), Some(secs(9)));
    assert_only(&d, x, rejected("w", err));
    assert_eq!(s.waiter_count(), 0);
    s.check_invariants(t0 + secs(1));
}

#[test]
fn adaptive_headroom_drops_once_per_episode_and_recovers_stepwise() {
    let t0 = Instant::now();
    let mut s = sched(
        &[(
            "p",
            PoolConfig {
                adaptive: true,
                headroom_recovery: secs(10),
                default_retry_after: secs(1),
                ..limit(3)
            },
        )],
        t0,
    );
    let p = pid("p");
    let eff = |s: &Scheduler| pool_snap(s, "p").effective_limit;
    assert_eq!(eff(&s), 3);

    let (a, _) = s.report_rate_limit(t0, &p, None, "").unwrap();
    assert_eq!((a.until, a.effective_limit, eff(&s)), (t0 + secs(1), 2, 2));
    // Same episode: no second drop, though the pause is extended.
    let (a, _) = s.report_rate_limit(t0 + ms(500), &p, None, "").unwrap();
    assert_eq!((a.until, a.effective_limit), (t0 + ms(1500), 2));
    // A new episode after the pause ended.
    let (a, _) = s.report_rate_limit(t0 + secs(2), &p, None, "").unwrap();
    assert_eq!((a.until, a.effective_limit), (t0 + secs(3), 1));
    // Floor 1.
    let (a, _) = s.report_rate_limit(t0 + secs(4), &p, None, "").unwrap();
    assert_eq!((a.until, a.effective_limit), (t0 + secs(5), 1));

    // The reduced limit holds grants back.
    let x = s.open_session();
    s.tick(t0 + secs(5));
    granted(&s.request(t0 + secs(5), x, req("r1", "p")), x, "r1");
    assert_only(&s.request(t0 + secs(5), x, req("r2", "p")), x, queued("r2", 0));
    assert_only(&s.request(t0 + secs(5), x, req("r3", "p")), x, queued("r3", 1));

    // One step per headroom_recovery after the pause end (t0+5s), each step granting at once.
    assert_eq!(s.next_deadline(), Some(t0 + secs(15)));
    assert!(s.tick(t0 + secs(15) - ms(1)).events.is_empty());
    assert_eq!(eff(&s), 1);
    let d = s.tick(t0 + secs(15));
    assert_eq!((eff(&s), grants(&d)), (2, vec![(x, "r2".to_owned())]));
    s.check_invariants(t0 + secs(15));
    let d = s.tick(t0 + secs(25));
    assert_eq!((eff(&s), grants(&d)), (3, vec![(x, "r3".to_owned())]));
    // Never above the configured limit.
    s.heartbeat(t0 + secs(25), x, &[]);
    s.tick(t0 + secs(50));
    assert_eq!(eff(&s), 3);
    assert_eq!(s.next_deadline().map(|d| d > t0 + secs(50)), Some(true));
    assert_within_limits(&s);
    s.check_invariants(t0 + secs(50));
}

#[test]
fn adaptive_recovery_catches_up_over_a_long_gap() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", PoolConfig { headroom_recovery: secs(10), ..limit(4) })], t0);
    let p = pid("p");
    for i in 0..3u64 {
        // Three separate episodes, closer together than one recovery step.
        s.report_rate_limit(t0 + secs(2 * i), &p, Some(secs(1)), "").unwrap();
    }
    assert_eq!(pool_snap(&s, "p").effective_limit, 1);
    // The last pause ended at t0+5s: steps at 15, 25 and 35 s; one late tick applies all due.
    s.tick(t0 + secs(34));
    assert_eq!(pool_snap(&s, "p").effective_limit, 3);
    s.tick(t0 + secs(1000));
    assert_eq!(pool_snap(&s, "p").effective_limit, 4);
}

#[test]
fn a_non_adaptive_pool_keeps_its_limit() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", PoolConfig { adaptive: false, ..limit(3) })], t0);
    let (a, _) = s.report_rate_limit(t0, &pid("p"), None, "").unwrap();
    assert_eq!((a.until, a.effective_limit), (t0 + PoolConfig::DEFAULT_RETRY_AFTER, 3));
    assert_eq!(s.report_rate_limit(t0, &pid("nope"), None, "").unwrap_err(), Error::UnknownPool(pid("nope")));
}

/// `retry_after = 0` counts as a 429 (adaptive drop) but pauses nothing (regression: it recorded a
/// pause ending `now`, announced `Paused` and left a timer already due, which then said `Resumed`).
#[test]
fn a_zero_retry_after_lowers_headroom_but_pauses_nothing() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", limit(2))], t0);
    let x = s.open_session();
    let l = granted(&s.request(t0, x, req("a", "p")), x, "a");
    let d = s.release(t0, x, l, Outcome::RateLimited(Some(Duration::ZERO)));
    assert_only(
        &d,
        x,
        Event::Released { lease_id: l, pool: pid("p"), outcome: Outcome::RateLimited(Some(Duration::ZERO)) },
    );
    let p = pool_snap(&s, "p");
    assert_eq!((p.paused_until, p.effective_limit), (None, 1));
    assert_eq!(s.next_deadline(), Some(t0 + PoolConfig::DEFAULT_HEADROOM_RECOVERY));
    assert!(s.tick(t0).events.is_empty());
    granted(&s.request(t0, x, req("b", "p")), x, "b");
    let (applied, d) = s.report_rate_limit(t0, &pid("p"), Some(Duration::ZERO), "").unwrap();
    assert_eq!(applied.until, t0);
    assert!(d.events.is_empty(), "{:#?}", d.events);
    s.check_invariants(t0);
}

/// Every agent holds the same token, so one report naming a day must not stop a pool for a day: an
/// agent's 429 (report or rate-limited release) pauses for at most the pool's `max_agent_retry_after`.
#[test]
fn an_agents_429_pauses_for_at_most_max_agent_retry_after() {
    let t0 = Instant::now();
    let capped = PoolConfig { max_agent_retry_after: secs(60), ..limit(2) };
    let mut s = sched(&[("p", capped.clone()), ("q", PoolConfig::with_limit(2))], t0);
    let (a, _) = s.report_rate_limit(t0, &pid("p"), Some(secs(24 * 3600)), "").unwrap();
    assert_eq!(a.until, t0 + secs(60));
    // A release with a huge Retry-After is capped alike; it extends the pause to its own capped end.
    let x = s.open_session();
    let t1 = t0 + secs(100);
    let l = granted(&s.request(t1, x, req("a", "p")), x, "a");
    s.release(t1, x, l, Outcome::RateLimited(Some(secs(3600))));
    assert_eq!(pool_snap(&s, "p").paused_until, Some(t1 + secs(60)));
    // A shorter Retry-After than the cap is taken as it is.
    let (a, _) = s.report_rate_limit(t1 + secs(100), &pid("p"), Some(secs(5)), "").unwrap();
    assert_eq!(a.until, t1 + secs(105));
    // The default cap applies where none is set.
    let (a, _) = s.report_rate_limit(t0, &pid("q"), Some(secs(24 * 3600)), "").unwrap();
    assert_eq!(a.until, t0 + PoolConfig::DEFAULT_MAX_AGENT_RETRY_AFTER);
    s.check_invariants(t1 + secs(100));
}

/// An operator's pause is not capped by `max_agent_retry_after`, and an agent's shorter report never
/// shortens it.
#[test]
fn an_operators_pause_is_not_capped() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", PoolConfig { max_agent_retry_after: secs(60), ..limit(2) })], t0);
    let (until, _) = s.pause_pool(t0, &pid("p"), secs(3600), "maintenance").unwrap();
    assert_eq!(until, t0 + secs(3600));
    let (a, _) = s.report_rate_limit(t0 + secs(1), &pid("p"), Some(secs(7200)), "").unwrap();
    assert_eq!(a.until, t0 + secs(3600), "an agent's report neither extends past its cap nor shortens");
}

/// A zero cap: agents' reports still lower the effective limit, but pause nothing.
#[test]
fn a_zero_cap_lets_reports_lower_headroom_without_pausing() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", PoolConfig { max_agent_retry_after: Duration::ZERO, ..limit(3) })], t0);
    let (a, d) = s.report_rate_limit(t0, &pid("p"), Some(secs(30)), "").unwrap();
    assert_eq!((a.until, a.effective_limit), (t0, 2));
    assert!(d.events.is_empty(), "{:#?}", d.events);
    assert_eq!(pool_snap(&s, "p").paused_until, None);
    s.check_invariants(t0);
}

/// The cap is validated with the other settings: above the longest pause it is refused.
#[test]
fn max_agent_retry_after_above_the_longest_pause_is_refused() {
    let t0 = Instant::now();
    let too_long = PoolConfig { max_agent_retry_after: SchedulerConfig::MAX_PAUSE + secs(1), ..limit(1) };
    let e = Scheduler::new(cfg(), pools(&[("p", too_long)]), t0).unwrap_err();
    assert!(e.to_string().contains("max_agent_retry_after"), "{e}");
    let mut s = sched(&[("p", limit(1))], t0);
    let patch =
        PoolPatch { max_agent_retry_after: Some(SchedulerConfig::MAX_PAUSE + secs(1)), ..Default::default() };
    assert!(s.upsert_pool(t0, pid("p"), &patch, 10).is_err());
    let patch = PoolPatch { max_agent_retry_after: Some(secs(1)), ..Default::default() };
    s.upsert_pool(t0, pid("p"), &patch, 10).unwrap();
    let (a, _) = s.report_rate_limit(t0, &pid("p"), Some(secs(30)), "").unwrap();
    assert_eq!(a.until, t0 + secs(1));
}

#[test]
fn a_pool_shows_the_ancestor_pause_that_blocks_it() {
    let t0 = Instant::now();
    let mut s = sched(&[("g", limit(4)), ("p", child("g", 3)), ("c", child("p", 2)), ("o", limit(1))], t0);
    assert_eq!(pool_snap(&s, "c").blocked_by, None);

    s.pause_pool(t0, &pid("g"), secs(30), "incident").unwrap();
    // Every descendant shows the root's pause; the root itself is paused, not blocked.
    for pool in ["p", "c"] {
        let b = pool_snap(&s, pool).blocked_by.expect("blocked by g");
        assert_eq!((b.pool.as_str(), b.until), ("g", t0 + secs(30)), "{pool}");
        assert!(b.reason.contains("incident"), "{}", b.reason);
        assert_eq!(pool_snap(&s, pool).paused_until, None, "{pool} is not paused itself");
    }
    assert_eq!(pool_snap(&s, "g").blocked_by, None);
    assert_eq!(pool_snap(&s, "o").blocked_by, None, "another tree is not blocked");

    // With two paused ancestors, the one whose pause ends last; the pool's own pause is not one.
    s.report_rate_limit(t0, &pid("p"), Some(secs(60)), "").unwrap();
    s.report_rate_limit(t0, &pid("c"), Some(secs(90)), "").unwrap();
    let b = pool_snap(&s, "c").blocked_by.expect("blocked");
    assert_eq!((b.pool.as_str(), b.until), ("p", t0 + secs(60)));
    assert_eq!(pool_snap(&s, "p").blocked_by.map(|b| b.pool), Some(pid("g")));

    // Pauses end on the clock: then the next one shows, then none.
    s.tick(t0 + secs(30));
    assert_eq!(pool_snap(&s, "p").blocked_by, None);
    assert_eq!(pool_snap(&s, "c").blocked_by.map(|b| b.pool), Some(pid("p")));
    s.tick(t0 + secs(60));
    assert_eq!(pool_snap(&s, "c").blocked_by, None);
    assert_eq!(pool_snap(&s, "c").paused_until, Some(t0 + secs(90)));
}
