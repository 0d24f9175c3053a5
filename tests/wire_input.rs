//! What a client's malformed or excessive input does, through the real daemon: an undecodable frame,
//! an oversized unary call, an over-long request id, a cancel that crossed its grant, and a flood of
//! refusals (the daemon's log stays bounded per stream).
//!
//! The log assertions read the daemon's own `tracing` output: each test runs on the default
//! single-threaded runtime, so the in-process daemon's tasks log to the subscriber the test set.

use std::{
    io::Write,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use prost::{Message, bytes::BufMut};
use slotd_proto::v1::{self as pb, client_message::Msg as Up, server_message::Msg as Down};
use slotd_test_support::{Daemon, within};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Code, Request, Status, Streaming,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::http::uri::PathAndQuery,
};
use tracing_subscriber::fmt::MakeWriter;

const POOLS: &str = r#"
[pools.p]
max_concurrent = 2
"#;

// ------------------------------------------------------------------------------------------------
// The daemon's log, captured
// ------------------------------------------------------------------------------------------------

/// Everything the daemon logged (at INFO and above) since [`capture_logs`].
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Logs {
    type Writer = Logs;

    fn make_writer(&'a self) -> Logs {
        self.clone()
    }
}

impl Logs {
    /// The lines containing `needle`.
    fn lines_with(&self, needle: &str) -> Vec<String> {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
        text.lines().filter(|l| l.contains(needle)).map(str::to_owned).collect()
    }

