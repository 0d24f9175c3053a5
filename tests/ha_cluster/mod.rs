//! The HA test cluster: one real etcd on free loopback ports and three `slotd` members, each this
//! test binary run again as [`ha_member`] with `SLOTD_HA_CONFIG` set. Shared by the HA test files
//! (`mod ha_cluster;`); every file that uses it must keep [`ha_member`] reachable as
//! `ha_cluster::ha_member`.
#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use slotd_proto::v1::{self as pb, server_message::Msg, slotd_client::SlotdClient};
use slotd_test_support::{
    Agent, TcpProxy,
    etcd::Etcd,
    process::{PROCESS_TIMEOUT, Slotd},
};
use tonic::{Code, transport::Channel};

/// The etcd lease TTL of every member (etcd's own minimum is about 2 s).
pub const LEASE_TTL: &str = "2s";
/// Every member's `[ha] margin`: a leader stops granting at its last keepalive + TTL − this.
pub const MARGIN: Duration = Duration::from_millis(500);
/// Longest a lease can live: also the new leader's learning period.
pub const MAX_TTL: Duration = Duration::from_secs(3);
/// How long a failover may take before a test fails: TTL + learning + a margin for a loaded machine.
pub const FAILOVER_TIMEOUT: Duration = Duration::from_secs(20);

