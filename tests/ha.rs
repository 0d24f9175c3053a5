//! High availability on etcd: three `slotd` processes and one real etcd on loopback.
//!
//! - A standby answers every call (Acquire, the unary calls, Admin, Watch) UNAVAILABLE with the
//!   leader's address in `slotd-leader`; health serves `slotd.v1.Slotd` and `slotd.v1.Admin` on the
//!   leader only.
//! - SIGKILL the leader: a standby takes over; the clients re-present their leases there; nothing new
//!   is granted while the re-presented leases hold the limit; the new term's fencing tokens are above
//!   every earlier one. The time from the kill to the first new grant is printed.
//! - SIGSTOP the leader past its lease TTL: after SIGCONT it grants nothing, ends its streams and
//!   exits, while a standby took over meanwhile.
//!
//! Skipped (with a message) when no `etcd` binary is installed; `.ci/run` installs Debian's
//! `etcd-server`.
//!
//! Each member is this test binary run again (`current_exe() --exact ha_cluster::ha_member`, as in
//! chaos.rs) with `SLOTD_HA_CONFIG` set: [`ha_member`] then serves that config on 127.0.0.1:0 and
//! exits 1 when `serve` fails (a deposed leader), like the `slotd` binary.

use std::time::{Duration, Instant};

use slotd_proto::v1::{self as pb, admin_client::AdminClient, server_message::Msg};
use slotd_test_support::{dur, process::PROCESS_TIMEOUT, resume_of, scrape};
use tonic::{Code, transport::Channel};

mod ha_cluster;

use ha_cluster::*;

