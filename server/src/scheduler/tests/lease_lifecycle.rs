//! Leases from grant to end: release, stream close, TTL expiry and heartbeats, release cooldown and
//! fencing tokens.

use super::*;

#[test]
fn closing_a_session_frees_its_waiters_and_leases_at_once() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", limit(1)), ("q", limit(1))], t0);
    let x = s.open_session();
    let y = s.open_session();
    let l = granted(&s.request(t0, x, req("h", "p")), x, "h");
    granted(&s.request(t0, x, req("hq", "q")), x, "hq");
    // x's own waiter is ahead of y's; it must leave with x.
    assert_only(&s.request(t0, x, req("x2", "p")), x, queued("x2", 0));
    assert_only(&s.request(t0, y, req("y1", "p")), y, queued("y1", 1));
    assert_only(&s.request(t0, y, req("y2", "q")), y, queued("y2", 0));
    assert_eq!((s.lease_count(), s.waiter_count()), (2, 3));

    let t1 = t0 + ms(5);
    let d = s.close_session(t1, x, Duration::ZERO);
    // Nothing is addressed to the closed stream; y gets both freed slots in the same decisions.
    assert!(d.events.iter().all(|(sess, _)| *sess == y), "{:#?}", d.events);
    assert_eq!(grants(&d), vec![(y, "y1".to_owned()), (y, "y2".to_owned())]);
    assert_eq!((s.lease_count(), s.waiter_count()), (2, 0));
    assert_eq!(s.session_count(), 1);
    assert_eq!((load(&s, "p"), load(&s, "q")), ((1, 0), (1, 0)));
    s.check_invariants(t1);

    // The closed stream's lease is gone for good.
    let d = s.release(t1, y, l, Outcome::Ok);
    assert_only(&d, y, lease_error(l, Error::LeaseEnded { id: l, how: "released when its stream closed" }));

    // Closing the last session empties everything; closing twice is harmless.
    assert!(s.close_session(t1, y, Duration::ZERO).events.is_empty());
    assert!(s.close_session(t1, y, Duration::ZERO).events.is_empty());
    assert_eq!((s.lease_count(), s.waiter_count(), s.session_count()), (0, 0, 0));
    assert_eq!((load(&s, "p"), load(&s, "q")), ((0, 0), (0, 0)));
    s.check_invariants(t1);
}

#[test]
fn a_lease_without_heartbeat_is_reclaimed_at_its_expiry() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", limit(1))], t0);
    let x = s.open_session();
    let y = s.open_session();
    let d = s.request(t0, x, NewRequest { ttl: Some(secs(1)), ..req("h", "p") });
    let l = granted(&d, x, "h");
    match &d.events[0].1 {
        Event::Granted { ttl, expires_at, .. } => assert_eq!((*ttl, *expires_at), (secs(1), t0 + secs(1))),
        e => panic!("{e:?}"),
    }
    assert_only(&s.request(t0, y, req("w", "p")), y, queued("w", 0));
    assert_eq!(s.next_deadline(), Some(t0 + secs(1)));

    assert!(s.tick(t0 + ms(999)).events.is_empty());
    assert_eq!(s.lease_count(), 1);

    // Reclaimed exactly at expires_at, and the slot goes to the waiter in the same tick.
    let t1 = t0 + secs(1);
    let d = s.tick(t1);
    assert_eq!(d.events[0], (x, Event::Expired { lease_id: l, pool: pid("p"), reason: ExpiryReason::Ttl }));
    granted(&d, y, "w");
    assert_eq!(d.events.len(), 2);
    s.check_invariants(t1);

    // A late release or heartbeat gets a clear error and changes nothing.
    let before = fingerprint(&s);
    let ended = Error::LeaseEnded { id: l, how: "reclaimed after its ttl expired without a heartbeat" };
    assert_only(&s.release(t1, x, l, Outcome::Ok), x, lease_error(l, ended.clone()));
    assert_eq!(fingerprint(&s), before);
    assert_eq!(
        s.heartbeat(t1, x, &[l]).events,
        vec![(x, lease_error(l, ended)), (x, Event::HeartbeatAck { renewed: 0 })]
    );
    assert_eq!(fingerprint(&s), before);
    s.check_invariants(t1);
}

