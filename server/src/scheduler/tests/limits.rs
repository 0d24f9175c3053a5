//! Limits over a pool tree: every level holds, a lease takes all its levels at once, and a waiter
//! holds nothing.

use super::*;

#[test]
fn a_tree_never_exceeds_any_level() {
    let t0 = Instant::now();
    let mut s = sched(&[("g", limit(3)), ("a", child("g", 2)), ("b", child("g", 2))], t0);
    let x = s.open_session();

    let a1 = granted(&s.request(t0, x, req("a1", "a")), x, "a1");
    granted(&s.request(t0, x, req("a2", "a")), x, "a2");
    assert_eq!((load(&s, "g"), load(&s, "a")), ((2, 0), (2, 0)));

    // `a` is full while `g` has room: the waiter takes no slot of `g`.
    assert_only(&s.request(t0, x, req("a3", "a")), x, queued("a3", 0));
    assert_eq!((load(&s, "g"), load(&s, "a")), ((2, 0), (2, 1)));
    s.check_invariants(t0);

    // ... so `b` can still use the last slot of `g`.
    let b1 = granted(&s.request(t0, x, req("b1", "b")), x, "b1");
    assert_eq!((load(&s, "g"), load(&s, "a"), load(&s, "b")), ((3, 0), (2, 1), (1, 0)));

    // `b` has room but `g` is full.
    assert_only(&s.request(t0, x, req("b2", "b")), x, queued("b2", 0));
    assert_eq!((load(&s, "g"), load(&s, "b")), ((3, 0), (1, 1)));
    assert_within_limits(&s);
    s.check_invariants(t0);

    // Freeing a slot of `a` (and so of `g`): both waiters could use it; only one gets it, the
    // better key (same priority and start, so the earlier arrival).
    let t1 = t0 + ms(10);
    let d = s.release(t1, x, a1, Outcome::Ok);
    assert_eq!(grants(&d), vec![(x, "a3".to_owned())]);
    assert_eq!((load(&s, "g"), load(&s, "a"), load(&s, "b")), ((3, 0), (2, 0), (1, 1)));
    assert_within_limits(&s);
    s.check_invariants(t1);

    let d = s.release(t1, x, b1, Outcome::Ok);
    assert_eq!(grants(&d), vec![(x, "b2".to_owned())]);
    assert_eq!((load(&s, "g"), load(&s, "a"), load(&s, "b")), ((3, 0), (2, 0), (1, 0)));
    assert_within_limits(&s);
    s.check_invariants(t1);
}

#[test]
fn a_lease_counts_on_every_ancestor() {
    let t0 = Instant::now();
    let mut s = sched(&[("root", limit(5)), ("mid", child("root", 5)), ("leaf", child("mid", 5))], t0);
    let x = s.open_session();
    let l = granted(&s.request(t0, x, req("r", "leaf")), x, "r");
    for p in ["root", "mid", "leaf"] {
        assert_eq!(load(&s, p), (1, 0), "{p}");
    }
    let lease = &s.snapshot(None).unwrap().leases[0];
    assert_eq!((lease.id, &lease.pool), (l, &pid("leaf")));
    s.check_invariants(t0);

    let d = s.release(t0, x, l, Outcome::Ok);
    assert_only(&d, x, Event::Released { lease_id: l, pool: pid("leaf"), outcome: Outcome::Ok });
    for p in ["root", "mid", "leaf"] {
        assert_eq!(load(&s, p), (0, 0), "{p}");
    }
    s.check_invariants(t0);
}

#[test]
fn a_full_parent_blocks_every_child_and_frees_to_the_best_key() {
    let t0 = Instant::now();
    let mut s = sched(&[("g", limit(1)), ("a", child("g", 1)), ("b", child("g", 1))], t0);
    let x = s.open_session();
    let y = s.open_session();
    let l = granted(&s.request(t0, x, req("h", "g")), x, "h");
    assert_only(&s.request(t0, y, req_p("lo", "a", 1)), y, queued("lo", 0));
    assert_only(&s.request(t0, y, req_p("hi", "b", 8)), y, queued("hi", 0));
    assert_only(&s.request(t0, y, req_p("mid", "g", 5)), y, queued("mid", 0));
    s.check_invariants(t0);

    // One slot at a time, always to the best key among the three pools.
    let d = s.release(t0 + ms(1), x, l, Outcome::Ok);
    assert_eq!(grants(&d), vec![(y, "hi".to_owned())]);
    let hi = granted(&d, y, "hi");
    let d = s.release(t0 + ms(2), y, hi, Outcome::Ok);
    assert_eq!(grants(&d), vec![(y, "mid".to_owned())]);
    let mid = granted(&d, y, "mid");
    let d = s.release(t0 + ms(3), y, mid, Outcome::Ok);
    assert_eq!(grants(&d), vec![(y, "lo".to_owned())]);
    assert_within_limits(&s);
    s.check_invariants(t0 + ms(3));
}

/// A slot freed by a timer at the instant a request arrives goes to the best waiter, not to the
/// newcomer that happens to be processed first (regression: the request fast path granted a child
/// pool's newcomer ahead of the parent's queued waiters when `advance` had just freed the slot).
#[test]
fn a_slot_freed_by_expiry_goes_to_the_queued_waiter_before_a_newcomer() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", limit(1)), ("c", child("p", 1))], t0);
    let x = s.open_session();
    let y = s.open_session();
    let z = s.open_session();
    let h = granted(&s.request(t0, x, NewRequest { ttl: Some(secs(1)), ..req("h", "p") }), x, "h");
    assert_only(&s.request(t0, y, req_p("w", "p", 9)), y, queued("w", 0));

    // No tick at t0+1s: the request is the first operation to see the expiry.
    let t1 = t0 + secs(1);
    let d = s.request(t1, z, req_p("late", "c", 0));
    assert_eq!(
        ungated(&d.events),
        vec![
            (x, Event::Expired { lease_id: h, pool: pid("p"), reason: ExpiryReason::Ttl }),
            d.events[1].clone(),
            (z, queued("late", 0)),
        ]
    );
    granted(&d, y, "w");
    assert_eq!((load(&s, "p"), load(&s, "c")), ((1, 0), (0, 1)));
    s.check_invariants(t1);
}

/// The same for a pause that ends at the instant a request arrives.
#[test]
fn a_pause_ending_serves_the_queued_waiter_before_a_newcomer() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", limit(1)), ("c", child("p", 1))], t0);
    let x = s.open_session();
    let y = s.open_session();
    s.report_rate_limit(t0, &pid("p"), Some(secs(2)), "").unwrap();
    assert_queued_in_pause(&s.request(t0, x, req_p("w", "p", 9)), x, queued("w", 0), "p", t0 + secs(2));
    let t1 = t0 + secs(2);
    let d = s.request(t1, y, req_p("late", "c", 0));
    granted(&d, x, "w");
    assert_eq!(events_of(&d, y), vec![queued("late", 0)]);
    s.check_invariants(t1);
}
