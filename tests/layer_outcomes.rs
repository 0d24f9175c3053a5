//! The tower layer in front of a fake provider speaking real HTTP on loopback: each answer (429 with
//! Retry-After in seconds or as an HTTP date, 529 `overloaded_error`, 402, `insufficient_quota`, 500)
//! reaches the daemon as its outcome class, and the daemon applies that class's policy: a pause with
//! adaptive headroom, a breaker failure, a long quota pause with a clear reason, a failure hold.

use std::{
    convert::Infallible,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use slotd_client::{LeaseLayer, proto as pb};
use slotd_test_support::{Daemon, pool_in, within};
use tokio::net::{TcpListener, TcpStream};
use tower::{Layer, ServiceExt};

/// The fake provider: the path picks the answer.
async fn answer(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let in_3s = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(3));
    let (status, headers, body): (u16, Vec<(&str, String)>, &str) = match req.uri().path() {
        "/429" => (429, vec![("retry-after", "2".into())], r#"{"error":{"type":"rate_limit_error"}}"#),
        "/429-date" => (429, vec![("retry-after", in_3s)], r#"{"error":{"type":"rate_limit_error"}}"#),
        "/529" => {
            (529, vec![], r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#)
        }
        "/402" => (402, vec![], r#"{"error":{"type":"billing_error"}}"#),
        "/quota" => (429, vec![], r#"{"error":{"type":"insufficient_quota","code":"insufficient_quota"}}"#),
        "/500" => (500, vec![], "internal error"),
        _ => (200, vec![], r#"{"ok":true}"#),
    };
    let mut b = Response::builder().status(status).header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(k, v);
    }
    Ok(b.body(Full::new(Bytes::from_static(body.as_bytes()))).expect("valid answer"))
}

/// Serves [`answer`] on 127.0.0.1:0; returns its address.
async fn fake_provider() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service_fn(answer)));
        }
    });
    addr
}

/// One HTTP call through the layer on `pool`, reading the whole answer (so the layer sees the error
/// body); returns the status.
async fn call(client: &slotd_client::Client, addr: std::net::SocketAddr, pool: &str, path: &str) -> u16 {
    let http = tower::service_fn(move |req: Request<Full<Bytes>>| async move {
        type BoxError = Box<dyn std::error::Error + Send + Sync>;
        let stream = TcpStream::connect(addr).await?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok::<_, BoxError>(send.send_request(req).await?)
    });
    let svc = LeaseLayer::new(client.clone(), pool).layer(http);
    let req = Request::post(format!("http://{addr}{path}")).body(Full::new(Bytes::new())).unwrap();
    let resp = within("provider call", svc.oneshot(req)).await.expect("call");
    let status = resp.status().as_u16();
    within("answer body", resp.into_body().collect()).await.expect("body");
    status
}

fn remaining(p: &pb::PoolStatus) -> Option<Duration> {
    let until = SystemTime::try_from(p.paused_until?).ok()?;
    until.duration_since(SystemTime::now()).ok()
}

const POOLS: &str = r#"
[pools.ok]
max_concurrent = 2
[pools.rl]
max_concurrent = 2
[pools.rl_date]
max_concurrent = 2
[pools.over]
max_concurrent = 2
[pools.over.health.breaker]
enabled = true
failures = 1
open_base = "30s"
open_max = "30s"
[pools.billing]
max_concurrent = 2
max_agent_retry_after = "2h"
[pools.quota]
max_concurrent = 2
max_agent_retry_after = "2h"
[pools.fail]
max_concurrent = 2
[pools.fail.health]
failure_hold = "30s"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_provider_answer_moves_the_daemon_by_its_class() {
    let d = Daemon::start(POOLS).await;
    let client = d.connect().await;
    let addr = fake_provider().await;

    assert_eq!(call(&client, addr, "ok", "/ok").await, 200);
    let s = d.wait_for("the ok lease released", |s| pool_in(s, "ok").in_flight == 0).await;
    let p = pool_in(&s, "ok");
    assert!(p.paused_until.is_none() && p.held == 0, "{p:#?}");

    // 429 with Retry-After in seconds: a pause that long, and one step of adaptive headroom.
    assert_eq!(call(&client, addr, "rl", "/429").await, 429);
    let s = d.wait_for("rl paused", |s| pool_in(s, "rl").paused_until.is_some()).await;
    let p = pool_in(&s, "rl");
    let left = remaining(&p).unwrap();
    assert!(left > Duration::from_millis(1500) && left <= Duration::from_secs(2), "{left:?}");
    assert_eq!(p.effective_limit, 1);
    assert!(p.pause_reason.contains("rate limited (429)"), "{p:#?}");

    // 429 with Retry-After as an HTTP date.
    call(&client, addr, "rl_date", "/429-date").await;
    let s = d.wait_for("rl_date paused", |s| pool_in(s, "rl_date").paused_until.is_some()).await;
    let left = remaining(&pool_in(&s, "rl_date")).unwrap();
    assert!(left > Duration::from_secs(1) && left <= Duration::from_secs(3), "{left:?}");

    // 529 overloaded_error: a provider-wide failure, so the breaker opens (failures = 1); the pause
    // uses the pool's default, and the effective limit stays (it says nothing about this key's quota).
    call(&client, addr, "over", "/529").await;
    let s = d
        .wait_for("over's breaker opened", |s| {
            pool_in(s, "over").breaker.as_ref().is_some_and(|b| b.state() == pb::BreakerState::Open)
        })
        .await;
    let p = pool_in(&s, "over");
    assert!(p.pause_reason.contains("overloaded"), "{p:#?}");
    assert_eq!(p.effective_limit, 2);

    // 402 and insufficient_quota: a long pause with a clear reason.
    for pool in ["billing", "quota"] {
        call(&client, addr, pool, if pool == "billing" { "/402" } else { "/quota" }).await;
        let s = d.wait_for("quota pause", |s| pool_in(s, pool).paused_until.is_some()).await;
        let p = pool_in(&s, pool);
        assert!(p.pause_reason.contains("quota exhausted (402)"), "{pool}: {p:#?}");
        assert!(remaining(&p).unwrap() > Duration::from_secs(3500), "{pool}: {p:#?}");
    }

    // 500: an error; no pause, but the failure hold keeps the slot.
    assert_eq!(call(&client, addr, "fail", "/500").await, 500);
    let s = d.wait_for("fail held", |s| pool_in(s, "fail").held == 1).await;
    let p = pool_in(&s, "fail");
    assert!(p.paused_until.is_none() && p.in_flight == 0, "{p:#?}");
    client.close().await.unwrap();
}
