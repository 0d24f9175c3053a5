//! Accepting connections: a bound on open ones, a handshake deadline, and backoff on accept errors.
//!
//! tonic's own accept loop retries a failing `accept` at once and silently, so near the fd limit
//! (EMFILE) it spins, and hyper waits forever for the HTTP/2 preface of a connection that never
//! speaks. [`incoming`] replaces that loop: it is the stream of connections handed to
//! `serve_with_incoming_shutdown`.
//!
//! - Every accepted connection holds a place among `limits.max_connections` for as long as it is
//!   open; one more is closed at once (with an HTTP/2 GOAWAY on plaintext, so a client can say why)
//!   and counted, with a rate-limited warning.
//! - A connection must deliver the 24-byte HTTP/2 client preface within `limits.handshake_timeout`,
//!   or its next read fails and hyper closes it. Under TLS the same deadline also bounds the TLS
//!   handshake (see [`tls_handshake_timeout`]).
//! - Accept errors are logged (rate-limited) and retried after a backoff that doubles from
//!   [`ACCEPT_BACKOFF_MIN`] to [`ACCEPT_BACKOFF_MAX`].
//! - Accepted sockets get TCP_NODELAY: without it Nagle holds back the second of two small writes
//!   (Released, then Granted) for a delayed ACK.
//! - Writes are coalesced: what HTTP/2 hands over is held back for a turn of the runtime before it
//!   goes to the socket (see [`Conn`]'s `poll_flush`), so frames that other streams of the same
//!   connection queue meanwhile leave in the same `write`.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::Stream;
use prometheus::core::Collector;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::{Instant, Sleep},
};
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::{debug, warn};

/// First wait after a failed `accept`.
pub const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
/// Longest wait between `accept` retries.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one warning per this interval for each kind of trouble (refusals, accept errors); the
/// ones in between are counted and reported with the next.
pub const WARN_EVERY: Duration = Duration::from_secs(10);
/// How often an idle HTTP/2 connection is pinged, to find peers that vanished without a FIN.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a keepalive ping may go unanswered before the connection is closed.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// The HTTP/2 client connection preface (RFC 9113 §3.4) a client sends first.
pub const PREFACE_LEN: usize = 24;
/// Most bytes a connection holds back for coalescing; beyond this a write goes to the socket first.
pub const COALESCE_MAX: usize = 64 * 1024;
/// Most turns of the runtime a connection's bytes are held back for, while more keep arriving.
pub const COALESCE_MAX_TURNS: u8 = 8;

/// What [`incoming`] enforces.
#[derive(Clone, Debug)]
pub struct ConnectionLimits {
    /// Most connections open at once.
    pub max_connections: usize,
    /// How long a new connection has to send the HTTP/2 preface.
    pub handshake_timeout: Duration,
    /// Send a GOAWAY before closing a refused connection (plaintext only: under TLS the bytes would
    /// mean nothing to the client).
    pub goaway_on_refusal: bool,
}

/// Counters of what [`incoming`] did, shared with whoever reports them (metrics).
#[derive(Debug, Default)]
pub struct ConnectionCounts {
    open: std::sync::atomic::AtomicUsize,
    refused: std::sync::atomic::AtomicU64,
    accept_errors: std::sync::atomic::AtomicU64,
}

impl ConnectionCounts {
    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Connections refused over `limits.max_connections` so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Failed `accept` calls so far.
    pub fn accept_errors(&self) -> u64 {
        self.accept_errors.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Reports [`ConnectionCounts`] to Prometheus as `slotd_connections_open`,
/// `slotd_connections_refused_total` and `slotd_accept_errors_total`, read at each scrape.
struct CountsCollector {
    counts: Arc<ConnectionCounts>,
    open: prometheus::IntGauge,
    refused: prometheus::IntCounter,
    accept_errors: prometheus::IntCounter,
}

impl Collector for CountsCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        [self.open.desc(), self.refused.desc(), self.accept_errors.desc()].concat()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.open.set(i64::try_from(self.counts.open()).unwrap_or(i64::MAX));
        // Counters only go up: add what happened since the last scrape.
        let catch_up = |c: &prometheus::IntCounter, now: u64| c.inc_by(now.saturating_sub(c.get()));
        catch_up(&self.refused, self.counts.refused());
        catch_up(&self.accept_errors, self.counts.accept_errors());
        [self.open.collect(), self.refused.collect(), self.accept_errors.collect()].concat()
    }
}

