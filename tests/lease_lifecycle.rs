//! Lease lifecycle over loopback: competing clients, stream drop, TTL reclaim, late messages,
//! heartbeats, fencing tokens and resume grace.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use slotd_proto::v1 as pb;
use slotd_test_support::{Daemon, ms, pool_in, resume_of};
use tonic::Code;

const ONE_POOL: &str = r#"
[pools.p]
max_concurrent = 2
"#;

const SINGLE: &str = r#"
[pools.p]
max_concurrent = 1
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn competing_clients_on_separate_connections_share_the_limit() {
    const CLIENTS: usize = 6;
    const CYCLES: usize = 4;
    let d = Daemon::start(ONE_POOL).await;
    let held = Arc::new(AtomicUsize::new(0));
    let waited = Arc::new(AtomicUsize::new(0));
    let served = Arc::new(AtomicUsize::new(0));
    // Connect everyone first, then start together, so the clients really compete.
    let start = Arc::new(tokio::sync::Barrier::new(CLIENTS));
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let mut agent = d.agent(&format!("agent-{c}")).await;
        let (held, waited, served, start) = (held.clone(), waited.clone(), served.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            for i in 0..CYCLES {
                let id = format!("r{i}");
                agent.request(agent.req(&id, "p")).await;
                let g = match agent.next().await {
                    pb::server_message::Msg::Granted(g) if g.request_id == id => g,
                    pb::server_message::Msg::Queued(q) if q.request_id == id => {
                        waited.fetch_add(1, Ordering::SeqCst);
                        agent.expect_granted(&id).await
                    }
                    other => panic!("expected Granted or Queued for {id}, got {other:?}"),
                };
                // Counted from the grant we saw until just before the Release goes out: a subset of
                // what the daemon holds, so it can never legitimately exceed the limit.
                let now = held.fetch_add(1, Ordering::SeqCst) + 1;
                assert!(now <= 2, "{} leases held at once on a pool of 2", now);
                tokio::time::sleep(Duration::from_millis(3)).await;
                held.fetch_sub(1, Ordering::SeqCst);
                agent.release_ok(&g.lease_id).await;
                served.fetch_add(1, Ordering::SeqCst);
            }
            agent
        }));
    }
    // Meanwhile the daemon's own accounting never goes over the limit either.
    while !tasks.iter().all(|t| t.is_finished()) {
        let s = d.status().await;
        let p = pool_in(&s, "p");
        assert!(p.in_flight <= 2, "Status shows {} in flight", p.in_flight);
        assert!(s.leases.len() <= 2, "Status lists {} leases", s.leases.len());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut agents = Vec::new();
    for t in tasks {
        agents.push(slotd_test_support::within("agent", t).await.expect("agent task"));
    }
    assert_eq!(served.load(Ordering::SeqCst), CLIENTS * CYCLES);
    assert!(waited.load(Ordering::SeqCst) > 0, "no request ever had to wait: the clients did not compete");
    d.assert_idle().await;
    drop(agents);
    d.stop().await;
}

#[tokio::test]
async fn dropping_the_stream_releases_at_once() {
    let d = Daemon::start(SINGLE).await;
    let mut a = d.agent("a").await;
    let mut b = d.agent("b").await;
    let g = a.acquire("ra", "p").await;
    b.request(b.req("rb", "p")).await;
    b.expect_queued("rb").await;
    assert_eq!(d.pool("p").await.queued, 1);

    let t0 = Instant::now();
    drop(a);
    let gb = b.expect_granted("rb").await;
    // The default TTL is 30 s: this was the stream close, not an expiry.
    assert!(t0.elapsed() < Duration::from_secs(2), "took {:?}", t0.elapsed());
    assert_ne!(gb.lease_id, g.lease_id);
    let s = d.status().await;
    assert_eq!(pool_in(&s, "p").in_flight, 1);
    assert_eq!(s.leases.len(), 1);
    assert_eq!(s.leases[0].holder, "b");

    // A queued request leaves the queue when its stream goes away, too.
    let mut c = d.agent("c").await;
    c.request(c.req("rc", "p")).await;
    c.expect_queued("rc").await;
    assert_eq!(d.pool("p").await.queued, 1);
    drop(c);
    d.wait_for("c's waiter to leave the queue", |s| pool_in(s, "p").queued == 0).await;

    // Half-closing the request stream (the client is done) also releases.
    b.close_sending();
    assert_eq!(b.expect_end().await.map(|s| s.code()), None);
    d.wait_for("b's lease to be released", |s| pool_in(s, "p").in_flight == 0 && s.leases.is_empty()).await;
    d.assert_idle().await;
    d.stop().await;
}

