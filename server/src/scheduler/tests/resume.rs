//! Resume: moving a live lease to another stream, and re-creating leases during the learning
//! period after a restart.

use super::*;

fn resume(lease_id: LeaseId, token: u64, pool: &str) -> ResumeRequest {
    ResumeRequest {
        lease_id,
        token: FencingToken(token),
        pool: pid(pool),
        priority: Priority::DEFAULT,
        ttl: None,
        holder: "agent".into(),
    }
}

fn resumed(lease_id: LeaseId, token: u64, expires_at: Instant) -> Event {
    Event::LeaseResumed { lease_id, token: FencingToken(token), expires_at }
}

#[test]
fn a_live_lease_moves_to_the_resuming_stream() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", limit(1)), ("q", limit(1))], t0);
    let old = s.open_session();
    let new = s.open_session();
    let d = s.request(t0, old, req("h", "p"));
    let l = granted(&d, old, "h");
    let tok = token_of(&d, "h");
    let t1 = t0 + secs(5);
    let before = fingerprint(&s);

    // Wrong token, wrong pool, unknown pool: refused, nothing changes.
    for (r, err) in [
        (resume(l, tok + 1, "p"), Error::LeaseMismatch(l, "wrong fencing token")),
        (resume(l, tok, "q"), Error::LeaseMismatch(l, "wrong pool")),
        (resume(l, tok, "zz"), Error::UnknownPool(pid("zz"))),
    ] {
        assert_only(&s.resume(t0, new, r), new, lease_error(l, err));
        assert_eq!(fingerprint(&s), before);
    }

    let d = s.resume(t1, new, resume(l, tok, "p"));
    assert_only(&d, new, resumed(l, tok, t1 + PoolConfig::DEFAULT_TTL));
    let lease = &s.snapshot(None).unwrap().leases[0];
    assert_eq!((lease.session, lease.token.0), (new, tok));
    assert_eq!(load(&s, "p"), (1, 0));
    s.check_invariants(t1);

    // The old stream no longer owns it; closing it leaves the lease alone.
    assert_only(&s.release(t1, old, l, Outcome::Ok), old, lease_error(l, Error::NotYourLease(l)));
    assert!(s.close_session(t1, old, Duration::ZERO).events.is_empty());
    assert_eq!(s.lease_count(), 1);
    s.check_invariants(t1);

    // Pause fan-out follows the lease to its new stream.
    let (_, d) = s.report_rate_limit(t1, &pid("p"), None, "").unwrap();
    assert_eq!(d.events.len(), 1);
    assert_eq!(d.events[0].0, new);

    assert_only(
        &s.release(t1, new, l, Outcome::Ok),
        new,
        Event::Released { lease_id: l, pool: pid("p"), outcome: Outcome::Ok },
    );
    // An ended lease cannot be resumed.
    assert_only(
        &s.resume(t1, new, resume(l, tok, "p")),
        new,
        lease_error(l, Error::LeaseEnded { id: l, how: "released" }),
    );
    assert_eq!((s.lease_count(), load(&s, "p")), (0, (0, 0)));
    s.check_invariants(t1);
}

#[test]
fn after_a_restart_leases_are_re_created_while_learning_and_grants_wait() {
    let t0 = Instant::now();
    let mut s = sched_with(
        SchedulerConfig { learning_period: secs(10), ..cfg() },
        &[("g", limit(3)), ("p", child("g", 2)), ("q", child("g", 2))],
        t0,
    );
    let x = s.open_session();
    let y = s.open_session();
    assert!(s.snapshot(None).unwrap().learning);
    assert_eq!(s.next_deadline(), Some(t0 + secs(10)));

    // New requests wait, even with room everywhere.
    assert_only(&s.request(t0, y, req("new", "q")), y, queued("new", 0));
    s.check_invariants(t0);

    let a = LeaseId(0xa);
    let b = LeaseId(0xb);
    let c = LeaseId(0xc);
    let t1 = t0 + secs(1);
    assert_only(&s.resume(t1, x, resume(a, 500, "p")), x, resumed(a, 500, t1 + PoolConfig::DEFAULT_TTL));
    assert_only(&s.resume(t1, x, resume(b, 7, "p")), x, resumed(b, 7, t1 + PoolConfig::DEFAULT_TTL));
    assert_eq!((load(&s, "g"), load(&s, "p")), ((2, 0), (2, 0)));
    // `p` is at its configured limit: refused, nothing changes.
    let before = fingerprint(&s);
    assert_only(&s.resume(t1, x, resume(c, 9, "p")), x, lease_error(c, Error::ResumeOverLimit(pid("p"))));
    assert_eq!(fingerprint(&s), before);
    // Tokens stay ahead of every re-created lease.
    assert_eq!(pool_snap(&s, "p").next_token, 501);
    // q has room, and so has g (2 of 3).
    assert_only(&s.resume(t1, x, resume(c, 3, "q")), x, resumed(c, 3, t1 + PoolConfig::DEFAULT_TTL));
    // Now g is full.
    let e = LeaseId(0xe);
    assert_only(&s.resume(t1, x, resume(e, 3, "q")), x, lease_error(e, Error::ResumeOverLimit(pid("q"))));
    assert_eq!(load(&s, "g"), (3, 0));
    let lease = s.snapshot(None).unwrap().leases;
    assert!(lease.iter().all(|l| l.request_id.is_none()));
    s.check_invariants(t1);

    // Learning ends: g is full, so the waiter still waits ...
    let t2 = t0 + secs(10);
    assert!(s.tick(t2).events.is_empty());
    assert!(!s.snapshot(None).unwrap().learning);
    s.check_invariants(t2);
    // ... until a re-created lease is released.
    let d = s.release(t2, x, c, Outcome::Ok);
    assert_eq!(token_of(&d, "new"), 4, "after the token re-created on q");
    assert_eq!(load(&s, "q"), (1, 0));
    assert_eq!(load(&s, "g"), (3, 0));
    let d = s.request(t2, x, req("p-new", "p"));
    assert_only(&d, x, queued("p-new", 0));
    let d = s.release(t2, x, a, Outcome::Ok);
    assert_eq!(token_of(&d, "p-new"), 501, "after the token re-created on p");

    // After learning, unknown leases cannot be re-created.
    let f = LeaseId(0xf);
    assert_only(&s.resume(t2, x, resume(f, 1, "q")), x, lease_error(f, Error::UnknownLease(f)));
    s.check_invariants(t2);
}