    /// Waits until some line contains `needle`; returns the lines that do.
    #[track_caller]
    fn wait_for<'a>(&'a self, needle: &'a str) -> impl Future<Output = Vec<String>> + 'a {
        within("a log line", async move {
            loop {
                let lines = self.lines_with(needle);
                if !lines.is_empty() {
                    return lines;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    }
}

/// Sends this thread's `tracing` output (the in-process daemon's, on a current-thread runtime) to a
/// buffer until the guard drops.
fn capture_logs() -> (Logs, tracing::subscriber::DefaultGuard) {
    let logs = Logs::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .finish();
    (logs, tracing::subscriber::set_default(subscriber))
}

/// The value of `key=N` in a log line.
#[track_caller]
fn field(line: &str, key: &str) -> u64 {
    let at = line.find(&format!("{key}=")).unwrap_or_else(|| panic!("no {key} in {line}"));
    let digits: String = line[at + key.len() + 1..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().unwrap_or_else(|e| panic!("{key} in {line}: {e}"))
}

// ------------------------------------------------------------------------------------------------
// A raw Acquire stream: any bytes up, server messages down
// ------------------------------------------------------------------------------------------------

/// A codec that sends each item's bytes as one gRPC message, as they are.
#[derive(Default)]
struct RawCodec;

struct RawEncoder;
struct MessageDecoder;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = pb::ServerMessage;
    type Encoder = RawEncoder;
    type Decoder = MessageDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> MessageDecoder {
        MessageDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for MessageDecoder {
    type Item = pb::ServerMessage;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<pb::ServerMessage>, Status> {
        pb::ServerMessage::decode(src).map(Some).map_err(|e| Status::internal(e.to_string()))
    }
}

/// Opens an Acquire stream on its own connection whose messages are raw bytes.
#[track_caller]
fn raw_acquire(
    d: &Daemon,
) -> impl Future<Output = (mpsc::Sender<Vec<u8>>, Streaming<pb::ServerMessage>)> + '_ {
    let open = async move {
        let mut grpc = tonic::client::Grpc::new(d.channel().await);
        grpc.ready().await.expect("channel ready");
        let (tx, rx) = mpsc::channel(8);
        let path = PathAndQuery::from_static("/slotd.v1.Slotd/Acquire");
        let resp = grpc.streaming(Request::new(ReceiverStream::new(rx)), path, RawCodec).await;
        (tx, resp.expect("Acquire opens").into_inner())
    };
    within("a raw Acquire stream", open)
}

fn encoded(msg: Up) -> Vec<u8> {
    pb::ClientMessage { msg: Some(msg) }.encode_to_vec()
}

// ------------------------------------------------------------------------------------------------
// The tests
// ------------------------------------------------------------------------------------------------

/// Regression: an undecodable frame ended the stream with status OK, logged nothing, and silently
/// released the stream's leases. Now the stream ends with INVALID_ARGUMENT saying why, the daemon logs
/// a warning, and the leases are released as for any closed stream.
#[tokio::test]
async fn an_undecodable_frame_ends_acquire_with_invalid_argument_and_a_warning() {
    let (logs, _guard) = capture_logs();
    let d = Daemon::start(POOLS).await;
    let (tx, mut rx) = raw_acquire(&d).await;
    let req = pb::LeaseRequest { request_id: "r".into(), pool: "p".into(), ..Default::default() };
    tx.send(encoded(Up::Request(req))).await.unwrap();
    let granted = within("Granted", rx.message()).await.expect("a message");
    assert!(matches!(granted, Some(pb::ServerMessage { msg: Some(Down::Granted(_)) })), "{granted:?}");
    assert_eq!(d.pool("p").await.in_flight, 1);

    // Field 0 with wire type 7: no protobuf message decodes from this.
    tx.send(vec![0x07, 0xff, 0xff]).await.unwrap();
    let end = within("the stream to end", rx.message()).await;
    let status = end.expect_err("the stream ends with an error status");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("undecodable message"), "{status:?}");

    let warned = logs.wait_for("undecodable message on an Acquire stream").await;
    assert!(warned[0].contains("WARN"), "{warned:?}");
    // Its lease went with the stream; the daemon still grants.
    d.wait_for("the lease to be released", |s| s.leases.is_empty()).await;
    let mut a = d.agent("a").await;
    let g = a.acquire("after", "p").await;
    a.release_ok(&g.lease_id).await;
    d.assert_idle().await;
    d.stop().await;
}

/// Regression: an oversized unary call got OUT_OF_RANGE, where the README promises RESOURCE_EXHAUSTED
/// for every bound. Acquire's oversized message already ended its stream with RESOURCE_EXHAUSTED.
#[tokio::test]
async fn an_oversized_unary_call_is_resource_exhausted() {
    let d = Daemon::start("[limits]\nmax_message_bytes = 1024\n[pools.p]\nmax_concurrent = 1").await;
    let mut c = d.client();
    let big = "x".repeat(2000);
    let report = pb::ReportRateLimitRequest {
        pool: "p".into(),
        retry_after: None,
        reason: big.clone(),
        ..Default::default()
    };
    let e = c.report_rate_limit(report).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("limits.max_message_bytes"), "{e:?}");
    let e = c.status(pb::StatusRequest { pool: big.clone() }).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let mut admin = d.admin().await;
    let spec = pb::PoolSpec { name: big.clone(), ..Default::default() };
    let e = admin.upsert_pool(pb::UpsertPoolRequest { pool: Some(spec) }).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    // Other errors keep their codes; nothing was paused.
    let e = c.status(pb::StatusRequest { pool: "nope".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(d.pool("p").await.paused_until.is_none());

    // Acquire keeps RESOURCE_EXHAUSTED.
    let mut a = d.agent("a").await;
    a.request(pb::LeaseRequest { holder: big, ..a.req("big", "p") }).await;
    let s = a.expect_end().await.expect("an error status");
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    d.assert_idle().await;
    d.stop().await;
}

/// Regression: a 129-byte request_id was echoed back cut to 128 bytes, so the client could not match
/// the answer (and a cancel cut to 128 bytes could hit another request). Ids are never cut: an
/// over-long one is refused with INVALID_ARGUMENT in a `Rejected` carrying it whole.
#[tokio::test]
async fn an_over_long_request_id_is_refused_and_echoed_whole() {
    let d = Daemon::start("[pools.p]\nmax_concurrent = 1").await;
    let mut h = d.agent("holder").await;
    let g = h.acquire("h", "p").await;
    let mut x = d.agent("x").await;
    let prefix = "a".repeat(128);
    x.request(x.req(&prefix, "p")).await;
    x.expect_queued(&prefix).await;

    for long in [format!("{prefix}b"), "z".repeat(60_000)] {
        x.request(x.req(&long, "p")).await;
        let r = x.expect_rejected(&long, Code::InvalidArgument).await;
        assert_eq!(r.request_id.len(), long.len());
        assert!(r.message.len() < 1024, "the message does not repeat the id: {} bytes", r.message.len());
        x.cancel(&long).await;
        x.expect_rejected(&long, Code::InvalidArgument).await;
    }
    // The cancel of the 129-byte id did not cancel the request named by its first 128 bytes.
    assert_eq!(d.pool("p").await.queued, 1);
    x.cancel(&prefix).await;
    x.expect_cancelled(&prefix).await;
    h.release_ok(&g.lease_id).await;
    d.assert_idle().await;
    d.stop().await;
}

/// Regression: cancelling an already-granted request answered `Rejected{NOT_FOUND}` after its
/// `Granted`; the proto says such a cancel does nothing. It now does nothing and says nothing.
#[tokio::test]
async fn a_cancel_that_crossed_its_grant_does_nothing() {
    let d = Daemon::start(POOLS).await;
    let mut x = d.agent("x").await;
    // The cancel leaves before the client has read the grant, as when an acquire future is dropped.
    x.request(x.req("r", "p")).await;
    x.cancel("r").await;
    let g = x.expect_granted("r").await;
    x.expect_silence(Duration::from_millis(100)).await;
    let s = d.status().await;
    assert_eq!(s.leases.len(), 1, "the lease is untouched: {s:#?}");
    // The client releases it as usual; a cancel after that is an unknown request.
    x.release_ok(&g.lease_id).await;
    x.cancel("r").await;
    x.expect_rejected("r", Code::NotFound).await;
    d.assert_idle().await;
    d.stop().await;
}

/// Regression: a heartbeat naming 1,900 unknown ids wrote 1,900 log lines. Now one operation's
/// refusals are one line per stream, and each stream has a log budget: the lines held back are
/// counted, and the count is written with the stream's next line or its close.
#[tokio::test]
async fn refusals_are_logged_once_per_message_and_rate_limited_per_stream() {
    let (logs, _guard) = capture_logs();
    let d = Daemon::start(POOLS).await;
    let mut x = d.agent("x").await;
    let unknown: Vec<String> = (0..1900u128).map(|i| format!("{:032x}", i + 1)).collect();
    let ids: Vec<&str> = unknown.iter().map(String::as_str).collect();
    x.heartbeat(&ids).await;
    for id in &ids {
        x.expect_lease_error(id, Code::NotFound).await;
    }
    x.expect_heartbeat_ack(0).await;
    let refused = logs.lines_with("refused");
    assert_eq!(refused.len(), 1, "one line for one heartbeat: {refused:#?}");
    assert_eq!(field(&refused[0], "leases"), 1900, "{}", refused[0]);

    // A flood of bad messages: a burst of lines, then one per refill, then the rest counted.
    let started = Instant::now();
    const FLOOD: u64 = 200;
    for i in 0..FLOOD {
        let id = format!("{:032x}", 5000 + i);
        x.release(&id).await;
        x.expect_lease_error(&id, Code::NotFound).await;
    }
    let elapsed = started.elapsed();
    drop(x);
    let closed = logs.wait_for("log lines about its refusals were held back").await;
    let lines = logs.lines_with("lease message refused");
    let written = lines.len() as u64;
    let refills = elapsed.as_secs() + 1;
    assert!(written <= 10 + refills, "{written} lines for {FLOOD} refusals in {elapsed:?}");
    // Every refusal is either written or counted as held back, exactly once.
    let held_back: u64 =
        lines.iter().map(|l| field(l, "suppressed")).sum::<u64>() + field(&closed[0], "suppressed");
    assert_eq!(written + held_back, FLOOD, "{lines:#?} {closed:#?}");
    // Another stream has a budget of its own.
    let mut y = d.agent("y").await;
    y.release("ffffffffffffffffffffffffffffffff").await;
    y.expect_lease_error("ffffffffffffffffffffffffffffffff", Code::NotFound).await;
    assert_eq!(logs.lines_with("ffffffffffffffffffffffffffffffff").len(), 1);
    d.stop().await;
}