/// SIGKILL the leader: a standby takes over, standbys redirect to it, the old leases are re-adopted,
/// nothing beyond the limit is granted, and tokens keep increasing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_without_over_grant() {
    let Some(mut c) = cluster(2) else { return };
    let first = c.leader().await;
    let url = c.url(first).to_owned();
    // The election's first leader has nothing to learn: no leader served before it.
    assert!(!probe(&url).await.expect("serving").learning, "the first leader of an election learns");

    let mut a = agent(&url, "a").await;
    let mut b = agent(&url, "b").await;
    let ga = a.acquire("ra", "p").await;
    let gb = b.acquire("rb", "p").await;
    let mut w = agent(&url, "w").await;
    w.request(w.req("rw", "p")).await;
    let _ = w.expect_queued("rw").await;
    let old_top = ga.fencing_token.max(gb.fencing_token);
    // An operator's change on this leader, stored in etcd under its epoch.
    let admin_channel =
        Channel::from_shared(url.clone()).expect("url").connect().await.expect("admin connection");
    let mut admin = AdminClient::new(admin_channel);
    let spec = pb::PoolSpec {
        name: "q".into(),
        max_concurrent: Some(3),
        default_ttl: Some(dur(MAX_TTL)),
        max_ttl: Some(dur(MAX_TTL)),
        ..Default::default()
    };
    admin.upsert_pool(pb::UpsertPoolRequest { pool: Some(spec) }).await.expect("upsert on the leader");
    // The epoch (etcd's revision of the leader key: small on a fresh etcd) in the high bits, a
    // per-pool counter from 0 in the low ones.
    let epoch = ga.fencing_token >> 32;
    assert!((1..1 << 20).contains(&epoch), "token {} has no epoch in its high bits", ga.fencing_token);
    assert_eq!(gb.fencing_token, ga.fencing_token + 1);

    // What the next leader inherits (published at most every 250 ms): both leases.
    c.published("p held 2", |d| d["pools"]["p"]["held"] == 2).await;
    let Failover { next, killed, elected } = c.kill_leader(first).await;
    let url = c.url(next).to_owned();

    // The clients re-present their leases on the new leader; a new waiter queues meanwhile.
    let mut w2 = agent(&url, "w").await;
    w2.request(w2.req("rw2", "p")).await;
    let q = w2.expect_queued("rw2").await;
    assert_eq!(q.position, 0);
    let mut a2 = agent(&url, "a").await;
    let mut b2 = agent(&url, "b").await;
    a2.resume(resume_of(&ga, "a")).await;
    b2.resume(resume_of(&gb, "b")).await;
    let ra = a2.expect_lease_resumed(&ga.lease_id).await;
    let rb = b2.expect_lease_resumed(&gb.lease_id).await;
    assert_eq!((ra.fencing_token, rb.fencing_token), (ga.fencing_token, gb.fencing_token));

    // Both re-adopted leases hold the limit: nothing is granted, learning or not, until one goes.
    let st = probe(&url).await.expect("the leader serves");
    let p = st.pools.iter().find(|p| p.name == "p").expect("pool p");
    assert_eq!(p.in_flight, 2);
    let wait_learning = Instant::now() + FAILOVER_TIMEOUT;
    while probe(&url).await.expect("serving").learning {
        a2.heartbeat(&[&ga.lease_id]).await;
        b2.heartbeat(&[&gb.lease_id]).await;
        assert!(Instant::now() < wait_learning, "learning never ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b2.heartbeat(&[&gb.lease_id]).await;
    a2.release(&ga.lease_id).await;
    let g = granted_while_renewing(&mut w2, "rw2", &[(&b2, &gb.lease_id)]).await;
    let first_grant = killed.elapsed();
    assert!(g.fencing_token > old_top, "token {} not above the old term's {old_top}", g.fencing_token);
    assert!(g.fencing_token >> 32 > old_top >> 32, "the new term's epoch is higher");
    eprintln!(
        "failover: kill -> new leader serving {:?}, kill -> first new grant {:?} (lease_ttl {LEASE_TTL}, learning {:?})",
        elected, first_grant, MAX_TTL
    );

    // Metrics: the new leader says so, with its epoch above the old one and its learning period.
    let text = scrape(c.metrics(next)).await;
    assert!(text.contains("slotd_ha_leader 1"), "{text}");
    assert!(text.contains("slotd_ha_terms_total 1"), "{text}");
    assert!(text.contains(&format!("slotd_ha_learning_seconds {}", MAX_TTL.as_secs())), "{text}");
    let epoch_now: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("slotd_ha_epoch "))
        .and_then(|v| v.parse().ok())
        .expect("slotd_ha_epoch");
    assert_eq!(epoch_now, g.fencing_token >> 32, "the token's high bits are the epoch");
    // Status says the same in its metadata (what `slotctl status` prints).
    let resp =
        client(&url).await.expect("leader").status(pb::StatusRequest::default()).await.expect("status");
    assert_eq!(resp.metadata().get(slotd_proto::ROLE_HEADER).expect("role"), "leader");
    assert_eq!(
        resp.metadata().get(slotd_proto::EPOCH_HEADER).expect("epoch"),
        epoch_now.to_string().as_str()
    );
    let standby = (0..3).find(|&i| i != next && c.members[i].is_some()).expect("a standby");
    let text = scrape(c.metrics(standby)).await;
    assert!(text.contains("slotd_ha_leader 0"), "{text}");

    // The operator's change is in force on the new leader.
    let q = st.pools.iter().find(|p| p.name == "q").expect("pool q carried over through etcd");
    assert_eq!(q.limit, 3);

    // A standby sends clients to the new leader.
    assert_eq!(probe(c.url(standby)).await.err().flatten().as_deref(), Some(url.as_str()));
    drop((a, b, w));
}

