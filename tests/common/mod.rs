//! Shared helpers for the end-to-end tests: the real daemon on 127.0.0.1:0, and raw Acquire streams
//! driven message by message.
//!
//! Every await that could hang is bounded by [`TIMEOUT`], so a broken daemon fails a test instead of
//! stalling the suite. The async helpers are plain `#[track_caller]` functions that return a future:
//! they capture the caller's location up front, so a failure names the line of the test that failed.

#![allow(dead_code)]

use std::{
    future::Future,
    net::SocketAddr,
    panic::Location,
    time::{Duration, SystemTime},
};

use slotd::{ServeError, config::Config};
use slotd_proto::v1::{
    self as pb, admin_client::AdminClient, client_message::Msg as Up, server_message::Msg,
    slotd_client::SlotdClient,
};
use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Status, Streaming, transport::Channel};

/// The longest any single step may take before the test fails.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// How often [`Daemon::wait_for`] polls Status.
const POLL: Duration = Duration::from_millis(5);

/// Bounds a future by [`TIMEOUT`], failing at `at` with `what` when it does not finish.
pub async fn bounded<T>(at: &Location<'_>, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(TIMEOUT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{at}: timed out after {TIMEOUT:?} waiting for {what}"),
    }
}

/// A wire duration.
pub fn dur(d: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(d).expect("small durations convert")
}

/// A wire duration of `n` milliseconds.
pub fn ms(n: u64) -> prost_types::Duration {
    dur(Duration::from_millis(n))
}

/// A wall-clock timestamp `d` in the past.
pub fn ago(d: Duration) -> prost_types::Timestamp {
    prost_types::Timestamp::from(SystemTime::now() - d)
}

/// A wire timestamp as a `SystemTime`.
pub fn system_time(ts: &prost_types::Timestamp) -> SystemTime {
    SystemTime::try_from(*ts).expect("valid timestamp")
}

/// `a - b` in milliseconds, signed.
pub fn diff_ms(a: &prost_types::Timestamp, b: &prost_types::Timestamp) -> i128 {
    let nanos = |t: &prost_types::Timestamp| i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos);
    (nanos(a) - nanos(b)) / 1_000_000
}

/// The real daemon, serving on an ephemeral loopback port.
pub struct Daemon {
    /// Where it listens.
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    reloads: Option<mpsc::Sender<Config>>,
    task: Option<JoinHandle<Result<(), ServeError>>>,
    client: SlotdClient<Channel>,
}

