//! Several agents share one LLM provider's concurrency through slotd.
//!
//! Starts a fake LLM HTTP server (which sometimes answers 429 with `Retry-After`), starts slotd in
//! this process (or uses `--endpoint URL`), and runs agents whose HTTP calls go through
//! [`LeaseLayer`]. One more agent streams an answer under `lease.hold`. When all are done it closes
//! the client (flushing the last releases) and prints the settled pool.
//!
//! ```text
//! cargo run -p slotd-client --example agent
//! cargo run -p slotd -- --config my.toml &   # then:
//! cargo run -p slotd-client --example agent -- --endpoint http://127.0.0.1:50051 --pool default
//! ```

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use clap::Parser;
use futures::StreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use slotd_client::{BoxError, Client, LeaseLayer};
use tokio::net::{TcpListener, TcpStream};
use tower::{Layer, ServiceExt};

/// Runs several agents against a fake LLM server, sharing slots through slotd.
#[derive(Parser)]
struct Args {
    /// A running slotd to use; without it, one is started in this process.
    #[arg(long)]
    endpoint: Option<String>,
    /// The pool to take slots on.
    #[arg(long, default_value = "llm")]
    pool: String,
    /// How many agents.
    #[arg(long, default_value_t = 4)]
    agents: usize,
    /// Calls per agent.
    #[arg(long, default_value_t = 3)]
    calls: usize,
}

/// The in-process daemon's configuration.
const DAEMON_TOML: &str = r#"
[pools.llm]
max_concurrent = 2
default_ttl = "5s"
adaptive = false
"#;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let started = Instant::now();

    let llm = start_fake_llm().await?;
    println!("fake LLM server on http://{llm}");

    let (endpoint, _daemon) = match args.endpoint {
        Some(url) => (url, None),
        None => {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let cfg = slotd::config::Config::from_toml_str(DAEMON_TOML)?;
            tokio::spawn(slotd::serve(cfg, listener, async move {
                let _ = stopped.await;
            }));
            println!("slotd started in-process on http://{addr} (pool llm, 2 slots)");
            (format!("http://{addr}"), Some(stop))
        }
    };

    let client = Client::builder().holder("agent example").connect(endpoint).await?;

    // Show pauses as the daemon pushes them.
    let mut pauses = client.pauses();
    tokio::spawn(async move {
        while pauses.changed().await.is_ok() {
            let now = std::time::SystemTime::now();
            for (pool, p) in pauses.borrow_and_update().iter() {
                let left = p.until.duration_since(now).unwrap_or_default();
                println!("  ⏸  pool {pool} paused for {left:.1?}: {}", p.reason);
            }
        }
    });

    // The HTTP client every agent uses, wrapped so that each request holds a slot.
    let http = tower::service_fn(move |req| send(llm, req));
    let http = LeaseLayer::new(client.clone(), args.pool.clone()).layer(http);

    let mut agents = Vec::new();
    for agent in 0..args.agents {
        let http = http.clone();
        let calls = args.calls;
        agents.push(tokio::spawn(async move {
            for call in 0..calls {
                let req = Request::post("/v1/messages")
                    .body(r#"{"prompt":"hi"}"#.to_owned())
                    .expect("valid request");
                let t0 = Instant::now();
                let resp = http.clone().oneshot(req).await?;
                let status = resp.status();
                let token = resp.body().lease().map(|l| l.fencing_token());
                let body = resp.into_body().collect().await?.to_bytes();
                println!(
                    "agent {agent} call {call}: {status} after {:>4}ms (fencing token {}) {}",
                    t0.elapsed().as_millis(),
                    token.map_or("-".into(), |t| t.to_string()),
                    String::from_utf8_lossy(&body)
                );
            }
            Ok::<_, BoxError>(())
        }));
    }

    // One more agent streams its answer and holds its slot until the last token.
    let streamer = {
        let client = client.clone();
        let pool = args.pool.clone();
        tokio::spawn(async move {
            let lease = client.acquire(&pool).priority(8).await?;
            println!("streamer: got a slot (fencing token {})", lease.fencing_token());
            let tokens = futures::stream::iter(["Once", " upon", " a", " time"]).then(|t| async move {
                tokio::time::sleep(Duration::from_millis(40)).await;
                t
            });
            let mut tokens = lease.hold(Box::pin(tokens));
            let mut text = String::new();
            while let Some(t) = tokens.next().await {
                text.push_str(t);
            }
            println!("streamer: {text:?}; slot released at the end of the stream");
            Ok::<_, BoxError>(())
        })
    };

    for a in agents {
        a.await??;
    }
    streamer.await??;

    // Dropped leases are released by the client's background task, which dies with the runtime when
    // `main` returns: close the client first, so every release reaches the daemon and is acknowledged.
    client.close().await?;
    let st = client.status(Some(&args.pool)).await?;
    for p in &st.pools {
        println!(
            "done in {:.1?}: pool {} in_flight {} queued {} (limit {}, effective {})",
            started.elapsed(),
            p.name,
            p.in_flight,
            p.queued,
            p.limit,
            p.effective_limit
        );
    }
    Ok(())
}

/// Sends one request to the fake LLM over a fresh HTTP/1 connection.
async fn send(addr: SocketAddr, mut req: Request<String>) -> Result<Response<Incoming>, BoxError> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    req.headers_mut().insert(http::header::HOST, "llm.invalid".parse()?);
    Ok(sender.send_request(req).await?)
}

/// A fake provider: answers after a short delay; every fifth call is a 429 with `Retry-After: 1`.
async fn start_fake_llm() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let calls = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let calls = calls.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req: Request<Incoming>| {
                    let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                    async move {
                        tokio::time::sleep(Duration::from_millis(30 + (n as u64 % 4) * 20)).await;
                        let resp = if n.is_multiple_of(5) {
                            Response::builder()
                                .status(StatusCode::TOO_MANY_REQUESTS)
                                .header("retry-after", "1")
                                .body(Full::new(&b"rate limited"[..]))
                        } else {
                            Response::builder().body(Full::new(&b"hello"[..]))
                        };
                        Ok::<_, Infallible>(resp.expect("valid response"))
                    }
                });
                let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    Ok(addr)
}
