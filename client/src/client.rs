//! [`Client`], its [`ClientBuilder`], and the [`AcquireBuilder`] / [`Acquire`] future that asks for a slot.

use std::{
    fmt,
    future::{Future, IntoFuture},
    panic::AssertUnwindSafe,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use futures::FutureExt;
use slotd_proto::v1::{self as pb, slotd_client::SlotdClient};
use tokio::sync::{mpsc, oneshot, watch};
use tonic::transport::{Channel, Endpoint};

use crate::{
    Error, Lease, LeaseHandle, Outcome, ProviderLimit, Report, Usage,
    command::{Command, RequestSpec},
    connect::{AuthChannel, BearerAuth, Connector},
    members::{Members, Retry},
    session::{Backoff, Pauses, Session, SessionConfig},
};

/// A connection to a slotd daemon: one background session task that owns one `Acquire` stream.
///
/// Cheap to clone (an `Arc`), `Send + Sync`. Every clone shares the same stream, leases and queue
/// places. The session task ends when the last clone, lease and pending acquire are gone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    cmd: mpsc::UnboundedSender<Command<Lease>>,
    /// Unary calls go to the current member; the token rides in the channels' interceptor.
    members: Members,
    pauses: watch::Receiver<Pauses>,
    holder: String,
    default_ttl: Option<Duration>,
    close_timeout: Duration,
    next_request: AtomicU64,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client").field("holder", &self.inner.holder).finish_non_exhaustive()
    }
}

/// Settings for a [`Client`]; start with [`Client::builder`].
#[derive(Clone)]
pub struct ClientBuilder {
    holder: Option<String>,
    default_ttl: Option<Duration>,
    heartbeat_interval: Option<Duration>,
    backoff: Backoff,
    resume_grace: Option<Duration>,
    close_timeout: Duration,
    bearer_token: Option<String>,
    /// Endpoint parsing, TLS and timeouts.
    connector: Connector,
}

impl fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("holder", &self.holder)
            .field("default_ttl", &self.default_ttl)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("backoff", &self.backoff)
            .field("resume_grace", &self.resume_grace)
            .field("close_timeout", &self.close_timeout)
            .field("bearer_token", &self.bearer_token.as_ref().map(|_| "<redacted>"))
            .field("connector", &self.connector)
            .finish()
    }
}

impl Default for ClientBuilder {
    fn default() -> Self {
        ClientBuilder {
            holder: None,
            default_ttl: None,
            heartbeat_interval: None,
            backoff: Backoff { initial: Self::DEFAULT_BACKOFF_INITIAL, max: Self::DEFAULT_BACKOFF_MAX },
            resume_grace: Some(Self::DEFAULT_RESUME_GRACE),
            close_timeout: Self::DEFAULT_CLOSE_TIMEOUT,
            bearer_token: None,
            connector: Connector::new(),
        }
    }
}

impl ClientBuilder {
    /// How long the daemon keeps this client's leases after its stream breaks, waiting for a resume.
    pub const DEFAULT_RESUME_GRACE: Duration = Duration::from_secs(5);
    /// The first reconnect delay (before jitter).
    pub const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_millis(50);
    /// The longest reconnect delay (before jitter).
    pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(5);
    /// How long [`Client::close`] (and the background flush after the last handle is dropped) waits
    /// for the daemon to acknowledge outstanding releases. As long as the default resume grace: a
    /// daemon that does not answer within it has dropped a broken stream's leases anyway.
    pub const DEFAULT_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

    /// Default settings.
    pub fn new() -> Self {
        Self::default()
    }

    /// The holder name shown in the daemon's Status (default: program name and pid). Each acquire
    /// can override it.
    pub fn holder(mut self, name: impl Into<String>) -> Self {
        self.holder = Some(name.into());
        self
    }

