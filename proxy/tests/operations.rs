//! Operations: limits on header size, body size and client connections; a lost lease is logged and
//! counted, and cuts the stream on a strict route; graceful shutdown lets streams finish, up to its
//! timeout; /healthz and /metrics.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use slotd_client::proto as pb;
use slotd_test_support::{Daemon, client::one_pool, http_get, pool_in, within};
use support::{Fake, Proxy, config, drain, http1, post, route, sample, send};

const LONG: [(&str, &str); 3] = [("x-fake", "sse"), ("x-fake-events", "1000"), ("x-fake-interval-ms", "20")];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn header_body_and_connection_limits() {
    let fake = Fake::start().await;
    let d = Daemon::start(&one_pool("p", 4, "")).await;
    let toml = config(
        &d.url(),
        &format!(
            "max_connections = 2\nmax_header_bytes = 16384\nmax_body_bytes = 1000\n{}",
            route("a", &fake.url(), "p", "")
        ),
    );
    let proxy = Proxy::start(&toml).await;
    let url = proxy.url("/a/v1/messages");

    // A header block over the limit: refused by the HTTP layer, never forwarded.
    let big = "x".repeat(20_000);
    let resp = within("head", http1().request(post(&url, &[("x-big", &big)]))).await;
    assert!(resp.map(|r| r.status().as_u16()).map_or(true, |s| s == 431), "a huge header was served");
    assert_eq!(fake.total(), 0);

    // A body over the limit: by Content-Length before any lease, and chunked while streaming.
    let req =
        http::Request::post(&url).body(http_body_util::Full::new(Bytes::from(vec![b'a'; 2000]))).unwrap();
    let (status, h, _) = send(&http1(), req).await;
    assert_eq!(status, 413);
    assert_eq!(h["x-slotd-reason"], "body_too_large");
    let chunks = futures::stream::iter(
        (0..20).map(|_| Ok::<_, std::io::Error>(Frame::data(Bytes::from(vec![b'a'; 100])))),
    );
    let chunked = Client::builder(TokioExecutor::new()).build_http::<StreamBody<_>>();
    let resp =
        within("chunked", chunked.request(http::Request::post(&url).body(StreamBody::new(chunks)).unwrap()))
            .await
            .unwrap();
    assert_eq!(resp.status(), 413);
    assert_eq!(resp.headers()["x-slotd-reason"], "body_too_large");
    d.wait_for("idle", |s| s.leases.is_empty()).await;

    // Two connections at most: a third waits until one closes.
    let (c1, c2) = (http1(), http1());
    let s1 = within("head", c1.request(post(&url, &LONG))).await.unwrap();
    let s2 = within("head", c2.request(post(&url, &LONG))).await.unwrap();
    let third = tokio::spawn({
        let url = url.clone();
        async move { send(&http1(), post(&url, &[])).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!third.is_finished(), "a third connection was served");
    drop(s1);
    drop(c1);
    let (status, _, _) = within("the third answer", third).await.unwrap();
    assert_eq!(status, 200);
    drop(s2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_lease_is_counted_and_cuts_the_stream_only_on_strict_routes() {
    let fake = Fake::start().await;
    let d = Daemon::start(&one_pool("p", 4, "")).await;
    let routes = format!(
        "{}{}",
        route("lax", &fake.url(), "p", ""),
        route("strict", &fake.url(), "p", "strict = true")
    );
    let proxy = Proxy::start(&config(&d.url(), &routes)).await;
    let mut admin = d.admin().await;
    for (r, strict) in [("lax", false), ("strict", true)] {
        let h = [("x-fake", "sse"), ("x-fake-events", "15"), ("x-fake-interval-ms", "20")];
        let resp = within("head", http1().request(post(&proxy.url(&format!("/{r}/v1/messages")), &h)))
            .await
            .unwrap();
        let mut body = resp.into_body();
        within("first event", body.frame()).await.unwrap().unwrap();
        let s = d.status().await;
        assert_eq!(s.leases.len(), 1);
        admin.revoke_lease(pb::RevokeLeaseRequest { lease_id: s.leases[0].lease_id.clone() }).await.unwrap();
        let rest = within("the rest", drain(body)).await;
        assert_eq!(rest.is_err(), strict, "{r}: {rest:?}");
    }
    let m =
        send(&http1(), http::Request::get(proxy.url("/metrics")).body(Default::default()).unwrap()).await.2;
    assert_eq!(sample(&m, r#"slotd_proxy_leases_lost_total{route="lax"}"#), 1.0, "{m}");
    assert_eq!(sample(&m, r#"slotd_proxy_leases_lost_total{route="strict"}"#), 1.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graceful_shutdown_lets_streams_finish_up_to_its_timeout() {
    let fake = Fake::start().await;
    let d = Daemon::start(&one_pool("p", 4, "")).await;
    let r = route("a", &fake.url(), "p", "");

    // A stream that ends within the timeout is served to its last event.
    let mut proxy = Proxy::start(&config(&d.url(), &format!("shutdown_timeout = \"10s\"\n{r}"))).await;
    let h = [("x-fake", "sse"), ("x-fake-events", "10"), ("x-fake-interval-ms", "20")];
    let resp = within("head", http1().request(post(&proxy.url("/a/v1/messages"), &h))).await.unwrap();
    let task = proxy.begin_shutdown();
    let body = within("the whole stream", resp.into_body().collect()).await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("message_stop"));
    within("serve to return", task).await.unwrap().unwrap();
    assert!(tokio::net::TcpStream::connect(proxy.addr).await.is_err(), "still accepting");
    d.wait_for("released", |s| s.leases.is_empty()).await;

    // A stream longer than the timeout is cut, and its lease still goes back.
    let mut proxy = Proxy::start(&config(&d.url(), &format!("shutdown_timeout = \"100ms\"\n{r}"))).await;
    let resp = within("head", http1().request(post(&proxy.url("/a/v1/messages"), &LONG))).await.unwrap();
    assert_eq!(d.pool("p").await.in_flight, 1);
    let task = proxy.begin_shutdown();
    within("serve to return", task).await.unwrap().unwrap();
    assert!(within("the cut", drain(resp.into_body())).await.is_err());
    d.wait_for("released", |s| pool_in(s, "p").in_flight == 0 && s.leases.is_empty()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_metrics_and_unknown_paths() {
    let fake = Fake::start().await;
    let d = Daemon::start(&one_pool("p", 4, "")).await;
    let proxy = Proxy::start(&config(&d.url(), &route("a", &fake.url(), "p", ""))).await;
    let (code, body) = http_get(proxy.addr, "/healthz").await;
    assert_eq!(code, 200);
    assert!(body.contains("\"daemon\":\"up\""), "{body}");
    let (status, _, _) = send(&http1(), post(&proxy.url("/a/v1/messages"), &[])).await;
    assert_eq!(status, 200);
    let (status, h, _) = send(&http1(), post(&proxy.url("/nowhere"), &[])).await;
    assert_eq!(status, 404);
    assert_eq!(h["x-slotd-reason"], "no_route");
    let (_, m) = http_get(proxy.addr, "/metrics").await;
    assert_eq!(sample(&m, r#"slotd_proxy_requests_total{outcome="ok",route="a"}"#), 1.0, "{m}");
    assert_eq!(sample(&m, r#"slotd_proxy_lease_wait_seconds_count{route="a"}"#), 1.0, "{m}");
    assert_eq!(sample(&m, r#"slotd_proxy_upstream_latency_seconds_count{route="a"}"#), 1.0, "{m}");
    assert!(sample(&m, r#"slotd_proxy_bytes_total{direction="response",route="a"}"#) > 0.0, "{m}");
    assert_eq!(sample(&m, r#"slotd_proxy_bytes_total{direction="request",route="a"}"#), 27.0, "{m}");
    assert_eq!(sample(&m, "slotd_proxy_daemon_up"), 1.0, "{m}");
}
