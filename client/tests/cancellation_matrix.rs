//! The cancellation matrix: acquire, release, reconnect and close, each against a slow, a failing and a
//! never-answering daemon.
//!
//! The daemons are fakes built here with tonic on 127.0.0.1:0, scripted through a [`Mode`] that a test
//! can switch at any time. Each cell asserts what the user of the client sees: an answer, an error, a
//! future that stays pending (checked with a short `timeout`) without hanging or panicking, and what
//! reached the wire (a cancel when an acquire future is dropped, a release when a lease is).
//!
//! Durations are tens of milliseconds. Timeouts are only "does not hang" guards, never upper bounds.

use std::{
    future::{Future, IntoFuture},
    net::SocketAddr,
    panic::Location,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::Stream;
use slotd_client::{Client, Outcome, proto as pb};
use slotd_proto::v1::{
    client_message::Msg as Up,
    server_message::Msg as Down,
    slotd_server::{Slotd, SlotdServer},
};
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status, Streaming};

/// The longest any wait may take before the test fails as hung.
const GUARD: Duration = Duration::from_secs(5);
/// How long a future must stay pending to count as "still waiting".
const PENDING: Duration = Duration::from_millis(60);
/// The clients' close timeout: how long a closing client keeps trying to flush its releases.
const CLOSE: Duration = Duration::from_millis(100);
/// A slow daemon's delay before each answer.
const SLOW: Duration = Duration::from_millis(30);

/// How the fake daemon behaves, switchable while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Answers every message at once.
    Normal,
    /// Answers every message after a delay.
    Slow(Duration),
    /// Refuses new streams, and ends an open one with an error status at its next message.
    Failing,
    /// Accepts streams and messages and never answers.
    Silent,
}

/// What the fake daemon saw, in order.
#[derive(Debug, Clone)]
enum Seen {
    /// A stream was opened.
    Open,
    /// A stream was refused (the daemon was failing).
    Refused,
    /// A message arrived.
    Msg(Up),
    /// The client ended its side of a stream.
    End,
}

struct State {
    mode: Mutex<Mode>,
    log: Mutex<Vec<Seen>>,
    next_lease: AtomicU64,
    /// Bumped to cut every open stream with an error status.
    cut: watch::Sender<u64>,
}

#[derive(Clone)]
struct FakeSlotd(Arc<State>);

type DownStream = Pin<Box<dyn Stream<Item = Result<pb::ServerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Slotd for FakeSlotd {
    type AcquireStream = DownStream;

    async fn acquire(
        &self,
        req: Request<Streaming<pb::ClientMessage>>,
    ) -> Result<Response<Self::AcquireStream>, Status> {
        let state = self.0.clone();
        if *state.mode.lock().unwrap() == Mode::Failing {
            state.log.lock().unwrap().push(Seen::Refused);
            return Err(Status::unavailable("scripted: refusing streams"));
        }
        state.log.lock().unwrap().push(Seen::Open);
        let mut inbound = req.into_inner();
        let mut cut = state.cut.subscribe();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    _ = cut.changed() => {
                        let _ = tx.send(Err(Status::unavailable("scripted: cut")));
                        return;
                    }
                    msg = inbound.message() => msg,
                };
                let Ok(Some(pb::ClientMessage { msg: Some(msg) })) = msg else {
                    state.log.lock().unwrap().push(Seen::End);
                    return;
                };
                state.log.lock().unwrap().push(Seen::Msg(msg.clone()));
                let mode = *state.mode.lock().unwrap();
                match mode {
                    Mode::Normal => {
                        let _ = tx.send(Ok(answer(&state, msg)));
                    }
                    Mode::Slow(delay) => {
                        let (state, tx) = (state.clone(), tx.clone());
                        tokio::spawn(async move {
                            tokio::time::sleep(delay).await;
                            let _ = tx.send(Ok(answer(&state, msg)));
                        });
                    }
                    Mode::Failing => {
                        let _ = tx.send(Err(Status::internal("scripted: failure")));
                        return;
                    }
                    Mode::Silent => {}
                }
            }
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(rx))))
    }

    async fn report_rate_limit(
        &self,
        _: Request<pb::ReportRateLimitRequest>,
    ) -> Result<Response<pb::ReportRateLimitResponse>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    async fn status(&self, _: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    async fn report_usage(
        &self,
        _: Request<pb::ReportUsageRequest>,
    ) -> Result<Response<pb::ReportUsageResponse>, Status> {
        Err(Status::unimplemented("not scripted"))
    }
}