/// A temp dir with the shared resume-credential key and the members' config.
pub struct Cluster {
    pub etcd: Etcd,
    pub dir: PathBuf,
    pub members: Vec<Option<Slotd>>,
    /// With [`cluster_via_proxies`]: member `i` reaches etcd through `proxies[i]` only.
    pub proxies: Vec<TcpProxy>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.members.clear();
        self.proxies.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn unique() -> String {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{}-{nanos}", std::process::id())
}

/// Starts etcd and three members, or `None` (after saying why) when etcd is not installed.
#[track_caller]
pub fn cluster(limit: u32) -> Option<Cluster> {
    cluster_with(limit, LEASE_TTL)
}

/// [`cluster`] with another etcd lease TTL.
#[track_caller]
pub fn cluster_with(limit: u32, lease_ttl: &str) -> Option<Cluster> {
    cluster_config(limit, lease_ttl, "")
}

/// [`cluster_with`] with `extra` TOML appended to the members' shared config; it must open with a
/// table header (more pools, `[pools.p.*]` tables, scheduler settings).
#[track_caller]
pub fn cluster_config(limit: u32, lease_ttl: &str, extra: &str) -> Option<Cluster> {
    start_cluster(limit, lease_ttl, extra, false)
}

/// [`cluster_config`], but each member reaches etcd through its own [`TcpProxy`]
/// (`Cluster::proxies[i]`), so that a test can cut one member from etcd while the others, and the
/// clients, still reach everything.
#[track_caller]
pub fn cluster_via_proxies(limit: u32, lease_ttl: &str, extra: &str) -> Option<Cluster> {
    start_cluster(limit, lease_ttl, extra, true)
}

#[track_caller]
fn start_cluster(limit: u32, lease_ttl: &str, extra: &str, via_proxies: bool) -> Option<Cluster> {
    let Some(etcd) = Etcd::start() else {
        eprintln!("SKIPPED: no `etcd` binary on PATH (apt-get install etcd-server; .ci/run installs it)");
        return None;
    };
    let dir = std::env::temp_dir().join(format!("slotd-ha-{}", unique()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let key = dir.join("lease.key");
    write_key(&key);
    let ttl = format!("{}s", MAX_TTL.as_secs());
    let election = format!("e-{}", unique());
    let proxies: Vec<TcpProxy> =
        if via_proxies { (0..3).map(|_| TcpProxy::start(etcd.addr)).collect() } else { Vec::new() };
    let mut members = Vec::new();
    for i in 0..3 {
        let endpoint = proxies.get(i).map_or_else(|| etcd.url.clone(), TcpProxy::url);
        // Every member finds a restart marker, as after a crash: with `[ha]` it must not matter (the
        // runtime state in etcd decides a new leader's learning).
        let marker = dir.join(format!("slotd-{i}.running"));
        std::fs::write(&marker, "").expect("write a restart marker");
        let toml = format!(
            "key_file = {key:?}\nrestart_marker = {marker:?}\n\
             [pools.p]\nmax_concurrent = {limit}\ndefault_ttl = \"{ttl}\"\nmax_ttl = \"{ttl}\"\n\
             [ha]\netcd = [\"{endpoint}\"]\nelection = \"{election}\"\nlease_ttl = \"{lease_ttl}\"\n\
             margin = \"{}ms\"\n",
            MARGIN.as_millis()
        ) + extra;
        let config = dir.join(format!("slotd-{i}.toml"));
        std::fs::write(&config, toml).expect("write config");
        members.push(Some(member(&config)));
    }
    Some(Cluster { etcd, dir, members, proxies })
}

/// The env var that makes [`ha_member`] a member serving this config file.
pub const MEMBER_CONFIG: &str = "SLOTD_HA_CONFIG";

/// Starts one member: this test binary, running [`ha_member`].
#[track_caller]
pub fn member(config: &Path) -> Slotd {
    let mut cmd = std::process::Command::new(std::env::current_exe().expect("the test binary"));
    cmd.args(["--exact", "ha_cluster::ha_member", "--nocapture", "--test-threads", "1"])
        .env(MEMBER_CONFIG, config);
    Slotd::spawn(cmd)
}

/// Not a test of its own: a no-op unless `SLOTD_HA_CONFIG` is set, when it is a member serving that
/// config on 127.0.0.1:0 (JSON logs on stderr, the address in the first line).
#[test]
pub fn ha_member() {
    let Some(path) = std::env::var_os(MEMBER_CONFIG) else { return };
    tracing_subscriber::fmt().json().with_writer(std::io::stderr).with_env_filter("info").init();
    let cfg = slotd_test_support::Config::from_file(Path::new(&path)).expect("a valid member config");
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let code = rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind metrics");
        tracing::info!(
            addr = %listener.local_addr().expect("addr"),
            metrics = %metrics.local_addr().expect("metrics addr"),
            "slotd serving"
        );
        // SIGTERM stops it gracefully, as it does the binary.
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        let shutdown = async move {
            term.recv().await;
        };
        match slotd::serve_with_metrics(cfg, listener, Some(metrics), shutdown, None).await {
            Ok(()) => 0,
            Err(e) => {
                tracing::error!(error = %e, "slotd failed");
                1
            }
        }
    });
    std::process::exit(code);
}

/// The shared key file: 32 random bytes, mode 0600 (what every member is given).
pub fn write_key(path: &Path) {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let bytes: [u8; 32] = rand::random();
    let mut f =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).expect("key file");
    std::io::Write::write_all(&mut f, &bytes).expect("write key");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

pub async fn client(url: &str) -> Option<SlotdClient<Channel>> {
    let ch = Channel::from_shared(url.to_owned()).ok()?.connect_timeout(Duration::from_millis(500));
    tokio::time::timeout(Duration::from_secs(1), ch.connect()).await.ok()?.ok().map(SlotdClient::new)
}

/// What a member answers to Status: `Ok` on the leader, the `slotd-leader` metadata on a standby.
pub async fn probe(url: &str) -> Result<pb::StatusResponse, Option<String>> {
    let Some(mut c) = client(url).await else { return Err(None) };
    match tokio::time::timeout(Duration::from_secs(1), c.status(pb::StatusRequest::default())).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => {
            assert_eq!(s.code(), Code::Unavailable, "a standby refuses with UNAVAILABLE: {s}");
            Err(s.metadata().get(slotd_proto::LEADER_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned))
        }
        Err(_) => Err(None),
    }
}

impl Cluster {
    pub fn url(&self, i: usize) -> &str {
        &self.members[i].as_ref().expect("a live member").url
    }

    /// Waits until exactly one live member serves and every other live one names it; returns it.
    pub async fn leader(&self) -> usize {
        let deadline = Instant::now() + FAILOVER_TIMEOUT;
        loop {
            let mut serving = Vec::new();
            let mut named = Vec::new();
            for (i, m) in self.members.iter().enumerate() {
                let Some(m) = m else { continue };
                match probe(&m.url).await {
                    Ok(_) => serving.push(i),
                    Err(leader) => named.push(leader),
                }
            }
            if let [i] = serving[..]
                && named.iter().all(|n| n.as_deref() == Some(self.url(i)))
            {
                return i;
            }
            assert!(
                Instant::now() < deadline,
                "no single leader within {FAILOVER_TIMEOUT:?}: {serving:?} {named:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The election name every member campaigns under (from the shared config).
    pub fn election(&self) -> String {
        let toml = std::fs::read_to_string(self.dir.join("slotd-0.toml")).expect("the members' config");
        let line = toml.lines().find_map(|l| l.strip_prefix("election = ")).expect("an election name");
        line.trim_matches('"').to_owned()
    }

    /// A client of the cluster's etcd.
    pub async fn etcd_client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.etcd.url.as_str()], None).await.expect("etcd client")
    }

