//! High availability: the runtime state a leader publishes to etcd, and what the next leader makes
//! of it. Three `slotd` processes and one real etcd on loopback (see `ha_cluster`).
//!
//! - Pauses (an operator's PausePool, an agent's ReportRateLimit with retry_after) and a breaker forced
//!   open on the leader are in force on the next leader after a SIGKILL, until the same wall time.
//! - A deposed leader's runtime write fails: the epoch guard.
//! - Rate budgets: requests granted by the old leader count against the new leader's window.
//! - Holds and release cooldowns: a cancelled call's slot stays held, a released slot keeps cooling,
//!   on the next leader until the same wall time.
//! - No document: the first leader does not learn; an unreadable one: the next leader learns fully.
//! - Learning ends early: with N leases held and re-presented, the new leader grants a new request
//!   as soon as all N are back, well before its learning period ends. The time is printed.
//!
//! Skipped (with a message) when no `etcd` binary is installed.

use std::time::{Duration, SystemTime};

use etcd_client::{Client as Etcd, GetOptions};
use slotd::ha::runtime::{self, PutError};
use slotd_proto::v1::{self as pb, admin_client::AdminClient};
use slotd_test_support::{dur, resume_of, scrape};
use tonic::transport::Channel;

mod ha_cluster;

use ha_cluster::*;

/// Two extra pools with short TTLs (so the learning period stays the default cluster's).
const PAUSE_POOLS: &str = "[pools.r]\nmax_concurrent = 2\ndefault_ttl = \"3s\"\nmax_ttl = \"3s\"\n\
                           [pools.s]\nmax_concurrent = 2\ndefault_ttl = \"3s\"\nmax_ttl = \"3s\"\n";
/// A pool whose leases may live 30 s: a new leader's learning period is 30 s.
const LONG_TTL: Duration = Duration::from_secs(30);

/// The leader's epoch, from Status metadata.
async fn epoch_of(url: &str) -> i64 {
    let resp = client(url).await.expect("leader").status(pb::StatusRequest::default()).await.expect("status");
    let v = resp.metadata().get(slotd_proto::EPOCH_HEADER).expect("epoch header").to_str().expect("ascii");
    v.parse().expect("a number")
}

/// The election key whose create revision is `epoch`: that term's leader key.
async fn leader_key(e: &Etcd, c: &Cluster, epoch: i64) -> Vec<u8> {
    let resp =
        e.clone().get(c.election(), Some(GetOptions::new().with_prefix())).await.expect("election keys");
    resp.kvs().iter().find(|kv| kv.create_revision() == epoch).expect("the leader key").key().to_vec()
}

fn pool<'a>(st: &'a pb::StatusResponse, name: &str) -> &'a pb::PoolStatus {
    st.pools.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("pool {name} in {st:?}"))
}

fn wall(ts: &prost_types::Timestamp) -> SystemTime {
    SystemTime::try_from(*ts).expect("a valid timestamp")
}

/// The same wall-clock instant, give or take the millisecond rounding of the stored form and the
/// two processes' clock anchors.
#[track_caller]
fn same_wall_time(a: SystemTime, b: SystemTime) {
    let d = a.duration_since(b).unwrap_or_else(|e| e.duration());
    assert!(d <= Duration::from_millis(20), "{a:?} vs {b:?}: {d:?} apart");
}