/// What a working daemon says to `msg`.
fn answer(state: &State, msg: Up) -> pb::ServerMessage {
    let msg = match msg {
        Up::Request(r) => {
            let n = state.next_lease.fetch_add(1, Ordering::Relaxed) + 1;
            Down::Granted(pb::Granted {
                request_id: r.request_id,
                lease_id: format!("{n:032x}"),
                fencing_token: n,
                ttl: Some(prost_types::Duration { seconds: 30, nanos: 0 }),
                expires_at: None,
                pool: r.pool,
                resume_credential: format!("credential-{n}"),
            })
        }
        Up::Cancel(c) => Down::Cancelled(pb::Cancelled { request_id: c.request_id }),
        Up::Heartbeat(_) => Down::HeartbeatAck(pb::HeartbeatAck { renewed: 0 }),
        Up::Release(r) => Down::Released(pb::Released { lease_id: r.lease_id }),
        Up::Resume(r) => Down::LeaseResumed(pb::LeaseResumed {
            lease_id: r.lease_id,
            fencing_token: r.fencing_token,
            expires_at: None,
        }),
    };
    pb::ServerMessage { msg: Some(msg) }
}

/// A scripted daemon serving on a loopback port.
struct Fake {
    addr: SocketAddr,
    state: Arc<State>,
    server: JoinHandle<()>,
}

