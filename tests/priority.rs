//! Queue order observed over loopback: higher priority first, then the oldest turn (`started_at`),
//! then arrival; and the aging rule that lets an old low-priority turn overtake.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use slotd_proto::v1 as pb;
use slotd_test_support::{Agent, Daemon, ago};

const SINGLE: &str = r#"
[pools.p]
max_concurrent = 1
"#;

/// A waiter: name, priority, how long ago its turn started (None: unset, i.e. its arrival).
type Spec = (&'static str, u32, Option<u64>);

fn request(agent: &Agent, (name, prio, started_secs_ago): Spec) -> pb::LeaseRequest {
    pb::LeaseRequest {
        priority: Some(prio),
        started_at: started_secs_ago.map(|s| ago(Duration::from_secs(s))),
        ..agent.req(name, "p")
    }
}

/// Waiters in arrival order, and the grant order the documented key implies with the default
/// aging step (30 s, so these few seconds of turn age never outweigh a priority level).
const WAITERS: [Spec; 7] = [
    ("a", 2, Some(10)),
    ("b", 7, Some(1)),
    ("c", 7, Some(5)),
    ("d", 2, Some(20)),
    ("e", 7, None),
    ("f", 7, None),
    ("g", 0, None),
];
const EXPECTED: [&str; 7] = ["c", "b", "e", "f", "d", "a", "g"];

#[tokio::test]
async fn grants_follow_priority_then_oldest_turn_then_arrival_on_one_stream() {
    let d = Daemon::start(SINGLE).await;
    let mut holder = d.agent("holder").await;
    let h = holder.acquire("h", "p").await;
    let mut w = d.agent("waiters").await;
    for spec in WAITERS {
        w.request(request(&w, spec)).await;
        w.expect_queued(spec.0).await;
    }
    assert_eq!(d.pool("p").await.queued, WAITERS.len() as u32);

    holder.release_ok(&h.lease_id).await;
    let mut order = Vec::new();
    for _ in 0..WAITERS.len() {
        let g = match w.next().await {
            pb::server_message::Msg::Granted(g) => g,
            other => panic!("expected a grant, got {other:?}"),
        };
        order.push(g.request_id.clone());
        // One slot: nothing else is granted until this lease goes back.
        w.release(&g.lease_id).await;
        w.expect_released(&g.lease_id).await;
    }
    assert_eq!(order, EXPECTED);
    d.assert_idle().await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grants_follow_the_same_order_across_separate_connections() {
    let d = Daemon::start(SINGLE).await;
    let mut holder = d.agent("holder").await;
    let h = holder.acquire("h", "p").await;
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for spec in WAITERS {
        let mut w = d.agent(spec.0).await;
        // Waiting for Queued before the next agent asks fixes the arrival order.
        w.request(request(&w, spec)).await;
        w.expect_queued(spec.0).await;
        let order = order.clone();
        tasks.push(tokio::spawn(async move {
            let g = w.expect_granted(spec.0).await;
            // The pool has one slot, so the next grant happens only after this release, which
            // happens after this push: the vector's order is the grant order.
            order.lock().unwrap().push(spec.0);
            tokio::time::sleep(Duration::from_millis(2)).await;
            w.release_ok(&g.lease_id).await;
            w
        }));
    }
    holder.release_ok(&h.lease_id).await;
    for t in tasks {
        slotd_test_support::within("a waiter", t).await.expect("waiter task");
    }
    assert_eq!(*order.lock().unwrap(), EXPECTED);
    d.assert_idle().await;
    d.stop().await;
}

#[tokio::test]
async fn aging_lets_an_old_low_priority_turn_overtake() {
    // key = started_at - priority × aging_step: with a 1 s step, priority 9 is worth 9 s of waiting.
    let d = Daemon::start(
        r#"
        [scheduler]
        aging_step = "1s"
        [pools.p]
        max_concurrent = 1
        "#,
    )
    .await;
    let mut holder = d.agent("holder").await;
    let h = holder.acquire("h", "p").await;
    let mut w = d.agent("waiters").await;
    // (name, priority, turn started this many seconds ago) -> keys: -9, -15, -5, -10.
    let specs: [Spec; 4] =
        [("high", 9, None), ("old-low", 0, Some(15)), ("young-low", 0, Some(5)), ("mid", 4, Some(6))];
    for spec in specs {
        w.request(request(&w, spec)).await;
        w.expect_queued(spec.0).await;
    }
    holder.release_ok(&h.lease_id).await;
    let mut order = Vec::new();
    for _ in 0..specs.len() {
        let g = match w.next().await {
            pb::server_message::Msg::Granted(g) => g,
            other => panic!("expected a grant, got {other:?}"),
        };
        order.push(g.request_id.clone());
        w.release(&g.lease_id).await;
        w.expect_released(&g.lease_id).await;
    }
    assert_eq!(order, ["old-low", "mid", "high", "young-low"]);
    d.assert_idle().await;
    d.stop().await;
}

#[tokio::test]
async fn queued_position_reflects_the_order() {
    let d = Daemon::start(SINGLE).await;
    let mut holder = d.agent("holder").await;
    let h = holder.acquire("h", "p").await;
    let mut w = d.agent("waiters").await;
    w.request(request(&w, ("low", 1, None))).await;
    assert_eq!(w.expect_queued("low").await.position, 0);
    w.request(request(&w, ("high", 8, None))).await;
    assert_eq!(w.expect_queued("high").await.position, 0, "a higher priority goes ahead");
    w.request(request(&w, ("low2", 1, None))).await;
    assert_eq!(w.expect_queued("low2").await.position, 2);
    drop(w);
    holder.release_ok(&h.lease_id).await;
    d.wait_for("the waiters to leave with their stream", |s| s.pools[0].queued == 0).await;
    d.assert_idle().await;
    d.stop().await;
}
