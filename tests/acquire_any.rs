//! `acquire_any` through the real daemon: the first listed pool with room, one place in every listed
//! queue, leaving them all, queue order against single-pool waiters, and contention with an auditor.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering::SeqCst},
    },
    time::Duration,
};

use slotd_client::{Outcome, proto as pb};
use slotd_test_support::{Daemon, within};

const TWO: &str = "[pools.a]\nmax_concurrent = 2\n[pools.b]\nmax_concurrent = 1\n";

fn any(agent: &slotd_test_support::Agent, id: &str, pools: &[&str]) -> pb::LeaseRequest {
    pb::LeaseRequest {
        any_pools: pools[1..].iter().map(|p| (*p).to_owned()).collect(),
        ..agent.req(id, pools[0])
    }
}

#[tokio::test]
async fn it_is_granted_on_the_first_listed_pool_with_room_and_says_which() {
    let d = Daemon::start(TWO).await;
    let mut x = d.agent("x").await;
    let mut pools = Vec::new();
    for i in 0..3 {
        let id = format!("r{i}");
        x.request(any(&x, &id, &["a", "b"])).await;
        pools.push(x.expect_granted(&id).await.pool);
    }
    assert_eq!(pools, ["a", "a", "b"]);
    // The caller's order decides, not the pools' names.
    let d = Daemon::start(TWO).await;
    let mut z = d.agent("z").await;
    z.request(any(&z, "first-b", &["b", "a"])).await;
    assert_eq!(z.expect_granted("first-b").await.pool, "b");
}

#[tokio::test]
async fn it_waits_in_every_queue_and_leaves_them_all() {
    let d = Daemon::start(TWO).await;
    let mut holder = d.agent("holder").await;
    let ga1 = holder.acquire("h1", "a").await;
    let _ga2 = holder.acquire("h2", "a").await;
    let gb = holder.acquire("h3", "b").await;
    let mut w = d.agent("w").await;
    w.request(any(&w, "w1", &["a", "b"])).await;
    w.expect_queued("w1").await;
    let (a, b) = (d.pool("a").await, d.pool("b").await);
    assert_eq!((a.queued, b.queued), (1, 1), "queued in both");
    // Cancelled: gone from both.
    w.cancel("w1").await;
    w.expect_cancelled("w1").await;
    let (a, b) = (d.pool("a").await, d.pool("b").await);
    assert_eq!((a.queued, b.queued), (0, 0));
    // Again, and b frees first: granted there, gone from a's queue, and nothing more when a frees.
    w.request(any(&w, "w2", &["a", "b"])).await;
    w.expect_queued("w2").await;
    holder.release(&gb.lease_id).await;
    assert_eq!(w.expect_granted("w2").await.pool, "b");
    assert_eq!(d.pool("a").await.queued, 0);
    holder.release(&ga1.lease_id).await;
    w.expect_silence(Duration::from_millis(50)).await;
    assert_eq!(d.pool("a").await.in_flight, 1);
}

#[tokio::test]
async fn an_earlier_single_pool_waiter_goes_first() {
    let d = Daemon::start(TWO).await;
    let mut holder = d.agent("holder").await;
    holder.acquire("h1", "a").await;
    holder.acquire("h2", "a").await;
    let gb = holder.acquire("h3", "b").await;
    let mut single = d.agent("single").await;
    single.request(single.req("only-b", "b")).await;
    single.expect_queued("only-b").await;
    let mut multi = d.agent("multi").await;
    multi.request(any(&multi, "any", &["a", "b"])).await;
    multi.expect_queued("any").await;
    holder.release(&gb.lease_id).await;
    single.expect_granted("only-b").await;
    multi.expect_silence(Duration::from_millis(50)).await;
}

#[tokio::test]
async fn bad_lists_are_refused() {
    let d = Daemon::start(TWO).await;
    let mut x = d.agent("x").await;
    x.request(any(&x, "dup", &["a", "b", "a"])).await;
    x.expect_rejected("dup", tonic::Code::InvalidArgument).await;
    x.request(any(&x, "unknown", &["a", "nope"])).await;
    x.expect_rejected("unknown", tonic::Code::NotFound).await;
    let many: Vec<String> = (0..9).map(|i| format!("p{i}")).collect();
    let names: Vec<&str> = many.iter().map(String::as_str).collect();
    x.request(any(&x, "many", &names)).await;
    x.expect_rejected("many", tonic::Code::InvalidArgument).await;
    d.assert_idle().await;
}

/// Eight clients loop `acquire_any(["a", "b"])` (3 slots in all); an auditor counts the holders of
/// each pool as the clients see them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contention_across_two_pools_keeps_each_limit() {
    let d = Daemon::start(TWO).await;
    let limits: HashMap<&str, usize> = HashMap::from([("a", 2), ("b", 1)]);
    let holding: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let peak: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let grants = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let client = d.connect().await;
        let (holding, peak, grants) = (holding.clone(), peak.clone(), grants.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..15 {
                let lease = client.acquire_any(["a", "b"]).await.expect("acquire_any");
                let pool = lease.pool().to_owned();
                {
                    let mut h = holding.lock().unwrap();
                    let n = h.entry(pool.clone()).or_default();
                    *n += 1;
                    let mut p = peak.lock().unwrap();
                    let m = p.entry(pool.clone()).or_default();
                    *m = (*m).max(*n);
                }
                grants.fetch_add(1, SeqCst);
                tokio::time::sleep(Duration::from_millis(2)).await;
                *holding.lock().unwrap().get_mut(&pool).unwrap() -= 1;
                lease.release(Outcome::Ok).await.expect("release");
            }
            client.close().await.expect("close");
        }));
    }
    for t in tasks {
        within("client ends", t).await.unwrap();
    }
    assert_eq!(grants.load(SeqCst), 8 * 15);
    let peak = peak.lock().unwrap().clone();
    for (pool, max) in &peak {
        assert!(*max <= limits[pool.as_str()], "{pool} had {max} holders at once");
    }
    assert!(peak.contains_key("a") && peak.contains_key("b"), "both pools served: {peak:?}");
    d.assert_idle().await;
}
