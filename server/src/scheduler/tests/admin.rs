//! Operator operations: manual pause and resume, revoke, drain, upsert and delete of single pools,
//! and the facts that metrics, Watch and logs read.

use super::*;

fn paused_event(e: &Event, pool: &str, until: Instant) -> bool {
    matches!(e, Event::Paused { pool: p, until: u, .. } if *p == pid(pool) && *u == until)
}

#[test]
fn a_manual_pause_fans_out_like_a_429_but_keeps_the_effective_limit() {
    let t0 = Instant::now();
    let mut s = sched(&[("g", limit(3)), ("c", child("g", 2))], t0);
    let holder = s.open_session();
    let waiter = s.open_session();
    let bystander = s.open_session();
    granted(&s.request(t0, holder, req("h", "c")), holder, "h");
    s.request(t0, waiter, req("x", "g"));
    // Fill g so the waiter queues.
    granted(&s.request(t0, waiter, req("y", "g")), waiter, "y");
    assert_only(&s.request(t0, waiter, req("w", "g")), waiter, queued("w", 0));

    let t1 = t0 + secs(1);
    let (until, d) = s.pause_pool(t1, &pid("g"), secs(5), "maintenance").unwrap();
    assert_eq!(until, t1 + secs(5));
    let told: Vec<SessionId> = d.events.iter().map(|(s, _)| *s).collect();
    assert_eq!(told, vec![holder, waiter], "everyone on g or below, nobody else");
    assert!(d.events.iter().all(|(_, e)| paused_event(e, "g", until)));
    assert!(events_of(&d, bystander).is_empty());
    let g = pool_snap(&s, "g");
    assert_eq!((g.effective_limit, g.paused_until), (3, Some(until)), "no adaptive decrease");
    assert!(g.pause_reason.contains("operator") && g.pause_reason.contains("maintenance"));
    assert_eq!(s.next_deadline(), Some(until));
    s.check_invariants(t1);

    // A shorter pause never shortens it and tells nobody.
    let (again, d) = s.pause_pool(t1, &pid("g"), secs(1), "").unwrap();
    assert_eq!(again, until);
    assert!(d.events.is_empty(), "{:#?}", d.events);
}

#[test]
fn resume_ends_the_pause_now_and_grants() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", limit(1))], t0);
    let x = s.open_session();
    s.pause_pool(t0, &pid("p"), secs(60), "").unwrap();
    let d = s.request(t0, x, req("w", "p"));
    assert_queued_in_pause(&d, x, queued("w", 0), "p", t0 + secs(60));

    let t1 = t0 + secs(1);
    let (was, d) = s.resume_pool(t1, &pid("p")).unwrap();
    assert!(was);
    assert_eq!(d.events[0], (x, Event::Resumed { pool: pid("p") }));
    assert_eq!(grants(&d), vec![(x, "w".to_owned())]);
    assert_eq!(pool_snap(&s, "p").paused_until, None);
    assert_eq!(pool_snap(&s, "p").pause_reason.as_ref(), "");
    s.check_invariants(t1);

    let (was, d) = s.resume_pool(t1, &pid("p")).unwrap();
    assert!(!was && d.events.is_empty(), "{:#?}", d.events);
}

#[test]
fn resume_keeps_adaptive_headroom() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", limit(4))], t0);
    let (applied, _) = s.report_rate_limit(t0, &pid("p"), Some(secs(5)), "").unwrap();
    assert_eq!(applied.effective_limit, 3);
    s.resume_pool(t0 + secs(1), &pid("p")).unwrap();
    assert_eq!(pool_snap(&s, "p").effective_limit, 3, "the provider's signal still stands");
}