impl Daemon {
    /// Starts `slotd::serve` with this TOML configuration.
    #[track_caller]
    pub fn start(toml: &str) -> impl Future<Output = Daemon> + '_ {
        Self::launch(Location::caller(), toml, false)
    }

    /// Starts `slotd::serve_with_reload`; [`Daemon::reload`] feeds it new configurations.
    #[track_caller]
    pub fn start_with_reload(toml: &str) -> impl Future<Output = Daemon> + '_ {
        Self::launch(Location::caller(), toml, true)
    }

    async fn launch(at: &'static Location<'static>, toml: &str, reload: bool) -> Daemon {
        let cfg = Config::from_toml_str(toml).unwrap_or_else(|e| panic!("{at}: config: {e}"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = shutdown_rx.await;
        };
        let (reloads, task) = if reload {
            let (tx, rx) = mpsc::channel(4);
            let task = tokio::spawn(slotd::serve_with_reload(cfg, listener, shutdown, Some(rx)));
            (Some(tx), task)
        } else {
            (None, tokio::spawn(slotd::serve(cfg, listener, shutdown)))
        };
        let client = bounded(at, "connect", SlotdClient::connect(format!("http://{addr}")))
            .await
            .unwrap_or_else(|e| panic!("{at}: connect to {addr}: {e}"));
        Daemon { addr, shutdown: Some(shutdown_tx), reloads, task: Some(task), client }
    }

    /// Starts `slotd::serve_with_metrics` with a metrics endpoint on another ephemeral loopback port;
    /// returns the daemon and the endpoint's address.
    #[track_caller]
    pub fn start_with_metrics(toml: &str) -> impl Future<Output = (Daemon, SocketAddr)> + '_ {
        let at = Location::caller();
        async move {
            let cfg = Config::from_toml_str(toml).unwrap_or_else(|e| panic!("{at}: config: {e}"));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
            let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
            let (addr, metrics_addr) = (listener.local_addr().unwrap(), metrics.local_addr().unwrap());
            let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
            let shutdown = async move {
                let _ = shutdown_rx.await;
            };
            let task = tokio::spawn(slotd::serve_with_metrics(cfg, listener, Some(metrics), shutdown, None));
            let client = bounded(at, "connect", SlotdClient::connect(format!("http://{addr}")))
                .await
                .unwrap_or_else(|e| panic!("{at}: connect to {addr}: {e}"));
            let d = Daemon { addr, shutdown: Some(shutdown_tx), reloads: None, task: Some(task), client };
            (d, metrics_addr)
        }
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

async fn status_at(at: &Location<'_>, client: &SlotdClient<Channel>) -> pb::StatusResponse {
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

/// One simulated agent process: a raw Acquire stream on its own connection.
pub struct Agent {
    /// Shown in failures and sent as the holder name.
    pub name: String,
    tx: Option<mpsc::Sender<pb::ClientMessage>>,
    rx: Streaming<pb::ServerMessage>,
    client: SlotdClient<Channel>,
}

impl Agent {
    async fn open(
        at: &'static Location<'static>,
        mut client: SlotdClient<Channel>,
        name: &str,
        grace: Option<&str>,
    ) -> Result<Agent, Status> {
        let (tx, rx) = mpsc::channel(64);
        let mut req = Request::new(ReceiverStream::new(rx));
        if let Some(g) = grace {
            req.metadata_mut()
                .insert(slotd::grpc::service::RESUME_GRACE_HEADER, g.parse().expect("ascii metadata"));
        }
        let rx = bounded(at, "Acquire to open", client.acquire(req)).await?.into_inner();
        Ok(Agent { name: name.to_owned(), tx: Some(tx), rx, client })
    }

    /// A request for one slot on `pool` with every optional field unset, holder = this agent's name.
    pub fn req(&self, request_id: &str, pool: &str) -> pb::LeaseRequest {
        pb::LeaseRequest {
            request_id: request_id.into(),
            pool: pool.into(),
            holder: self.name.clone(),
            ..Default::default()
        }
    }

    /// A clone of the request side, to send from another task (the stream stays open while it lives).
    #[track_caller]
    pub fn sender(&self) -> mpsc::Sender<pb::ClientMessage> {
        self.tx
            .clone()
            .unwrap_or_else(|| panic!("{}: {}: sending side closed", Location::caller(), self.name))
    }

    /// Sends one raw client message (`msg: None` is a message with no body).
    #[track_caller]
    pub fn send_raw(&self, msg: Option<Up>) -> impl Future<Output = ()> + '_ {
        let at = Location::caller();
        async move {
            let tx = self.tx.as_ref().unwrap_or_else(|| panic!("{at}: {}: sending side closed", self.name));
            bounded(at, "send", tx.send(pb::ClientMessage { msg }))
                .await
                .unwrap_or_else(|_| panic!("{at}: {}: request stream closed", self.name));
        }
    }

    /// Sends one client message.
    #[track_caller]
    pub fn send(&self, msg: Up) -> impl Future<Output = ()> + '_ {
        self.send_raw(Some(msg))
    }

    /// Sends a lease request.
    #[track_caller]
    pub fn request(&self, r: pb::LeaseRequest) -> impl Future<Output = ()> + '_ {
        self.send(Up::Request(r))
    }

    /// Cancels a queued request.
    #[track_caller]
    pub fn cancel(&self, request_id: &str) -> impl Future<Output = ()> + '_ {
        self.send(Up::Cancel(pb::CancelRequest { request_id: request_id.into() }))
    }

    /// Heartbeats the listed leases (all of this stream's when empty).
    #[track_caller]
    pub fn heartbeat(&self, lease_ids: &[&str]) -> impl Future<Output = ()> + '_ {
        self.send(Up::Heartbeat(pb::Heartbeat {
            lease_ids: lease_ids.iter().map(|s| (*s).to_owned()).collect(),
        }))
    }

    /// Releases a lease with outcome OK.
    #[track_caller]
    pub fn release(&self, lease_id: &str) -> impl Future<Output = ()> + '_ {
        self.release_with(lease_id, pb::Outcome::Ok, None)
    }

    /// Releases a lease with an outcome (and a retry_after for rate-limited ones).
    #[track_caller]
    pub fn release_with(
        &self,
        lease_id: &str,
        outcome: pb::Outcome,
        retry_after: Option<Duration>,
    ) -> impl Future<Output = ()> + '_ {
        self.send(Up::Release(pb::ReleaseLease {
            lease_id: lease_id.into(),
            outcome: outcome as i32,
            retry_after: retry_after.map(dur),
        }))
    }

    /// Resumes a lease granted on another stream.
    #[track_caller]
    pub fn resume(&self, r: pb::ResumeLease) -> impl Future<Output = ()> + '_ {
        self.send(Up::Resume(r))
    }

    /// Closes the sending half (the client says it is done), keeping the receiving half.
    pub fn close_sending(&mut self) {
        self.tx = None;
    }

    async fn next_at(&mut self, at: &Location<'_>) -> Msg {
        let what = format!("{}'s next message", self.name);
        match bounded(at, &what, self.rx.message()).await {
            Ok(Some(pb::ServerMessage { msg: Some(m) })) => m,
            Ok(Some(pb::ServerMessage { msg: None })) => {
                panic!("{at}: {}: server message with no body", self.name)
            }
            Ok(None) => panic!("{at}: {}: stream ended while a message was expected", self.name),
            Err(s) => panic!("{at}: {}: stream failed while a message was expected: {s}", self.name),
        }
    }

    /// The next server message, within [`TIMEOUT`].
    #[track_caller]
    pub fn next(&mut self) -> impl Future<Output = Msg> + '_ {
        let at = Location::caller();
        async move { self.next_at(at).await }
    }

    /// The next server message if one arrives within `d`.
    #[track_caller]
    pub fn next_within(&mut self, d: Duration) -> impl Future<Output = Option<Msg>> + '_ {
        let at = Location::caller();
        async move {
            match tokio::time::timeout(d, self.rx.message()).await {
                Err(_) => None,
                Ok(Ok(Some(m))) => m.msg,
                Ok(Ok(None)) => panic!("{at}: {}: stream ended", self.name),
                Ok(Err(s)) => panic!("{at}: {}: stream failed: {s}", self.name),
            }
        }
    }

    /// Asserts that no message arrives for `d`.
    #[track_caller]
    pub fn expect_silence(&mut self, d: Duration) -> impl Future<Output = ()> + '_ {
        let at = Location::caller();
        async move {
            if let Ok(r) = tokio::time::timeout(d, self.rx.message()).await {
                panic!("{at}: {}: expected no message for {d:?}, got {r:?}", self.name);
            }
        }
    }

    /// Waits for the stream to end without another message; returns its error status (None if clean).
    #[track_caller]
    pub fn expect_end(&mut self) -> impl Future<Output = Option<Status>> + '_ {
        let at = Location::caller();
        async move {
            let what = format!("{}'s stream to end", self.name);
            match bounded(at, &what, self.rx.message()).await {
                Ok(None) => None,
                Err(s) => Some(s),
                Ok(Some(m)) => panic!("{at}: {}: expected the stream to end, got {m:?}", self.name),
            }
        }
    }

    /// Expects `Granted` for `request_id` as the very next message.
    #[track_caller]
    pub fn expect_granted<'a>(&'a mut self, request_id: &'a str) -> impl Future<Output = pb::Granted> + 'a {
        let at = Location::caller();
        async move {
            match self.next_at(at).await {
                Msg::Granted(g) if g.request_id == request_id => g,
                other => panic!("{at}: {}: expected Granted for {request_id:?}, got {other:?}", self.name),
            }
        }
    }

    /// Expects `Queued` for `request_id` as the very next message.
    #[track_caller]
    pub fn expect_queued<'a>(&'a mut self, request_id: &'a str) -> impl Future<Output = pb::Queued> + 'a {
        let at = Location::caller();
        async move {
            match self.next_at(at).await {
                Msg::Queued(q) if q.request_id == request_id => q,
                other => panic!("{at}: {}: expected Queued for {request_id:?}, got {other:?}", self.name),
            }
        }
    }

    /// Expects `Rejected` for `request_id` with `code` as the very next message.
    #[track_caller]
    pub fn expect_rejected<'a>(
        &'a mut self,
        request_id: &'a str,
        code: Code,
    ) -> impl Future<Output = pb::Rejected> + 'a {
        let at = Location::caller();
        async move {
            match self.next_at(at).await {
                Msg::Rejected(r) if r.request_id == request_id => {
                    assert_eq!(
                        Code::from_i32(r.code),
                        code,
                        "{at}: {}: Rejected {request_id:?} with the wrong code: {r:?}",
                        self.name
                    );
                    assert!(!r.message.is_empty(), "{at}: Rejected without a reason: {r:?}");
                    r
                }
                other => panic!(
                    "{at}: {}: expected Rejected({code:?}) for {request_id:?}, got {other:?}",
                    self.name
                ),
            }
        }
    }

    /// Expects `Released` for `lease_id`.
    #[track_caller]
    pub fn expect_released<'a>(&'a mut self, lease_id: &'a str) -> impl Future<Output = ()> + 'a {
        let at = Location::caller();
        async move {
            match self.next_at(at).await {
                Msg::Released(r) if r.lease_id == lease_id => {}
                other => panic!("{at}: {}: expected Released for {lease_id}, got {other:?}", self.name),
            }
        }
    }

    /// Expects `LeaseError` for `lease_id` with `code`.
    #[track_caller]
    pub fn expect_lease_error<'a>(
        &'a mut self,
        lease_id: &'a str,
        code: Code,
    ) -> impl Future<Output = pb::LeaseError> + 'a {
        let at = Location::caller();
        async move {
            match self.next_at(at).await {
                Msg::LeaseError(e) if e.lease_id == lease_id => {
                    assert_eq!(
                        Code::from_i32(e.code),
                        code,
                        "{at}: {}: LeaseError for {lease_id:?} with the wrong code: {e:?}",
                        self.name
                    );
                    assert!(!e.message.is_empty(), "{at}: LeaseError without a reason: {e:?}");
                    e
                }
                other => panic!(
                    "{at}: {}: expected LeaseError({code:?}) for {lease_id:?}, got {other:?}",
                    self.name
                ),
            }
        }
    }

    /// Expects `Paused` for `pool`.
    #[track_caller]
    pub fn expect_paused<'a>(&'a mut self, pool: &'a str) -> impl Future<Output = pb::Paused> + 'a {
        let at = Location::caller();
        async move {
            match self.next_at(at).await {
                Msg::Paused(p) if p.pool == pool => p,
                other => panic!("{at}: {}: expected Paused for {pool}, got {other:?}", self.name),
            }
        }
    }

    /// Expects `Resumed` for `pool`.
    #[track_caller]
    pub fn expect_resumed<'a>(&'a mut self, pool: &'a str) -> impl Future<Output = ()> + 'a {
        let at = Location::caller();
        async move {
            match self.next_at(at).await {
                Msg::Resumed(r) if r.pool == pool => {}
                other => panic!("{at}: {}: expected Resumed for {pool}, got {other:?}", self.name),
            }
        }
    }

    /// Expects `Expired` for `lease_id`.
    #[track_caller]
    pub fn expect_expired<'a>(&'a mut self, lease_id: &'a str) -> impl Future<Output = pb::Expired> + 'a {
        let at = Location::caller();
        async move {
            match self.next_at(at).await {
                Msg::Expired(e) if e.lease_id == lease_id => e,
                other => panic!("{at}: {}: expected Expired for {lease_id}, got {other:?}", self.name),
            }
        }
    }

    /// Expects `HeartbeatAck` renewing `renewed` leases.
    #[track_caller]
    pub fn expect_heartbeat_ack(&mut self, renewed: u32) -> impl Future<Output = ()> + '_ {
        let at = Location::caller();
        async move {
            match self.next_at(at).await {
                Msg::HeartbeatAck(a) if a.renewed == renewed => {}
                other => panic!("{at}: {}: expected HeartbeatAck({renewed}), got {other:?}", self.name),
            }
        }
    }

    /// Expects `Cancelled` for `request_id`.
    #[track_caller]
    pub fn expect_cancelled<'a>(&'a mut self, request_id: &'a str) -> impl Future<Output = ()> + 'a {
        let at = Location::caller();
        async move {
            match self.next_at(at).await {
                Msg::Cancelled(c) if c.request_id == request_id => {}
                other => panic!("{at}: {}: expected Cancelled for {request_id:?}, got {other:?}", self.name),
            }
        }
    }

    /// Expects `LeaseResumed` for `lease_id`.
    #[track_caller]
    pub fn expect_lease_resumed<'a>(
        &'a mut self,
        lease_id: &'a str,
    ) -> impl Future<Output = pb::LeaseResumed> + 'a {
        let at = Location::caller();
        async move {
            match self.next_at(at).await {
                Msg::LeaseResumed(r) if r.lease_id == lease_id => r,
                other => panic!("{at}: {}: expected LeaseResumed for {lease_id}, got {other:?}", self.name),
            }
        }
    }

    /// Sends `r` and waits for its grant, accepting a `Queued` first.
    #[track_caller]
    pub fn acquire_with(&mut self, r: pb::LeaseRequest) -> impl Future<Output = pb::Granted> + '_ {
        let at = Location::caller();
        async move {
            let id = r.request_id.clone();
            self.send_raw(Some(Up::Request(r))).await;
            match self.next_at(at).await {
                Msg::Granted(g) if g.request_id == id => g,
                Msg::Queued(q) if q.request_id == id => match self.next_at(at).await {
                    Msg::Granted(g) if g.request_id == id => g,
                    other => panic!("{at}: {}: expected Granted for {id:?}, got {other:?}", self.name),
                },
                other => panic!("{at}: {}: expected Granted or Queued for {id:?}, got {other:?}", self.name),
            }
        }
    }

    /// Requests a slot on `pool` with defaults and waits for the grant (accepting a `Queued` first).
    #[track_caller]
    pub fn acquire<'a>(&'a mut self, request_id: &str, pool: &str) -> impl Future<Output = pb::Granted> + 'a {
        let r = self.req(request_id, pool);
        self.acquire_with(r)
    }

    /// Releases a lease (OK) and waits for `Released`.
    #[track_caller]
    pub fn release_ok<'a>(&'a mut self, lease_id: &'a str) -> impl Future<Output = ()> + 'a {
        let at = Location::caller();
        async move {
            self.send_raw(Some(Up::Release(pb::ReleaseLease {
                lease_id: lease_id.into(),
                outcome: pb::Outcome::Ok as i32,
                retry_after: None,
            })))
            .await;
            match self.next_at(at).await {
                Msg::Released(r) if r.lease_id == lease_id => {}
                other => panic!("{at}: {}: expected Released for {lease_id}, got {other:?}", self.name),
            }
        }
    }

    /// A Status snapshot through this agent's own connection.
    #[track_caller]
    pub fn status(&self) -> impl Future<Output = pb::StatusResponse> + '_ {
        let at = Location::caller();
        async move { status_at(at, &self.client).await }
    }

    /// A unary client on this agent's connection.
    pub fn client(&self) -> SlotdClient<Channel> {
        self.client.clone()
    }
}
