//! Admission: queue depth and its overflow policies, wait deadlines, and that nothing leaks.

use super::*;

fn depth(n: u32, on_overflow: Overflow) -> PoolConfig {
    PoolConfig { max_queue_depth: n, on_overflow, ..limit(1) }
}

#[test]
fn a_full_queue_rejects_under_reject() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", depth(1, Overflow::Reject))], t0);
    let x = s.open_session();
    let l = granted(&s.request(t0, x, req("h", "p")), x, "h");
    assert_only(&s.request(t0, x, req("w", "p")), x, queued("w", 0));
    let before = fingerprint(&s);
    assert_only(
        &s.request(t0, x, req_p("over", "p", 9)),
        x,
        rejected("over", Error::QueueFull { pool: pid("p"), depth: 1 }),
    );
    assert_eq!(fingerprint(&s), before);
    s.check_invariants(t0);

    let d = s.release(t0, x, l, Outcome::Ok);
    let w = granted(&d, x, "w");
    s.release(t0, x, w, Outcome::Ok);
    assert_eq!((s.lease_count(), s.waiter_count()), (0, 0));
}

#[test]
fn a_full_queue_sheds_its_oldest_arrival_under_shed_oldest() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", depth(2, Overflow::ShedOldest))], t0);
    let x = s.open_session();
    let y = s.open_session();
    granted(&s.request(t0, x, req("h", "p")), x, "h");
    // The oldest arrival, not the worst key, is shed: `old` has the better priority.
    assert_only(&s.request(t0, y, req_p("old", "p", 9)), y, queued("old", 0));
    assert_only(&s.request(t0 + ms(1), y, req_p("mid", "p", 1)), y, queued("mid", 1));
    let d = s.request(t0 + ms(2), x, req_p("new", "p", 5));
    assert_eq!(ungated(&d.events), vec![(y, rejected("old", Error::Shed(pid("p")))), (x, queued("new", 0)),]);
    assert_eq!((s.waiter_count(), load(&s, "p")), (2, (1, 2)));
    s.check_invariants(t0 + ms(2));
    // `old` is gone: cancelling it is an unknown request.
    assert_only(&s.cancel(t0 + ms(2), y, "old"), y, rejected("old", Error::UnknownRequest("old".into())));
    s.close_session(t0 + ms(3), x, Duration::ZERO);
    s.close_session(t0 + ms(3), y, Duration::ZERO);
    assert_eq!((s.lease_count(), s.waiter_count()), (0, 0));
}

#[test]
fn a_full_queue_blocks_in_arrival_order_under_block() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", depth(1, Overflow::Block))], t0);
    let x = s.open_session();
    let y = s.open_session();
    let h = granted(&s.request(t0, x, req("h", "p")), x, "h");
    assert_only(&s.request(t0, y, req_p("w1", "p", 0)), y, queued("w1", 0));
    let blocked = |id: &str, position| Event::Queued {
        request_id: RequestId::parse(id).unwrap(),
        position,
        blocked: true,
        gate: None,
    };
    assert_only(&s.request(t0, y, req_p("w2", "p", 1)), y, blocked("w2", 1));
    assert_only(&s.request(t0, y, req_p("w3", "p", 9)), y, blocked("w3", 2));
    assert_only(&s.request(t0, y, req_p("w4", "p", 5)), y, blocked("w4", 3));
    assert_eq!(load(&s, "p"), (1, 4));
    s.check_invariants(t0);

    // A blocked waiter can be cancelled.
    assert_only(&s.cancel(t0, y, "w4"), y, Event::Cancelled { request_id: RequestId::parse("w4").unwrap() });

    // Blocked waiters enter the queue in arrival order as room appears, whatever their priority.
    let mut order = Vec::new();
    let mut lease = h;
    let mut holder = x;
    for i in 1..=3 {
        let t = t0 + ms(i);
        let d = s.release(t, holder, lease, Outcome::Ok);
        let g = grants(&d);
        assert_eq!(g.len(), 1, "{:#?}", d.events);
        order.push(g[0].1.clone());
        lease = granted(&d, y, &g[0].1);
        holder = y;
        s.check_invariants(t);
    }
    assert_eq!(order, ["w1", "w2", "w3"]);
    s.release(t0 + ms(5), y, lease, Outcome::Ok);
    assert_eq!((s.lease_count(), s.waiter_count(), load(&s, "p")), (0, 0, (0, 0)));
}

#[test]
fn a_blocked_waiter_times_out_like_any_other() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", depth(1, Overflow::Block))], t0);
    let x = s.open_session();
    granted(&s.request(t0, x, req("h", "p")), x, "h");
    assert_only(&s.request(t0, x, req("w1", "p")), x, queued("w1", 0));
    let d = s.request(t0, x, NewRequest { max_wait: Some(ms(300)), ..req("w2", "p") });
    assert!(matches!(d.events[0].1, Event::Queued { blocked: true, .. }));
    let d = s.tick(t0 + ms(300));
    assert_only(
        &d,
        x,
        rejected("w2", Error::WaitTimeout { pool: pid("p"), waited: ms(300), retry_after: None }),
    );
    assert_eq!(load(&s, "p"), (1, 1));
    s.check_invariants(t0 + ms(300));
}