#[test]
fn revoke_expires_the_holder_and_frees_the_slot() {
    let t0 = Instant::now();
    let mut s = sched(&[("g", limit(1)), ("c", child("g", 1))], t0);
    let holder = s.open_session();
    let waiter = s.open_session();
    let l = granted(&s.request(t0, holder, req("h", "c")), holder, "h");
    assert_only(&s.request(t0, waiter, req("w", "c")), waiter, queued("w", 0));

    let t1 = t0 + ms(5);
    let (lease, d) = s.revoke(t1, l).unwrap();
    assert_eq!((lease.id, lease.pool.clone()), (l, pid("c")));
    assert_eq!(
        d.events[0],
        (holder, Event::Expired { lease_id: l, pool: pid("c"), reason: ExpiryReason::Revoked })
    );
    assert_eq!(grants(&d), vec![(waiter, "w".to_owned())]);
    assert_eq!(load(&s, "g"), (1, 0));
    s.check_invariants(t1);

    // The holder's late release gets a clear answer, and a second revoke too.
    let d = s.release(t1, holder, l, Outcome::Ok);
    assert_only(&d, holder, lease_error(l, Error::LeaseEnded { id: l, how: "revoked" }));
    assert_eq!(s.revoke(t1, l).unwrap_err(), Error::LeaseEnded { id: l, how: "revoked" });
}

#[test]
fn revoking_an_unknown_lease_changes_nothing() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", limit(1))], t0);
    let x = s.open_session();
    let l = granted(&s.request(t0, x, req("h", "p")), x, "h");
    let before = fingerprint(&s);
    // Even at an instant where the held lease would expire: a refusal runs no timers.
    let late = t0 + secs(3600);
    assert_eq!(s.revoke(late, LeaseId(7)).unwrap_err(), Error::UnknownLease(LeaseId(7)));
    assert_eq!(fingerprint(&s), before);
    assert_eq!(s.lease_count(), 1);
    let _ = l;
}

#[test]
fn drain_stops_grants_keeps_waiters_and_undrain_grants_them() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", limit(2))], t0);
    let x = s.open_session();
    let l = granted(&s.request(t0, x, req("a", "p")), x, "a");
    assert!(s.set_draining(t0, true).events.is_empty());
    assert!(s.is_draining() && s.snapshot(None).unwrap().draining);

    // Room on the pool, but neither the fast path nor the queue grants.
    assert_only(&s.request(t0, x, req("b", "p")), x, queued("b", 0));
    let d = s.release(t0 + ms(1), x, l, Outcome::Ok);
    assert_only(&d, x, Event::Released { lease_id: l, pool: pid("p"), outcome: Outcome::Ok });
    assert_eq!((s.lease_count(), s.waiter_count()), (0, 1));
    s.check_invariants(t0 + ms(1));

    let d = s.set_draining(t0 + ms(2), false);
    assert_eq!(grants(&d), vec![(x, "b".to_owned())]);
    assert!(!s.is_draining());
    s.check_invariants(t0 + ms(2));
}

#[test]
fn upsert_creates_and_patches_through_set_pools() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", limit(1))], t0);
    let x = s.open_session();
    granted(&s.request(t0, x, req("h", "p")), x, "h");
    assert_only(&s.request(t0, x, req("w", "p")), x, queued("w", 0));

    // Raising the limit grants the waiter; other settings are kept.
    let patch = PoolPatch { max_concurrent: Some(2), ..Default::default() };
    let (created, d) = s.upsert_pool(t0, pid("p"), &patch, 10).unwrap();
    assert!(!created);
    assert_eq!(grants(&d), vec![(x, "w".to_owned())]);
    assert_eq!(s.pool_configs()[&pid("p")], limit(2));

    // Lowering it revokes nothing.
    let patch = PoolPatch { max_concurrent: Some(1), ..Default::default() };
    let (_, d) = s.upsert_pool(t0, pid("p"), &patch, 10).unwrap();
    assert!(d.events.is_empty(), "{:#?}", d.events);
    assert_eq!(load(&s, "p"), (2, 0));

    // A new child takes defaults for what is unset.
    let patch = PoolPatch {
        max_concurrent: Some(3),
        parent: Some(Some(pid("p"))),
        cooldown: Some(ms(100)),
        ..Default::default()
    };
    let (created, _) = s.upsert_pool(t0, pid("c"), &patch, 10).unwrap();
    assert!(created);
    let c = &s.pool_configs()[&pid("c")];
    assert_eq!((c.max_concurrent, c.parent.clone(), c.cooldown), (3, Some(pid("p")), ms(100)));
    assert_eq!(c.default_ttl, PoolConfig::DEFAULT_TTL);
    // Making it a root again.
    let patch = PoolPatch { parent: Some(None), ..Default::default() };
    s.upsert_pool(t0, pid("c"), &patch, 10).unwrap();
    assert_eq!(s.pool_configs()[&pid("c")].parent, None);
    s.check_invariants(t0);
}