    /// The TTL asked for when an acquire sets none (default: the pool's `default_ttl`).
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.default_ttl = Some(ttl);
        self
    }

    /// A fixed heartbeat interval (default: a third of the shortest TTL held).
    pub fn heartbeat_interval(mut self, every: Duration) -> Self {
        self.heartbeat_interval = Some(every);
        self
    }

    /// Reconnect delays: exponential from `initial` up to `max`, each with full jitter. While a
    /// failover is under way (a standby names a leader that does not answer) they stay below
    /// [`ELECTION_RETRY_MAX`](crate::ELECTION_RETRY_MAX), so that leases are re-presented soon after
    /// the next leader is elected.
    pub fn reconnect_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff = Backoff { initial, max: max.max(initial) };
        self
    }

    /// How long the daemon should keep this client's leases after its stream breaks, so that a
    /// reconnect can resume them (sent as `slotd-resume-grace`; the daemon caps it). `None` means
    /// closing the stream releases everything at once.
    pub fn resume_grace(mut self, grace: Option<Duration>) -> Self {
        self.resume_grace = grace;
        self
    }

    /// How long [`Client::close`] waits for the daemon to acknowledge outstanding releases (default
    /// [`DEFAULT_CLOSE_TIMEOUT`](Self::DEFAULT_CLOSE_TIMEOUT)).
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.close_timeout = timeout;
        self
    }

    /// Sends `authorization: Bearer <token>` with every call.
    pub fn bearer_token(mut self, token: impl Into<String>) -> Self {
        self.bearer_token = Some(token.into());
        self
    }

    /// Uses TLS, trusting the CA certificates in `ca_pem` (PEM) for the daemon's certificate. An
    /// `https://` endpoint without this trusts the system's roots.
    pub fn tls(mut self, ca_pem: impl Into<Vec<u8>>) -> Self {
        self.connector = self.connector.tls(ca_pem);
        self
    }

    /// The name to check the daemon's certificate against, when it is not the endpoint's host (for
    /// example connecting to an IP address with a certificate for `slotd.internal`).
    pub fn tls_domain(mut self, name: impl Into<String>) -> Self {
        self.connector = self.connector.tls_domain(name);
        self
    }

    /// Connects to `endpoint` and starts the session task. The endpoint is `host:port` or a URL:
    /// `http://127.0.0.1:7070`, or `https://...` for TLS (see [`parse_endpoint`](crate::parse_endpoint)).
    ///
    /// # Cancel safety
    /// Cancel safe: nothing is started until the connection is made.
    pub async fn connect(self, endpoint: impl Into<String>) -> Result<Client, Error> {
        let endpoint = self.connector.endpoint(&endpoint.into())?;
        self.connect_endpoint(endpoint).await
    }

    /// Connects through a configured tonic [`Endpoint`]: the hook for TLS (enable tonic's TLS features
    /// and call `Endpoint::tls_config`), timeouts or a custom connector.
    ///
    /// # Cancel safety
    /// Cancel safe: nothing is started until the connection is made.
    pub async fn connect_endpoint(self, endpoint: Endpoint) -> Result<Client, Error> {
        let channel = endpoint.connect().await?;
        self.connect_channel(channel)
    }

    /// Starts a client over an existing channel (which reconnects by itself). Must be called within
    /// a tokio runtime.
    pub fn connect_channel(self, channel: Channel) -> Result<Client, Error> {
        let auth = BearerAuth::new(self.bearer_token.as_deref())?;
        let members = Members::single(SlotdClient::new(auth.wrap(channel)));
        self.start(members)
    }

    /// Connects to a highly available deployment (slotd's `[ha]`): `endpoints` are its members, in
    /// any order. The client talks to one at a time: a standby's UNAVAILABLE with `slotd-leader`
    /// sends it to the leader at once, any other failure to the next endpoint (with the usual
    /// backoff). After a failover the session re-presents its leases to the new leader, which
    /// re-adopts them during its learning period. Connections are made lazily, so a member that is
    /// down does not fail this call.
    ///
    /// # Cancel safety
    /// Cancel safe: nothing is started until it returns.
    pub async fn connect_any<I, S>(self, endpoints: I) -> Result<Client, Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let auth = BearerAuth::new(self.bearer_token.as_deref())?;
        let list = endpoints
            .into_iter()
            .map(|e| {
                Ok(SlotdClient::new(auth.clone().wrap(self.connector.endpoint(&e.into())?.connect_lazy())))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        if list.is_empty() {
            return Err(Error::Config("connect_any needs at least one endpoint".into()));
        }
        let members = Members::new(list, Some((self.connector.clone(), auth)));
        self.start(members)
    }

    fn start(self, members: Members) -> Result<Client, Error> {
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (pauses_tx, pauses_rx) = watch::channel(Pauses::new());
        let session = Session::new(
            SessionConfig {
                members: members.clone(),
                resume_grace: self.resume_grace,
                heartbeat_interval: self.heartbeat_interval,
                backoff: self.backoff,
                close_timeout: self.close_timeout,
            },
            cmd_rx,
            cmd_tx.downgrade(),
            pauses_tx,
        );
        tokio::spawn(session.run());
        Ok(Client {
            inner: Arc::new(Inner {
                cmd: cmd_tx,
                members,
                pauses: pauses_rx,
                holder: self.holder.unwrap_or_else(default_holder),
                default_ttl: self.default_ttl,
                close_timeout: self.close_timeout,
                next_request: AtomicU64::new(1),
            }),
        })
    }
}

