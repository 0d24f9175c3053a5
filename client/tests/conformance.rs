//! The client conformance scenarios of docs/CLIENTS.md, for the Rust client (the Python client runs
//! the same scenarios in python/tests/test_conformance.py, under the same names).

use std::{convert::Infallible, io, time::Duration};

use http::{Request, Response};
use http_body_util::{BodyExt, StreamBody};
use slotd_client::{Client, LeaseLayer, Lost};
use slotd_proto::v1::RevokeLeaseRequest;
use slotd_test_support::{
    Daemon, Proxy,
    client::{idle, one_pool, pool, wait_until},
    within,
};
use tower::{Layer, ServiceExt, service_fn};

fn request() -> Request<String> {
    Request::post("http://llm.invalid/v1/messages").body(String::new()).unwrap()
}

/// Abort mid-body: a response body that fails (or is dropped) half-way gives its lease back.
#[tokio::test]
async fn abort_mid_body() {
    let d = Daemon::start(&one_pool("llm", 1, "")).await;
    let agent = d.connect().await;
    // A provider whose body sends one event, then the connection breaks.
    let provider = service_fn(|_req: Request<String>| async {
        let frames: Vec<Result<http_body::Frame<&'static [u8]>, io::Error>> = vec![
            Ok(http_body::Frame::data(&b"data: {}\n\n"[..])),
            Err(io::Error::new(io::ErrorKind::ConnectionReset, "cut mid-body")),
        ];
        Ok::<_, Infallible>(Response::new(StreamBody::new(futures::stream::iter(frames))))
    });
    let svc = LeaseLayer::new(agent.clone(), "llm").layer(provider);
    let resp = within("call", svc.clone().oneshot(request())).await.unwrap();
    assert_eq!(pool(&d.status().await, "llm").in_flight, 1, "held while the body streams");
    let err = within("body", resp.into_body().collect()).await.expect_err("the body was cut");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    wait_until(&agent, "the cut body's lease released", |st| idle(st, "llm")).await;

    // Dropped half-way (the caller stopped reading): released too.
    let mut body = within("call", svc.oneshot(request())).await.unwrap().into_body();
    within("first frame", body.frame()).await.expect("a frame").expect("data");
    assert_eq!(pool(&d.status().await, "llm").in_flight, 1);
    drop(body);
    wait_until(&agent, "the dropped body's lease released", |st| idle(st, "llm")).await;
}

/// Retry backoff outside the lease: after a 429 the caller's backoff runs with no slot held, and the
/// retry takes a new lease.
#[tokio::test]
async fn retry_backoff_outside_the_lease() {
    let d = Daemon::start(&one_pool("llm", 1, "adaptive = false")).await;
    let agent = d.connect().await;
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let provider = service_fn({
        let calls = calls.clone();
        move |_req: Request<String>| {
            let n = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move {
                let status = if n == 0 { 429 } else { 200 };
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(status)
                        .header("retry-after-ms", "200")
                        // A body, so the lease rides in it until it is read (an empty body is
                        // complete at once and releases with the answer).
                        .body("{}".to_owned())
                        .unwrap(),
                )
            }
        }
    });
    let svc = LeaseLayer::new(agent.clone(), "llm").layer(provider);
    let first = within("call", svc.clone().oneshot(request())).await.unwrap();
    assert_eq!(first.status(), 429);
    let first_token = first.body().lease().expect("leased").fencing_token();
    within("body", first.into_body().collect()).await.unwrap();
    // The backoff: the slot is already back (the pool is paused, but nobody holds it).
    let st = wait_until(&agent, "released before the backoff", |st| pool(st, "llm").in_flight == 0).await;
    assert!(pool(&st, "llm").paused_until.is_some(), "the 429 paused the pool");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(pool(&d.status().await, "llm").in_flight, 0, "no slot held during the backoff");
    let retry = within("retry", svc.oneshot(request())).await.unwrap();
    assert_eq!(retry.status(), 200);
    assert!(retry.body().lease().expect("leased").fencing_token() > first_token, "a new lease");
    drop(retry);
    wait_until(&agent, "idle", |st| idle(st, "llm")).await;
}

/// Reconnect re-presents leases: after a connection cut the client resumes each held lease with its
/// credential (same id and token, never reported lost), and heartbeats keep it past its TTL.
#[tokio::test]
async fn reconnect_re_presents_leases() {
    let d = Daemon::start(&one_pool("llm", 1, "")).await;
    let observer = d.connect().await;
    let proxy = Proxy::start(d.addr).await;
    let agent = Client::builder()
        .resume_grace(Some(Duration::from_secs(3)))
        .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(100))
        .connect(proxy.url())
        .await
        .expect("connect through the proxy");
    let lease = within("grant", agent.acquire("llm").ttl(Duration::from_millis(300))).await.unwrap();
    for _ in 0..3 {
        proxy.cut();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Three TTLs after the first cut: only a resumed, renewed lease is still there.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let st = observer.status(None).await.unwrap();
    assert_eq!(st.leases.len(), 1, "{st:#?}");
    assert_eq!(st.leases[0].lease_id, lease.lease_id());
    assert_eq!(st.leases[0].fencing_token, lease.fencing_token());
    assert!(!lease.is_lost());
    within("release", lease.release(slotd_client::Outcome::Ok)).await.expect("released after the resume");
    wait_until(&observer, "idle", |st| idle(st, "llm")).await;
}

/// A lost lease is signalled: revoked by an operator, its holder learns it (`lost()` resolves).
#[tokio::test]
async fn lost_lease_is_signalled() {
    let d = Daemon::start(&one_pool("llm", 1, "")).await;
    let agent = d.connect().await;
    let lease = within("grant", agent.acquire("llm")).await.unwrap();
    let lost = lease.lost();
    let mut admin = d.admin().await;
    admin.revoke_lease(RevokeLeaseRequest { lease_id: lease.lease_id().to_owned() }).await.expect("revoke");
    let why = within("lost() resolves", lost).await;
    assert!(matches!(why, Lost::Revoked(_)), "{why:?}");
    assert!(lease.is_lost());
}

/// Close flushes releases: leases given back just before `close()` are all acknowledged by the
/// daemon when it returns.
#[tokio::test]
async fn close_flushes_releases() {
    let d = Daemon::start(&one_pool("llm", 3, "default_ttl = \"30s\"")).await;
    let agent = d.connect().await;
    let mut leases = Vec::new();
    for _ in 0..3 {
        leases.push(within("grant", agent.acquire("llm")).await.unwrap());
    }
    assert_eq!(pool(&d.status().await, "llm").in_flight, 3);
    drop(leases); // released in the background
    within("close", agent.close()).await.expect("every release acknowledged");
    // No waiting: close returned only after the daemon applied them.
    assert_eq!(pool(&d.status().await, "llm").in_flight, 0);
}
