//! [`Daemon`]: the real daemon (`slotd::serve*`) in-process on an ephemeral loopback port.

use std::{future::Future, net::SocketAddr, panic::Location};

use slotd::{ServeError, config::Config};
use slotd_proto::v1::{self as pb, admin_client::AdminClient, slotd_client::SlotdClient};
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
    task::JoinHandle,
};
use tonic::{Status, transport::Channel};

use crate::{Agent, POLL, TIMEOUT, bounded};

/// The real daemon, serving on an ephemeral loopback port. Dropping it begins a graceful shutdown.
pub struct Daemon {
    /// Where it listens (on loopback, also when it was bound to every interface).
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    reloads: Option<mpsc::Sender<Config>>,
    task: Option<JoinHandle<Result<(), ServeError>>>,
    client: SlotdClient<Channel>,
}

/// How to start one daemon.
struct Launch {
    cfg: Config,
    bind: SocketAddr,
    /// Serve with a reload channel ([`Daemon::reload`]).
    reload: bool,
    /// Serve a metrics endpoint on another ephemeral loopback port.
    metrics: bool,
    /// Connect the shared plaintext client before returning (else on first use: TLS, tokens).
    connect: bool,
}

impl Launch {
    #[track_caller]
    fn toml(at: &Location<'_>, toml: &str) -> Launch {
        let cfg = Config::from_toml_str(toml).unwrap_or_else(|e| panic!("{at}: config: {e}"));
        Launch {
            cfg,
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            reload: false,
            metrics: false,
            connect: true,
        }
    }
}

