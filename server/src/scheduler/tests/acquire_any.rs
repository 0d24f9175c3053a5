//! `acquire_any`: first listed pool whose gates pass, one queue place per listed pool, never two grants,
//! leaving every queue at once, and queue order against single-pool waiters.

use super::*;

fn any(id: &str, pools: &[&str]) -> NewRequest {
    NewRequest { any_of: pools[1..].iter().map(|p| pid(p)).collect(), ..req(id, pools[0]) }
}

fn granted_pool(d: &Decisions, request_id: &str) -> Option<PoolId> {
    d.events.iter().find_map(|(_, e)| match e {
        Event::Granted { request_id: r, pool, .. } if r.as_str() == request_id => Some(pool.clone()),
        _ => None,
    })
}

#[test]
fn it_is_granted_on_the_first_listed_pool_that_has_room() {
    let t0 = Instant::now();
    let mut s = sched(&[("a", limit(1)), ("b", limit(1)), ("c", limit(1))], t0);
    let x = s.open_session();
    assert_eq!(granted_pool(&s.request(t0, x, any("r1", &["a", "b", "c"])), "r1"), Some(pid("a")));
    assert_eq!(granted_pool(&s.request(t0, x, any("r2", &["a", "b", "c"])), "r2"), Some(pid("b")));
    // The caller's order decides, not the pools' names.
    assert_eq!(granted_pool(&s.request(t0, x, any("r3", &["c", "a"])), "r3"), Some(pid("c")));
    s.check_invariants(t0);
}

#[test]
fn it_waits_in_every_queue_and_leaves_them_all_when_granted() {
    let t0 = Instant::now();
    let mut s = sched(&[("a", limit(1)), ("b", limit(1))], t0);
    let (x, y) = (s.open_session(), s.open_session());
    let la = granted(&s.request(t0, x, req("ha", "a")), x, "ha");
    let lb = granted(&s.request(t0, x, req("hb", "b")), x, "hb");
    assert_only(&s.request(t0, y, any("w", &["a", "b"])), y, queued("w", 0));
    assert_eq!((load(&s, "a"), load(&s, "b")), ((1, 1), (1, 1)));
    s.check_invariants(t0);
    // b frees first: granted there, and gone from a's queue too.
    let d = s.release(t0, x, lb, Outcome::Ok);
    assert_eq!(granted_pool(&d, "w"), Some(pid("b")));
    assert_eq!((load(&s, "a"), load(&s, "b")), ((1, 0), (1, 0)));
    // a frees later: nothing more for w (it holds one slot, never two).
    assert!(grants(&s.release(t0, x, la, Outcome::Ok)).is_empty());
    s.check_invariants(t0);
}

#[test]
fn a_cancel_leaves_every_queue() {
    let t0 = Instant::now();
    let mut s = sched(&[("a", limit(1)), ("b", limit(1))], t0);
    let (x, y) = (s.open_session(), s.open_session());
    granted(&s.request(t0, x, req("ha", "a")), x, "ha");
    granted(&s.request(t0, x, req("hb", "b")), x, "hb");
    s.request(t0, y, any("w", &["a", "b"]));
    let d = s.cancel(t0, y, "w");
    assert_only(&d, y, Event::Cancelled { request_id: RequestId::parse("w").unwrap() });
    assert_eq!((load(&s, "a").1, load(&s, "b").1, s.waiter_count()), (0, 0, 0));
    // So does its stream closing, and a wait deadline.
    let w = NewRequest { max_wait: Some(secs(1)), ..any("w2", &["a", "b"]) };
    s.request(t0, y, w);
    assert_eq!(load(&s, "b").1, 1);
    s.tick(t0 + secs(1));
    assert_eq!((load(&s, "a").1, load(&s, "b").1, s.waiter_count()), (0, 0, 0));
    s.request(t0 + secs(1), y, any("w3", &["a", "b"]));
    s.close_session(t0 + secs(1), y, Duration::ZERO);
    assert_eq!((load(&s, "a").1, load(&s, "b").1, s.waiter_count()), (0, 0, 0));
    s.check_invariants(t0 + secs(1));
}

#[test]
fn queue_order_holds_against_single_pool_waiters() {
    let t0 = Instant::now();
    let mut s = sched(&[("a", limit(1)), ("b", limit(1))], t0);
    let (x, y, z) = (s.open_session(), s.open_session(), s.open_session());
    let la = granted(&s.request(t0, x, req("ha", "a")), x, "ha");
    let lb = granted(&s.request(t0, x, req("hb", "b")), x, "hb");
    // y waits on b alone first; z asks for any of a, b later; then a single-pool waiter on a.
    s.request(t0 + ms(1), y, req("only-b", "b"));
    s.request(t0 + ms(2), z, any("any", &["a", "b"]));
    s.request(t0 + ms(3), y, req("only-a", "a"));
    // b frees: the earlier single-pool waiter on b goes first, not the newer any-request.
    let d = s.release(t0 + ms(4), x, lb, Outcome::Ok);
    assert_eq!(grants(&d), vec![(y, "only-b".to_owned())]);
    // a frees: the any-request is ahead of the later waiter on a.
    let d = s.release(t0 + ms(5), x, la, Outcome::Ok);
    assert_eq!(grants(&d), vec![(z, "any".to_owned())]);
    assert_eq!(granted_pool(&d, "any"), Some(pid("a")));
    s.check_invariants(t0 + ms(5));
}