#[test]
fn bad_upserts_change_nothing() {
    let t0 = Instant::now();
    let mut s = sched(&[("a", limit(1)), ("b", child("a", 1))], t0);
    let before = fingerprint(&s);
    let bad = |n| PoolPatch { max_concurrent: Some(n), ..Default::default() };
    for n in [0, 10_001] {
        let err = s.upsert_pool(t0, pid("a"), &bad(n), 10).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(ref m) if m.contains("max_concurrent")), "{err}");
    }
    let cycle = PoolPatch { parent: Some(Some(pid("b"))), ..Default::default() };
    let err = s.upsert_pool(t0, pid("a"), &cycle, 10).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(ref m) if m.contains("cycle")), "{err}");
    let orphan = PoolPatch { parent: Some(Some(pid("nope"))), ..Default::default() };
    let err = s.upsert_pool(t0, pid("n"), &orphan, 10).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(ref m) if m.contains("does not exist")), "{err}");
    let err = s.upsert_pool(t0, pid("n"), &PoolPatch::default(), 2).unwrap_err();
    assert!(matches!(err, Error::LimitExceeded(_)), "{err}");
    // At the bound, an existing pool can still change.
    s.upsert_pool(t0, pid("a"), &bad(1), 2).unwrap();
    assert_eq!(fingerprint(&s), before);
}

#[test]
fn delete_rejects_waiters_expires_leases_and_refuses_parents() {
    let t0 = Instant::now();
    let mut s = sched(&[("g", limit(5)), ("c", child("g", 1))], t0);
    let x = s.open_session();
    let l = granted(&s.request(t0, x, req("h", "c")), x, "h");
    assert_only(&s.request(t0, x, req("w", "c")), x, queued("w", 0));

    let before = fingerprint(&s);
    let err = s.delete_pool(t0, &pid("g")).unwrap_err();
    assert_eq!(err, Error::PoolHasChildren { pool: pid("g"), children: "c".into() });
    assert_eq!(s.delete_pool(t0, &pid("zz")).unwrap_err(), Error::UnknownPool(pid("zz")));
    assert_eq!(fingerprint(&s), before);

    let (done, d) = s.delete_pool(t0, &pid("c")).unwrap();
    assert_eq!(done, PoolDeleted { rejected_waiters: 1, expired_leases: 1 });
    assert!(events_of(&d, x).contains(&rejected("w", Error::PoolRemoved(pid("c")))));
    assert!(events_of(&d, x).contains(&Event::Expired {
        lease_id: l,
        pool: pid("c"),
        reason: ExpiryReason::PoolRemoved
    }));
    assert_eq!(load(&s, "g"), (0, 0));
    assert!(s.snapshot(Some(&pid("c"))).is_err());
    s.check_invariants(t0);
    // Now g has no children.
    s.delete_pool(t0, &pid("g")).unwrap();
    assert!(s.pool_configs().is_empty());
}

