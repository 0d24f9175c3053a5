//! The pool tree over loopback: a global cap over two children is never exceeded at any level while
//! many clients hammer both; runtime limit changes grant at once when raised and revoke nothing when
//! lowered.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use slotd_proto::v1 as pb;
use slotd_test_support::{Daemon, pool_in};

const TREE: &str = r#"
[pools.global]
max_concurrent = 3

[pools.a]
max_concurrent = 2
parent = "global"

[pools.b]
max_concurrent = 2
parent = "global"
"#;

/// Leases a client has seen granted and not yet released, per level. Incremented after Granted
/// arrives and decremented before Release goes out, so each is a lower bound of what the daemon
/// holds: exceeding a limit here means the daemon exceeded it.
#[derive(Default)]
struct Audit {
    global: AtomicUsize,
    a: AtomicUsize,
    b: AtomicUsize,
    peak_global: AtomicUsize,
    peak_a: AtomicUsize,
    peak_b: AtomicUsize,
    /// Requests that had to queue: proof the limits were contended.
    waited: AtomicUsize,
}

impl Audit {
    fn child(&self, pool: &str) -> (&AtomicUsize, &AtomicUsize) {
        match pool {
            "a" => (&self.a, &self.peak_a),
            _ => (&self.b, &self.peak_b),
        }
    }

    fn enter(&self, pool: &str) {
        let g = self.global.fetch_add(1, Ordering::SeqCst) + 1;
        let (child, peak) = self.child(pool);
        let c = child.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak_global.fetch_max(g, Ordering::SeqCst);
        peak.fetch_max(c, Ordering::SeqCst);
        assert!(g <= 3, "{g} leases held at once under global (max 3)");
        assert!(c <= 2, "{c} leases held at once on {pool} (max 2)");
    }