impl ConnectionCounts {
    /// Registers these counts with a Prometheus registry (see [`crate::metrics::Metrics::registry`]).
    pub fn register(self: &Arc<Self>, registry: &prometheus::Registry) -> prometheus::Result<()> {
        let collector = CountsCollector {
            counts: self.clone(),
            open: prometheus::IntGauge::new("slotd_connections_open", "Client connections open now.")?,
            refused: prometheus::IntCounter::new(
                "slotd_connections_refused_total",
                "Client connections closed at once because limits.max_connections were open.",
            )?,
            accept_errors: prometheus::IntCounter::new(
                "slotd_accept_errors_total",
                "Failed accepts on the gRPC listener (EMFILE and the like), each retried after a backoff.",
            )?,
        };
        registry.register(Box::new(collector))
    }
}

/// The TLS handshake timeout to give tonic: the same deadline as for the HTTP/2 preface, since the
/// preface only follows the TLS handshake.
pub fn tls_handshake_timeout(limits: &ConnectionLimits) -> Duration {
    limits.handshake_timeout
}

struct Acceptor {
    listener: TcpListener,
    limits: ConnectionLimits,
    slots: Arc<Semaphore>,
    counts: Arc<ConnectionCounts>,
    backoff: Duration,
    refusals: RateLimited,
    errors: RateLimited,
}

/// The connections accepted on `listener`, each holding a place among `limits.max_connections`
/// (see the module docs). Never yields an error: accept errors are logged and retried here. Dropping
/// the stream closes the listener.
pub fn incoming(
    listener: TcpListener,
    limits: ConnectionLimits,
    counts: Arc<ConnectionCounts>,
) -> impl Stream<Item = Result<Conn, io::Error>> + Send + 'static {
    let slots = Arc::new(Semaphore::new(limits.max_connections.min(Semaphore::MAX_PERMITS)));
    let acceptor = Acceptor {
        listener,
        limits,
        slots,
        counts,
        backoff: ACCEPT_BACKOFF_MIN,
        refusals: RateLimited::default(),
        errors: RateLimited::default(),
    };
    futures::stream::unfold(acceptor, |mut a| async move {
        let conn = a.next().await;
        Some((Ok(conn), a))
    })
}

impl Acceptor {
    /// Waits for the next connection that fits under the limit.
    ///
    /// # Cancel safety
    /// Cancel safe: a connection is only taken from the listener in the same poll that returns it.
    async fn next(&mut self) -> Conn {
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(accepted) => {
                    self.backoff = ACCEPT_BACKOFF_MIN;
                    accepted
                }
                Err(e) if per_connection(&e) => {
                    // The peer gave up between SYN and accept: nothing is wrong with the listener.
                    debug!(error = %e, "connection lost before it was accepted");
                    continue;
                }
                Err(e) => {
                    self.counts.accept_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if let Some(suppressed) = self.errors.hit(Instant::now()) {
                        warn!(
                            error = %e,
                            retry_in_ms = self.backoff.as_millis() as u64,
                            suppressed,
                            "cannot accept connections (at the open-file limit? see LimitNOFILE); retrying"
                        );
                    }
                    tokio::time::sleep(self.backoff).await;
                    self.backoff = next_backoff(self.backoff);
                    continue;
                }
            };
            let Ok(permit) = self.slots.clone().try_acquire_owned() else {
                self.refuse(stream, peer);
                continue;
            };
            if let Err(e) = stream.set_nodelay(true) {
                debug!(%peer, error = %e, "cannot set TCP_NODELAY");
            }
            return Conn::new(stream, permit, self.counts.clone(), self.limits.handshake_timeout);
        }
    }

    fn refuse(&mut self, stream: TcpStream, peer: std::net::SocketAddr) {
        self.counts.refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if self.limits.goaway_on_refusal {
            // Best effort and never waits: a full socket buffer just means a bare close.
            let _ = stream.try_write(&goaway_frame());
        }
        drop(stream);
        if let Some(suppressed) = self.refusals.hit(Instant::now()) {
            warn!(
                %peer,
                max_connections = self.limits.max_connections,
                suppressed,
                "refusing a connection: limits.max_connections are open"
            );
        }
    }
}

