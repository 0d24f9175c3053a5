//! `set_pools` at runtime: raised limits grant at once, lowered ones revoke nothing, removed pools
//! let go of their waiters and leases.

use super::*;

#[test]
fn raising_a_limit_grants_waiters_at_once() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", limit(1))], t0);
    let x = s.open_session();
    granted(&s.request(t0, x, req("h", "p")), x, "h");
    for (i, id) in ["a", "b", "c"].into_iter().enumerate() {
        assert_only(&s.request(t0, x, req(id, "p")), x, queued(id, i as u32));
    }
    let d = s.set_pools(t0 + ms(1), pools(&[("p", limit(3))])).unwrap();
    assert_eq!(grants(&d), vec![(x, "a".to_owned()), (x, "b".to_owned())]);
    assert_eq!(load(&s, "p"), (3, 1));
    assert_eq!(pool_snap(&s, "p").effective_limit, 3);
    assert_within_limits(&s);
    s.check_invariants(t0 + ms(1));
}

#[test]
fn lowering_a_limit_revokes_nothing_and_waits_until_below_it() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", limit(3))], t0);
    let x = s.open_session();
    let held: Vec<LeaseId> =
        ["a", "b", "c"].iter().map(|id| granted(&s.request(t0, x, req(id, "p")), x, id)).collect();
    let d = s.set_pools(t0, pools(&[("p", limit(1))])).unwrap();
    assert!(d.events.is_empty(), "{:#?}", d.events);
    assert_eq!((s.lease_count(), load(&s, "p")), (3, (3, 0)));
    assert_only(&s.request(t0, x, req("w", "p")), x, queued("w", 0));
    s.check_invariants(t0);

    // 2 and then 1 in flight: still not below the new limit of 1.
    for (i, l) in held[..2].iter().enumerate() {
        let t = t0 + ms(i as u64 + 1);
        assert_only(
            &s.release(t, x, *l, Outcome::Ok),
            x,
            Event::Released { lease_id: *l, pool: pid("p"), outcome: Outcome::Ok },
        );
        s.check_invariants(t);
    }
    assert_eq!(load(&s, "p"), (1, 1));
    let d = s.release(t0 + ms(3), x, held[2], Outcome::Ok);
    assert_eq!(grants(&d), vec![(x, "w".to_owned())]);
    assert_eq!(load(&s, "p"), (1, 0));
    s.check_invariants(t0 + ms(3));
}

#[test]
fn lowering_a_parent_limit_holds_back_its_children() {
    let t0 = Instant::now();
    let mut s = sched(&[("g", limit(4)), ("a", child("g", 4))], t0);
    let x = s.open_session();
    let held: Vec<LeaseId> =
        ["a1", "a2"].iter().map(|id| granted(&s.request(t0, x, req(id, "a")), x, id)).collect();
    s.set_pools(t0, pools(&[("g", limit(1)), ("a", child("g", 4))])).unwrap();
    assert_only(&s.request(t0, x, req("w", "a")), x, queued("w", 0));
    assert!(s.release(t0, x, held[0], Outcome::Ok).events.len() == 1);
    let d = s.release(t0, x, held[1], Outcome::Ok);
    assert_eq!(grants(&d), vec![(x, "w".to_owned())]);
    assert_eq!((load(&s, "g"), load(&s, "a")), ((1, 0), (1, 0)));
    s.check_invariants(t0);
}

#[test]
fn removing_a_pool_rejects_its_waiters_and_expires_its_leases() {
    let t0 = Instant::now();
    let mut s = sched(&[("g", limit(1)), ("a", child("g", 1)), ("b", child("g", 1))], t0);
    let x = s.open_session();
    let y = s.open_session();
    let l = granted(&s.request(t0, x, req("h", "a")), x, "h");
    assert_only(&s.request(t0, x, req("wa", "a")), x, queued("wa", 0));
    assert_only(&s.request(t0, y, req("wb", "b")), y, queued("wb", 0));

    let t1 = t0 + ms(10);
    let d = s.set_pools(t1, pools(&[("g", limit(1)), ("b", child("g", 1))])).unwrap();
    assert_eq!(
        d.events[..2],
        [
            (x, rejected("wa", Error::PoolRemoved(pid("a")))),
            (x, Event::Expired { lease_id: l, pool: pid("a"), reason: ExpiryReason::PoolRemoved }),
        ]
    );
    // The parent slot it held goes to the sibling's waiter in the same decisions.
    assert_eq!(grants(&d), vec![(y, "wb".to_owned())]);
    assert_eq!(d.events.len(), 3);
    assert_eq!(s.snapshot(Some(&pid("a"))).unwrap_err(), Error::UnknownPool(pid("a")));
    assert_eq!((load(&s, "g"), load(&s, "b")), ((1, 0), (1, 0)));
    assert_eq!((s.lease_count(), s.waiter_count()), (1, 0));
    s.check_invariants(t1);

    // The lease is gone for good; the pool is unknown to new requests.
    assert_only(
        &s.release(t1, x, l, Outcome::Ok),
        x,
        lease_error(l, Error::LeaseEnded { id: l, how: "revoked" }),
    );
    assert_only(&s.request(t1, x, req("again", "a")), x, rejected("again", Error::UnknownPool(pid("a"))));
}

#[test]
fn an_invalid_pool_set_changes_nothing() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", limit(1))], t0);
    let x = s.open_session();
    granted(&s.request(t0, x, req("h", "p")), x, "h");
    assert_only(&s.request(t0, x, req("w", "p")), x, queued("w", 0));
    let before = fingerprint(&s);
    let bad = [
        pools(&[("p", child("missing", 1))]),
        pools(&[("p", child("q", 1)), ("q", child("p", 1))]),
        pools(&[("p", limit(0))]),
        pools(&[("p", PoolConfig { max_queue_depth: 0, ..limit(1) })]),
        pools(&[("p", PoolConfig { default_ttl: secs(10), max_ttl: secs(5), ..limit(1) })]),
    ];
    for b in bad {
        let err = s.set_pools(t0, b).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
        assert_eq!(fingerprint(&s), before);
    }
    assert!(matches!(
        Scheduler::new(cfg(), pools(&[("p", child("p", 1))]), t0),
        Err(Error::InvalidArgument(_))
    ));
}

/// Raising `max_queue_depth` lets blocked waiters into the queue at once, so they compete by key
/// from then on (regression: they stayed blocked until some queued waiter left).
#[test]
fn raising_the_queue_depth_admits_blocked_waiters() {
    let t0 = Instant::now();
    let block = |n| PoolConfig { max_queue_depth: n, on_overflow: Overflow::Block, ..limit(1) };
    let mut s = sched(&[("p", block(1))], t0);
    let x = s.open_session();
    let h = granted(&s.request(t0, x, req("h", "p")), x, "h");
    assert_only(&s.request(t0, x, req_p("lo", "p", 0)), x, queued("lo", 0));
    let d = s.request(t0, x, req_p("hi", "p", 9));
    assert!(matches!(d.events[0].1, Event::Queued { blocked: true, .. }));

    s.set_pools(t0, pools(&[("p", block(5))])).unwrap();
    // A newcomer of middle priority sorts between them: `hi` is in the queue now.
    assert_only(&s.request(t0, x, req_p("mid", "p", 5)), x, queued("mid", 1));
    let d = s.release(t0, x, h, Outcome::Ok);
    assert_eq!(grants(&d), vec![(x, "hi".to_owned())]);
    s.check_invariants(t0);
}