/// An operator's pause, an agent's 429 pause and a breaker forced open on the leader are in force on
/// the next one, until the same wall time. The deposed leader's write is then refused by the epoch
/// guard, while the new leader's goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pauses_and_breakers_survive_a_failover() {
    let Some(mut c) = cluster_config(2, LEASE_TTL, PAUSE_POOLS) else { return };
    let first = c.leader().await;
    let url = c.url(first).to_owned();
    // The first leader of an election learns for its whole period (no published state); pauses made
    // after it are what this test follows (a successor then learns only for the leases it held).
    let mut warm = agent(&url, "warm").await;
    let g = warm.acquire("warm", "r").await;
    warm.release_ok(&g.lease_id).await;
    let mut admin =
        AdminClient::new(Channel::from_shared(url.clone()).expect("url").connect().await.expect("admin"));
    admin
        .pause_pool(pb::PausePoolRequest {
            pool: "p".into(),
            duration: Some(dur(Duration::from_secs(60))),
            reason: "provider maintenance".into(),
        })
        .await
        .expect("PausePool");
    let a = agent(&url, "a").await;
    a.client()
        .report_rate_limit(pb::ReportRateLimitRequest {
            pool: "r".into(),
            retry_after: Some(dur(Duration::from_secs(45))),
            reason: "429".into(),
            ..Default::default()
        })
        .await
        .expect("ReportRateLimit");
    admin
        .force_breaker(pb::BreakerForceRequest {
            pool: "s".into(),
            to: pb::BreakerForce::Open as i32,
            reason: "provider down".into(),
        })
        .await
        .expect("ForceBreaker");
    let before = probe(&url).await.expect("the leader serves");
    let (p_until, r_until) = (
        wall(pool(&before, "p").paused_until.as_ref().expect("p paused")),
        wall(pool(&before, "r").paused_until.as_ref().expect("r paused")),
    );
    let old_epoch = epoch_of(&url).await;
    let e = c.etcd_client().await;
    c.published("the pauses and the open breaker", |d| {
        d["pools"]["p"]["paused_until_unix_ms"].is_u64()
            && d["pools"]["r"]["paused_until_unix_ms"].is_u64()
            && d["pools"]["s"]["breaker"] == "open"
    })
    .await;
    let old_key = leader_key(&e, &c, old_epoch).await;

    let next = c.kill_leader(first).await.next;
    drop(a);
    let url = c.url(next).to_owned();
    let after = probe(&url).await.expect("the new leader serves");
    let (p, r, s) = (pool(&after, "p"), pool(&after, "r"), pool(&after, "s"));
    same_wall_time(wall(p.paused_until.as_ref().expect("p still paused")), p_until);
    assert_eq!(p.pause_reason, pool(&before, "p").pause_reason);
    same_wall_time(wall(r.paused_until.as_ref().expect("r still paused")), r_until);
    let breaker = s.breaker.as_ref().expect("breaker");
    assert_eq!(breaker.state, pb::BreakerState::Open as i32, "{breaker:?}");
    assert!(breaker.forced, "still forced open (until an operator closes it): {breaker:?}");
    // In force: a request on the paused pool waits.
    let mut w = agent(&url, "w").await;
    w.request(w.req("rw", "p")).await;
    let q = w.expect_queued("rw").await;
    assert_eq!(q.gate, pb::Gate::Pause as i32, "{q:?}");

    // The new leader publishes under its epoch; the deposed leader's epoch no longer writes.
    let new_epoch = epoch_of(&url).await;
    assert!(new_epoch > old_epoch);
    let doc = c.published("the new epoch", |d| d["epoch"] == new_epoch).await;
    let key = runtime::runtime_key(&c.election());
    let refused =
        runtime::put_guarded(&e, &old_key, old_epoch, &key, "{}".into(), Duration::from_secs(2)).await;
    assert!(matches!(refused, Err(PutError::Deposed(ep)) if ep == old_epoch), "{refused:?}");
    assert_eq!(c.runtime_doc(&e).await.expect("still stored")["epoch"], new_epoch, "unchanged");
    // The same write under the live term's key and epoch goes through: the guard is what refused.
    let new_key = leader_key(&e, &c, new_epoch).await;
    runtime::put_guarded(&e, &new_key, new_epoch, &key, doc.to_string(), Duration::from_secs(2))
        .await
        .expect("the live term writes");
}