fn default_holder() -> String {
    let program = std::env::args()
        .next()
        .and_then(|p| std::path::Path::new(&p).file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "slotd-client".into());
    format!("{program} pid {}", std::process::id())
}

impl Client {
    /// Connects with default settings. See [`ClientBuilder::connect`].
    ///
    /// # Cancel safety
    /// Cancel safe: nothing is started until the connection is made.
    pub async fn connect(endpoint: impl Into<String>) -> Result<Client, Error> {
        ClientBuilder::new().connect(endpoint).await
    }

    /// Settings for a new client.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::new()
    }

    /// Asks for a slot on `pool`. Set options on the builder, then `.await` it for a [`Lease`].
    ///
    /// Waits in the daemon's queue (and through pauses) until granted, rejected, or `max_wait` runs
    /// out. See [`Acquire`] for cancel safety.
    pub fn acquire(&self, pool: impl Into<String>) -> AcquireBuilder {
        AcquireBuilder {
            client: self.clone(),
            spec: RequestSpec {
                pool: pool.into(),
                any_pools: Vec::new(),
                priority: None,
                started_at: SystemTime::now(),
                ttl: self.inner.default_ttl,
                max_wait: None,
                holder: self.inner.holder.clone(),
                tokens: None,
            },
        }
    }

    /// Runs `f` under a lease on `pool` and releases the lease when `f`'s future ends, however it ends.
    ///
    /// The outcome is the one set through [`LeaseHandle::set_outcome`], or else [`Outcome::Ok`] for
    /// `Ok`, [`Outcome::Error`] for `Err` and for a panic (which is then resumed), and
    /// [`Outcome::Cancelled`] if this future is dropped while `f` runs. The release is sent without
    /// waiting for the daemon's answer.
    ///
    /// # Cancel safety
    /// Dropping the future while it waits for the slot cancels the request (losing its place in the
    /// queue); dropping it while `f` runs drops `f`'s future and releases the lease as cancelled.
    pub async fn run<F, Fut, T, E>(&self, pool: impl Into<String>, f: F) -> Result<T, E>
    where
        F: FnOnce(LeaseHandle) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: From<Error>,
    {
        let lease = self.acquire(pool).await?;
        let handle = lease.handle();
        let guard = ReleaseGuard(Some(lease));
        let result = AssertUnwindSafe(f(handle.clone())).catch_unwind().await;
        let default = match &result {
            Ok(Ok(_)) => Outcome::Ok,
            Ok(Err(_)) | Err(_) => Outcome::Error,
        };
        guard.finish(default);
        match result {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Runs a unary call on the current member; once more on the leader when a standby names one.
    pub(crate) async fn unary<T, F, Fut>(&self, call: F) -> Result<T, tonic::Status>
    where
        F: Fn(SlotdClient<AuthChannel>) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        match call(self.inner.members.current()).await {
            // Any other code is the daemon's answer: the member is alive and stays in use.
            Err(status)
                if status.code() == tonic::Code::Unavailable
                    && self.inner.members.failed(Some(&status)) == Retry::Now =>
            {
                call(self.inner.members.current()).await
            }
            res => res,
        }
    }

    /// Runs a read-only unary call: as [`unary`](Self::unary), and with several members a member that
    /// is down (UNAVAILABLE naming no leader) moves the call on to the next one. Bounded: each
    /// member at most once, plus one redirect from each.
    pub(crate) async fn unary_read<T, F, Fut>(&self, call: F) -> Result<T, tonic::Status>
    where
        F: Fn(SlotdClient<AuthChannel>) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let members = &self.inner.members;
        let mut tries = members.len().saturating_mul(2);
        loop {
            let status = match call(members.current()).await {
                Err(status) => status,
                ok => return ok,
            };
            // Any other code is the daemon's answer: the member is alive and stays in use.
            if status.code() != tonic::Code::Unavailable || tries == 0 {
                return Err(status);
            }
            if members.failed(Some(&status)) != Retry::Now && members.len() == 1 {
                return Err(status);
            }
            tries -= 1;
        }
    }

    /// The pause state of every pool this client waits on or holds, as pushed by the daemon.
    pub fn pauses(&self) -> watch::Receiver<Pauses> {
        self.inner.pauses.clone()
    }

    /// A snapshot of the daemon: every pool (or only `pool`) and every lease.
    ///
    /// # Cancel safety
    /// Cancel safe: a read-only call.
    pub async fn status(&self, pool: Option<&str>) -> Result<pb::StatusResponse, Error> {
        let req = pb::StatusRequest { pool: pool.unwrap_or_default().to_owned() };
        let call = |mut c: SlotdClient<AuthChannel>| {
            let req = req.clone();
            async move { c.status(req).await }
        };
        Ok(self.unary_read(call).await?.into_inner())
    }

    /// Reports a provider 429 seen outside a lease; pauses `pool` for `retry_after` (or the pool's
    /// default). Returns when the pool's pause now ends.
    ///
    /// # Cancel safety
    /// Dropping the future may or may not have delivered the report.
    pub async fn report_rate_limit(
        &self,
        pool: impl Into<String>,
        retry_after: Option<Duration>,
        reason: impl Into<String>,
    ) -> Result<Option<SystemTime>, Error> {
        let req = pb::ReportRateLimitRequest {
            pool: pool.into(),
            retry_after: retry_after.and_then(|d| prost_types::Duration::try_from(d).ok()),
            reason: reason.into(),
            ..Default::default()
        };
        let call = |mut c: SlotdClient<AuthChannel>| {
            let req = req.clone();
            async move { c.report_rate_limit(req).await }
        };
        let resp = self.unary(call).await?;
        Ok(resp.into_inner().paused_until.and_then(|t| SystemTime::try_from(t).ok()))
    }

    /// Reports a provider answer seen outside a lease: [`Outcome::RateLimited`], [`Outcome::Overloaded`]
    /// or [`Outcome::QuotaExhausted`] (the daemon refuses the other classes with INVALID_ARGUMENT). The
    /// pool's policy for the class applies (by default a pause; an overload also counts as a failure
    /// for the pool's circuit breaker). Returns when the pool's pause now ends, if it is paused.
    ///
    /// # Cancel safety
    /// Dropping the future may or may not have delivered the report.
    pub async fn report_outcome(
        &self,
        pool: impl Into<String>,
        outcome: Outcome,
        reason: impl Into<String>,
    ) -> Result<Option<SystemTime>, Error> {
        let (code, retry_after) = crate::session::wire::outcome(outcome);
        let req = pb::ReportRateLimitRequest {
            pool: pool.into(),
            retry_after: retry_after.and_then(|d| prost_types::Duration::try_from(d).ok()),
            reason: reason.into(),
            outcome: code as i32,
        };
        let call = |mut c: SlotdClient<AuthChannel>| {
            let req = req.clone();
            async move { c.report_rate_limit(req).await }
        };
        let resp = self.unary(call).await?.into_inner();
        Ok(resp.paused_until.and_then(|t| SystemTime::try_from(t).ok()))
    }

    /// Reports a provider call made outside a lease: its usage is charged to `pool`'s rate budgets and
    /// the provider's rate-limit headers (see [`provider::provider_limits`](crate::provider)) clamp
    /// them. Returns the pool's budgets after (`None` when it has none).
    ///
    /// # Cancel safety
    /// Dropping the future may or may not have delivered the report.
    pub async fn report_usage(
        &self,
        pool: impl Into<String>,
        usage: Option<Usage>,
        limits: Vec<ProviderLimit>,
    ) -> Result<Option<pb::BudgetStatus>, Error> {
        let report = Report { outcome: Outcome::Ok, usage, limits };
        let wire = crate::session::wire::release(String::new(), report);
        let req = pb::ReportUsageRequest {
            pool: pool.into(),
            usage: wire.usage,
            provider_limits: wire.provider_limits,
        };
        let call = |mut c: SlotdClient<AuthChannel>| {
            let req = req.clone();
            async move { c.report_usage(req).await }
        };
        Ok(self.unary(call).await?.into_inner().budget)
    }

    /// Closes the client: withdraws queued acquires, releases every lease still held (as
    /// [`Outcome::Cancelled`]; their guards report [`Lost::SessionClosed`](crate::Lost::SessionClosed)),
    /// sends every release that is still on its way (leases dropped a moment ago included), and waits
    /// until the daemon has acknowledged them all, at most the close timeout
    /// ([`ClientBuilder::close_timeout`], default [`ClientBuilder::DEFAULT_CLOSE_TIMEOUT`]).
    ///
    /// Call it before a short-lived program exits: a dropped [`Lease`] is released by the client's
    /// background task, which dies with the runtime when `main` returns, so without `close` the last
    /// release may never leave the process (the daemon then holds the slot for the resume grace and
    /// counts it as a TTL expiry).
    ///
    /// Every clone shares the session, so this closes them all: later acquires fail with
    /// [`Error::SessionClosed`]. [`status`](Self::status) and
    /// [`report_rate_limit`](Self::report_rate_limit) keep working. Closing again, or after the
    /// session ended, returns `Ok(())` at once.
    ///
    /// Returns [`Error::Unacknowledged`] when the timeout ran out first (the daemon was unreachable
    /// or slow): those slots come back when their resume grace or TTL runs out.
    ///
    /// # Cancel safety
    /// The close starts on the first poll; dropping the future afterwards only stops waiting for it:
    /// the session still flushes and ends in the background, within the same timeout.
    pub async fn close(&self) -> Result<(), Error> {
        let deadline = tokio::time::Instant::now() + self.inner.close_timeout;
        let (tx, rx) = oneshot::channel();
        if self.inner.cmd.send(Command::Close { deadline, reply: tx }).is_err() {
            // The session already ended: nothing is left to flush.
            return Ok(());
        }
        // The session answers every close it received; no answer means the runtime dropped it.
        rx.await.unwrap_or(Err(Error::SessionClosed))
    }

    fn next_request_id(&self) -> String {
        format!("r{}", self.inner.next_request.fetch_add(1, Ordering::Relaxed))
    }
}

