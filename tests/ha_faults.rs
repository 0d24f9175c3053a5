//! High availability when etcd fails under the leader: three `slotd` members, one real etcd, and
//! agents cycling leases through `slotd-client` given every member.
//!
//! - Cut the leader from etcd (a `slotd_test_support::TcpProxy` between them, cut or silenced)
//!   while its clients still reach it: it keeps serving until its grant deadline, grants nothing
//!   from then on, ends its streams and exits; a standby (with its own, unaffected path to etcd)
//!   takes over.
//! - Cut it briefly (healed well before its deadline): it reconnects and keeps its term.
//! - Restart etcd quickly (well within the lease TTL): the leader keeps serving, or steps down
//!   cleanly; either way the agents are served again.
//! - Stop etcd past the lease TTL: the leader steps down (no grant after its deadline, streams
//!   ended, process exited); once etcd is back a standby is elected and the agents are served again.
//!
//! In every case an auditor checks the agents' claims: never more than the limit at once, every
//! fencing token granted once, and a claim granted after another one was released carries a higher
//! token (tokens strictly increase per pool across the failure). The fence and failover times are
//! printed (docs/BENCHMARKS.md, "Failure tests").
//!
//! Skipped (with a message) when no `etcd` binary is installed. Each member is this test binary run
//! again as `ha_cluster::ha_member` (see tests/ha_cluster).

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use slotd_proto::v1 as pb;
use slotd_test_support::Agent;
use tonic::Code;

mod ha_cluster;

use ha_cluster::*;

/// [`LEASE_TTL`] as a duration.
const TTL: Duration = Duration::from_secs(2);
/// Agents cycling leases; more than the limit, so that some always wait.
const AGENTS: usize = 4;
/// The pool's limit.
const LIMIT: u32 = 2;
/// How long an agent holds each lease.
const HOLD: Duration = Duration::from_millis(20);
/// A grant's wall time is read back from its `expires_at - ttl`, which the daemon maps from its
/// monotonic clock through an anchor taken at start: allow for the wall clock being slewed since.
const CLOCK_SLACK: Duration = Duration::from_millis(20);

/// One lease as an agent held it.
#[derive(Clone, Copy, Debug)]
struct Claim {
    agent: usize,
    token: u64,
    /// When the daemon granted it (its `expires_at - ttl`, wall clock).
    granted: SystemTime,
    /// From the grant's arrival to just before the release (this process's clock).
    from: Instant,
    to: Instant,
}

impl Claim {
    fn epoch(&self) -> u64 {
        self.token >> 32
    }
}