/// With N leases held on a pool whose leases may live 30 s, the new leader grants a new request as
/// soon as all N are re-presented, while its term's 30 s learning period still runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learning_ends_once_every_lease_is_back() {
    const N: usize = 2;
    let Some(mut c) = cluster(2) else { return };
    let first = c.leader().await;
    let url = c.url(first).to_owned();
    // The first leader of an election has no published state: it learns for its whole period (the
    // longest max_ttl, 3 s); the pool with 30 s leases is added after that.
    let mut warm = agent(&url, "warm").await;
    let g = warm.acquire("warm", "p").await;
    warm.release_ok(&g.lease_id).await;
    let mut admin =
        AdminClient::new(Channel::from_shared(url.clone()).expect("url").connect().await.expect("admin"));
    let spec = pb::PoolSpec {
        name: "long".into(),
        max_concurrent: Some(N as u32 + 1),
        default_ttl: Some(dur(LONG_TTL)),
        max_ttl: Some(dur(LONG_TTL)),
        ..Default::default()
    };
    admin.upsert_pool(pb::UpsertPoolRequest { pool: Some(spec) }).await.expect("upsert on the leader");
    let mut held = Vec::new();
    for i in 0..N {
        let name = format!("h{i}");
        let mut a = agent(&url, &name).await;
        let g = a.acquire(&format!("r{i}"), "long").await;
        held.push((name, g, a));
    }
    c.published("the held count", |d| d["pools"]["long"]["held"] == N as u64).await;

    let Failover { next, killed, elected } = c.kill_leader(first).await;
    let url = c.url(next).to_owned();
    let st = probe(&url).await.expect("the new leader serves");
    assert!(st.learning, "the term's learning period runs");
    let l = pool(&st, "long");
    let learning_end = wall(l.learning_until.as_ref().expect("long learns"));
    assert_eq!((l.learning_expected, l.learning_back), (Some(N as u32), 0));
    assert!(pool(&st, "p").learning_until.is_none(), "a pool the old leader held nothing on does not learn");

    let mut w = agent(&url, "w").await;
    w.request(w.req("new", "long")).await;
    let q = w.expect_queued("new").await;
    assert_eq!(q.gate, pb::Gate::Learning as i32, "{q:?}");
    let mut back = Vec::new();
    for (name, g, _) in &held {
        let mut a = agent(&url, name).await;
        a.resume(resume_of(g, name)).await;
        a.expect_lease_resumed(&g.lease_id).await;
        back.push(a);
    }
    let granted = w.expect_granted("new").await;
    let granted_at = SystemTime::now();
    let took = killed.elapsed();
    assert!(granted_at < learning_end, "granted before the learning period's end");
    let st = probe(&url).await.expect("serving");
    assert!(st.learning, "the term's period still runs (re-creation stays open)");
    assert!(pool(&st, "long").learning_until.is_none(), "long left learning");
    assert!(granted.fencing_token > held.iter().map(|h| h.1.fencing_token).max().unwrap_or(0));

    let text = scrape(c.metrics(next)).await;
    let pool_secs: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("slotd_ha_learning_pool_seconds{pool=\"long\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("slotd_ha_learning_pool_seconds for long: {text}"));
    assert!(pool_secs < LONG_TTL.as_secs_f64(), "{pool_secs}");
    assert!(text.contains("slotd_ha_learning_pool_seconds{pool=\"p\"} 0"), "{text}");
    eprintln!(
        "learning: kill -> new leader serving {elected:?}, kill -> first new grant {took:?}; \
         pool learning took {pool_secs:.3}s of a {LONG_TTL:?} period ({N} leases re-presented)"
    );
    drop((held, back));
}

/// The election's first leader grants at once (no leader served before it); a runtime document
/// that cannot be read makes the next leader learn for its whole period, the safe side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_document_means_no_learning_and_a_bad_one_means_full_learning() {
    let extra = format!(
        "[pools.long]\nmax_concurrent = 2\ndefault_ttl = \"{0}s\"\nmax_ttl = \"{0}s\"\n",
        LONG_TTL.as_secs()
    );
    let Some(mut c) = cluster_config(2, LEASE_TTL, &extra) else { return };
    let first = c.leader().await;
    let url = c.url(first).to_owned();
    let st = probe(&url).await.expect("the first leader serves");
    assert!(!st.learning, "the first leader of an election learns: {st:?}");
    let mut a = agent(&url, "a").await;
    let g = a.acquire("r1", "long").await;
    assert!(g.fencing_token > 0);

    // Replace the document with one no leader could have written (and hold nothing that would make
    // the leader rewrite it), then kill the leader.
    let e = c.etcd_client().await;
    c.published("long held 1", |d| d["pools"]["long"]["held"] == 1).await;
    let key = format!("/slotd/{}/runtime", c.election());
    e.clone().put(key, "{ not json", None).await.expect("etcd put");
    let next = c.kill_leader(first).await.next;
    let st = probe(c.url(next)).await.expect("the new leader serves");
    assert!(st.learning, "an unreadable document is ignored: the whole period is learned");
    let l = pool(&st, "long");
    let until = wall(l.learning_until.as_ref().expect("long learns"));
    assert!(until > SystemTime::now() + LONG_TTL / 2, "long learns for its max_ttl: until {until:?}");
    assert_eq!(l.learning_expected, None, "no count is known");
}