#[test]
fn a_waiter_past_its_max_wait_is_rejected_at_its_deadline() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", limit(1)), ("q", PoolConfig { max_wait: Some(secs(2)), ..limit(1) })], t0);
    let x = s.open_session();
    let hp = granted(&s.request(t0, x, req("hp", "p")), x, "hp");
    granted(&s.request(t0, x, req("hq", "q")), x, "hq");
    let d = s.request(t0, x, NewRequest { max_wait: Some(secs(1)), ..req("w", "p") });
    assert_only(&d, x, queued("w", 0));
    // The pool's default applies when the request gives none.
    assert_only(&s.request(t0, x, req("wq", "q")), x, queued("wq", 0));
    assert_eq!(s.next_deadline(), Some(t0 + secs(1)));

    assert!(s.tick(t0 + ms(999)).events.is_empty());
    let d = s.tick(t0 + secs(1));
    assert_only(
        &d,
        x,
        rejected("w", Error::WaitTimeout { pool: pid("p"), waited: secs(1), retry_after: None }),
    );
    // A release after the deadline finds nobody waiting.
    assert_only(
        &s.release(t0 + ms(1500), x, hp, Outcome::Ok),
        x,
        Event::Released { lease_id: hp, pool: pid("p"), outcome: Outcome::Ok },
    );
    let d = s.tick(t0 + secs(2));
    assert_eq!(
        events_of(&d, x),
        vec![rejected("wq", Error::WaitTimeout { pool: pid("q"), waited: secs(2), retry_after: None },)]
    );
    assert_eq!(s.waiter_count(), 0);
    s.check_invariants(t0 + secs(2));
}

#[test]
fn max_wait_zero_means_now_or_never() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", limit(1))], t0);
    let x = s.open_session();
    let now_only = |id: &str| NewRequest { max_wait: Some(Duration::ZERO), ..req(id, "p") };
    let l = granted(&s.request(t0, x, now_only("a")), x, "a");
    let before = fingerprint(&s);
    assert_only(
        &s.request(t0, x, now_only("b")),
        x,
        rejected("b", Error::WaitTimeout { pool: pid("p"), waited: Duration::ZERO, retry_after: None }),
    );
    assert_eq!(fingerprint(&s), before);
    s.release(t0, x, l, Outcome::Ok);
    assert_eq!((s.lease_count(), s.waiter_count()), (0, 0));
    s.check_invariants(t0);
}

#[test]
fn a_session_cannot_hold_more_than_max_per_session() {
    let t0 = Instant::now();
    let mut s = sched_with(SchedulerConfig { max_per_session: 2, ..cfg() }, &[("p", limit(1))], t0);
    let x = s.open_session();
    granted(&s.request(t0, x, req("a", "p")), x, "a");
    assert_only(&s.request(t0, x, req("b", "p")), x, queued("b", 0));
    let before = fingerprint(&s);
    let d = s.request(t0, x, req("c", "p"));
    assert!(
        matches!(&d.events[..], [(_, Event::Rejected { error: Error::LimitExceeded(_), .. })]),
        "{:#?}",
        d.events
    );
    assert_eq!(fingerprint(&s), before);
    // Another session is not affected.
    let y = s.open_session();
    assert_only(&s.request(t0, y, req("c", "p")), y, queued("c", 1));
}

#[test]
fn cancel_withdraws_a_queued_request() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", limit(1))], t0);
    let x = s.open_session();
    let l = granted(&s.request(t0, x, req("h", "p")), x, "h");
    assert_only(&s.request(t0, x, req("a", "p")), x, queued("a", 0));
    assert_only(&s.request(t0, x, req("b", "p")), x, queued("b", 1));
    assert_only(&s.cancel(t0, x, "a"), x, Event::Cancelled { request_id: RequestId::parse("a").unwrap() });
    assert_eq!(load(&s, "p"), (1, 1));
    let d = s.release(t0, x, l, Outcome::Ok);
    assert_eq!(grants(&d), vec![(x, "b".to_owned())]);
    // The id of a granted (no longer open) request may be used again.
    assert_only(&s.request(t0, x, req("b", "p")), x, queued("b", 0));
    s.check_invariants(t0);
}

/// A cancel that crossed its request's `Granted` on the wire does nothing and says nothing (the proto's
/// promise); the client releases the lease once it reads the grant. Another stream's grant, or a
/// grant already released, is an unknown request.
#[test]
fn cancel_of_a_granted_request_does_nothing_and_says_nothing() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", limit(2))], t0);
    let x = s.open_session();
    let y = s.open_session();
    let l = granted(&s.request(t0, x, req("g", "p")), x, "g");
    let before = fingerprint(&s);
    let d = s.cancel(t0, x, "g");
    assert!(d.events.is_empty() && d.facts.is_empty(), "{d:#?}");
    assert_eq!(fingerprint(&s), before);
    assert_only(&s.cancel(t0, y, "g"), y, rejected("g", Error::UnknownRequest("g".into())));
    s.release(t0, x, l, Outcome::Ok);
    assert_only(&s.cancel(t0, x, "g"), x, rejected("g", Error::UnknownRequest("g".into())));
    s.check_invariants(t0);
}
