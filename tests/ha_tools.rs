//! The operator tools against a highly available deployment: three `slotd` members on one real etcd
//! (the `ha_cluster` helpers), reached by `slotctl` and `slotd-proxy` given every member's address.
//!
//! - `slotctl status` and `slotctl pause`, given a standby first, reach the leader (the standby's
//!   `slotd-leader` redirect is followed); after SIGKILL of the leader, with the dead member listed
//!   first, `slotctl status` answers from the new leader and names it.
//! - `slotctl run` holds its lease through a failover: the new leader re-adopts the same lease.
//! - The proxy, given every member with a standby first, forwards under a lease; its in-flight
//!   request keeps its lease across the leader's SIGKILL (re-presented to the new leader), it serves
//!   again afterwards, and nothing leaks (the new leader holds 0 once the requests end).
//!
//! Skipped (with a message) when no `etcd` binary is installed; `.ci/run` installs one.

use std::{
    convert::Infallible,
    net::SocketAddr,
    panic::Location,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::{Request, Response, service::service_fn};
use hyper_util::rt::TokioIo;
use slotctl::{
    cli::{Cli, Output},
    conn::{Conn, Target},
};
use slotd_proto::v1 as pb;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{oneshot, watch},
};

mod ha_cluster;

use ha_cluster::*;

/// The members' URLs with a standby first, then the leader, then the other standby: a tool given
/// this list must follow a redirect to reach the leader.
fn standby_first(c: &Cluster, leader: usize) -> Vec<String> {
    let standbys: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    vec![c.url(standbys[0]).to_owned(), c.url(leader).to_owned(), c.url(standbys[1]).to_owned()]
}

/// The leader's Status (the member must be the leader).
#[track_caller]
fn leader_status(url: &str) -> impl Future<Output = pb::StatusResponse> + '_ {
    let at = Location::caller();
    async move { probe(url).await.unwrap_or_else(|e| panic!("{at}: {url} is not the leader: {e:?}")) }
}