/// Agents on `slotd-client`, each given every member, acquiring and releasing in a loop.
struct Agents {
    claims: Arc<Mutex<Vec<Claim>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Agents {
    async fn start(urls: Vec<String>) -> Agents {
        let claims = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for agent in 0..AGENTS {
            let (urls, claims, stop) = (urls.clone(), claims.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let client = slotd_client::Client::builder()
                    .holder(format!("agent-{agent}"))
                    .resume_grace(Some(Duration::from_secs(5)))
                    .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
                    .connect_any(urls)
                    .await
                    .expect("client");
                while !stop.load(Ordering::Relaxed) {
                    let lease = client.acquire("p").await.expect("acquire");
                    let from = Instant::now();
                    let granted = lease.expires_at() - lease.ttl();
                    tokio::time::sleep(HOLD).await;
                    let claim =
                        Claim { agent, token: lease.fencing_token(), granted, from, to: Instant::now() };
                    claims.lock().expect("claims").push(claim);
                    let _ = lease.release(slotd_client::Outcome::Ok).await;
                }
            }));
        }
        Agents { claims, stop, tasks }
    }

    fn claims(&self) -> Vec<Claim> {
        self.claims.lock().expect("claims").clone()
    }

    /// Waits until every agent got a lease after `since` (a bounded wait: a failover at most).
    #[track_caller]
    fn served_since(&self, since: Instant, what: &'static str) -> impl std::future::Future<Output = ()> + '_ {
        let at = std::panic::Location::caller();
        async move {
            let deadline = Instant::now() + FAILOVER_TIMEOUT * 2;
            loop {
                let claims = self.claims();
                if (0..AGENTS).all(|n| claims.iter().any(|c| c.agent == n && c.from > since)) {
                    return;
                }
                assert!(Instant::now() < deadline, "{at}: not every agent was served {what}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// Stops the agents and returns every claim.
    async fn stop(self) -> Vec<Claim> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            tokio::time::timeout(FAILOVER_TIMEOUT, t).await.expect("agents stop").expect("agent task");
        }
        self.claims.lock().expect("claims").clone()
    }
}

/// The auditor: no over-grant by fencing token, tokens granted once, and strictly increasing in
/// the order the agents saw grants and releases.
#[track_caller]
fn audit(claims: &[Claim]) {
    let mut edges: Vec<(Instant, i32)> = claims.iter().flat_map(|c| [(c.from, 1), (c.to, -1)]).collect();
    edges.sort_by_key(|&(at, d)| (at, d));
    let (mut now, mut most) = (0, 0);
    for (_, d) in edges {
        now += d;
        most = most.max(now);
    }
    assert!(most <= LIMIT as i32, "{most} leases held at once, limit {LIMIT}");
    let mut tokens: Vec<u64> = claims.iter().map(|c| c.token).collect();
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!(tokens.len(), claims.len(), "a fencing token was granted twice");
    for a in claims {
        for b in claims.iter().filter(|b| a.to < b.from) {
            assert!(
                a.token < b.token,
                "token {} (epoch {}) granted after token {} (epoch {}) was released",
                b.token,
                b.epoch(),
                a.token,
                a.epoch()
            );
        }
    }
}

/// Every grant of `epoch` happened before `bound` (wall clock).
#[track_caller]
fn no_grant_of_epoch_after(claims: &[Claim], epoch: u64, bound: SystemTime, what: &str) {
    for c in claims.iter().filter(|c| c.epoch() == epoch) {
        assert!(
            c.granted < bound + CLOCK_SLACK,
            "epoch {epoch} granted token {} {:?} after {what}",
            c.token,
            c.granted.duration_since(bound).unwrap_or_default()
        );
    }
}

/// The leader's epoch, from the `slotd-epoch` metadata of its Status.
async fn epoch_of(url: &str) -> u64 {
    let resp =
        client(url).await.expect("a leader").status(pb::StatusRequest::default()).await.expect("status");
    let epoch = resp.metadata().get(slotd_proto::EPOCH_HEADER).expect("an epoch on the leader");
    epoch.to_str().expect("ascii").parse().expect("a number")
}

/// Reads `watcher`'s stream to its end: it must end with UNAVAILABLE. Returns when it ended.
#[track_caller]
fn streams_end(watcher: &mut Agent) -> impl std::future::Future<Output = (Instant, SystemTime)> + '_ {
    let at = std::panic::Location::caller();
    async move {
        let (_, status) = watcher.until_end().await;
        let ended = (Instant::now(), SystemTime::now());
        assert!(
            status.as_ref().is_some_and(|s| s.code() == Code::Unavailable),
            "{at}: the deposed leader's stream ends with UNAVAILABLE: {status:?}"
        );
        ended
    }
}

fn urls(c: &Cluster) -> Vec<String> {
    (0..3).map(|i| c.url(i).to_owned()).collect()
}

/// A cluster under load, before its fault: the leader, its epoch, an idle agent on it (whose stream's
/// end [`streams_end`] times) and the cycling agents, every one served once.
struct Loaded {
    first: usize,
    epoch: u64,
    watcher: Agent,
    agents: Agents,
}

async fn under_load(c: &Cluster) -> Loaded {
    let first = c.leader().await;
    let epoch = epoch_of(c.url(first)).await;
    let watcher = agent(c.url(first), "watcher").await;
    let agents = Agents::start(urls(c)).await;
    agents.served_since(Instant::now(), "before the fault").await;
    Loaded { first, epoch, watcher, agents }
}

/// Cut the leader from etcd while its clients still reach it: it grants until its deadline (its
/// last keepalive before the cut + TTL − margin) and not after, ends its streams, exits; a standby
/// takes over and every agent is served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_from_etcd_fences_itself_and_a_standby_takes_over() {
    partition_the_leader(Partition::Cut).await;
}