/// Releases the lease if the closure form is dropped (or unwinds) before it finished.
struct ReleaseGuard(Option<Lease>);

impl ReleaseGuard {
    fn finish(mut self, default: Outcome) {
        if let Some(lease) = self.0.take() {
            let report = lease.handle().take_report(default);
            lease.release_in_background(report);
        }
    }
}

impl Drop for ReleaseGuard {
    fn drop(&mut self) {
        if let Some(lease) = self.0.take() {
            let report = lease.handle().take_report(Outcome::Cancelled);
            lease.release_in_background(report);
        }
    }
}

/// Options of one acquire; `.await` it (it is [`IntoFuture`]) to get a [`Lease`].
#[must_use = "an acquire does nothing until awaited"]
#[derive(Debug)]
pub struct AcquireBuilder {
    pub(crate) client: Client,
    pub(crate) spec: RequestSpec,
}

impl AcquireBuilder {
    /// 0..=9, higher is served first (the daemon's default is 5).
    pub fn priority(mut self, priority: u32) -> Self {
        self.spec.priority = Some(priority);
        self
    }

    /// When the agent's turn started (default: when `acquire` was called). Within a priority the
    /// oldest turn is served first, and the time survives reconnects.
    pub fn started_at(mut self, t: SystemTime) -> Self {
        self.spec.started_at = t;
        self
    }