#[test]
fn facts_tell_grants_ends_pauses_and_limit_moves_once() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", limit(2))], t0);
    let x = s.open_session();
    let d = s.request(t0, x, req("a", "p"));
    let a = granted(&d, x, "a");
    assert!(
        matches!(&d.facts[..], [Fact::Granted { lease, waited, probe: false }] if lease.id == a && waited.is_zero())
    );

    let d = s.request(t0, x, req("b", "p"));
    let b = granted(&d, x, "b");
    assert!(matches!(&d.facts[..], [Fact::Granted { lease, .. }] if lease.id == b && lease.pool == pid("p")));
    let d = s.release(t0, x, a, Outcome::RateLimited(Some(secs(1))));
    assert!(matches!(
        &d.facts[0],
        Fact::Ended { lease, end: LeaseEnd::Released(Outcome::RateLimited(_)) } if lease.id == a
    ));
    assert!(matches!(&d.facts[1], Fact::Effective { pool, limit: 1 } if *pool == pid("p")));
    assert!(
        matches!(&d.facts[2], Fact::Paused { pool, until, extended: true, .. } if *pool == pid("p") && *until == t0 + secs(1))
    );
    // The pause of a pool nobody else cares about is still a fact.
    let d = s.tick(t0 + secs(1));
    assert!(matches!(&d.facts[..], [Fact::Resumed { pool }] if *pool == pid("p")), "{:#?}", d.facts);
    let (_, d) = s.revoke(t0 + secs(1), b).unwrap();
    assert!(
        matches!(&d.facts[..], [Fact::Ended { lease, end: LeaseEnd::Expired(ExpiryReason::Revoked) }] if lease.id == b)
    );
    let d = s.tick(t0 + secs(1) + PoolConfig::DEFAULT_HEADROOM_RECOVERY);
    assert!(
        matches!(&d.facts[..], [Fact::Effective { pool, limit: 2 }] if *pool == pid("p")),
        "{:#?}",
        d.facts
    );
}

#[test]
fn a_pause_of_an_idle_pool_and_a_closed_stream_are_facts() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", limit(2)), ("q", limit(1))], t0);
    // Nobody waits on or holds q: no session is told, but the pause is a fact.
    let (applied, d) = s.report_rate_limit(t0, &pid("q"), Some(secs(5)), "").unwrap();
    assert!(d.events.is_empty(), "{:#?}", d.events);
    assert!(
        matches!(&d.facts[..], [Fact::Paused { pool, until, extended: true, .. }] if *pool == pid("q") && *until == applied.until)
    );
    // A shorter report does not move the pause, and is a fact all the same.
    let (_, d) = s.report_rate_limit(t0, &pid("q"), Some(secs(1)), "").unwrap();
    assert!(
        matches!(&d.facts[..], [Fact::Paused { extended: false, until, .. }] if *until == t0 + secs(5)),
        "{:#?}",
        d.facts
    );

    let x = s.open_session();
    let l = granted(&s.request(t0, x, req("a", "p")), x, "a");
    let d = s.close_session(t0, x, Duration::ZERO);
    assert!(d.events.is_empty());
    assert!(matches!(&d.facts[..], [Fact::Ended { lease, end: LeaseEnd::StreamClosed }] if lease.id == l));
}

#[test]
fn pool_changes_are_facts() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", limit(2))], t0);
    let (_, d) = s.upsert_pool(t0, pid("n"), &PoolPatch::default(), 10).unwrap();
    assert!(matches!(
        &d.facts[..],
        [Fact::PoolChanged { pool, change: PoolChange::Created, reload: false }] if *pool == pid("n")
    ));
    let mut all = s.pool_configs();
    all.remove(&pid("n"));
    all.insert(pid("p"), limit(3));
    all.insert(pid("z"), limit(1));
    let d = s.set_pools(t0, all).unwrap();
    let changes: Vec<(String, PoolChange)> = d
        .facts
        .iter()
        .filter_map(|f| match f {
            Fact::PoolChanged { pool, change, reload: true } => Some((pool.to_string(), *change)),
            _ => None,
        })
        .collect();
    assert_eq!(
        changes,
        [
            ("n".into(), PoolChange::Removed),
            ("p".into(), PoolChange::Changed),
            ("z".into(), PoolChange::Created)
        ]
    );
}