#[test]
fn a_heartbeat_extends_a_lease() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", limit(2))], t0);
    let x = s.open_session();
    let ttl = NewRequest { ttl: Some(secs(1)), ..req("a", "p") };
    let a = granted(&s.request(t0, x, ttl.clone()), x, "a");
    let b =
        granted(&s.request(t0, x, NewRequest { request_id: RequestId::parse("b").unwrap(), ..ttl }), x, "b");

    // Renew only `a`.
    let d = s.heartbeat(t0 + ms(600), x, &[a]);
    assert_only(&d, x, Event::HeartbeatAck { renewed: 1 });
    let d = s.tick(t0 + secs(1));
    assert_only(&d, x, Event::Expired { lease_id: b, pool: pid("p"), reason: ExpiryReason::Ttl });
    assert_eq!(s.snapshot(None).unwrap().leases[0].expires_at, t0 + ms(1600));

    // An empty list renews all of the session's leases.
    let d = s.heartbeat(t0 + ms(1500), x, &[]);
    assert_only(&d, x, Event::HeartbeatAck { renewed: 1 });
    assert!(s.tick(t0 + ms(2499)).events.is_empty());
    let d = s.tick(t0 + ms(2500));
    assert_only(&d, x, Event::Expired { lease_id: a, pool: pid("p"), reason: ExpiryReason::Ttl });
    assert_eq!((s.lease_count(), load(&s, "p")), (0, (0, 0)));
    s.check_invariants(t0 + ms(2500));
}

#[test]
fn a_released_slot_cools_down_before_it_is_granted_again() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", PoolConfig { cooldown: ms(200), ..limit(1) })], t0);
    let x = s.open_session();
    let y = s.open_session();
    let l = granted(&s.request(t0, x, req("h", "p")), x, "h");
    assert_only(&s.request(t0, y, req("w", "p")), y, queued("w", 0));

    let t1 = t0 + secs(1);
    let d = s.release(t1, x, l, Outcome::Ok);
    assert_only(&d, x, Event::Released { lease_id: l, pool: pid("p"), outcome: Outcome::Ok });
    let p = pool_snap(&s, "p");
    assert_eq!((p.in_flight, p.cooling, p.queued), (0, 1, 1));
    assert_eq!(s.next_deadline(), Some(t1 + ms(200)));
    s.check_invariants(t1);

    // A new request does not get the cooling slot either.
    assert_only(&s.request(t1 + ms(100), x, req("n", "p")), x, queued("n", 1));
    assert!(s.tick(t1 + ms(199)).events.is_empty());

    let d = s.tick(t1 + ms(200));
    assert_eq!(grants(&d), vec![(y, "w".to_owned())]);
    let p = pool_snap(&s, "p");
    assert_eq!((p.in_flight, p.cooling, p.queued), (1, 0, 1));
    s.check_invariants(t1 + ms(200));
}

#[test]
fn fencing_tokens_strictly_increase_per_pool() {
    let t0 = Instant::now();
    let mut s =
        sched_with(SchedulerConfig { first_token: 100, ..cfg() }, &[("p", limit(2)), ("q", limit(1))], t0);
    let x = s.open_session();
    let mut last = 0;
    for i in 0..5 {
        let id = format!("r{i}");
        let d = s.request(t0 + ms(i), x, req(&id, "p"));
        let tok = token_of(&d, &id);
        assert!(tok > last, "token {tok} after {last}");
        assert!(tok >= 100);
        last = tok;
        s.release(t0 + ms(i), x, granted(&d, x, &id), Outcome::Ok);
    }
    assert_eq!(pool_snap(&s, "p").next_token, last + 1);
    // Another pool has its own sequence.
    assert_eq!(token_of(&s.request(t0, x, req("q0", "q")), "q0"), 100);
    assert_eq!(pool_snap(&s, "q").next_token, 101);
}

/// A pool removed and added again must not hand out tokens it already issued (regression).
#[test]
fn fencing_tokens_survive_removing_and_re_adding_a_pool() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", limit(1)), ("q", limit(1))], t0);
    let x = s.open_session();
    let d = s.request(t0, x, req("a", "p"));
    let first = token_of(&d, "a");
    s.release(t0, x, granted(&d, x, "a"), Outcome::Ok);
    let d = s.request(t0, x, req("b", "p"));
    let second = token_of(&d, "b");
    assert!(second > first);

    s.set_pools(t0 + ms(1), pools(&[("q", limit(1))])).unwrap();
    s.set_pools(t0 + ms(2), pools(&[("p", limit(1)), ("q", limit(1))])).unwrap();
    let third = token_of(&s.request(t0 + ms(3), x, req("c", "p")), "c");
    assert!(third > second, "token {third} reissued after {second}");
    s.check_invariants(t0 + ms(3));
}
