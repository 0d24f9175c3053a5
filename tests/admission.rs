//! Admission over loopback: each overflow policy, max_wait deadlines, max_wait 0, release cooldown,
//! and no leak afterwards.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use slotd_proto::v1 as pb;
use slotd_test_support::{Daemon, ms, pool_in};
use tonic::Code;

const POOLS: &str = r#"
[pools.reject]
max_concurrent = 1
max_queue_depth = 1
on_overflow = "reject"

[pools.shed]
max_concurrent = 1
max_queue_depth = 1
on_overflow = "shed_oldest"

[pools.block]
max_concurrent = 1
max_queue_depth = 1
on_overflow = "block"

[pools.wait]
max_concurrent = 1
max_wait = "100ms"

[pools.cool]
max_concurrent = 1
cooldown = "150ms"
"#;

#[tokio::test]
async fn reject_refuses_the_newcomer_when_the_queue_is_full() {
    let d = Daemon::start(POOLS).await;
    let mut h = d.agent("holder").await;
    let mut w1 = d.agent("w1").await;
    let mut w2 = d.agent("w2").await;
    let g = h.acquire("h", "reject").await;
    w1.request(w1.req("r1", "reject")).await;
    assert_eq!(w1.expect_queued("r1").await.position, 0);
    w2.request(w2.req("r2", "reject")).await;
    w2.expect_rejected("r2", Code::ResourceExhausted).await;
    assert_eq!(d.pool("reject").await.queued, 1);

    h.release_ok(&g.lease_id).await;
    let g1 = w1.expect_granted("r1").await;
    w1.release_ok(&g1.lease_id).await;
    // The refused request left nothing behind.
    w2.expect_silence(Duration::from_millis(20)).await;
    d.assert_idle().await;
    d.stop().await;
}

#[tokio::test]
async fn shed_oldest_refuses_the_oldest_waiter_and_queues_the_newcomer() {
    let d = Daemon::start(POOLS).await;
    let mut h = d.agent("holder").await;
    let mut w1 = d.agent("w1").await;
    let mut w2 = d.agent("w2").await;
    let g = h.acquire("h", "shed").await;
    w1.request(w1.req("r1", "shed")).await;
    w1.expect_queued("r1").await;
    w2.request(w2.req("r2", "shed")).await;
    w1.expect_rejected("r1", Code::ResourceExhausted).await;
    assert_eq!(w2.expect_queued("r2").await.position, 0);
    assert_eq!(d.pool("shed").await.queued, 1);

    h.release_ok(&g.lease_id).await;
    let g2 = w2.expect_granted("r2").await;
    w1.expect_silence(Duration::from_millis(20)).await;
    w2.release_ok(&g2.lease_id).await;
    d.assert_idle().await;
    d.stop().await;
}

#[tokio::test]
async fn block_lets_the_newcomer_wait_outside_the_queue_and_serves_it_later() {
    let d = Daemon::start(POOLS).await;
    let mut h = d.agent("holder").await;
    let mut w1 = d.agent("w1").await;
    let mut w2 = d.agent("w2").await;
    let g = h.acquire("h", "block").await;
    w1.request(w1.req("r1", "block")).await;
    assert!(!w1.expect_queued("r1").await.blocked);
    w2.request(w2.req("r2", "block")).await;
    let q2 = w2.expect_queued("r2").await;
    assert!(q2.blocked, "{q2:?}");
    assert_eq!(q2.position, 1);
    assert_eq!(d.pool("block").await.queued, 2, "blocked waiters count as queued");

    h.release_ok(&g.lease_id).await;
    let g1 = w1.expect_granted("r1").await;
    // r2 entered the queue but the slot is held again.
    w2.expect_silence(Duration::from_millis(30)).await;
    assert_eq!(d.pool("block").await.queued, 1);
    w1.release_ok(&g1.lease_id).await;
    let g2 = w2.expect_granted("r2").await;
    w2.release_ok(&g2.lease_id).await;
    d.assert_idle().await;
    d.stop().await;
}