/// SIGSTOP the leader past its lease TTL: a standby takes over; after SIGCONT the old leader grants
/// nothing (its slot freed while it was stopped stays unused), ends its streams and exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_leader_grants_nothing_after_it_resumes() {
    let Some(mut c) = cluster(1) else { return };
    let first = c.leader().await;
    let url = c.url(first).to_owned();
    let mut x = agent(&url, "x").await;
    let gx = x.acquire("rx", "p").await;
    let mut y = agent(&url, "y").await;
    y.request(y.req("ry", "p")).await;
    let _ = y.expect_queued("ry").await;

    c.signal(first, libc::SIGSTOP);
    let stopped = c.members[first].take().expect("live");
    let next = c.leader().await;
    assert_ne!(next, first);
    // Sent while the old leader is stopped: freeing the slot would grant `ry` were it not fenced.
    x.release(&gx.lease_id).await;
    c.members[first] = Some(stopped);
    c.signal(first, libc::SIGCONT);

    let (seen, status) = y.until_end().await;
    assert!(
        !seen.iter().any(|m| matches!(m, Msg::Granted(_))),
        "the stalled leader granted after it resumed: {seen:?}"
    );
    assert!(
        status.as_ref().is_some_and(|s| s.code() == Code::Unavailable),
        "stream ends with UNAVAILABLE: {status:?}"
    );
    // The deposed member exits (its supervisor would start it again as a standby).
    let deadline = Instant::now() + PROCESS_TIMEOUT;
    let mut old = c.members[first].take().expect("live");
    let code = loop {
        if let Some(code) = old.try_exit() {
            break code;
        }
        assert!(Instant::now() < deadline, "the deposed leader did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_ne!(code, Some(0), "a deposed leader exits non-zero");
}

/// One claim on a slot, as an agent saw it: from the grant to just before the release.
#[derive(Clone, Copy, Debug)]
struct Claim {
    token: u64,
    from: Instant,
    to: Instant,
}

/// Agents cycle leases through `slotd-client` given every member (one agent only a standby); SIGKILL
/// the leader. An auditor checks that no instant had more claims than the limit, that tokens only
/// grow (every token after the failover is above every token before it), and that every agent is
/// served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_follow_the_leader_through_a_failover() {
    const AGENTS: usize = 4;
    const LIMIT: u32 = 2;
    let Some(mut c) = cluster(LIMIT) else { return };
    let first = c.leader().await;
    let urls: Vec<String> = (0..3).map(|i| c.url(i).to_owned()).collect();
    let claims = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(usize, Claim)>::new()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    // The last agent knows one standby only: it is redirected to the leader, and after the kill it
    // goes back to that standby, which names the next leader (or is it).
    let standby = urls[(first + 1) % urls.len()].clone();
    for n in 0..AGENTS {
        let urls = if n == AGENTS - 1 { vec![standby.clone()] } else { urls.clone() };
        let (claims, stop) = (claims.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let client = slotd_client::Client::builder()
                .holder(format!("agent-{n}"))
                .resume_grace(Some(Duration::from_secs(5)))
                .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
                .connect_any(urls)
                .await
                .expect("client");
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let lease = client.acquire("p").await.expect("acquire");
                let from = Instant::now();
                tokio::time::sleep(Duration::from_millis(20)).await;
                let claim = Claim { token: lease.fencing_token(), from, to: Instant::now() };
                claims.lock().expect("claims").push((n, claim));
                let _ = lease.release(slotd_client::Outcome::Ok).await;
            }
        }));
    }
    let served = |after: Instant| {
        let claims = claims.lock().expect("claims");
        (0..AGENTS).all(|n| claims.iter().any(|(m, cl)| *m == n && cl.from > after))
    };
    let start = Instant::now();
    while !served(start) {
        assert!(start.elapsed() < FAILOVER_TIMEOUT, "agents not served before the failover");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let killed = c.kill(first);
    while !served(killed) {
        assert!(
            killed.elapsed() < FAILOVER_TIMEOUT * 2,
            "not every agent was served again after the failover"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        tokio::time::timeout(FAILOVER_TIMEOUT, t).await.expect("agents stop").expect("agent task");
    }

    let claims = claims.lock().expect("claims").clone();
    // Never more claims at once than the limit.
    let mut edges: Vec<(Instant, i32)> = claims.iter().flat_map(|(_, c)| [(c.from, 1), (c.to, -1)]).collect();
    edges.sort_by_key(|&(at, d)| (at, d));
    let (mut now, mut most) = (0, 0);
    for (_, d) in edges {
        now += d;
        most = most.max(now);
    }
    assert!(most <= LIMIT as i32, "{most} claims at once, limit {LIMIT}");
    // Tokens are unique, and every grant after the failover is above every grant before it.
    let mut tokens: Vec<u64> = claims.iter().map(|(_, c)| c.token).collect();
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!(tokens.len(), claims.len(), "a fencing token was granted twice");
    // The new term's tokens carry a higher epoch, so they are above every token of the old term.
    let old_epoch = claims
        .iter()
        .filter(|(_, c)| c.from < killed)
        .map(|(_, c)| c.token >> 32)
        .max()
        .expect("claims before");
    let after: Vec<&Claim> =
        claims.iter().filter(|(_, c)| c.token >> 32 > old_epoch).map(|(_, c)| c).collect();
    assert!(
        claims.iter().filter(|(_, c)| c.token >> 32 == old_epoch && c.from > killed).count() <= AGENTS,
        "only leases granted before the kill may carry the old epoch"
    );
    assert!(after.iter().all(|c| c.from > killed), "a new-term grant before the kill");
    let first_grant = after.iter().map(|c| c.from).min().expect("grants after the failover");
    eprintln!(
        "clients: kill -> first grant on the new leader {:?} ({} claims, {} after the failover)",
        first_grant - killed,
        claims.len(),
        after.len()
    );
}

/// SIGTERM the leader: it stops granting, revokes its etcd lease and exits 0, and a standby takes
/// over at once. The lease TTL here (60 s) is far beyond the wait for a new leader, so only the
/// revocation can explain the takeover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopped_gracefully_hands_over_at_once() {
    let Some(mut c) = cluster_with(1, "60s") else { return };
    let first = c.leader().await;
    let stopping = Instant::now();
    c.members[first].take().expect("live").terminate();
    let next = c.leader().await;
    assert_ne!(next, first);
    eprintln!("graceful: SIGTERM -> new leader serving {:?}", stopping.elapsed());
}