#[test]
fn without_a_learning_period_unknown_leases_are_not_re_created() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", limit(1))], t0);
    let x = s.open_session();
    let id = LeaseId(42);
    let before = fingerprint(&s);
    assert_only(&s.resume(t0, x, resume(id, 1, "p")), x, lease_error(id, Error::UnknownLease(id)));
    assert_eq!(fingerprint(&s), before);
    assert!(!s.snapshot(None).unwrap().learning);
}

#[test]
fn a_stream_closed_with_grace_keeps_its_leases_for_a_resume() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", limit(1))], t0);
    let old = s.open_session();
    let other = s.open_session();
    let d = s.request(t0, old, req("a", "p"));
    let a = granted(&d, old, "a");
    let ta = token_of(&d, "a");
    assert_only(&s.request(t0, other, req("w", "p")), other, queued("w", 0));

    // The lease stays (detached) instead of going to the waiter.
    let d = s.close_session(t0, old, secs(5));
    assert!(d.events.is_empty(), "{:#?}", d.events);
    assert_eq!((s.lease_count(), load(&s, "p")), (1, (1, 1)));
    assert_eq!(s.snapshot(None).unwrap().leases[0].expires_at, t0 + secs(5));
    s.check_invariants(t0);

    // A new stream takes it over and renews it with the full TTL.
    let new = s.open_session();
    let t1 = t0 + secs(4);
    assert_only(&s.resume(t1, new, resume(a, ta, "p")), new, resumed(a, ta, t1 + PoolConfig::DEFAULT_TTL));
    s.check_invariants(t1);
    assert!(s.tick(t0 + secs(5)).events.is_empty());
    assert_eq!(s.lease_count(), 1);

    // Not resumed in time: it expires at the end of the grace and the waiter gets the slot.
    let d = s.close_session(t1, new, secs(2));
    assert!(d.events.is_empty(), "{:#?}", d.events);
    assert!(s.tick(t1 + secs(2) - ms(1)).events.is_empty());
    let d = s.tick(t1 + secs(2));
    assert_eq!(grants(&d), vec![(other, "w".to_owned())]);
    assert_eq!(s.lease_count(), 1);
    assert_only(
        &s.resume(t1 + secs(2), other, resume(a, ta, "p")),
        other,
        lease_error(
            a,
            Error::LeaseEnded { id: a, how: "reclaimed after its ttl expired without a heartbeat" },
        ),
    );
    s.check_invariants(t1 + secs(2));
}

/// The TTL of a resume applies from then on, also to a live lease (regression: it was checked but
/// ignored, so the lease kept its old TTL while the client heartbeat for the new one).
#[test]
fn a_resume_sets_the_ttl_of_a_live_lease() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", limit(1))], t0);
    let old = s.open_session();
    let new = s.open_session();
    let d = s.request(t0, old, NewRequest { ttl: Some(secs(2)), ..req("h", "p") });
    let l = granted(&d, old, "h");
    let tok = token_of(&d, "h");

    let t1 = t0 + secs(1);
    let r = ResumeRequest { ttl: Some(secs(60)), ..resume(l, tok, "p") };
    assert_only(&s.resume(t1, new, r), new, resumed(l, tok, t1 + secs(60)));
    let lease = s.snapshot(None).unwrap().leases[0].clone();
    assert_eq!((lease.ttl, lease.expires_at), (secs(60), t1 + secs(60)));
    // Heartbeats renew with the new TTL.
    s.heartbeat(t1 + secs(30), new, &[]);
    assert_eq!(s.snapshot(None).unwrap().leases[0].expires_at, t1 + secs(90));
    // An invalid TTL is refused and changes nothing.
    let before = fingerprint(&s);
    let r = ResumeRequest { ttl: Some(Duration::ZERO), ..resume(l, tok, "p") };
    let d = s.resume(t1 + secs(30), old, r);
    assert!(matches!(d.events[..], [(_, Event::LeaseError { error: Error::InvalidTtl { .. }, .. })]));
    assert_eq!(fingerprint(&s), before);
    s.check_invariants(t1 + secs(30));
}
