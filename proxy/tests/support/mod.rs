//! Test support for the proxy suites: a fake LLM provider (a hyper server on loopback that streams SSE
//! slowly, answers 429 / 529 / 402 / 500, cuts a stream mid-body and counts its own concurrent
//! requests), the proxy in-process on 127.0.0.1:0, and a small HTTP client.
#![allow(dead_code)]

use std::{
    convert::Infallible,
    net::SocketAddr,
    panic::Location,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use futures::StreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::{body::Frame, service::service_fn};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
};
use slotd_test_support::{TIMEOUT, bounded};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every log line this test binary writes, captured from the first call on with that call's
/// `filter` (an `EnvFilter` directive), for tests that check what is (and is never) logged.
pub fn captured_logs(filter: &str) -> &'static Mutex<Vec<u8>> {
    static LOGS: std::sync::OnceLock<&'static Mutex<Vec<u8>>> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let buf: &'static Mutex<Vec<u8>> = Box::leak(Box::new(Mutex::new(Vec::new())));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(move || Capture(buf))
            .with_ansi(false)
            .try_init();
        buf
    })
}

/// A log writer into a captured buffer.
struct Capture(&'static Mutex<Vec<u8>>);

impl std::io::Write for Capture {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
/// Chunk size of `x-fake: bulk` answers.
pub const BULK_CHUNK: usize = 16 * 1024;
type FakeBody = UnsyncBoxBody<Bytes, BoxError>;

/// What the fake provider saw.
#[derive(Default)]
pub struct Seen {
    /// Requests being answered right now (from arrival to the end or drop of the response body).
    pub current: AtomicUsize,
    /// The most at once.
    pub max: AtomicUsize,
    /// Every request.
    pub total: AtomicUsize,
    /// `x-agent` of each request, in arrival order.
    pub agents: Mutex<Vec<String>>,
    /// Header names of the last request (lowercase).
    pub last_headers: Mutex<Vec<String>>,
}

/// The fake provider. Its behaviour per request comes from request headers (forwarded by the proxy):
/// - `x-fake: ok` (default): a JSON answer with Anthropic usage, after `x-fake-delay-ms`;
/// - `x-fake: sse`: `x-fake-events` Anthropic events every `x-fake-interval-ms`, usage in `message_delta`;
/// - `x-fake: 429`: 429 with `Retry-After: <x-fake-retry-after>` (verbatim: seconds or an HTTP date) or
///   `retry-after-ms: <x-fake-retry-after-ms>`;
/// - `x-fake: 529 | 402 | 500`: that status with the Anthropic error body;
/// - `x-fake: cut`: a 200 SSE stream that fails after its first event.
pub struct Fake {
    pub addr: SocketAddr,
    pub seen: Arc<Seen>,
    _stop: oneshot::Sender<()>,
}

struct Counted(Arc<Seen>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.current.fetch_sub(1, Ordering::SeqCst);
    }
}

fn header<'a>(req: &'a Request<hyper::body::Incoming>, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

fn num(req: &Request<hyper::body::Incoming>, name: &str, default: u64) -> u64 {
    header(req, name).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn json(status: u16, body: String, guard: Counted) -> Response<FakeBody> {
    let stream = futures::stream::once(async move {
        let _guard = guard;
        Ok::<_, BoxError>(Frame::data(Bytes::from(body)))
    });
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(StreamBody::new(stream).boxed_unsync())
        .unwrap()
}

fn error_body(kind: &str) -> String {
    format!(r#"{{"type":"error","error":{{"type":"{kind}","message":"fake"}}}}"#)
}

async fn answer(
    seen: Arc<Seen>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<FakeBody>, Infallible> {
    let n = seen.current.fetch_add(1, Ordering::SeqCst) + 1;
    seen.max.fetch_max(n, Ordering::SeqCst);
    seen.total.fetch_add(1, Ordering::SeqCst);
    let guard = Counted(seen.clone());
    if let Some(a) = header(&req, "x-agent") {
        seen.agents.lock().unwrap().push(a.to_owned());
    }
    *seen.last_headers.lock().unwrap() = req.headers().keys().map(|k| k.as_str().to_owned()).collect();
    let delay = Duration::from_millis(num(&req, "x-fake-delay-ms", 0));
    let kind = header(&req, "x-fake").unwrap_or("ok").to_owned();
    let retry_after = header(&req, "x-fake-retry-after").map(str::to_owned);
    let retry_after_ms = header(&req, "x-fake-retry-after-ms").map(str::to_owned);
    let events = num(&req, "x-fake-events", 5);
    let req_bytes_hint = num(&req, "x-fake-bytes", 0);
    let interval = Duration::from_millis(num(&req, "x-fake-interval-ms", 20));
    // Read the request body fully (a provider does).
    let body_len = req.into_body().collect().await.map(|b| b.to_bytes().len()).unwrap_or(0);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let resp = match kind.as_str() {
        "429" => {
            let mut r = json(429, error_body("rate_limit_error"), guard);
            if let Some(v) = retry_after {
                r.headers_mut().insert("retry-after", v.parse().unwrap());
            }
            if let Some(v) = retry_after_ms {
                r.headers_mut().insert("retry-after-ms", v.parse().unwrap());
            }
            r.headers_mut().insert("anthropic-ratelimit-requests-limit", "50".parse().unwrap());
            r.headers_mut().insert("anthropic-ratelimit-requests-remaining", "0".parse().unwrap());
            r
        }
        "529" => json(529, error_body("overloaded_error"), guard),
        "402" => json(402, error_body("billing_error"), guard),
        "500" => json(500, error_body("api_error"), guard),
        "bulk" => {
            // `x-fake-bytes` bytes in 16 KiB chunks, as fast as the reader takes them.
            let total = req_bytes_hint;
            let chunk = Bytes::from(vec![b'x'; BULK_CHUNK]);
            let stream = futures::stream::unfold((total, guard), move |(left, guard)| {
                let chunk = chunk.clone();
                async move {
                    if left == 0 {
                        return None;
                    }
                    let n = left.min(BULK_CHUNK as u64);
                    Some((Ok::<_, BoxError>(Frame::data(chunk.slice(..n as usize))), (left - n, guard)))
                }
            });
            Response::builder()
                .header("content-type", "application/octet-stream")
                .body(StreamBody::new(stream).boxed_unsync())
                .unwrap()
        }
        "sse" | "cut" => {
            let cut = kind == "cut";
            let stream = futures::stream::unfold((0u64, guard), move |(i, guard)| async move {
                if i > events + 1 {
                    return None;
                }
                if i > 0 && !interval.is_zero() {
                    tokio::time::sleep(interval).await;
                }
                if cut && i == 1 {
                    return Some((Err::<Frame<Bytes>, BoxError>("cut".into()), (events + 2, guard)));
                }
                let ev = if i == 0 {
                    "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":11,\"output_tokens\":1}}}\n\n".to_owned()
                } else if i <= events {
                    format!(
                        "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"delta\":{{\"text\":\"t{i}\"}}}}\n\n"
                    )
                } else {
                    "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":42}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n".to_owned()
                };
                Some((Ok(Frame::data(Bytes::from(ev))), (i + 1, guard)))
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(StreamBody::new(stream).boxed_unsync())
                .unwrap()
        }
        _ => json(
            200,
            format!(
                r#"{{"id":"msg_1","request_bytes":{body_len},"usage":{{"input_tokens":10,"output_tokens":20}}}}"#
            ),
            guard,
        ),
    };
    Ok(resp)
}

impl Fake {
    /// Starts the fake provider on 127.0.0.1:0 (HTTP/1.1 and HTTP/2).
    pub async fn start() -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let (stop, mut stopped) = oneshot::channel::<()>();
        let s = seen.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    r = listener.accept() => r.unwrap(),
                    _ = &mut stopped => return,
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| answer(s.clone(), req));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Fake { addr, seen, _stop: stop }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn max(&self) -> usize {
        self.seen.max.load(Ordering::SeqCst)
    }

    pub fn current(&self) -> usize {
        self.seen.current.load(Ordering::SeqCst)
    }

    pub fn total(&self) -> usize {
        self.seen.total.load(Ordering::SeqCst)
    }
}

/// The proxy, serving in-process on 127.0.0.1:0.
pub struct Proxy {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), slotd_proxy::ServeError>>>,
}

/// A proxy config: `daemon`, then `extra` (top-level keys and `[routes.*]` tables).
pub fn config(daemon: &str, extra: &str) -> String {
    format!("listen = \"127.0.0.1:0\"\ndaemon = \"{daemon}\"\ndaemon_probe_interval = \"50ms\"\n{extra}\n")
}

/// One route `/p` -> `upstream`, pool `pool`, plus extra route keys.
pub fn route(name: &str, upstream: &str, pool: &str, extra: &str) -> String {
    format!(
        "[routes.{name}]\nprefix = \"/{name}\"\nupstream = \"{upstream}\"\npool = \"{pool}\"\ndialect = \"anthropic\"\n{extra}\n"
    )
}

impl Proxy {
    #[track_caller]
    pub fn start(toml: &str) -> impl Future<Output = Proxy> + '_ {
        let at = Location::caller();
        async move {
            let cfg =
                slotd_proxy::Config::from_toml_str(toml).unwrap_or_else(|e| panic!("{at}: config: {e}"));
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (stop, stopped) = oneshot::channel::<()>();
            let task = tokio::spawn(slotd_proxy::serve(cfg, listener, async move {
                let _ = stopped.await;
            }));
            Proxy { addr, stop: Some(stop), task: Some(task) }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Begins a graceful shutdown and waits for `serve` to return.
    #[track_caller]
    pub fn stop(mut self) -> impl Future<Output = ()> {
        let at = Location::caller();
        let _ = self.stop.take().unwrap().send(());
        let task = self.task.take().unwrap();
        async move {
            bounded(at, "the proxy to stop", task).await.unwrap().unwrap();
        }
    }

    /// Starts a graceful shutdown without waiting.
    pub fn begin_shutdown(&mut self) -> JoinHandle<Result<(), slotd_proxy::ServeError>> {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// An HTTP/1.1 client (pooled connections).
pub fn http1() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// An HTTP/2 client with prior knowledge.
pub fn http2() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).http2_only(true).build_http()
}

/// A POST to `url` with these headers.
pub fn post(url: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut b = Request::post(url).header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::from_static(b"{\"model\":\"m\",\"messages\":[]}"))).unwrap()
}

/// Sends and reads the whole answer: status, headers, body.
#[track_caller]
pub fn send(
    c: &Client<HttpConnector, Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> impl Future<Output = (StatusCode, http::HeaderMap, String)> + '_ {
    let at = Location::caller();
    async move {
        bounded(at, "a response", async {
            let resp = c.request(req).await.unwrap_or_else(|e| panic!("{at}: request: {e}"));
            let (parts, body) = resp.into_parts();
            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            (parts.status, parts.headers, String::from_utf8_lossy(&body).into_owned())
        })
        .await
    }
}

/// Polls `f` until it holds, failing at the caller's line after [`TIMEOUT`].
#[track_caller]
pub fn eventually<F: Fn() -> bool>(what: &'static str, f: F) -> impl Future<Output = ()> {
    let at = Location::caller();
    async move {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        while !f() {
            if tokio::time::Instant::now() >= deadline {
                panic!("{at}: timed out waiting for {what}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// The value of a Prometheus sample (`name{labels}`), 0 when absent.
pub fn sample(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix) && l[prefix.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Drains a response body, frame by frame.
pub async fn drain(body: hyper::body::Incoming) -> Result<usize, hyper::Error> {
    let mut n = 0;
    let mut s = http_body_util::BodyDataStream::new(body);
    while let Some(chunk) = s.next().await {
        n += chunk?.len();
    }
    Ok(n)
}
