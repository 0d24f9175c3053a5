//! One lease per upstream attempt, held until the last byte: concurrency capped by the pool, SSE
//! keeps its slot to the end, a client disconnect frees it at once, HTTP/1.1 and HTTP/2 clients,
//! `x-slotd-*` and hop-by-hop headers never reach the provider.

mod support;

use http_body_util::BodyExt;
use slotd_test_support::{Daemon, client::one_pool, pool_in, scrape, within};
use support::{Fake, Proxy, config, http1, http2, post, route, sample, send};

fn sse(events: &str, interval_ms: &str) -> Vec<(&'static str, String)> {
    vec![
        ("x-fake", "sse".into()),
        ("x-fake-events", events.into()),
        ("x-fake-interval-ms", interval_ms.into()),
    ]
}

fn headers<'a>(v: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    v.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_two_clients_on_a_pool_of_four_never_exceed_four_upstream() {
    let fake = Fake::start().await;
    let d = Daemon::start(&one_pool("p", 4, "")).await;
    let proxy = Proxy::start(&config(&d.url(), &route("a", &fake.url(), "p", ""))).await;
    let url = proxy.url("/a/v1/messages");
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..32 {
        let url = url.clone();
        tasks.spawn(async move {
            // Half of them on HTTP/2, half on HTTP/1.1; each its own client (connection).
            let c = if i % 2 == 0 { http1() } else { http2() };
            let h = sse("3", "10");
            let (status, _, body) = send(&c, post(&url, &headers(&h))).await;
            assert_eq!(status, 200, "{body}");
            assert!(body.contains("message_stop"), "{body}");
        });
    }
    while let Some(r) = within("32 clients", tasks.join_next()).await {
        r.unwrap();
    }
    assert_eq!(fake.total(), 32);
    assert!(fake.max() <= 4, "the provider saw {} at once", fake.max());
    assert!(fake.max() >= 2, "the test never overlapped requests: {}", fake.max());
    d.wait_for("every lease released", |s| pool_in(s, "p").in_flight == 0).await;
    d.assert_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_sse_answer_keeps_its_slot_until_the_last_event() {
    let fake = Fake::start().await;
    let (d, metrics) = Daemon::start_with_metrics(&one_pool("p", 1, "")).await;
    let proxy = Proxy::start(&config(&d.url(), &route("a", &fake.url(), "p", ""))).await;
    let c = http1();
    let h = sse("4", "40");
    let resp =
        within("response head", c.request(post(&proxy.url("/a/v1/messages"), &headers(&h)))).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let first = within("first event", body.frame()).await.unwrap().unwrap().into_data().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("message_start"));
    // Streaming: the slot is held, and a second request waits in slotd's queue.
    let p = d.pool("p").await;
    assert_eq!((p.in_flight, p.queued), (1, 0));
    let c2 = http1();
    let url = proxy.url("/a/v1/messages");
    let second = tokio::spawn(async move { send(&c2, post(&url, &[])).await });
    d.wait_for("the second request queued", |s| pool_in(s, "p").queued == 1).await;
    // Read to the end, event by event: the slot stays held until the last one.
    let mut rest = Vec::new();
    while let Some(frame) = within("next event", body.frame()).await {
        let data = frame.unwrap().into_data().unwrap();
        rest.extend_from_slice(&data);
        if !String::from_utf8_lossy(&rest).contains("message_stop") {
            assert_eq!(fake.current(), 1);
        }
    }
    assert!(String::from_utf8_lossy(&rest).contains("message_delta"));
    let (status, _, _) = within("the second answer", second).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(fake.max(), 1, "the second request reached the provider while the stream ran");
    d.wait_for("idle", |s| pool_in(s, "p").in_flight == 0).await;
    let m = scrape(metrics).await;
    assert_eq!(sample(&m, r#"slotd_leases_released_total{outcome="ok",pool="p"}"#), 2.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_disconnect_mid_stream_frees_the_slot_as_cancelled() {
    let fake = Fake::start().await;
    let (d, metrics) = Daemon::start_with_metrics(&one_pool("p", 1, "")).await;
    let proxy = Proxy::start(&config(&d.url(), &route("a", &fake.url(), "p", ""))).await;
    for client in [http1(), http2()] {
        // A stream far longer than the test's patience: only the disconnect can end it in time.
        let h = sse("1000", "50");
        let resp =
            within("head", client.request(post(&proxy.url("/a/v1/messages"), &headers(&h)))).await.unwrap();
        let mut body = resp.into_body();
        within("first event", body.frame()).await.unwrap().unwrap();
        assert_eq!(d.pool("p").await.in_flight, 1);
        drop(body);
        drop(client);
        d.wait_for("the slot back", |s| pool_in(s, "p").in_flight == 0 && s.leases.is_empty()).await;
        support::eventually("the provider's request to end", || fake.current() == 0).await;
    }
    let m = scrape(metrics).await;
    assert_eq!(sample(&m, r#"slotd_leases_released_total{outcome="cancelled",pool="p"}"#), 2.0, "{m}");
    let pm =
        support::send(&http1(), http::Request::get(proxy.url("/metrics")).body(Default::default()).unwrap())
            .await
            .2;
    assert_eq!(sample(&pm, r#"slotd_proxy_requests_total{outcome="cancelled",route="a"}"#), 2.0, "{pm}");
    assert_eq!(sample(&pm, r#"slotd_proxy_in_flight{route="a"}"#), 0.0, "{pm}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_headers_are_used_and_removed_and_hop_by_hop_headers_dropped() {
    let fake = Fake::start().await;
    let d = Daemon::start(&one_pool("p", 2, "")).await;
    let proxy = Proxy::start(&config(&d.url(), &route("a", &fake.url(), "p", ""))).await;
    let c = http1();
    let h = sse("1000", "50");
    let mut hs = headers(&h);
    hs.extend([
        ("x-slotd-priority", "8"),
        ("x-slotd-holder", "reviewer-7"),
        ("x-slotd-started-at", "2026-01-01T00:00:00Z"),
        ("x-slotd-unknown", "1"),
        ("connection", "x-private"),
        ("x-private", "1"),
        ("x-api-key", "sk-test"),
    ]);
    let resp = within("head", c.request(post(&proxy.url("/a/v1/messages"), &hs))).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    within("first event", body.frame()).await.unwrap().unwrap();
    let s = d.status().await;
    assert_eq!(s.leases.len(), 1, "{s:?}");
    assert_eq!(s.leases[0].holder, "reviewer-7");
    assert_eq!(s.leases[0].priority, 8);
    let names = fake.seen.last_headers.lock().unwrap().clone();
    assert!(names.iter().all(|n| !n.starts_with("x-slotd-")), "{names:?}");
    assert!(!names.contains(&"x-private".to_owned()), "{names:?}");
    assert!(names.contains(&"x-api-key".to_owned()), "{names:?}");
    drop(body);
    d.wait_for("idle", |s| s.leases.is_empty()).await;

    // A bad header is refused locally (400) without taking a lease.
    let (status, h, body) = send(&c, post(&proxy.url("/a/v1/messages"), &[("x-slotd-priority", "11")])).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(h["x-slotd-reason"], "bad_header");
    // x-slotd-pool is refused on a route that allows no pool.
    let (status, _, _) = send(&c, post(&proxy.url("/a/v1/messages"), &[("x-slotd-pool", "p")])).await;
    assert_eq!(status, 400);
    // A request body streams through (the fake echoes its length).
    let (status, _, body) = send(&c, post(&proxy.url("/a/v1/messages"), &[])).await;
    assert_eq!(status, 200);
    assert!(body.contains("\"request_bytes\":27"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_leaves_while_queued_leaves_slotd_s_queue() {
    let fake = Fake::start().await;
    let d = Daemon::start(&one_pool("p", 1, "")).await;
    let proxy = Proxy::start(&config(&d.url(), &route("a", &fake.url(), "p", ""))).await;
    let h = sse("1000", "50");
    let holder =
        within("head", http1().request(post(&proxy.url("/a/v1/messages"), &headers(&h)))).await.unwrap();
    for client in [http1(), http2()] {
        let url = proxy.url("/a/v1/messages");
        let waiting = tokio::spawn(async move { client.request(post(&url, &[])).await.map(|r| r.status()) });
        d.wait_for("the request queued", |s| pool_in(s, "p").queued == 1).await;
        waiting.abort();
        d.wait_for("the queue empty again", |s| pool_in(s, "p").queued == 0).await;
        assert_eq!(d.pool("p").await.in_flight, 1, "the holder lost its slot");
    }
    drop(holder);
    d.wait_for("idle", |s| s.leases.is_empty()).await;
    assert_eq!(fake.total(), 1, "a request that left reached the provider");
}
