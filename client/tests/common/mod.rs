//! Shared helpers: the real daemon in-process on 127.0.0.1, clients for it, and bounded waits on Status.
//!
//! Every wait is bounded by [`TIMEOUT`] so a broken daemon or client fails the test instead of hanging
//! the suite. Async helpers are `#[track_caller]` functions returning a future, so failures name the
//! line of the test.

#![allow(dead_code)]

use std::{
    future::{Future, IntoFuture},
    net::SocketAddr,
    panic::Location,
    time::{Duration, Instant},
};

use slotd::{ServeError, config::Config};
use slotd_client::{Client, proto as pb};
use tokio::{sync::oneshot, task::JoinHandle};

/// The longest any single wait may take.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// How often Status is polled.
const POLL: Duration = Duration::from_millis(5);

/// The real daemon serving on a loopback port.
pub struct Daemon {
    /// Where it listens.
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServeError>>>,
}

impl Daemon {
    /// Starts the daemon with `toml` on an ephemeral port.
    #[track_caller]
    pub fn start(toml: &str) -> impl Future<Output = Daemon> + '_ {
        let at = Location::caller();
        async move { Self::launch(at, toml, "127.0.0.1:0".parse().unwrap()).await }
    }

    /// Starts the daemon with `toml` on `addr` (to restart one on the same port).
    #[track_caller]
    pub fn start_on(toml: &str, addr: SocketAddr) -> impl Future<Output = Daemon> + '_ {
        let at = Location::caller();
        async move { Self::launch(at, toml, addr).await }
    }

    async fn launch(at: &'static Location<'static>, toml: &str, addr: SocketAddr) -> Daemon {
        let cfg = Config::from_toml_str(toml).unwrap_or_else(|e| panic!("{at}: config: {e}"));
        let listener =
            tokio::net::TcpListener::bind(addr).await.unwrap_or_else(|e| panic!("{at}: bind {addr}: {e}"));
        let addr = listener.local_addr().expect("local addr");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(slotd::serve(cfg, listener, async move {
            let _ = rx.await;
        }));
        Daemon { addr, shutdown: Some(tx), task: Some(task) }
    }

    /// The daemon's URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client with fast reconnects.
    #[track_caller]
    pub fn client(&self) -> impl Future<Output = Client> + '_ {
        let at = Location::caller();
        async move {
            bounded(
                at,
                "connect",
                Client::builder()
                    .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(100))
                    .connect(self.url()),
            )
            .await
            .unwrap_or_else(|e| panic!("{at}: connect: {e}"))
        }
    }

    /// Resolves the shutdown future and waits for `serve` to return.
    #[track_caller]
    pub fn stop(mut self) -> impl Future<Output = ()> {
        let at = Location::caller();
        async move {
            let _ = self.shutdown.take().expect("running").send(());
            let task = self.task.take().expect("running");
            bounded(at, "daemon stop", task)
                .await
                .expect("serve task")
                .unwrap_or_else(|e| panic!("{at}: serve: {e}"));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Bounds `fut` by [`TIMEOUT`].
pub async fn bounded<T>(at: &Location<'_>, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(TIMEOUT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{at}: timed out after {TIMEOUT:?} waiting for {what}"),
    }
}

/// Bounds `fut` by [`TIMEOUT`], failing at the caller's line.
#[track_caller]
pub fn within<F: IntoFuture>(what: &'static str, fut: F) -> impl Future<Output = F::Output> {
    let at = Location::caller();
    async move { bounded(at, what, fut.into_future()).await }
}

/// Polls Status until `pred` holds, returning that Status.
#[track_caller]
pub fn wait_until<'a>(
    client: &'a Client,
    what: &'a str,
    pred: impl Fn(&pb::StatusResponse) -> bool + 'a,
) -> impl Future<Output = pb::StatusResponse> + 'a {
    let at = Location::caller();
    async move {
        let start = Instant::now();
        loop {
            let st = client.status(None).await.unwrap_or_else(|e| panic!("{at}: status: {e}"));
            if pred(&st) {
                return st;
            }
            if start.elapsed() > TIMEOUT {
                panic!("{at}: timed out waiting until {what}; last status: {st:#?}");
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// The named pool in a Status.
#[track_caller]
pub fn pool<'a>(st: &'a pb::StatusResponse, name: &str) -> &'a pb::PoolStatus {
    st.pools.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no pool {name} in {st:#?}"))
}

/// True when nothing is held or queued on `name`.
pub fn idle(st: &pb::StatusResponse, name: &str) -> bool {
    let p = pool(st, name);
    p.in_flight == 0 && p.queued == 0 && st.leases.iter().all(|l| l.pool != name)
}

/// A one-pool config: `[pools.NAME] max_concurrent = LIMIT` plus `extra` lines.
pub fn one_pool(name: &str, limit: u32, extra: &str) -> String {
    format!("[pools.{name}]\nmax_concurrent = {limit}\n{extra}\n")
}