/// Requests the old leader granted count against the new leader's request budget: with all 3
/// requests of a minute spent on the old leader, the new leader queues the next request on the
/// budget instead of granting 3 more in the same minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_budgets_survive_a_failover() {
    let extra = "[pools.rpm]\nmax_concurrent = 10\ndefault_ttl = \"3s\"\nmax_ttl = \"3s\"\n\n\
                 [pools.rpm.budget]\nrequests_per_minute = 3\n";
    let Some(mut c) = cluster_config(2, LEASE_TTL, extra) else { return };
    let first = c.leader().await;
    let url = c.url(first).to_owned();
    let mut a = agent(&url, "a").await;
    for i in 0..3 {
        let g = a.acquire(&format!("r{i}"), "rpm").await;
        a.release_ok(&g.lease_id).await;
    }
    let level = |st: &pb::StatusResponse| {
        let b = pool(st, "rpm").budget.as_ref().expect("rpm has a budget");
        b.levels.iter().find(|l| l.kind == pb::BudgetKind::Requests as i32).expect("requests").level
    };
    assert_eq!(level(&probe(&url).await.expect("the leader serves")), 0, "all three spent");
    let doc = c
        .published("the spent request budget", |d| {
            d["pools"]["rpm"]["held"] == 0 && d["pools"]["rpm"]["budget_full_at_unix_ms"]["requests"].is_u64()
        })
        .await;
    let full_at = doc["pools"]["rpm"]["budget_full_at_unix_ms"]["requests"].as_u64().expect("a time");
    let now_ms =
        SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).expect("after 1970").as_millis() as u64;
    assert!(full_at > now_ms + 50_000, "3 requests at 3 per minute: full again in about a minute");

    let next = c.kill_leader(first).await.next;
    drop(a);
    let url = c.url(next).to_owned();
    let st = probe(&url).await.expect("the new leader serves");
    assert!(pool(&st, "rpm").learning_until.is_none(), "nothing was held: no learning");
    assert_eq!(level(&st), 0, "the old leader's requests count on the new leader");
    let mut w = agent(&url, "w").await;
    w.request(w.req("after", "rpm")).await;
    let q = w.expect_queued("after").await;
    assert_eq!(q.gate, pb::Gate::RequestsBudget as i32, "{q:?}");
}

/// A cancelled call's slot stays held on the next leader: with one slot kept by a 30 s
/// `cancel_cooldown` on the old leader, the new leader shows it held until the same wall time and
/// grants nothing on the pool meanwhile (the provider may still be running the cancelled call). A
/// slot in its 30 s release `cooldown` keeps cooling likewise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_and_cooldowns_survive_a_failover() {
    let extra = "[pools.hc]\nmax_concurrent = 1\nadaptive = false\ndefault_ttl = \"3s\"\nmax_ttl = \"3s\"\n\n\
                 [pools.hc.health]\ncancel_cooldown = \"30s\"\n\n\
                 [pools.cd]\nmax_concurrent = 1\nadaptive = false\ndefault_ttl = \"3s\"\nmax_ttl = \"3s\"\n\
                 cooldown = \"30s\"\n";
    let Some(mut c) = cluster_config(2, LEASE_TTL, extra) else { return };
    let first = c.leader().await;
    let url = c.url(first).to_owned();
    let mut a = agent(&url, "a").await;
    let g = a.acquire("r1", "hc").await;
    a.release_with(&g.lease_id, pb::Outcome::Cancelled, None).await;
    a.expect_released(&g.lease_id).await;
    let g = a.acquire("r2", "cd").await;
    a.release_ok(&g.lease_id).await;
    let before = probe(&url).await.expect("the leader serves");
    let hc = pool(&before, "hc");
    assert_eq!(hc.held, 1, "{hc:?}");
    let held_until = wall(hc.held_until.as_ref().expect("held until"));
    assert_eq!(pool(&before, "cd").cooling, 1);
    c.published("the cancel hold and the cooldown", |d| {
        d["pools"]["hc"]["holds"][0]["kind"] == "cancel_cooldown"
            && d["pools"]["hc"]["held"] == 0
            && d["pools"]["cd"]["cooling_until_unix_ms"][0].is_u64()
    })
    .await;

    let next = c.kill_leader(first).await.next;
    drop(a);
    let url = c.url(next).to_owned();
    let after = probe(&url).await.expect("the new leader serves");
    let hc = pool(&after, "hc");
    assert_eq!(hc.held, 1, "the hold came over: {hc:?}");
    same_wall_time(wall(hc.held_until.as_ref().expect("held until")), held_until);
    let mut w = agent(&url, "w").await;
    w.request(w.req("after", "hc")).await;
    let q = w.expect_queued("after").await;
    assert_eq!(q.gate, pb::Gate::Cooldown as i32, "held slots show as cooldown: {q:?}");
    assert_eq!(pool(&after, "cd").cooling, 1, "the cooldown came over");
    w.request(w.req("after-cd", "cd")).await;
    let q = w.expect_queued("after-cd").await;
    assert_eq!(q.gate, pb::Gate::Cooldown as i32, "{q:?}");
}