#[test]
fn it_respects_every_gate_of_the_granted_pool_s_chain() {
    let t0 = Instant::now();
    let mut s = sched(&[("g", limit(1)), ("a", child("g", 1)), ("b", limit(1))], t0);
    let x = s.open_session();
    s.pause_pool(t0, &pid("g"), secs(5), "test").unwrap();
    // a is blocked by its parent's pause; b is free.
    assert_eq!(granted_pool(&s.request(t0, x, any("r", &["a", "b"])), "r"), Some(pid("b")));
    let d = s.request(t0, x, any("r2", &["a", "b"]));
    assert!(grants(&d).is_empty());
    assert!(
        d.events.iter().any(|(_, e)| matches!(e, Event::Paused { pool, .. } if *pool == pid("g"))),
        "told of the pause on a's chain"
    );
    assert_eq!(granted_pool(&s.tick(t0 + secs(5)), "r2"), Some(pid("a")));
}

#[test]
fn bad_lists_are_refused_and_change_nothing() {
    let t0 = Instant::now();
    let short = PoolConfig { max_ttl: secs(5), default_ttl: secs(5), ..limit(1) };
    let mut s = sched(&[("a", short), ("b", limit(1))], t0);
    let x = s.open_session();
    let before = fingerprint(&s);
    let d = s.request(t0, x, any("dup", &["a", "b", "a"]));
    assert!(
        matches!(&d.events[..], [(_, Event::Rejected { error: Error::InvalidArgument(m), .. })] if m.contains("twice"))
    );
    let d = s.request(t0, x, any("unknown", &["a", "zz"]));
    assert!(matches!(&d.events[..], [(_, Event::Rejected { error: Error::UnknownPool(_), .. })]));
    let many: Vec<String> = (0..NewRequest::MAX_ANY_POOLS + 1).map(|i| format!("p{i}")).collect();
    let names: Vec<&str> = many.iter().map(String::as_str).collect();
    let d = s.request(t0, x, any("many", &names));
    assert!(matches!(&d.events[..], [(_, Event::Rejected { error: Error::InvalidArgument(_), .. })]));
    // A TTL must suit every listed pool.
    let d = s.request(t0, x, NewRequest { ttl: Some(secs(10)), ..any("ttl", &["b", "a"]) });
    assert!(matches!(&d.events[..], [(_, Event::Rejected { error: Error::InvalidTtl { .. }, .. })]));
    assert_eq!(fingerprint(&s), before);
}

#[test]
fn a_full_listed_queue_refuses_it() {
    let t0 = Instant::now();
    let shed = PoolConfig { max_queue_depth: 1, on_overflow: Overflow::ShedOldest, ..limit(1) };
    let mut s = sched(&[("a", shed), ("b", limit(1))], t0);
    let x = s.open_session();
    granted(&s.request(t0, x, req("ha", "a")), x, "ha");
    granted(&s.request(t0, x, req("hb", "b")), x, "hb");
    s.request(t0, x, req("wa", "a"));
    let d = s.request(t0, x, any("w", &["b", "a"]));
    assert!(
        matches!(&d.events[..], [(_, Event::Rejected { error: Error::QueueFull { pool, .. }, .. })] if *pool == pid("a"))
    );
    assert_eq!(s.waiter_count(), 1, "nothing shed for it");
}

#[test]
fn a_multi_pool_waiter_shed_from_one_queue_leaves_them_all() {
    let t0 = Instant::now();
    let shed = PoolConfig { max_queue_depth: 1, on_overflow: Overflow::ShedOldest, ..limit(1) };
    let mut s = sched(&[("a", shed), ("b", limit(1))], t0);
    let (x, y) = (s.open_session(), s.open_session());
    granted(&s.request(t0, x, req("ha", "a")), x, "ha");
    granted(&s.request(t0, x, req("hb", "b")), x, "hb");
    s.request(t0, y, any("w", &["a", "b"]));
    let d = s.request(t0, x, req("late", "a"));
    assert!(events_of(&d, y).contains(&rejected("w", Error::Shed(pid("a")))));
    assert_eq!((load(&s, "a").1, load(&s, "b").1), (1, 0));
    s.check_invariants(t0);
}

#[test]
fn the_probe_of_a_half_open_pool_can_go_to_an_any_request() {
    let t0 = Instant::now();
    let b = BreakerConfig { enabled: true, failures: 1, open_base: secs(10), ..Default::default() };
    let a = PoolConfig { health: HealthConfig { breaker: b, ..Default::default() }, ..limit(2) };
    let mut s = sched(&[("a", a), ("b", limit(1))], t0);
    let x = s.open_session();
    let l = granted(&s.request(t0, x, req("f", "a")), x, "f");
    s.release(t0, x, l, Outcome::Error);
    let hb = granted(&s.request(t0, x, req("hb", "b")), x, "hb");
    // a is open and b full: it waits in both.
    assert!(grants(&s.request(t0, x, any("w", &["a", "b"]))).is_empty());
    let d = s.tick(t0 + secs(10));
    assert!(
        d.events
            .iter()
            .any(|(_, e)| matches!(e, Event::Granted { pool, probe: true, .. } if *pool == pid("a")))
    );
    assert!(grants(&s.release(t0 + secs(10), x, hb, Outcome::Ok)).is_empty());
    s.check_invariants(t0 + secs(10));
}