/// Waits until the leader at `url` shows a lease held by `holder`; returns its id.
#[track_caller]
fn lease_held_by<'a>(url: &'a str, holder: &'a str) -> impl Future<Output = String> + 'a {
    let at = Location::caller();
    async move {
        let deadline = Instant::now() + FAILOVER_TIMEOUT;
        loop {
            if let Ok(st) = probe(url).await
                && let Some(l) = st.leases.iter().find(|l| l.holder == holder)
            {
                return l.lease_id.clone();
            }
            assert!(
                Instant::now() < deadline,
                "{at}: {url} shows no lease of {holder} within {FAILOVER_TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Waits until the leader at `url` holds nothing on pool `p`.
#[track_caller]
fn holds_nothing(url: &str) -> impl Future<Output = ()> + '_ {
    let at = Location::caller();
    async move {
        let deadline = Instant::now() + FAILOVER_TIMEOUT;
        loop {
            let st = leader_status(url).await;
            let held = st.pools.iter().find(|p| p.name == "p").map_or(0, |p| p.in_flight);
            if held == 0 && st.leases.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{at}: still held on {url}: {held} in flight, {:?}",
                st.leases
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The epoch in `slotctl status`'s first line (`role: leader, epoch N, member URL`).
#[track_caller]
fn epoch_of(status_text: &str) -> u64 {
    let first = status_text.lines().next().unwrap_or_default();
    first
        .split(", ")
        .find_map(|part| part.strip_prefix("epoch "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no epoch in {first:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slotctl_reaches_the_leader_through_any_member() {
    let Some(mut c) = cluster(2) else { return };
    let first = c.leader().await;
    let members = standby_first(&c, first);
    let leader_url = c.url(first).to_owned();

    // Given only a standby, status follows its redirect and names the leader it answered from.
    let conn = Conn::connect(&Target::new(members[0].clone())).await.expect("connect to a standby");
    let text = slotctl::status(&conn, None, Output::Table).await.expect("status through a standby");
    assert!(text.starts_with("role: leader, epoch "), "{text}");
    assert!(text.lines().next().unwrap_or_default().ends_with(&format!("member {leader_url}")), "{text}");
    let old_epoch = epoch_of(&text);
    assert!(old_epoch > 0, "{text}");

    // A pause given every member, a standby first (repeated flag and a comma list), lands on the leader.
    let cli = Cli::try_parse_from([
        "slotctl",
        "--endpoint",
        &members[0],
        "--endpoint",
        &members[1..].join(","),
        "pause",
        "p",
        "--for",
        "60s",
        "--reason",
        "maintenance",
    ])
    .expect("slotctl arguments");
    assert_eq!(cli.endpoint, members);
    assert_eq!(slotctl::main(cli).await, 0, "slotctl pause through a standby");
    let st = leader_status(&leader_url).await;
    let p = st.pools.iter().find(|p| p.name == "p").expect("pool p");
    assert!(p.paused_until.is_some(), "the leader's pool p is not paused: {p:?}");

    // SIGKILL the leader. With the dead member listed first, status skips it and answers from the
    // new leader, in a newer term.
    let next = c.kill_leader(first).await.next;
    let dead_first = [leader_url.clone()]
        .into_iter()
        .chain(members.iter().filter(|m| **m != leader_url).cloned())
        .collect();
    let target = Target { endpoints: dead_first, ..Target::default() };
    let conn = Conn::connect(&target).await.expect("some member answers");
    let text = slotctl::status(&conn, None, Output::Table).await.expect("status after the failover");
    assert!(text.starts_with("role: leader, epoch "), "{text}");
    assert!(text.lines().next().unwrap_or_default().ends_with(&format!("member {}", c.url(next))), "{text}");
    assert!(epoch_of(&text) > old_epoch, "the new term has a higher epoch: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slotctl_run_keeps_its_lease_through_a_failover() {
    let Some(mut c) = cluster(1) else { return };
    let first = c.leader().await;
    let members = standby_first(&c, first);
    let go = c.dir.join("go");
    let wait_for_go = format!("while [ ! -e {go:?} ]; do sleep 0.05; done");
    let cli = Cli::try_parse_from([
        "slotctl",
        "--endpoint",
        &members.join(","),
        "run",
        "--pool",
        "p",
        "--holder",
        "ha-run",
        "--",
        "sh",
        "-c",
        &wait_for_go,
    ])
    .expect("slotctl arguments");
    let run = tokio::spawn(slotctl::main(cli));
    let lease = lease_held_by(c.url(first), "ha-run").await;

    let next = c.kill_leader(first).await.next;
    // The session re-presents the lease: the new leader holds the very same one.
    assert_eq!(lease_held_by(c.url(next), "ha-run").await, lease, "the lease is re-adopted, not a new one");

    std::fs::write(&go, b"").expect("let the command finish");
    let code =
        tokio::time::timeout(FAILOVER_TIMEOUT, run).await.expect("slotctl run ends").expect("run task");
    assert_eq!(code, 0, "the command's exit status");
    holds_nothing(c.url(next)).await;
}

/// A fake provider: `/hold` answers once the gate opens, anything else at once; counts requests
/// being answered.
struct Upstream {
    addr: SocketAddr,
    open: watch::Sender<bool>,
    current: Arc<AtomicUsize>,
}

impl Upstream {
    async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind upstream");
        let addr = listener.local_addr().expect("upstream addr");
        let (open, gate) = watch::channel(false);
        let current = Arc::new(AtomicUsize::new(0));
        let count = current.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (gate, count) = (gate.clone(), count.clone());
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (mut gate, count) = (gate.clone(), count.clone());
                    async move {
                        count.fetch_add(1, Ordering::SeqCst);
                        if req.uri().path().ends_with("/hold") {
                            let _ = gate.wait_for(|open| *open).await;
                        }
                        count.fetch_sub(1, Ordering::SeqCst);
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"{\"ok\":true}"))))
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc),
                );
            }
        });
        Upstream { addr, open, current }
    }
}

/// `GET path` on the proxy over a fresh connection: the status code and the body (unbounded: the
/// caller bounds it).
async fn get(proxy: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(proxy).await.expect("connect to the proxy");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {proxy}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("send");
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.expect("read");
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let code = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_follows_the_leader_and_keeps_in_flight_leases() {
    let Some(mut c) = cluster(2) else { return };
    let first = c.leader().await;
    let members = standby_first(&c, first);
    let upstream = Upstream::start().await;
    let daemons = members.iter().map(|m| format!("{m:?}")).collect::<Vec<_>>().join(", ");
    let toml = format!(
        "listen = \"127.0.0.1:0\"\ndaemon = [{daemons}]\ndaemon_probe_interval = \"50ms\"\n\
         [routes.r]\nprefix = \"/r\"\nupstream = \"http://{}\"\npool = \"p\"\ndialect = \"anthropic\"\n\
         max_wait = \"60s\"\n",
        upstream.addr
    );
    let cfg = slotd_proxy::Config::from_toml_str(&toml).expect("proxy config");
    assert_eq!(cfg.daemon.0, members);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let proxy = listener.local_addr().expect("proxy addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let served = tokio::spawn(slotd_proxy::serve(cfg, listener, async move {
        let _ = stopped.await;
    }));

    // Through a standby listed first, a request is forwarded under a lease taken on the leader.
    let (code, body) =
        tokio::time::timeout(FAILOVER_TIMEOUT, get(proxy, "/r/v1/messages")).await.expect("answer");
    assert_eq!(code, 200, "{body}");
    let (code, health) =
        tokio::time::timeout(FAILOVER_TIMEOUT, get(proxy, "/healthz")).await.expect("healthz");
    assert_eq!(code, 200);
    assert!(health.contains("\"daemon\":\"up\""), "a standby naming a live leader is reachable: {health}");
    let held = tokio::spawn(get(proxy, "/r/hold"));
    let lease = lease_held_by(c.url(first), "slotd-proxy").await;
    // The proxy forwards the request once its lease is granted: wait until the upstream has it.
    let deadline = Instant::now() + FAILOVER_TIMEOUT;
    while upstream.current.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the proxy never forwarded the held request");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(upstream.current.load(Ordering::SeqCst), 1);

    // SIGKILL the leader while the request is in flight: its lease is re-presented to the new leader.
    let next = c.kill_leader(first).await.next;
    let url = c.url(next).to_owned();
    assert_eq!(lease_held_by(&url, "slotd-proxy").await, lease, "the in-flight lease is re-adopted");

    // The held answer completes, and new requests are served under leases of the new leader.
    upstream.open.send_replace(true);
    let (code, body) =
        tokio::time::timeout(FAILOVER_TIMEOUT, held).await.expect("held answer").expect("task");
    assert_eq!(code, 200, "{body}");
    let deadline = Instant::now() + FAILOVER_TIMEOUT;
    loop {
        let (code, body) =
            tokio::time::timeout(FAILOVER_TIMEOUT, get(proxy, "/r/v1/messages")).await.expect("answer");
        if code == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the proxy does not serve again after the failover: {code} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, health) = tokio::time::timeout(FAILOVER_TIMEOUT, get(proxy, "/healthz")).await.expect("healthz");
    assert!(health.contains("\"daemon\":\"up\""), "{health}");

    // Nothing leaks: the new leader holds nothing once the requests ended.
    holds_nothing(&url).await;
    assert_eq!(upstream.current.load(Ordering::SeqCst), 0);
    let _ = stop.send(());
    tokio::time::timeout(FAILOVER_TIMEOUT, served).await.expect("proxy stops").expect("task").expect("serve");
}

/// What `slotctl top` sees next from its Watch follower, within `within`.
#[track_caller]
fn next_watch_msg(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<slotctl::top::Msg>,
    within: Duration,
) -> impl Future<Output = slotctl::top::Msg> + '_ {
    let at = Location::caller();
    async move {
        tokio::time::timeout(within, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("{at}: nothing from the Watch follower within {within:?}"))
            .unwrap_or_else(|| panic!("{at}: the Watch follower stopped"))
    }
}