impl Fake {
    async fn start(mode: Mode) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(State {
            mode: Mutex::new(mode),
            log: Mutex::default(),
            next_lease: AtomicU64::new(0),
            cut: watch::Sender::new(0),
        });
        let svc = SlotdServer::new(FakeSlotd(state.clone()));
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
        });
        Fake { addr, state, server }
    }

    /// A client with fast reconnects, once its stream is open.
    async fn client(&self) -> Client {
        let opened = self.attempts();
        let connect = Client::builder()
            .reconnect_backoff(Duration::from_millis(5), Duration::from_millis(20))
            .close_timeout(CLOSE)
            .connect(format!("http://{}", self.addr));
        let client = within("connect", connect).await.expect("connect to the fake daemon");
        self.saw("the client's stream", |log| attempts(log) > opened).await;
        client
    }

    fn set(&self, mode: Mode) {
        *self.state.mode.lock().unwrap() = mode;
    }

    /// Ends every open stream with an error status, as a network cut would.
    fn cut(&self) {
        self.state.cut.send_modify(|n| *n += 1);
    }

    fn log(&self) -> Vec<Seen> {
        self.state.log.lock().unwrap().clone()
    }

    fn attempts(&self) -> usize {
        attempts(&self.log())
    }

    /// Waits until the log satisfies `pred`.
    #[track_caller]
    fn saw<'a>(
        &'a self,
        what: &'static str,
        pred: impl Fn(&[Seen]) -> bool + 'a,
    ) -> impl Future<Output = ()> + 'a {
        let at = Location::caller();
        async move {
            let wait = async {
                while !pred(&self.log()) {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            };
            if tokio::time::timeout(GUARD, wait).await.is_err() {
                panic!("{at}: the daemon never saw {what}; it saw {:#?}", self.log());
            }
        }
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Bounds `fut` by [`GUARD`], failing at the caller's line if it hangs.
#[track_caller]
fn within<F: IntoFuture>(what: &'static str, fut: F) -> impl Future<Output = F::Output> {
    let at = Location::caller();
    async move {
        match tokio::time::timeout(GUARD, fut.into_future()).await {
            Ok(v) => v,
            Err(_) => panic!("{at}: {what} hung for {GUARD:?}"),
        }
    }
}

/// Asserts that `fut` is still waiting after [`PENDING`].
#[track_caller]
fn stays_pending<F: Future>(what: &'static str, fut: Pin<&mut F>) -> impl Future<Output = ()>
where
    F::Output: std::fmt::Debug,
{
    let at = Location::caller();
    async move {
        if let Ok(out) = tokio::time::timeout(PENDING, fut).await {
            panic!("{at}: {what} should still be waiting, got {out:?}");
        }
    }
}

/// How many streams were opened or refused.
fn attempts(log: &[Seen]) -> usize {
    log.iter().filter(|s| matches!(s, Seen::Open | Seen::Refused)).count()
}

fn requests(log: &[Seen]) -> Vec<&str> {
    log.iter()
        .filter_map(|s| match s {
            Seen::Msg(Up::Request(r)) => Some(r.request_id.as_str()),
            _ => None,
        })
        .collect()
}

fn cancels(log: &[Seen]) -> Vec<&str> {
    log.iter()
        .filter_map(|s| match s {
            Seen::Msg(Up::Cancel(c)) => Some(c.request_id.as_str()),
            _ => None,
        })
        .collect()
}

fn releases(log: &[Seen]) -> Vec<(&str, i32)> {
    log.iter()
        .filter_map(|s| match s {
            Seen::Msg(Up::Release(r)) => Some((r.lease_id.as_str(), r.outcome)),
            _ => None,
        })
        .collect()
}

fn resumes(log: &[Seen]) -> Vec<&str> {
    log.iter()
        .filter_map(|s| match s {
            Seen::Msg(Up::Resume(r)) => Some(r.lease_id.as_str()),
            _ => None,
        })
        .collect()
}

// ---- acquire ----------------------------------------------------------------------------------------

#[tokio::test]
async fn acquire_slow_daemon_grants_late_and_a_dropped_acquire_is_cancelled_and_its_grant_returned() {
    let d = Fake::start(Mode::Slow(SLOW)).await;
    let c = d.client().await;
    let lease = within("a slow grant", c.acquire("p")).await.expect("granted");
    assert_eq!(lease.pool(), "p");
    drop(lease);

    // Dropped before the slow grant: the cancel goes on the wire, and the grant that still comes is
    // given straight back as cancelled.
    let mut acquire = Box::pin(c.acquire("p").into_future());
    let id = acquire.request_id().to_owned();
    assert!(futures::poll!(acquire.as_mut()).is_pending());
    drop(acquire);
    d.saw("the cancel", |log| cancels(log).contains(&id.as_str())).await;
    d.saw("the late grant given back", |log| {
        releases(log).iter().any(|(_, outcome)| *outcome == pb::Outcome::Cancelled as i32)
    })
    .await;
}

#[tokio::test]
async fn acquire_failing_daemon_keeps_waiting_and_resends_on_every_stream() {
    let d = Fake::start(Mode::Normal).await;
    let c = d.client().await;
    d.set(Mode::Failing);
    let mut acquire = Box::pin(c.acquire("p").into_future());
    let id = acquire.request_id().to_owned();
    // The stream fails at the request; the client reconnects (refused) and keeps the request.
    stays_pending("an acquire against a failing daemon", acquire.as_mut()).await;
    d.saw("reconnect attempts", |log| attempts(log) >= 3).await;

    // Once the daemon works again, the same request is re-sent and granted.
    d.set(Mode::Normal);
    let lease = within("the grant after recovery", acquire).await.expect("granted");
    assert!(requests(&d.log()).iter().filter(|r| **r == id).count() >= 2, "re-sent: {:#?}", d.log());
    drop(lease);
}

#[tokio::test]
async fn acquire_silent_daemon_stays_pending_and_a_drop_cancels_on_the_wire() {
    let d = Fake::start(Mode::Silent).await;
    let c = d.client().await;
    let mut acquire = Box::pin(c.acquire("p").into_future());
    let id = acquire.request_id().to_owned();
    stays_pending("an acquire nobody answers", acquire.as_mut()).await;
    d.saw("the request", |log| requests(log).contains(&id.as_str())).await;
    drop(acquire);
    d.saw("the cancel", |log| cancels(log).contains(&id.as_str())).await;
}

// ---- release ----------------------------------------------------------------------------------------

#[tokio::test]
async fn release_slow_daemon_answers_late_and_a_dropped_release_is_still_sent() {
    let d = Fake::start(Mode::Slow(SLOW)).await;
    let c = d.client().await;
    let lease = within("grant", c.acquire("p")).await.expect("granted");
    within("a slow release", lease.release(Outcome::Ok)).await.expect("released");

    // Dropping the release future after its first poll only stops waiting for the answer.
    let lease = within("grant", c.acquire("p")).await.expect("granted");
    let id = lease.lease_id().to_owned();
    let mut release = Box::pin(lease.rate_limited(None));
    assert!(futures::poll!(release.as_mut()).is_pending());
    drop(release);
    d.saw("the release", |log| releases(log).contains(&(id.as_str(), pb::Outcome::RateLimited as i32))).await;
}

#[tokio::test]
async fn release_failing_daemon_waits_and_completes_once_the_daemon_recovers() {
    let d = Fake::start(Mode::Normal).await;
    let c = d.client().await;
    let lease = within("grant", c.acquire("p")).await.expect("granted");
    let id = lease.lease_id().to_owned();
    d.set(Mode::Failing);
    let mut release = Box::pin(lease.failed());
    stays_pending("a release against a failing daemon", release.as_mut()).await;

    // After recovery the lease is resumed, then released, and only then does the release answer.
    d.set(Mode::Normal);
    within("the release after recovery", release).await.expect("released");
    let log = d.log();
    let resumed = log.iter().position(|s| matches!(s, Seen::Msg(Up::Resume(r)) if r.lease_id == id));
    let released = log.iter().rposition(|s| matches!(s, Seen::Msg(Up::Release(r)) if r.lease_id == id));
    assert!(resumed.is_some() && resumed < released, "resume before release: {log:#?}");
}

#[tokio::test]
async fn release_silent_daemon_stays_pending_but_the_release_is_on_the_wire() {
    let d = Fake::start(Mode::Normal).await;
    let c = d.client().await;
    let lease = within("grant", c.acquire("p")).await.expect("granted");
    let id = lease.lease_id().to_owned();
    d.set(Mode::Silent);
    let mut release = Box::pin(lease.release(Outcome::Ok));
    stays_pending("a release nobody answers", release.as_mut()).await;
    d.saw("the release", |log| releases(log).contains(&(id.as_str(), pb::Outcome::Ok as i32))).await;
    drop(release);
    // The client is still usable: nothing is stuck behind the unanswered release.
    d.set(Mode::Normal);
    let next = within("a grant after the unanswered release", c.acquire("p")).await.expect("granted");
    drop(next);
}

// ---- reconnect --------------------------------------------------------------------------------------

#[tokio::test]
async fn reconnect_slow_daemon_resumes_the_lease_late_without_losing_it() {
    let d = Fake::start(Mode::Normal).await;
    let c = d.client().await;
    let lease = within("grant", c.acquire("p")).await.expect("granted");
    let id = lease.lease_id().to_owned();
    d.set(Mode::Slow(SLOW));
    d.cut();
    d.saw("the resume", |log| resumes(log).contains(&id.as_str())).await;
    // Released after the reconnect: the answer waits for the slow resume, then the slow release.
    within("release after a slow resume", lease.release(Outcome::Ok)).await.expect("released");
}

#[tokio::test]
async fn reconnect_failing_daemon_retries_with_backoff_and_resumes_once_it_recovers() {
    let d = Fake::start(Mode::Normal).await;
    let c = d.client().await;
    let lease = within("grant", c.acquire("p")).await.expect("granted");
    let id = lease.lease_id().to_owned();
    d.set(Mode::Failing);
    d.cut();
    let before = d.attempts();
    d.saw("repeated reconnect attempts", |log| attempts(log) >= before + 3).await;
    // The client cannot know whether the daemon kept the lease: it does not report it lost.
    assert!(!lease.is_lost());
    d.set(Mode::Normal);
    d.saw("the resume", |log| resumes(log).contains(&id.as_str())).await;
    within("release after recovery", lease.release(Outcome::Ok)).await.expect("released");
}

#[tokio::test]
async fn reconnect_silent_daemon_leaves_the_resume_and_a_queued_acquire_waiting() {
    let d = Fake::start(Mode::Normal).await;
    let c = d.client().await;
    let lease = within("grant", c.acquire("p")).await.expect("granted");
    let id = lease.lease_id().to_owned();
    d.set(Mode::Silent);
    d.cut();
    d.saw("the resume", |log| resumes(log).contains(&id.as_str())).await;
    let mut acquire = Box::pin(c.acquire("p").into_future());
    stays_pending("an acquire on a silent stream", acquire.as_mut()).await;
    assert!(!lease.is_lost(), "an unanswered resume is not a loss");
    let mut release = Box::pin(lease.release(Outcome::Ok));
    stays_pending("a release behind an unanswered resume", release.as_mut()).await;
    drop(release);
    drop(acquire);
}

// ---- close ------------------------------------------------------------------------------------------

#[tokio::test]
async fn close_slow_daemon_flushes_the_release_then_ends_the_stream() {
    let d = Fake::start(Mode::Slow(SLOW)).await;
    let c = d.client().await;
    let lease = within("grant", c.acquire("p")).await.expect("granted");
    let id = lease.lease_id().to_owned();
    drop(lease);
    drop(c);
    // The last handle is gone: the task waits for the release's answer, then closes its stream.
    d.saw("the release, then the end of the stream", |log| {
        let released = log.iter().position(|s| matches!(s, Seen::Msg(Up::Release(r)) if r.lease_id == id));
        let ended = log.iter().rposition(|s| matches!(s, Seen::End));
        released.is_some() && released < ended
    })
    .await;
}

#[tokio::test]
async fn close_failing_daemon_stops_reconnecting_at_its_timeout() {
    let d = Fake::start(Mode::Normal).await;
    let c = d.client().await;
    let lease = within("grant", c.acquire("p")).await.expect("granted");
    d.set(Mode::Failing);
    d.cut();
    let before = d.attempts();
    d.saw("reconnect attempts", |log| attempts(log) > before).await;
    drop(lease);
    drop(c);
    // It keeps trying to deliver the release until its close timeout; from then on it makes no more
    // attempts.
    tokio::time::sleep(CLOSE + PENDING).await;
    let settled = d.attempts();
    tokio::time::sleep(PENDING).await;
    assert_eq!(d.attempts(), settled, "a closed client must stop reconnecting");
}

#[tokio::test]
async fn close_silent_daemon_sends_the_release_and_returns_at_once() {
    let d = Fake::start(Mode::Normal).await;
    let c = d.client().await;
    let lease = within("grant", c.acquire("p")).await.expect("granted");
    let id = lease.lease_id().to_owned();
    d.set(Mode::Silent);
    // Dropping never waits for the daemon, even one that never answers. (The task itself gives up
    // on the unanswered release after its flush timeout, which this test does not wait for.)
    drop(lease);
    drop(c);
    d.saw("the release", |log| releases(log).contains(&(id.as_str(), pb::Outcome::Ok as i32))).await;
}

#[tokio::test]
async fn explicit_close_slow_daemon_waits_for_the_release() {
    let d = Fake::start(Mode::Slow(SLOW)).await;
    let c = d.client().await;
    let lease = within("grant", c.acquire("p")).await.expect("granted");
    drop(lease);
    within("close", c.close()).await.expect("the slow answer came within the close timeout");
}

#[tokio::test]
async fn explicit_close_failing_daemon_reports_the_lost_release() {
    let d = Fake::start(Mode::Normal).await;
    let c = d.client().await;
    let lease = within("grant", c.acquire("p")).await.expect("granted");
    d.set(Mode::Failing);
    d.cut();
    drop(lease);
    let closed = within("close", c.close()).await;
    assert!(matches!(closed, Err(slotd_client::Error::Unacknowledged { releases: 1 })), "{closed:?}");
}

#[tokio::test]
async fn explicit_close_silent_daemon_gives_up_at_its_timeout() {
    let d = Fake::start(Mode::Normal).await;
    let c = d.client().await;
    let lease = within("grant", c.acquire("p")).await.expect("granted");
    let id = lease.lease_id().to_owned();
    d.set(Mode::Silent);
    drop(lease);
    let closed = within("close", c.close()).await;
    assert!(matches!(closed, Err(slotd_client::Error::Unacknowledged { releases: 1 })), "{closed:?}");
    d.saw("the release", |log| releases(log).contains(&(id.as_str(), pb::Outcome::Ok as i32))).await;
    // Dropping a close future stops only the waiting; closing again answers at once.
    within("close again", c.close()).await.expect("nothing is left to flush");
}