/// The wait after `current` when `accept` fails again: doubled, up to [`ACCEPT_BACKOFF_MAX`].
fn next_backoff(current: Duration) -> Duration {
    current.saturating_mul(2).clamp(ACCEPT_BACKOFF_MIN, ACCEPT_BACKOFF_MAX)
}

/// Errors that concern one connection, not the listener: retry at once.
fn per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

/// The reason a refused client sees, in its GOAWAY's debug data.
const REFUSAL_DEBUG_DATA: &[u8] = b"too many connections (limits.max_connections)";

/// An empty server SETTINGS frame (the server's preface) and a GOAWAY with ENHANCE_YOUR_CALM.
fn goaway_frame() -> Vec<u8> {
    const SETTINGS: u8 = 0x4;
    const GOAWAY: u8 = 0x7;
    const ENHANCE_YOUR_CALM: u32 = 0xb;
    let mut out = Vec::with_capacity(9 + 9 + 8 + REFUSAL_DEBUG_DATA.len());
    let header = |out: &mut Vec<u8>, len: usize, kind: u8| {
        let len = u32::try_from(len).unwrap_or(0).to_be_bytes();
        out.extend_from_slice(&len[1..]);
        out.extend_from_slice(&[kind, 0, 0, 0, 0, 0]);
    };
    header(&mut out, 0, SETTINGS);
    header(&mut out, 8 + REFUSAL_DEBUG_DATA.len(), GOAWAY);
    out.extend_from_slice(&0u32.to_be_bytes()); // last stream id
    out.extend_from_slice(&ENHANCE_YOUR_CALM.to_be_bytes());
    out.extend_from_slice(REFUSAL_DEBUG_DATA);
    out
}

/// One accepted connection: the socket, its place among `max_connections` (given back on drop), the
/// handshake deadline until the preface has arrived, and the bytes held back for coalescing.
///
/// # Coalescing
/// tokio runs a task woken by the running one next (its LIFO slot). When an event fans out to many
/// streams of one connection, each stream task that queues its frame therefore hands over to the
/// connection task at once, which wrote that single frame: one `writev` per message. Here
/// `poll_write` only copies into `out`, and when the runtime has a backlog of ready tasks (see
/// `backlog`), the first `poll_flush` of a batch returns `Pending` instead of writing, with the
/// connection task's wake-up deferred until the worker has run the other ready tasks
/// (`tokio::task::yield_now`): the woken stream tasks queue their frames meanwhile, and the next
/// `poll_flush` writes them all at once, unless more arrived during that turn: then it holds them
/// for another, up to [`COALESCE_MAX_TURNS`]. Without a backlog a flush writes at once, as holding
/// back would only cost a poll and delay the write.
///
/// `out` is bounded by [`COALESCE_MAX`] (beyond it `poll_write` drains to the socket first, waiting
/// as a socket write would) and freed once written, so an idle connection holds no buffer.
pub struct Conn {
    io: TcpStream,
    _permit: OwnedSemaphorePermit,
    counts: Arc<ConnectionCounts>,
    /// Until the preface has arrived; `None` after.
    deadline: Option<Pin<Box<Sleep>>>,
    /// Preface bytes still to come.
    preface_left: usize,
    /// Bytes accepted from HTTP/2 (or TLS), not yet written to the socket.
    out: Vec<u8>,
    /// How much of `out` the socket has taken.
    written: usize,
    /// While `out` is held back: how long it was when it was last held, and for how many turns.
    held: Option<(usize, u8)>,
    /// The runtime serving this connection, whose backlog decides whether holding back pays.
    runtime: Option<tokio::runtime::Handle>,
}