#[tokio::test]
async fn waiting_past_max_wait_is_rejected_with_deadline_exceeded() {
    let d = Daemon::start(POOLS).await;
    let mut h = d.agent("holder").await;
    let mut w = d.agent("w").await;
    let g = h.acquire("h", "wait").await;

    // The request's own max_wait.
    let t0 = Instant::now();
    w.request(pb::LeaseRequest { max_wait: Some(ms(60)), ..w.req("own", "wait") }).await;
    w.expect_queued("own").await;
    w.expect_rejected("own", Code::DeadlineExceeded).await;
    assert!(t0.elapsed() >= Duration::from_millis(60), "rejected after {:?}", t0.elapsed());

    // The pool's default max_wait (100ms).
    let t0 = Instant::now();
    w.request(w.req("default", "wait")).await;
    w.expect_queued("default").await;
    let r = w.expect_rejected("default", Code::DeadlineExceeded).await;
    assert!(t0.elapsed() >= Duration::from_millis(100), "rejected after {:?}", t0.elapsed());
    assert!(r.message.contains("max_wait"), "{r:?}");
    assert_eq!(d.pool("wait").await.queued, 0);

    // max_wait 0: grant now or reject now.
    let t0 = Instant::now();
    w.request(pb::LeaseRequest { max_wait: Some(ms(0)), ..w.req("now", "wait") }).await;
    w.expect_rejected("now", Code::DeadlineExceeded).await;
    assert!(t0.elapsed() < Duration::from_millis(100), "took {:?}", t0.elapsed());
    h.release_ok(&g.lease_id).await;
    let g0 = w.acquire_with(pb::LeaseRequest { max_wait: Some(ms(0)), ..w.req("free", "wait") }).await;
    // A granted request is not rejected when its max_wait passes.
    w.expect_silence(Duration::from_millis(150)).await;
    w.release_ok(&g0.lease_id).await;
    d.assert_idle().await;
    d.stop().await;
}

#[tokio::test]
async fn cooldown_delays_the_next_grant() {
    let d = Daemon::start(POOLS).await;
    let mut a = d.agent("a").await;
    let mut b = d.agent("b").await;
    let g = a.acquire("ra", "cool").await;
    b.request(b.req("rb", "cool")).await;
    b.expect_queued("rb").await;

    let t0 = Instant::now();
    a.release_ok(&g.lease_id).await;
    let p = d.pool("cool").await;
    assert_eq!((p.in_flight, p.cooling, p.queued), (0, 1, 1), "{p:?}");
    let gb = b.expect_granted("rb").await;
    assert!(t0.elapsed() >= Duration::from_millis(150), "granted after {:?}", t0.elapsed());
    b.release_ok(&gb.lease_id).await;

    // A fresh request during the cooldown waits for it too.
    let t0 = Instant::now();
    b.request(b.req("again", "cool")).await;
    b.expect_queued("again").await;
    let g2 = b.expect_granted("again").await;
    assert!(t0.elapsed() >= Duration::from_millis(100), "granted after {:?}", t0.elapsed());
    b.release_ok(&g2.lease_id).await;
    d.wait_for("the cooldown to pass", |s| pool_in(s, "cool").cooling == 0).await;
    d.assert_idle().await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_through_every_policy_leaks_nothing() {
    let d = Daemon::start(POOLS).await;
    let mut tasks = Vec::new();
    let start = Arc::new(tokio::sync::Barrier::new(20));
    for pool in ["reject", "shed", "block", "wait", "cool"] {
        for i in 0..4 {
            let mut a = d.agent(&format!("{pool}-{i}")).await;
            let start = start.clone();
            tasks.push(tokio::spawn(async move {
                start.wait().await;
                let mut granted = 0;
                for n in 0..3 {
                    let id = format!("r{n}");
                    a.request(pb::LeaseRequest { max_wait: Some(ms(300)), ..a.req(&id, pool) }).await;
                    loop {
                        match a.next().await {
                            pb::server_message::Msg::Queued(_) => continue,
                            pb::server_message::Msg::Granted(g) => {
                                tokio::time::sleep(Duration::from_millis(2)).await;
                                a.release_ok(&g.lease_id).await;
                                granted += 1;
                                break;
                            }
                            pb::server_message::Msg::Rejected(r) => {
                                let code = Code::from_i32(r.code);
                                assert!(
                                    matches!(code, Code::ResourceExhausted | Code::DeadlineExceeded),
                                    "{r:?}"
                                );
                                break;
                            }
                            other => panic!("unexpected {other:?}"),
                        }
                    }
                }
                (a, granted)
            }));
        }
    }
    let mut total = 0;
    let mut agents = Vec::new();
    for t in tasks {
        let (a, g) = slotd_test_support::within("an agent", t).await.expect("agent");
        total += g;
        agents.push(a);
    }
    assert!(total > 0);
    d.wait_for("every cooldown to pass", |s| s.pools.iter().all(|p| p.cooling == 0)).await;
    d.assert_idle().await;
    drop(agents);
    d.stop().await;
}