/// [`a_leader_cut_from_etcd_fences_itself_and_a_standby_takes_over`] when the link goes silent
/// instead: its connections to etcd stay open and nothing gets through, so no error tells the
/// leader; only its deadline does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_silently_partitioned_from_etcd_fences_itself_and_a_standby_takes_over() {
    partition_the_leader(Partition::Silent).await;
}

/// How the leader loses etcd.
#[derive(Clone, Copy, Debug)]
enum Partition {
    /// Its connections to etcd are closed, new ones blackholed (`TcpProxy::cut`).
    Cut,
    /// Its connections to etcd stay open and drop every byte (`TcpProxy::silence`).
    Silent,
}

async fn partition_the_leader(how: Partition) {
    let Some(mut c) = cluster_via_proxies(LIMIT, LEASE_TTL, "") else { return };
    let Loaded { first, epoch, mut watcher, agents } = under_load(&c).await;

    let (cut_at, cut_wall) = (Instant::now(), SystemTime::now());
    match how {
        Partition::Cut => c.proxies[first].cut(),
        Partition::Silent => c.proxies[first].silence(),
    }
    let (ended, _) = streams_end(&mut watcher).await;
    let fenced = ended - cut_at;
    let code = c.wait_exit(first).await;
    let exited = cut_at.elapsed();
    assert_ne!(code, Some(0), "a deposed leader exits non-zero");
    let next = c.leader().await;
    let serving = cut_at.elapsed();
    assert_ne!(next, first);
    let next_epoch = epoch_of(c.url(next)).await;
    assert!(next_epoch > epoch, "the new term's epoch {next_epoch} is above {epoch}");
    agents.served_since(Instant::now(), "by the new leader").await;
    let claims = agents.stop().await;

    audit(&claims);
    // Its last keepalive before the cut was sent before the cut: no grant of its term after the
    // cut + TTL − margin.
    no_grant_of_epoch_after(&claims, epoch, cut_wall + (TTL - MARGIN), "the cut + TTL − margin");
    // Cut from etcd but not from its clients, it kept serving them meanwhile.
    assert!(
        claims.iter().any(|c| c.epoch() == epoch && c.granted > cut_wall),
        "the cut leader granted nothing after the cut (it should serve until its deadline)"
    );
    let first_new = claims.iter().filter(|c| c.epoch() == next_epoch).map(|c| c.from).min();
    let first_new = first_new.expect("grants of the new term") - cut_at;
    eprintln!(
        "etcd cut ({how:?}): cut -> streams ended {fenced:?}, -> exited {exited:?}, -> new leader serving \
         {serving:?}, -> first grant of the new term {first_new:?} (lease_ttl {LEASE_TTL}, margin {MARGIN:?})"
    );
}

/// Cut the leader from etcd briefly (healed well before its grant deadline): it reconnects, renews
/// and keeps its term; nobody else is elected and the auditor holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_from_etcd_briefly_keeps_its_term() {
    let Some(mut c) = cluster_via_proxies(LIMIT, LEASE_TTL, "") else { return };
    let Loaded { first, epoch, mut watcher, agents } = under_load(&c).await;

    let cut = Instant::now();
    c.proxies[first].cut();
    tokio::time::sleep(BRIEF_CUT).await;
    c.proxies[first].heal();
    // Past every deadline a keepalive before the cut could give: grants of its term from here on
    // prove that it renewed after the heal.
    tokio::time::sleep((cut + TTL).saturating_duration_since(Instant::now())).await;
    let after = Instant::now();
    agents.served_since(after, "after the heal").await;
    let claims = agents.stop().await;
    let late: Vec<&Claim> = claims.iter().filter(|c| c.from > after).collect();
    assert!(late.iter().all(|c| c.epoch() == epoch), "another term granted: {late:?}");
    assert!(c.members[first].as_mut().expect("live").try_exit().is_none(), "the leader exited");
    assert_eq!(c.leader().await, first);
    assert_eq!(epoch_of(c.url(first)).await, epoch);
    assert!(watcher.next_within(Duration::from_millis(50)).await.is_none(), "the watcher heard something");
    audit(&claims);
}