    /// The leader's runtime document in etcd (`/slotd/<election>/runtime`), parsed, or `None`.
    pub async fn runtime_doc(&self, e: &etcd_client::Client) -> Option<serde_json::Value> {
        let key = format!("/slotd/{}/runtime", self.election());
        let resp = e.clone().get(key, None).await.expect("etcd get");
        serde_json::from_slice(resp.kvs().first()?.value()).ok()
    }

    /// Waits until the runtime document satisfies `ok` (it is published every 250 ms at most: a
    /// test that kills the leader waits for what the next leader must inherit); returns it.
    pub async fn published(&self, what: &str, ok: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let e = self.etcd_client().await;
        let deadline = Instant::now() + FAILOVER_TIMEOUT;
        loop {
            if let Some(doc) = self.runtime_doc(&e).await.filter(|d| ok(d)) {
                return doc;
            }
            assert!(
                Instant::now() < deadline,
                "the runtime state never showed {what}: {:?}",
                self.runtime_doc(&e).await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn metrics(&self, i: usize) -> std::net::SocketAddr {
        let m = self.members[i].as_ref().expect("a live member").metrics.as_deref().expect("metrics address");
        m.parse().expect("a socket address")
    }

    /// Waits (up to [`PROCESS_TIMEOUT`]) for member `i` to exit on its own, takes it out of the
    /// cluster and returns its exit code (`None`: killed by a signal).
    #[track_caller]
    pub fn wait_exit(&mut self, i: usize) -> impl std::future::Future<Output = Option<i32>> + '_ {
        let at = std::panic::Location::caller();
        async move {
            let deadline = Instant::now() + PROCESS_TIMEOUT;
            let m = self.members[i].as_mut().expect("a live member");
            let code = loop {
                if let Some(code) = m.try_exit() {
                    break code;
                }
                assert!(
                    Instant::now() < deadline,
                    "{at}: member {i} did not exit within {PROCESS_TIMEOUT:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            self.members[i] = None;
            code
        }
    }

    /// SIGKILLs member `i` and forgets it; returns the instant of the kill.
    pub fn kill(&mut self, i: usize) -> Instant {
        self.signal(i, libc::SIGKILL);
        let killed = Instant::now();
        self.members[i] = None;
        killed
    }

    /// SIGKILLs the leader `i` and waits for the next single leader.
    pub async fn kill_leader(&mut self, i: usize) -> Failover {
        let killed = self.kill(i);
        let next = self.leader().await;
        Failover { next, killed, elected: killed.elapsed() }
    }

    pub fn signal(&self, i: usize, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.members[i].as_ref().expect("live").id()).expect("pid");
        // SAFETY: kill(2) on our own, not yet reaped, child.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }
}

/// What [`Cluster::kill_leader`] saw.
pub struct Failover {
    /// The member that leads now.
    pub next: usize,
    /// When the old leader was killed.
    pub killed: Instant,
    /// From the kill until the next leader was known.
    pub elected: Duration,
}

pub async fn agent(url: &str, name: &str) -> Agent {
    Agent::connect(url, name, Some("5s")).await.unwrap_or_else(|s| panic!("{name}: Acquire on {url}: {s}"))
}

/// Reads `a`'s stream until a grant for `request_id`, renewing `holders`' leases meanwhile so they
/// outlive the wait. Fails on any other grant.
pub async fn granted_while_renewing(
    a: &mut Agent,
    request_id: &str,
    holders: &[(&Agent, &str)],
) -> pb::Granted {
    let deadline = Instant::now() + FAILOVER_TIMEOUT;
    loop {
        for (h, lease) in holders {
            h.heartbeat(&[lease]).await;
        }
        match a.next_within(Duration::from_millis(300)).await {
            Some(Msg::Granted(g)) if g.request_id == request_id => return g,
            Some(Msg::Queued(_)) | None => {}
            Some(other) => panic!("{}: expected a grant for {request_id}, got {other:?}", a.name),
        }
        assert!(Instant::now() < deadline, "{request_id} not granted within {FAILOVER_TIMEOUT:?}");
    }
}