/// `slotctl top`'s event feed, given a standby first: it follows the redirect to the leader, and
/// after the leader's SIGKILL re-opens Watch on the next leader, whose events then arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slotctl_top_follows_watch_to_the_next_leader() {
    use slotctl::top::{Msg, watch_events};
    let Some(mut c) = cluster(2) else { return };
    let first = c.leader().await;
    let members = standby_first(&c, first);
    let conn = Conn::connect(&Target { endpoints: members, ..Target::default() }).await.expect("connect");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let follower = tokio::spawn(watch_events(conn, None, tx));
    let within = slotd_test_support::process::PROCESS_TIMEOUT;
    assert!(matches!(next_watch_msg(&mut rx, within).await, Msg::WatchUp), "Watch opened");

    let failover = c.kill_leader(first).await;
    let next = failover.next;
    // The stream breaks; the follower goes on until Watch is open on the new leader.
    let deadline = Instant::now() + FAILOVER_TIMEOUT * 2;
    let mut down = false;
    loop {
        match next_watch_msg(&mut rx, deadline.saturating_duration_since(Instant::now())).await {
            Msg::WatchDown { .. } => down = true,
            Msg::WatchUp if down => break,
            _ => {}
        }
    }
    println!(
        "top: kill -> new leader serving {:?}, kill -> Watch open on it {:?}",
        failover.elected,
        failover.killed.elapsed()
    );
    // An event of the new leader arrives through it.
    let mut a = agent(c.url(next), "after").await;
    let g = a.acquire("r", "p").await;
    loop {
        let msg = next_watch_msg(&mut rx, within).await;
        if let Msg::Watch(ev) = msg
            && let Some(pb::watch_event::Event::Granted(l)) = ev.event
            && l.lease_id == g.lease_id
        {
            break;
        }
    }
    follower.abort();
}