impl Daemon {
    /// Starts `slotd::serve` with this TOML configuration.
    #[track_caller]
    pub fn start(toml: &str) -> impl Future<Output = Daemon> + '_ {
        let at = Location::caller();
        async move { Self::launch(at, Launch::toml(at, toml)).await.0 }
    }

    /// Starts `slotd::serve` with this TOML configuration on `addr` (to restart one on the same port).
    #[track_caller]
    pub fn start_on(toml: &str, addr: SocketAddr) -> impl Future<Output = Daemon> + '_ {
        let at = Location::caller();
        async move { Self::launch(at, Launch { bind: addr, ..Launch::toml(at, toml) }).await.0 }
    }

    /// Starts `slotd::serve_with_reload`; [`Daemon::reload`] feeds it new configurations.
    #[track_caller]
    pub fn start_with_reload(toml: &str) -> impl Future<Output = Daemon> + '_ {
        let at = Location::caller();
        async move { Self::launch(at, Launch { reload: true, ..Launch::toml(at, toml) }).await.0 }
    }

    /// Starts `slotd::serve_with_metrics` with a metrics endpoint on another ephemeral loopback port;
    /// returns the daemon and the endpoint's address.
    #[track_caller]
    pub fn start_with_metrics(toml: &str) -> impl Future<Output = (Daemon, SocketAddr)> + '_ {
        let at = Location::caller();
        async move {
            let (d, metrics) = Self::launch(at, Launch { metrics: true, ..Launch::toml(at, toml) }).await;
            (d, metrics.expect("a metrics endpoint"))
        }
    }

    /// Starts `slotd::serve` with an already built configuration (tokens, TLS files) on `bind`, for
    /// example `"0.0.0.0:0"`. The shared client ([`Daemon::client`]) connects in plaintext on first
    /// use, so it only works when the daemon serves plaintext.
    #[track_caller]
    pub fn serve(cfg: Config, bind: &str) -> impl Future<Output = Daemon> + '_ {
        let at = Location::caller();
        async move {
            let bind = bind.parse().unwrap_or_else(|e| panic!("{at}: bind address {bind:?}: {e}"));
            let launch = Launch { cfg, bind, reload: false, metrics: false, connect: false };
            Self::launch(at, launch).await.0
        }
    }

    async fn launch(at: &'static Location<'static>, l: Launch) -> (Daemon, Option<SocketAddr>) {
        let bind = l.bind;
        let listener = TcpListener::bind(bind).await.unwrap_or_else(|e| panic!("{at}: bind {bind}: {e}"));
        let mut addr = listener.local_addr().expect("local addr");
        if addr.ip().is_unspecified() {
            addr = SocketAddr::from(([127, 0, 0, 1], addr.port()));
        }
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = shutdown_rx.await;
        };
        let (mut reloads, mut metrics_addr) = (None, None);
        let task = if l.metrics {
            let metrics = TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
            metrics_addr = Some(metrics.local_addr().expect("local addr"));
            tokio::spawn(slotd::serve_with_metrics(l.cfg, listener, Some(metrics), shutdown, None))
        } else if l.reload {
            let (tx, rx) = mpsc::channel(4);
            reloads = Some(tx);
            tokio::spawn(slotd::serve_with_reload(l.cfg, listener, shutdown, Some(rx)))
        } else {
            tokio::spawn(slotd::serve(l.cfg, listener, shutdown))
        };
        let client = if l.connect {
            bounded(at, "connect", SlotdClient::connect(format!("http://{addr}")))
                .await
                .unwrap_or_else(|e| panic!("{at}: connect to {addr}: {e}"))
        } else {
            SlotdClient::new(
                Channel::from_shared(format!("http://{addr}")).expect("valid url").connect_lazy(),
            )
        };
        let d = Daemon { addr, shutdown: Some(shutdown_tx), reloads, task: Some(task), client };
        (d, metrics_addr)
    }

    /// The daemon's URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A unary client on the daemon's shared connection.
    pub fn client(&self) -> SlotdClient<Channel> {
        self.client.clone()
    }

    /// A new channel (a new TCP connection) to the daemon.
    #[track_caller]
    pub fn channel(&self) -> impl Future<Output = Channel> + '_ {
        let at = Location::caller();
        async move {
            let endpoint = Channel::from_shared(self.url()).expect("valid url");
            bounded(at, "connect", endpoint.connect()).await.unwrap_or_else(|e| panic!("{at}: connect: {e}"))
        }
    }

    /// An Admin client on its own connection.
    #[track_caller]
    pub fn admin(&self) -> impl Future<Output = AdminClient<Channel>> + '_ {
        let at = Location::caller();
        async move { AdminClient::new(self.channel_at(at).await) }
    }

    /// A new simulated agent process: its own connection and one Acquire stream.
    #[track_caller]
    pub fn agent<'a>(&'a self, name: &'a str) -> impl Future<Output = Agent> + 'a {
        let at = Location::caller();
        async move { self.open_agent(at, name, None).await.unwrap_or_else(|s| panic!("{at}: open Acquire: {s}")) }
    }

    /// An agent whose Acquire stream asks for a resume grace (metadata `slotd-resume-grace`).
    #[track_caller]
    pub fn agent_with_grace<'a>(&'a self, name: &'a str, grace: &'a str) -> impl Future<Output = Agent> + 'a {
        let at = Location::caller();
        async move {
            self.open_agent(at, name, Some(grace)).await.unwrap_or_else(|s| panic!("{at}: open Acquire: {s}"))
        }
    }

    /// Opens an Acquire stream with optional grace metadata; the error when the daemon refuses it.
    #[track_caller]
    pub fn try_agent<'a>(
        &'a self,
        name: &'a str,
        grace: Option<&'a str>,
    ) -> impl Future<Output = Result<Agent, Status>> + 'a {
        let at = Location::caller();
        self.open_agent(at, name, grace)
    }

    async fn open_agent(
        &self,
        at: &'static Location<'static>,
        name: &str,
        grace: Option<&str>,
    ) -> Result<Agent, Status> {
        let client = SlotdClient::new(self.channel_at(at).await);
        Agent::open(at, client, name, grace).await
    }

    async fn channel_at(&self, at: &'static Location<'static>) -> Channel {
        let endpoint = Channel::from_shared(self.url()).expect("valid url");
        bounded(at, "connect", endpoint.connect()).await.unwrap_or_else(|e| panic!("{at}: connect: {e}"))
    }

    /// A Status snapshot of every pool.
    #[track_caller]
    pub fn status(&self) -> impl Future<Output = pb::StatusResponse> + '_ {
        let at = Location::caller();
        async move { status_at(at, &self.client).await }
    }

    /// The Status of one pool.
    #[track_caller]
    pub fn pool<'a>(&'a self, name: &'a str) -> impl Future<Output = pb::PoolStatus> + 'a {
        let at = Location::caller();
        async move { pool_of(at, &status_at(at, &self.client).await, name) }
    }

    /// Polls Status until `pred` holds, failing after [`TIMEOUT`]; returns the snapshot that satisfied it.
    #[track_caller]
    pub fn wait_for<'a>(
        &'a self,
        what: &'a str,
        pred: impl Fn(&pb::StatusResponse) -> bool + 'a,
    ) -> impl Future<Output = pb::StatusResponse> + 'a {
        let at = Location::caller();
        async move {
            let deadline = tokio::time::Instant::now() + TIMEOUT;
            loop {
                let s = status_at(at, &self.client).await;
                if pred(&s) {
                    return s;
                }
                if tokio::time::Instant::now() >= deadline {
                    panic!("{at}: timed out waiting for {what}; last status: {s:#?}");
                }
                tokio::time::sleep(POLL).await;
            }
        }
    }

    /// Asserts that nothing is queued, held or cooling anywhere (no leak).
    #[track_caller]
    pub fn assert_idle(&self) -> impl Future<Output = ()> + '_ {
        let at = Location::caller();
        async move {
            let s = status_at(at, &self.client).await;
            assert!(s.leases.is_empty(), "{at}: leases left: {:#?}", s.leases);
            for p in &s.pools {
                assert_eq!(p.in_flight, 0, "{at}: pool {} in_flight: {p:#?}", p.name);
                assert_eq!(p.queued, 0, "{at}: pool {} queued: {p:#?}", p.name);
            }
        }
    }

    /// Sends a new configuration to a daemon started with [`Daemon::start_with_reload`].
    #[track_caller]
    pub fn reload<'a>(&'a self, toml: &'a str) -> impl Future<Output = ()> + 'a {
        let at = Location::caller();
        async move {
            let cfg = Config::from_toml_str(toml).unwrap_or_else(|e| panic!("{at}: config: {e}"));
            let tx =
                self.reloads.as_ref().unwrap_or_else(|| panic!("{at}: daemon was not started with reload"));
            bounded(at, "reload send", tx.send(cfg)).await.expect("reload channel open");
        }
    }

    /// Resolves the shutdown future (graceful shutdown begins) without waiting for the daemon to stop.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Waits for `serve` to return (after [`Daemon::begin_shutdown`]).
    #[track_caller]
    pub fn join(mut self) -> impl Future<Output = Result<(), ServeError>> {
        let at = Location::caller();
        let task = self.task.take().expect("joined once");
        async move {
            bounded(at, "the daemon to stop", task)
                .await
                .unwrap_or_else(|e| panic!("{at}: serve task panicked: {e}"))
        }
    }

    /// Graceful shutdown, then waits for `serve` to return successfully.
    #[track_caller]
    pub fn stop(mut self) -> impl Future<Output = ()> {
        let at = Location::caller();
        self.begin_shutdown();
        let task = self.task.take().expect("stopped once");
        async move {
            bounded(at, "the daemon to stop", task)
                .await
                .unwrap_or_else(|e| panic!("{at}: serve task panicked: {e}"))
                .unwrap_or_else(|e| panic!("{at}: serve failed: {e}"));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.begin_shutdown();
    }
}

pub(crate) async fn status_at(at: &Location<'_>, client: &SlotdClient<Channel>) -> pb::StatusResponse {
    let mut c = client.clone();
    bounded(at, "Status", c.status(pb::StatusRequest::default()))
        .await
        .unwrap_or_else(|s| panic!("{at}: Status failed: {s}"))
        .into_inner()
}

fn pool_of(at: &Location<'_>, s: &pb::StatusResponse, name: &str) -> pb::PoolStatus {
    s.pools
        .iter()
        .find(|p| p.name == name)
        .cloned()
        .unwrap_or_else(|| panic!("{at}: no pool {name} in {s:#?}"))
}

/// The Status of one pool inside a snapshot.
#[track_caller]
pub fn pool_in(s: &pb::StatusResponse, name: &str) -> pb::PoolStatus {
    pool_of(Location::caller(), s, name)
}