    /// How long the lease lives without a heartbeat (default: the client's default TTL or the
    /// pool's). Heartbeats are automatic.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.spec.ttl = Some(ttl);
        self
    }

    /// Give up with `DEADLINE_EXCEEDED` after waiting this long. Zero means "now or never".
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.spec.max_wait = Some(max_wait);
        self
    }

    /// The holder name shown in Status for this lease.
    pub fn holder(mut self, name: impl Into<String>) -> Self {
        self.spec.holder = name.into();
        self
    }

    /// The call's token estimate, reserved from the pool's rate budgets at grant: the input tokens
    /// it sends and its `max_tokens`. Without it the pool's default estimate applies. Settle the
    /// real usage with [`Lease::settle`](crate::Lease::settle) (or a release carrying usage) so the
    /// unused part goes back. An estimate above a budget's burst is refused with
    /// [`Error::Rejected`](crate::Error) (INVALID_ARGUMENT).
    pub fn tokens(mut self, input: u64, max_output: u64) -> Self {
        self.spec.tokens = Some((input, max_output));
        self
    }
}

impl IntoFuture for AcquireBuilder {
    type Output = Result<Lease, Error>;
    type IntoFuture = Acquire;

    fn into_future(self) -> Acquire {
        let request_id = self.client.next_request_id();
        Acquire { client: self.client, request_id, spec: Some(self.spec), rx: None, done: false }
    }
}