#[tokio::test]
async fn heartbeat_stop_reclaims_after_the_ttl_and_late_messages_change_nothing() {
    let d = Daemon::start(SINGLE).await;
    let mut a = d.agent("hung").await;
    let mut b = d.agent("waiter").await;
    let t0 = Instant::now();
    let g = a.acquire_with(pb::LeaseRequest { ttl: Some(ms(150)), ..a.req("ra", "p") }).await;
    b.request(b.req("rb", "p")).await;
    b.expect_queued("rb").await;

    // `a` keeps its stream open but stops heartbeating: the lease is reclaimed after its TTL.
    let e = a.expect_expired(&g.lease_id).await;
    assert!(t0.elapsed() >= Duration::from_millis(150), "expired after {:?}", t0.elapsed());
    assert_eq!(e.reason, pb::ExpiryReason::Ttl as i32);
    let gb = b.expect_granted("rb").await;

    // A late Release and a late Heartbeat for the reclaimed lease get a clear error...
    a.release(&g.lease_id).await;
    a.expect_lease_error(&g.lease_id, Code::FailedPrecondition).await;
    a.heartbeat(&[&g.lease_id]).await;
    a.expect_lease_error(&g.lease_id, Code::FailedPrecondition).await;
    a.expect_heartbeat_ack(0).await;
    // ...and change nothing: b still holds the only slot, with its own token.
    let s = d.status().await;
    assert_eq!(pool_in(&s, "p").in_flight, 1);
    assert_eq!(s.leases.len(), 1);
    assert_eq!(s.leases[0].lease_id, gb.lease_id);
    assert_eq!(s.leases[0].fencing_token, gb.fencing_token);
    assert!(gb.fencing_token > g.fencing_token);
    b.expect_silence(Duration::from_millis(30)).await;

    b.release_ok(&gb.lease_id).await;
    d.assert_idle().await;
    d.stop().await;
}

