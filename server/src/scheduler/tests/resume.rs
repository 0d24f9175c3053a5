//! Resume: moving a live lease to another stream, and re-creating leases during the learning
//! period after a restart; both only with the lease's resume credential.

use super::*;

/// A resume with the credential this scheduler's key gives the lease (as its `Granted` carried, or
/// as a grant before a restart with the same key did). Holder `""`, as [`req`] asks with.
fn resume(s: &Scheduler, lease_id: LeaseId, token: u64, pool: &str) -> ResumeRequest {
    let credential = s.cfg.lease_key.credential(lease_id, FencingToken(token), &pid(pool), "");
    ResumeRequest { credential, ..forged(lease_id, token, pool) }
}

/// A resume with everything Status shows about a lease, but no valid credential.
fn forged(lease_id: LeaseId, token: u64, pool: &str) -> ResumeRequest {
    ResumeRequest {
        lease_id,
        token: FencingToken(token),
        pool: pid(pool),
        priority: Priority::DEFAULT,
        ttl: None,
        holder: "".into(),
        credential: ResumeCredential::default(),
    }
}

/// The credential of the grant of `request_id`.
#[track_caller]
fn credential_of(d: &Decisions, request_id: &str) -> ResumeCredential {
    d.events
        .iter()
        .find_map(|(_, e)| match e {
            Event::Granted { request_id: r, credential, .. } if r.as_str() == request_id => {
                Some(credential.clone())
            }
            _ => None,
        })
        .unwrap_or_else(|| panic!("no grant of {request_id:?} in {:#?}", d.events))
}

fn bad_credential(lease: LeaseId) -> Event {
    lease_error(lease, Error::BadCredential(lease))
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

    // The grant's credential is the one the key gives the lease.
    assert_eq!(resume(&s, l, tok, "p").credential, credential_of(&d, "h"));
    // Without the credential, or with one for another token, pool or holder: refused, nothing changes.
    let other_holder =
        ResumeRequest { holder: "x".into(), credential: credential_of(&d, "h"), ..forged(l, tok, "p") };
    for r in [
        forged(l, tok, "p"),
        ResumeRequest { credential: credential_of(&d, "h"), ..forged(l, tok + 1, "p") },
        ResumeRequest { credential: credential_of(&d, "h"), ..forged(l, tok, "q") },
        ResumeRequest { credential: credential_of(&d, "h"), ..forged(l, tok, "zz") },
        other_holder,
        ResumeRequest { credential: ResumeCredential::new("zz"), ..forged(l, tok, "p") },
    ] {
        assert_only(&s.resume(t0, new, r), new, bad_credential(l));
        assert_eq!(fingerprint(&s), before);
    }

    // With it: the lease moves, and the stream it was taken from is told.
    let d = s.resume(t1, new, resume(&s, l, tok, "p"));
    assert_eq!(
        d.events,
        vec![
            (old, Event::ResumedElsewhere { lease_id: l, pool: pid("p") }),
            (new, resumed(l, tok, t1 + PoolConfig::DEFAULT_TTL)),
        ]
    );
    let lease = &s.snapshot(None).unwrap().leases[0];
    assert_eq!((lease.session, lease.token.0), (new, tok));
    assert_eq!(load(&s, "p"), (1, 0));
    s.check_invariants(t1);

    // The old stream no longer owns it; closing it leaves the lease alone.
    assert_only(&s.release(t1, old, l, Outcome::Ok), old, lease_error(l, Error::NotYourLease(l)));
    let d = s.heartbeat(t1, old, &[l]);
    assert_eq!(
        d.events,
        vec![(old, lease_error(l, Error::NotYourLease(l))), (old, Event::HeartbeatAck { renewed: 0 })]
    );
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
        &s.resume(t1, new, resume(&s, l, tok, "p")),
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
    let r = resume(&s, a, 500, "p");
    assert_only(&s.resume(t1, x, r), x, resumed(a, 500, t1 + PoolConfig::DEFAULT_TTL));
    let r = resume(&s, b, 7, "p");
    assert_only(&s.resume(t1, x, r), x, resumed(b, 7, t1 + PoolConfig::DEFAULT_TTL));
    assert_eq!((load(&s, "g"), load(&s, "p")), ((2, 0), (2, 0)));
    // `p` is at its configured limit: refused, nothing changes.
    let before = fingerprint(&s);
    let r = resume(&s, c, 9, "p");
    assert_only(&s.resume(t1, x, r), x, lease_error(c, Error::ResumeOverLimit(pid("p"))));
    assert_eq!(fingerprint(&s), before);
    // Tokens stay ahead of every re-created lease.
    assert_eq!(pool_snap(&s, "p").next_token, 501);
    // q has room, and so has g (2 of 3).
    let r = resume(&s, c, 3, "q");
    assert_only(&s.resume(t1, x, r), x, resumed(c, 3, t1 + PoolConfig::DEFAULT_TTL));
    // Now g is full.
    let e = LeaseId(0xe);
    let r = resume(&s, e, 3, "q");
    assert_only(&s.resume(t1, x, r), x, lease_error(e, Error::ResumeOverLimit(pid("q"))));
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
    let r = resume(&s, f, 1, "q");
    assert_only(&s.resume(t2, x, r), x, lease_error(f, Error::UnknownLease(f)));
    s.check_invariants(t2);
}