/// The future of an [`AcquireBuilder`]: resolves to a [`Lease`] once the daemon grants the slot.
///
/// # Cancel safety
/// Dropping it cancels the request: it leaves the daemon's queue and loses its place. If the grant
/// was already on its way, the slot goes straight back to the daemon.
#[must_use = "futures do nothing unless polled"]
#[derive(Debug)]
pub struct Acquire {
    client: Client,
    request_id: String,
    spec: Option<RequestSpec>,
    rx: Option<oneshot::Receiver<Result<Lease, Error>>>,
    done: bool,
}

impl Acquire {
    /// The request id sent to the daemon (unique within this client).
    pub fn request_id(&self) -> &str {
        &self.request_id
    }
}

impl Future for Acquire {
    type Output = Result<Lease, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(Err(Error::SessionClosed));
        }
        if let Some(spec) = this.spec.take() {
            let (tx, rx) = oneshot::channel();
            let sent = this.client.inner.cmd.send(Command::Acquire {
                request_id: this.request_id.clone(),
                spec,
                reply: tx,
            });
            if sent.is_err() {
                this.done = true;
                return Poll::Ready(Err(Error::SessionClosed));
            }
            this.rx = Some(rx);
        }
        let rx = this.rx.as_mut().expect("sent above");
        match Pin::new(rx).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(answer) => {
                this.done = true;
                Poll::Ready(answer.unwrap_or(Err(Error::SessionClosed)))
            }
        }
    }
}

impl Drop for Acquire {
    fn drop(&mut self) {
        if self.rx.is_some() && !self.done {
            // Sent before the receiver is dropped: if the grant already arrived, the lease inside the
            // receiver drops next and releases itself, and the session ignores this cancel.
            let _ = self.client.inner.cmd.send(Command::Cancel { request_id: self.request_id.clone() });
        }
    }
}