/// A standby refuses every agent and operator call, streams included, with UNAVAILABLE naming the
/// leader, and its gRPC health says which member leads: `slotd.v1.Slotd` and `slotd.v1.Admin` serve
/// on the leader only, the server as a whole (`""`) on every live member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_refuses_every_call_and_health_names_the_role() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let Some(c) = cluster(2) else { return };
    let leader = c.leader().await;
    let standby = (0..3).find(|&i| i != leader).expect("a standby");
    let leader_url = c.url(leader).to_owned();
    let channel = |url: String| async move {
        Channel::from_shared(url).expect("url").connect().await.expect("connect")
    };
    let health = |url: String| async move {
        let mut h = HealthClient::new(channel(url).await);
        let mut statuses = Vec::new();
        for service in ["", "slotd.v1.Slotd", "slotd.v1.Admin"] {
            let r = h.check(HealthCheckRequest { service: service.into() }).await.expect("health check");
            statuses.push(ServingStatus::try_from(r.into_inner().status).expect("a known status"));
        }
        statuses
    };
    use ServingStatus::{NotServing, Serving};
    assert_eq!(health(leader_url.clone()).await, [Serving, Serving, Serving], "the leader");
    assert_eq!(health(c.url(standby).to_owned()).await, [Serving, NotServing, NotServing], "a standby");

    let names_the_leader = |s: &tonic::Status, what: &str| {
        assert_eq!(s.code(), Code::Unavailable, "{what}: {s}");
        let named = s.metadata().get(slotd_proto::LEADER_HEADER).and_then(|v| v.to_str().ok());
        assert_eq!(named, Some(leader_url.as_str()), "{what} names the leader");
    };
    let ch = channel(c.url(standby).to_owned()).await;
    let mut agent = slotd_proto::v1::slotd_client::SlotdClient::new(ch.clone());
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let first = pb::ClientMessage {
        msg: Some(pb::client_message::Msg::Request(pb::LeaseRequest {
            request_id: "r1".into(),
            pool: "p".into(),
            ..Default::default()
        })),
    };
    tx.send(first).await.expect("queued");
    let refused = match agent.acquire(tokio_stream::wrappers::ReceiverStream::new(rx)).await {
        Err(s) => s,
        Ok(resp) => {
            let mut stream = resp.into_inner();
            stream.message().await.expect_err("a standby grants nothing")
        }
    };
    names_the_leader(&refused, "Acquire");
    let refused = agent
        .report_rate_limit(pb::ReportRateLimitRequest { pool: "p".into(), ..Default::default() })
        .await
        .expect_err("ReportRateLimit on a standby");
    names_the_leader(&refused, "ReportRateLimit");
    let mut admin = AdminClient::new(ch);
    let refused = admin
        .pause_pool(pb::PausePoolRequest {
            pool: "p".into(),
            duration: Some(dur(Duration::from_secs(5))),
            reason: "on a standby".into(),
        })
        .await
        .expect_err("PausePool on a standby");
    names_the_leader(&refused, "PausePool");
    let refused = admin.watch(pb::WatchRequest::default()).await.expect_err("Watch on a standby");
    names_the_leader(&refused, "Watch");
    // Nothing reached the leader: p is not paused there.
    let st = probe(&leader_url).await.expect("the leader serves");
    assert!(st.pools.iter().all(|p| p.paused_until.is_none()), "{st:?}");
    drop(tx);
}
