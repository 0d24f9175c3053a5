//! Queue order: priority, then turn start, then arrival; aging; and the turn-start clamp.

use super::*;

/// Queues `reqs` behind a held slot of a limit-1 pool at `at`, then releases one lease at a time
/// and returns the grant order.
#[track_caller]
fn service_order(s: &mut Scheduler, at: Instant, reqs: Vec<NewRequest>) -> Vec<String> {
    let x = s.open_session();
    let mut lease = granted(&s.request(at, x, req("holder", "p")), x, "holder");
    for r in reqs {
        let d = s.request(at, x, r);
        assert!(matches!(d.events[..], [(_, Event::Queued { .. })]), "{:#?}", d.events);
        s.check_invariants(at);
    }
    let mut order = Vec::new();
    while s.waiter_count() > 0 {
        let d = s.release(at, x, lease, Outcome::Ok);
        let g = grants(&d);
        assert_eq!(g.len(), 1, "{:#?}", d.events);
        lease = granted(&d, x, &g[0].1);
        order.push(g[0].1.clone());
        s.check_invariants(at);
    }
    order
}

fn started(id: &str, priority: u32, started_at: Instant) -> NewRequest {
    NewRequest { started_at: Some(started_at), ..req_p(id, "p", priority) }
}

#[test]
fn higher_priority_first_then_older_turn_then_arrival() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", limit(1))], t0);
    let now = t0 + secs(10);
    let order = service_order(
        &mut s,
        now,
        vec![
            started("p1", 1, now),
            started("p9", 9, now),
            started("p5-new", 5, now),
            started("p5-old", 5, now - secs(5)),
            started("p5-new-2", 5, now),
            started("p5-older", 5, t0),
        ],
    );
    assert_eq!(order, ["p9", "p5-older", "p5-old", "p5-new", "p5-new-2", "p1"]);
}

#[test]
fn queued_positions_follow_the_key() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", limit(1))], t0);
    let x = s.open_session();
    granted(&s.request(t0, x, req("h", "p")), x, "h");
    assert_only(&s.request(t0, x, req_p("a", "p", 1)), x, queued("a", 0));
    assert_only(&s.request(t0, x, req_p("b", "p", 9)), x, queued("b", 0));
    assert_only(&s.request(t0, x, req_p("c", "p", 5)), x, queued("c", 1));
    assert_only(&s.request(t0, x, req_p("d", "p", 1)), x, queued("d", 3));
}

#[test]
fn a_low_priority_turn_that_started_long_enough_ago_overtakes() {
    let t0 = Instant::now();
    let step = SchedulerConfig::DEFAULT_AGING_STEP;
    let mut s = sched(&[("p", limit(1))], t0);
    let now = t0 + secs(600);
    // Priority 0 started at t0; priority 9 is worth 9 × 30 s = 270 s of waiting.
    let order = service_order(
        &mut s,
        now,
        vec![
            started("hi-recent", 9, t0 + step * 9 + secs(1)),
            started("lo-old", 0, t0),
            started("hi-early", 9, t0 + step * 9 - secs(1)),
            // One level apart is worth 30 s: key 0.5 s, between lo-old and hi-recent.
            started("p1-late", 1, t0 + step + ms(500)),
        ],
    );
    assert_eq!(order, ["hi-early", "lo-old", "p1-late", "hi-recent"]);
}

#[test]
fn aging_prevents_starvation_under_a_stream_of_high_priority_arrivals() {
    let t0 = Instant::now();
    let step = ms(100);
    let mut s = sched_with(SchedulerConfig { aging_step: step, ..cfg() }, &[("p", limit(1))], t0);
    let x = s.open_session();
    let mut lease = granted(&s.request(t0, x, req("first", "p")), x, "first");
    assert_only(&s.request(t0, x, req_p("low", "p", 0)), x, queued("low", 0));
    // Every 10 ms a priority-9 request arrives; every 20 ms the holder releases (so the queue of
    // high-priority requests only grows). Priority 9 is worth 900 ms here.
    let mut granted_at = None;
    for i in 1..=300u64 {
        let t = t0 + ms(10 * i);
        s.request(t, x, req_p(&format!("hi{i}"), "p", 9));
        if i % 2 == 0 {
            let d = s.release(t, x, lease, Outcome::Ok);
            let (_, id) = grants(&d).pop().expect("a waiter is granted");
            lease = granted(&d, x, &id);
            if id == "low" {
                granted_at = Some(t);
                break;
            }
            // Only requests whose turn started before low's aged past it may go first.
            let n: u64 = id[2..].parse().unwrap();
            assert!(ms(10 * n) < step * 9, "{id} overtook low");
        }
        s.check_invariants(t);
    }
    let at = granted_at.expect("low priority starved");
    assert!(at <= t0 + ms(2000), "low granted only at {:?}", at - t0);
}

#[test]
fn turn_starts_are_clamped_to_an_hour_ago_and_to_now() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", limit(1))], t0);
    let now = t0 + secs(2 * 3600);
    let hour = SchedulerConfig::MAX_TURN_AGE;
    let order = service_order(
        &mut s,
        now,
        vec![
            // Two hours ago counts as one hour ago ...
            started("ancient", 0, t0),
            // ... so a priority-1 turn started 20 s after that clamp wins (30 s per level).
            started("p1", 1, now - hour + secs(20)),
            // A start in the future counts as now: it does not lose to a later arrival.
            started("future", 5, now + secs(100)),
            started("now", 5, now),
        ],
    );
    assert_eq!(order, ["p1", "ancient", "future", "now"]);
}