/// How long [`a_leader_cut_from_etcd_briefly_keeps_its_term`] cuts: well within the grant window
/// (TTL − margin − a keepalive period = 0.83 s at worst).
const BRIEF_CUT: Duration = Duration::from_millis(300);

/// Restart etcd at once (its outage well within the lease TTL): the leader keeps serving (same
/// term) or steps down cleanly; the agents are served again and the auditor holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quick_etcd_restart_keeps_the_leader_or_steps_it_down_cleanly() {
    let Some(mut c) = cluster(LIMIT) else { return };
    let Loaded { first, epoch, mut watcher, agents } = under_load(&c).await;

    let killed = Instant::now();
    tokio::task::block_in_place(|| {
        c.etcd.kill();
        c.etcd.start_again();
    });
    let outage = killed.elapsed();
    // Past every deadline a keepalive before the kill could give: a grant of the old term from
    // here on proves the leader renewed once etcd was back.
    tokio::time::sleep((killed + TTL).saturating_duration_since(Instant::now())).await;
    let after = Instant::now();
    agents.served_since(after, "after etcd came back").await;
    let late: Vec<Claim> = agents.claims().into_iter().filter(|c| c.from > after).collect();
    let kept = late.iter().all(|c| c.epoch() == epoch);
    if kept {
        // Same term: it renewed through the restart, its streams are intact and it still leads.
        assert!(c.members[first].as_mut().expect("live").try_exit().is_none(), "the leader exited");
        assert_eq!(c.leader().await, first);
        assert_eq!(epoch_of(c.url(first)).await, epoch);
        assert!(
            watcher.next_within(Duration::from_millis(50)).await.is_none(),
            "the watcher heard something"
        );
    } else {
        let (_, ended_wall) = streams_end(&mut watcher).await;
        assert_ne!(c.wait_exit(first).await, Some(0), "a deposed leader exits non-zero");
        let next = c.leader().await;
        assert!(epoch_of(c.url(next)).await > epoch);
        // It stopped granting before it ended its streams.
        no_grant_of_epoch_after(&agents.claims(), epoch, ended_wall, "its streams ended");
    }
    let claims = agents.stop().await;
    audit(&claims);
    eprintln!(
        "etcd restart within the TTL: outage {outage:?}; the leader {}",
        if kept { "kept serving (same term)" } else { "stepped down; a new leader took over" }
    );
}

/// Stop etcd past the lease TTL: the leader grants nothing after its deadline, ends its streams
/// and exits while etcd is down; once etcd is back a standby is elected and serves every agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_etcd_outage_steps_the_leader_down_and_a_leader_is_elected_once_etcd_is_back() {
    let Some(mut c) = cluster(LIMIT) else { return };
    let Loaded { first, epoch, mut watcher, agents } = under_load(&c).await;

    let (killed, killed_wall) = (Instant::now(), SystemTime::now());
    tokio::task::block_in_place(|| c.etcd.kill());
    let (ended, _) = streams_end(&mut watcher).await;
    let fenced = ended - killed;
    assert_ne!(c.wait_exit(first).await, Some(0), "a deposed leader exits non-zero");
    // Keep etcd down past the lease TTL.
    tokio::time::sleep((killed + TTL + MARGIN).saturating_duration_since(Instant::now())).await;
    tokio::task::block_in_place(|| c.etcd.start_again());
    let back = Instant::now();
    let next = c.leader().await;
    let elected = back.elapsed();
    assert_ne!(next, first);
    let next_epoch = epoch_of(c.url(next)).await;
    assert!(next_epoch > epoch, "the new term's epoch {next_epoch} is above {epoch}");
    agents.served_since(Instant::now(), "by the leader elected after the outage").await;
    let served = back.elapsed();
    let claims = agents.stop().await;

    audit(&claims);
    no_grant_of_epoch_after(&claims, epoch, killed_wall + (TTL - MARGIN), "etcd stopped + TTL − margin");
    eprintln!(
        "etcd down past the TTL: kill -> streams ended {fenced:?}; etcd back -> new leader serving \
         {elected:?}, -> every agent served {served:?}"
    );
}