impl Conn {
    fn new(
        io: TcpStream,
        permit: OwnedSemaphorePermit,
        counts: Arc<ConnectionCounts>,
        handshake: Duration,
    ) -> Self {
        counts.open.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let deadline = Instant::now().checked_add(handshake).map(|at| Box::pin(tokio::time::sleep_until(at)));
        Self {
            io,
            _permit: permit,
            counts,
            deadline,
            preface_left: PREFACE_LEN,
            out: Vec::new(),
            written: 0,
            held: None,
            runtime: tokio::runtime::Handle::try_current().ok(),
        }
    }

    /// Whether the runtime has a backlog of ready tasks: tasks in its global queue, where tokio puts
    /// what overflows a worker's local queue (256) and what is woken from outside it. Only then may
    /// other streams of this connection be about to queue frames; otherwise holding back costs a poll
    /// and delays the write (holding always, measured uncontended: +7 µs round trip, +4 µs of daemon
    /// CPU per acquire + release; see docs/BENCHMARKS.md).
    fn backlog(&self) -> bool {
        self.runtime.as_ref().is_some_and(|rt| rt.metrics().global_queue_depth() > 0)
    }

    /// Writes `out` to the socket; `Ready(Ok)` once all of it is written (the buffer is freed then).
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.out.len() {
            let n = std::task::ready!(Pin::new(&mut self.io).poll_write(cx, &self.out[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.out = Vec::new();
        self.written = 0;
        self.held = None;
        Poll::Ready(Ok(()))
    }

    /// Makes room for `want` more bytes in `out`, draining it to the socket when it is full; then
    /// how many of them fit.
    fn poll_room(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        if self.out.len() >= COALESCE_MAX {
            std::task::ready!(self.poll_drain(cx))?;
        }
        Poll::Ready(Ok(want.min(COALESCE_MAX - self.out.len())))
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.counts.open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("peer", &self.io.peer_addr().ok()).finish_non_exhaustive()
    }
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.io.connect_info()
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        match (&polled, this.deadline.as_mut()) {
            (_, None) => {}
            (Poll::Ready(Ok(())), Some(_)) => {
                let n = buf.filled().len() - before;
                this.preface_left = this.preface_left.saturating_sub(n);
                if this.preface_left == 0 {
                    this.deadline = None;
                }
            }
            (Poll::Ready(Err(_)), Some(_)) => {}
            (Poll::Pending, Some(deadline)) => {
                // Polled here so that the timer wakes the connection's task when it fires.
                if deadline.as_mut().poll(cx).is_ready() {
                    debug!(peer = ?this.io.peer_addr().ok(), "closing a connection that sent no HTTP/2 preface in time");
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no HTTP/2 preface within limits.handshake_timeout",
                    )));
                }
            }
        }
        polled
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = std::task::ready!(this.poll_room(cx, buf.len()))?;
        this.out.extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let total = bufs.iter().fold(0usize, |acc, b| acc.saturating_add(b.len()));
        let mut room = std::task::ready!(this.poll_room(cx, total))?;
        let mut n = 0;
        for b in bufs {
            let take = b.len().min(room);
            this.out.extend_from_slice(&b[..take]);
            n += take;
            room -= take;
            if room == 0 {
                break;
            }
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        // Slices are copied into `out` either way; saying so spares h2 copying data frames into its
        // own buffer first.
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.out.is_empty() {
            return Pin::new(&mut this.io).poll_flush(cx);
        }
        let turns = match this.held {
            // Writing has begun (the socket was full): finish it.
            _ if this.written > 0 => 0,
            None if this.backlog() => 1,
            None => 0,
            // More arrived during the last turn: more may be coming.
            Some((len, turns)) if this.out.len() > len && turns < COALESCE_MAX_TURNS => turns + 1,
            Some(_) => 0,
        };
        if turns > 0 {
            // A turn of the runtime for the other streams of this connection (see `Conn`).
            this.held = Some((this.out.len(), turns));
            wake_after_the_ready_tasks(cx);
            return Poll::Pending;
        }
        std::task::ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// Has the task woken once the worker thread has run the other tasks that are ready (or, under
/// steady load, at its next maintenance tick): tokio's `yield_now`, polled once. Unlike a plain
/// `wake_by_ref`, which re-queues the task at once and makes the worker notify an idle one (a
/// cross-CPU wake-up that finds nothing to do), a deferred wake costs only a zero-timeout poll of the
/// I/O driver when the worker would otherwise go idle.
pub(crate) fn wake_after_the_ready_tasks(cx: &mut Context<'_>) {
    let mut yielded = std::pin::pin!(tokio::task::yield_now());
    // Always `Pending` on the first poll: it registered the waker.
    let _ = yielded.as_mut().poll(cx);
}

/// Lets one event through per [`WARN_EVERY`], counting the rest.
#[derive(Debug, Default)]
struct RateLimited {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimited {
    /// `Some(events suppressed since the last one let through)` when this one may be logged.
    fn hit(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < WARN_EVERY => {
                self.suppressed = self.suppressed.saturating_add(1);
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A `Conn` over a loopback socket, and the peer's end.
    async fn conn_pair() -> (Conn, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let peer = TcpStream::connect(listener.local_addr().expect("addr")).await.expect("connect");
        let (io, _) = listener.accept().await.expect("accept");
        let permit = Arc::new(Semaphore::new(1)).try_acquire_owned().expect("permit");
        (Conn::new(io, permit, Arc::default(), Duration::from_secs(10)), peer)
    }

    /// Gives the runtime a backlog: a task spawned from another thread waits in its global queue
    /// until the test task yields.
    fn make_backlog() {
        let rt = tokio::runtime::Handle::current();
        std::thread::scope(|s| {
            s.spawn(|| drop(rt.spawn(async {})));
        });
        assert_eq!(rt.metrics().global_queue_depth(), 1);
    }

    /// Counts the wake-ups of a waker.
    #[derive(Default)]
    struct Count(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Polls `f` once, then lets the runtime run (which wakes deferred wakers); the poll's result and
    /// how often the waker was woken.
    async fn poll_once<T>(f: impl FnOnce(&mut Context<'_>) -> Poll<T>) -> (Poll<T>, usize) {
        let count = Arc::new(Count::default());
        let waker = std::task::Waker::from(count.clone());
        let polled = f(&mut Context::from_waker(&waker));
        tokio::task::yield_now().await;
        (polled, count.0.load(std::sync::atomic::Ordering::Relaxed))
    }

    #[tokio::test]
    async fn writes_are_held_while_more_arrive_then_leave_together() {
        let (mut conn, mut peer) = conn_pair().await;
        conn.write_all(b"one ").await.expect("write");
        conn.write_all(b"two ").await.expect("write");
        // With other tasks ready, the first flush holds the bytes back and wakes the task, so it is
        // polled again later.
        make_backlog();
        let (polled, wakes) = poll_once(|cx| Pin::new(&mut conn).poll_flush(cx)).await;
        assert!(polled.is_pending());
        assert_eq!(wakes, 1);
        // More arrived during that turn: held for another.
        conn.write_all(b"three").await.expect("write");
        let (polled, wakes) = poll_once(|cx| Pin::new(&mut conn).poll_flush(cx)).await;
        assert!(polled.is_pending());
        assert_eq!(wakes, 1);
        // A turn that added nothing: everything is written, in one go.
        let (polled, _) = poll_once(|cx| Pin::new(&mut conn).poll_flush(cx)).await;
        assert!(matches!(polled, Poll::Ready(Ok(()))), "{polled:?}");
        assert_eq!(conn.out.capacity(), 0, "written: the buffer is freed");
        let mut got = [0u8; 13];
        peer.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"one two three");
        // Nothing held: a flush returns at once.
        let (polled, wakes) = poll_once(|cx| Pin::new(&mut conn).poll_flush(cx)).await;
        assert!(matches!(polled, Poll::Ready(Ok(()))) && wakes == 0, "{polled:?} {wakes}");
    }

    #[tokio::test]
    async fn without_a_backlog_a_flush_writes_at_once() {
        let (mut conn, mut peer) = conn_pair().await;
        conn.write_all(b"alone").await.expect("write");
        let (polled, wakes) = poll_once(|cx| Pin::new(&mut conn).poll_flush(cx)).await;
        assert!(matches!(polled, Poll::Ready(Ok(()))) && wakes == 0, "{polled:?} {wakes}");
        let mut got = [0u8; 5];
        peer.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"alone");
    }

    #[tokio::test]
    async fn a_steady_trickle_is_held_for_at_most_the_turn_limit() {
        let (mut conn, mut peer) = conn_pair().await;
        let mut held = 0;
        let mut sent = 0usize;
        make_backlog();
        loop {
            conn.write_all(b"x").await.expect("write");
            sent += 1;
            match poll_once(|cx| Pin::new(&mut conn).poll_flush(cx)).await.0 {
                Poll::Pending => held += 1,
                Poll::Ready(r) => break r.expect("flush"),
            }
            assert!(held <= usize::from(COALESCE_MAX_TURNS), "held for {held} turns");
        }
        assert_eq!(held, usize::from(COALESCE_MAX_TURNS));
        let mut got = vec![0u8; sent];
        peer.read_exact(&mut got).await.expect("read");
        assert!(got.iter().all(|b| *b == b'x'));
    }

    #[tokio::test]
    async fn held_bytes_are_bounded_and_written_on_shutdown() {
        let (mut conn, mut peer) = conn_pair().await;
        let big = vec![7u8; COALESCE_MAX + 100];
        let slices = [io::IoSlice::new(&big[..10]), io::IoSlice::new(&big[10..])];
        let (polled, _) = poll_once(|cx| Pin::new(&mut conn).poll_write_vectored(cx, &slices)).await;
        assert!(matches!(polled, Poll::Ready(Ok(COALESCE_MAX))), "{polled:?}");
        // Full: the next write goes to the socket first.
        conn.write_all(&big[COALESCE_MAX..]).await.expect("write");
        assert_eq!(conn.out.len(), 100);
        conn.shutdown().await.expect("shutdown");
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, big);
    }

    #[test]
    fn warnings_are_let_through_once_per_interval_with_the_count_in_between() {
        let t0 = Instant::now();
        let mut r = RateLimited::default();
        assert_eq!(r.hit(t0), Some(0));
        assert_eq!(r.hit(t0 + Duration::from_secs(1)), None);
        assert_eq!(r.hit(t0 + Duration::from_secs(2)), None);
        assert_eq!(r.hit(t0 + WARN_EVERY), Some(2));
        assert_eq!(r.hit(t0 + WARN_EVERY), None);
    }

    #[test]
    fn the_refusal_is_a_settings_frame_then_a_goaway_with_its_reason() {
        let f = goaway_frame();
        assert_eq!(&f[..9], &[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        let len = usize::from(f[9]) << 16 | usize::from(f[10]) << 8 | usize::from(f[11]);
        assert_eq!(f[12], 7, "GOAWAY");
        assert_eq!(len, f.len() - 18);
        assert_eq!(&f[22..26], &[0, 0, 0, 0xb], "ENHANCE_YOUR_CALM");
        assert!(f.ends_with(REFUSAL_DEBUG_DATA));
    }

    #[test]
    fn accept_backoff_doubles_from_5ms_to_1s() {
        let waits: Vec<Duration> =
            std::iter::successors(Some(ACCEPT_BACKOFF_MIN), |b| Some(next_backoff(*b))).take(10).collect();
        assert_eq!(waits[..3], [ACCEPT_BACKOFF_MIN, ACCEPT_BACKOFF_MIN * 2, ACCEPT_BACKOFF_MIN * 4]);
        assert_eq!(waits[9], ACCEPT_BACKOFF_MAX, "{waits:?}");
        assert_eq!(next_backoff(ACCEPT_BACKOFF_MAX), ACCEPT_BACKOFF_MAX);
    }
}