    fn leave(&self, pool: &str) {
        self.child(pool).0.fetch_sub(1, Ordering::SeqCst);
        self.global.fetch_sub(1, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_tree_is_never_exceeded_at_any_level() {
    const CLIENTS_PER_CHILD: usize = 5;
    const CYCLES: usize = 8;
    let d = Daemon::start(TREE).await;
    let audit = Arc::new(Audit::default());
    let mut tasks = Vec::new();
    // Connect everyone first, then start together, so the clients really overlap.
    let start = Arc::new(tokio::sync::Barrier::new(2 * CLIENTS_PER_CHILD));
    for pool in ["a", "b"] {
        for c in 0..CLIENTS_PER_CHILD {
            let mut agent = d.agent(&format!("{pool}-{c}")).await;
            let audit = audit.clone();
            let start = start.clone();
            tasks.push(tokio::spawn(async move {
                start.wait().await;
                for i in 0..CYCLES {
                    let id = format!("r{i}");
                    agent
                        .request(pb::LeaseRequest {
                            priority: Some(((c + i) % 10) as u32),
                            ..agent.req(&id, pool)
                        })
                        .await;
                    let g = match agent.next().await {
                        pb::server_message::Msg::Granted(g) if g.request_id == id => g,
                        pb::server_message::Msg::Queued(q) if q.request_id == id => {
                            audit.waited.fetch_add(1, Ordering::SeqCst);
                            agent.expect_granted(&id).await
                        }
                        other => panic!("expected Granted or Queued for {id}, got {other:?}"),
                    };
                    assert_eq!(g.pool, pool);
                    audit.enter(pool);
                    tokio::time::sleep(Duration::from_millis(1 + (c as u64 + i as u64) % 3)).await;
                    audit.leave(pool);
                    agent.release_ok(&g.lease_id).await;
                }
                agent
            }));
        }
    }

    // The daemon's own accounting agrees, at every Status taken while the clients run.
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let client = d.client();
        let done = done.clone();
        tokio::spawn(async move {
            let mut snapshots = 0;
            while !done.load(Ordering::SeqCst) {
                let s =
                    client.clone().status(pb::StatusRequest::default()).await.expect("status").into_inner();
                let (g, a, b) = (pool_in(&s, "global"), pool_in(&s, "a"), pool_in(&s, "b"));
                assert!(g.in_flight <= 3, "{g:?}");
                assert!(a.in_flight <= 2 && b.in_flight <= 2, "{a:?} {b:?}");
                assert_eq!(g.in_flight, a.in_flight + b.in_flight, "parents count their children's leases");
                assert!(s.leases.len() <= 3);
                snapshots += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            snapshots
        })
    };

    let mut agents = Vec::new();
    for t in tasks {
        agents.push(slotd_test_support::within("a client", t).await.expect("client task"));
    }
    done.store(true, Ordering::SeqCst);
    let snapshots = slotd_test_support::within("the watcher", watcher).await.expect("watcher task");
    assert!(snapshots > 0);
    // The limits were actually contended (how often, and the peaks the clients saw, depend on timing).
    assert!(audit.waited.load(Ordering::SeqCst) > 0, "no request ever had to wait");
    assert!(audit.peak_a.load(Ordering::SeqCst) >= 1 && audit.peak_b.load(Ordering::SeqCst) >= 1);
    d.assert_idle().await;
    drop(agents);
    d.stop().await;
}

#[tokio::test]
async fn a_child_grant_takes_a_slot_on_its_parent_too() {
    let d = Daemon::start(TREE).await;
    let mut x = d.agent("x").await;
    let ga1 = x.acquire("a1", "a").await;
    let ga2 = x.acquire("a2", "a").await;
    let gb1 = x.acquire("b1", "b").await;
    // global is full: b has room of its own but must wait for the parent.
    let mut y = d.agent("y").await;
    y.request(y.req("b2", "b")).await;
    y.expect_queued("b2").await;
    let s = d.status().await;
    assert_eq!(pool_in(&s, "global").in_flight, 3);
    assert_eq!(pool_in(&s, "b").in_flight, 1);
    // Freeing a slot under a sibling frees the parent: b2 goes.
    x.release_ok(&ga1.lease_id).await;
    let gb2 = y.expect_granted("b2").await;
    for id in [&ga2.lease_id, &gb1.lease_id] {
        x.release_ok(id).await;
    }
    y.release_ok(&gb2.lease_id).await;
    d.assert_idle().await;
    d.stop().await;
}

const ONE: &str = r#"
[pools.p]
max_concurrent = 1
"#;

const THREE: &str = r#"
[pools.p]
max_concurrent = 3
"#;

#[tokio::test]
async fn raising_a_limit_grants_at_once_and_lowering_it_revokes_nothing() {
    let d = Daemon::start_with_reload(ONE).await;
    let mut h = d.agent("holder").await;
    let mut w = d.agent("waiters").await;
    let g0 = h.acquire("h", "p").await;
    w.request(w.req("w1", "p")).await;
    w.expect_queued("w1").await;
    w.request(w.req("w2", "p")).await;
    w.expect_queued("w2").await;

    // Raise 1 -> 3: both waiters are granted at once.
    d.reload(THREE).await;
    let g1 = w.expect_granted("w1").await;
    let g2 = w.expect_granted("w2").await;
    let p = d.pool("p").await;
    assert_eq!((p.limit, p.in_flight, p.queued), (3, 3, 0));

    // Lower 3 -> 1: every held lease stays, nobody is told anything.
    d.reload(ONE).await;
    d.wait_for("the lowered limit", |s| pool_in(s, "p").limit == 1).await;
    h.expect_silence(Duration::from_millis(50)).await;
    w.expect_silence(Duration::from_millis(1)).await;
    let s = d.status().await;
    assert_eq!(pool_in(&s, "p").in_flight, 3);
    assert_eq!(s.leases.len(), 3);
    // Heartbeats still work on the over-limit leases.
    w.heartbeat(&[]).await;
    w.expect_heartbeat_ack(2).await;

    // New requests wait until in_flight drops below the new limit.
    let mut n = d.agent("newcomer").await;
    n.request(n.req("n", "p")).await;
    n.expect_queued("n").await;
    h.release_ok(&g0.lease_id).await;
    n.expect_silence(Duration::from_millis(30)).await;
    w.release_ok(&g1.lease_id).await;
    n.expect_silence(Duration::from_millis(30)).await;
    w.release_ok(&g2.lease_id).await;
    let gn = n.expect_granted("n").await;
    n.release_ok(&gn.lease_id).await;
    d.assert_idle().await;
    d.stop().await;
}

#[tokio::test]
async fn raising_a_parent_limit_grants_waiting_children() {
    let tree = |global: u32| {
        format!(
            "[pools.global]\nmax_concurrent = {global}\n[pools.a]\nmax_concurrent = 4\nparent = \"global\"\n"
        )
    };
    let d = Daemon::start_with_reload(&tree(1)).await;
    let mut x = d.agent("x").await;
    let g = x.acquire("first", "a").await;
    let mut y = d.agent("y").await;
    y.request(y.req("second", "a")).await;
    y.expect_queued("second").await;
    d.reload(&tree(2)).await;
    let g2 = y.expect_granted("second").await;
    assert_eq!(d.pool("global").await.in_flight, 2);
    x.release_ok(&g.lease_id).await;
    y.release_ok(&g2.lease_id).await;
    d.assert_idle().await;
    d.stop().await;
}