#[tokio::test]
async fn heartbeats_keep_a_lease_alive_past_several_ttls() {
    let d = Daemon::start(SINGLE).await;
    let mut a = d.agent("alive").await;
    let g = a.acquire_with(pb::LeaseRequest { ttl: Some(ms(100)), ..a.req("ra", "p") }).await;
    let t0 = Instant::now();
    // Five TTLs, renewing every 25 ms (both the all-leases and the listed form).
    let mut n = 0;
    while t0.elapsed() < Duration::from_millis(500) {
        tokio::time::sleep(Duration::from_millis(25)).await;
        if n % 2 == 0 {
            a.heartbeat(&[]).await;
        } else {
            a.heartbeat(&[&g.lease_id]).await;
        }
        a.expect_heartbeat_ack(1).await;
        n += 1;
    }
    let s = d.status().await;
    assert_eq!(s.leases.len(), 1);
    assert_eq!(s.leases[0].lease_id, g.lease_id);
    let expires_in = s.leases[0].expires_in.expect("expires_in");
    assert!(expires_in.seconds == 0 && expires_in.nanos > 0, "{expires_in:?}");
    a.release_ok(&g.lease_id).await;
    d.assert_idle().await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fencing_tokens_strictly_increase() {
    let d = Daemon::start(
        r#"
        [pools.p]
        max_concurrent = 3
        [pools.q]
        max_concurrent = 1
        "#,
    )
    .await;
    let mut a = d.agent("a").await;
    let mut b = d.agent("b").await;
    let mut last = 0u64;
    for i in 0..5 {
        // Alternating streams and connections: one sequence per pool.
        let agent = if i % 2 == 0 { &mut a } else { &mut b };
        let g = agent.acquire(&format!("r{i}"), "p").await;
        assert!(g.fencing_token > last, "token {} after {last}", g.fencing_token);
        assert_eq!(g.pool, "p");
        last = g.fencing_token;
        agent.release_ok(&g.lease_id).await;
    }
    // Concurrent holders get distinct tokens, still increasing in grant order.
    let g1 = a.acquire("x1", "p").await;
    let g2 = b.acquire("x2", "p").await;
    let g3 = a.acquire("x3", "p").await;
    assert!(last < g1.fencing_token);
    assert!(g1.fencing_token < g2.fencing_token);
    assert!(g2.fencing_token < g3.fencing_token);
    let p = d.pool("p").await;
    assert!(p.next_fencing_token > g3.fencing_token);
    // A reclaimed lease does not reset the sequence.
    let ge = b.acquire_with(pb::LeaseRequest { ttl: Some(ms(50)), ..b.req("short", "q") }).await;
    b.expect_expired(&ge.lease_id).await;
    let gq = b.acquire("after", "q").await;
    assert!(gq.fencing_token > ge.fencing_token);
    a.release_ok(&g1.lease_id).await;
    b.release_ok(&g2.lease_id).await;
    a.release_ok(&g3.lease_id).await;
    b.release_ok(&gq.lease_id).await;
    d.assert_idle().await;
    d.stop().await;
}

#[tokio::test]
async fn resume_grace_keeps_the_lease_for_a_new_stream() {
    let d = Daemon::start(SINGLE).await;
    let mut a = d.agent_with_grace("a", "2s").await;
    let g = a.acquire("ra", "p").await;
    let mut w = d.agent("waiter").await;
    w.request(w.req("rw", "p")).await;
    w.expect_queued("rw").await;

    // The process "crashes": its stream goes away, but the lease outlives it for the grace.
    drop(a);
    w.expect_silence(Duration::from_millis(150)).await;
    let s = d.status().await;
    assert_eq!(pool_in(&s, "p").in_flight, 1);
    assert_eq!(s.leases.len(), 1);
    assert_eq!(s.leases[0].lease_id, g.lease_id);

    // It reconnects and resumes with the grant's credential: same lease, same fencing token.
    let mut a2 = d.agent("a-again").await;
    a2.resume(resume_of(&g, "a")).await;
    let r = a2.expect_lease_resumed(&g.lease_id).await;
    assert_eq!(r.fencing_token, g.fencing_token);
    // The lease belongs to the new stream now: it can heartbeat and release it.
    a2.heartbeat(&[]).await;
    a2.expect_heartbeat_ack(1).await;
    a2.release_ok(&g.lease_id).await;
    let gw = w.expect_granted("rw").await;
    assert!(gw.fencing_token > g.fencing_token);
    w.release_ok(&gw.lease_id).await;
    d.assert_idle().await;
    d.stop().await;
}

#[tokio::test]
async fn without_grace_a_dropped_stream_cannot_be_resumed() {
    let d = Daemon::start(SINGLE).await;
    let mut a = d.agent("a").await;
    let g = a.acquire("ra", "p").await;
    drop(a);
    d.wait_for("the lease to be released", |s| s.leases.is_empty()).await;
    let mut a2 = d.agent("a-again").await;
    a2.resume(resume_of(&g, "a")).await;
    a2.expect_lease_error(&g.lease_id, Code::FailedPrecondition).await;
    d.assert_idle().await;
    d.stop().await;
}

#[tokio::test]
async fn an_unclaimed_grace_runs_out_and_frees_the_slot() {
    let d = Daemon::start(SINGLE).await;
    let mut a = d.agent_with_grace("a", "150ms").await;
    let g = a.acquire("ra", "p").await;
    let mut w = d.agent("waiter").await;
    w.request(w.req("rw", "p")).await;
    w.expect_queued("rw").await;
    let t0 = Instant::now();
    drop(a);
    let gw = w.expect_granted("rw").await;
    assert!(t0.elapsed() >= Duration::from_millis(150), "granted after {:?}", t0.elapsed());
    assert_ne!(gw.lease_id, g.lease_id);
    w.release_ok(&gw.lease_id).await;
    d.assert_idle().await;
    d.stop().await;
}

/// The daemon reads a stream and writes its answers from one task, forwarding a bounded number of
/// messages per turn: a long pipelined burst must still be answered completely and in order.
#[tokio::test]
async fn a_pipelined_burst_on_one_stream_is_answered_in_order() {
    const N: usize = 300;
    let d = Daemon::start("[pools.p]\nmax_concurrent = 1000").await;
    let mut a = d.agent("burst").await;
    let sender = {
        let reqs: Vec<pb::LeaseRequest> = (0..N).map(|i| a.req(&format!("r{i}"), "p")).collect();
        let tx = a.sender();
        tokio::spawn(async move {
            for r in reqs {
                tx.send(pb::ClientMessage { msg: Some(pb::client_message::Msg::Request(r)) }).await.unwrap();
            }
        })
    };
    let mut leases = Vec::with_capacity(N);
    for i in 0..N {
        leases.push(a.expect_granted(&format!("r{i}")).await.lease_id);
    }
    sender.await.unwrap();
    assert_eq!(d.pool("p").await.in_flight, N as u32);
    for l in &leases {
        a.release(l).await;
    }
    for l in &leases {
        match a.next().await {
            pb::server_message::Msg::Released(r) => assert_eq!(&r.lease_id, l, "releases out of order"),
            other => panic!("expected Released({l}), got {other:?}"),
        }
    }
    d.assert_idle().await;
    d.stop().await;
}