#[test]
fn without_a_learning_period_unknown_leases_are_not_re_created() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", limit(1))], t0);
    let x = s.open_session();
    let id = LeaseId(42);
    let before = fingerprint(&s);
    let r = resume(&s, id, 1, "p");
    assert_only(&s.resume(t0, x, r), x, lease_error(id, Error::UnknownLease(id)));
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
    // Its old stream is gone: nobody is told of the takeover.
    let r = resume(&s, a, ta, "p");
    assert_only(&s.resume(t1, new, r), new, resumed(a, ta, t1 + PoolConfig::DEFAULT_TTL));
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
    let r = resume(&s, a, ta, "p");
    assert_only(
        &s.resume(t1 + secs(2), other, r),
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
    let r = ResumeRequest { ttl: Some(secs(60)), ..resume(&s, l, tok, "p") };
    let d = s.resume(t1, new, r);
    assert_eq!(d.events.last(), Some(&(new, resumed(l, tok, t1 + secs(60)))));
    let lease = s.snapshot(None).unwrap().leases[0].clone();
    assert_eq!((lease.ttl, lease.expires_at), (secs(60), t1 + secs(60)));
    // Heartbeats renew with the new TTL.
    s.heartbeat(t1 + secs(30), new, &[]);
    assert_eq!(s.snapshot(None).unwrap().leases[0].expires_at, t1 + secs(90));
    // An invalid TTL is refused and changes nothing.
    let before = fingerprint(&s);
    let r = ResumeRequest { ttl: Some(Duration::ZERO), ..resume(&s, l, tok, "p") };
    let d = s.resume(t1 + secs(30), old, r);
    assert!(matches!(d.events[..], [(_, Event::LeaseError { error: Error::InvalidTtl { .. }, .. })]));
    assert_eq!(fingerprint(&s), before);
    s.check_invariants(t1 + secs(30));
}

/// Lease theft: a stream that knows everything Status shows (id, token, pool, holder) can neither take
/// over a live lease nor re-create one during learning; the counters do not move.
#[test]
fn forged_resumes_change_nothing() {
    let t0 = Instant::now();
    let mut s = sched_with(
        SchedulerConfig { learning_period: secs(10), ..cfg() },
        &[("g", limit(2)), ("p", child("g", 2))],
        t0,
    );
    let x = s.open_session();
    let thief = s.open_session();
    let a = LeaseId(0xa);
    let r = resume(&s, a, 40, "p");
    assert_eq!(events_of(&s.resume(t0, x, r), x), [resumed(a, 40, t0 + PoolConfig::DEFAULT_TTL)]);
    let before = fingerprint(&s);
    let next = pool_snap(&s, "p").next_token;
    let max = SchedulerConfig::MAX_RESUME_TOKEN;
    for (id, token) in [(a, 40), (LeaseId(0xb), 41), (LeaseId(0xc), max), (LeaseId(0xd), u64::MAX)] {
        // Status-level knowledge, a credential of another lease, another key's credential.
        let other_key = LeaseKey::from_bytes(&[9; 32]).credential(id, FencingToken(token), &pid("p"), "");
        let another_lease = resume(&s, LeaseId(0xff), 40, "p").credential;
        for credential in [ResumeCredential::default(), another_lease, other_key] {
            let r = ResumeRequest { credential, ..forged(id, token, "p") };
            assert_only(&s.resume(t0 + secs(1), thief, r), thief, bad_credential(id));
            assert_eq!(fingerprint(&s), before);
        }
    }
    assert_eq!(pool_snap(&s, "p").next_token, next);
    // The highest token a credential can name is still refused (the counter keeps room to grow).
    let r = resume(&s, LeaseId(0xe), max + 1, "p");
    assert!(matches!(
        s.resume(t0, x, r).events[..],
        [(_, Event::LeaseError { error: Error::InvalidArgument(_), .. })]
    ));
    assert_eq!(fingerprint(&s), before);
    s.check_invariants(t0 + secs(1));
}

/// Credentials outlive a restart that keeps the key, and only then.
#[test]
fn a_credential_from_before_a_restart_re_creates_the_lease_only_under_the_same_key() {
    let t0 = Instant::now();
    let key = LeaseKey::from_bytes(&[3; 32]);
    let mut before = sched_with(SchedulerConfig { lease_key: key.clone(), ..cfg() }, &[("p", limit(1))], t0);
    let x = before.open_session();
    let d = before.request(t0, x, req("h", "p"));
    let (l, tok, cred) = (granted(&d, x, "h"), token_of(&d, "h"), credential_of(&d, "h"));

    let learning = |key: LeaseKey| {
        let cfg =
            SchedulerConfig { lease_key: key, learning_period: secs(10), first_token: tok + 1, ..cfg() };
        sched_with(cfg, &[("p", limit(1))], t0)
    };
    let r = ResumeRequest { credential: cred, ..forged(l, tok, "p") };
    let mut other = learning(LeaseKey::from_bytes(&[4; 32]));
    let y = other.open_session();
    assert_only(&other.resume(t0, y, r.clone()), y, bad_credential(l));
    assert_eq!(load(&other, "p"), (0, 0));

    let mut same = learning(key);
    let y = same.open_session();
    assert_only(&same.resume(t0, y, r), y, resumed(l, tok, t0 + PoolConfig::DEFAULT_TTL));
    assert_eq!(load(&same, "p"), (1, 0));
    same.check_invariants(t0);
}
