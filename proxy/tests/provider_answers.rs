//! What the provider answers reaches slotd: a 429 pauses the pool for every client (Retry-After in
//! seconds, as an HTTP date, or in milliseconds), 529 / 402 / 500 / a stream cut mid-body release as
//! overloaded / quota_exhausted / error; local refusals (queue full, max_wait, paused) look like the
//! provider's errors but carry `x-slotd-reason`.

mod support;

use std::time::{Duration, SystemTime};

use slotd_test_support::{Daemon, pool_in, scrape, system_time, within};
use support::{Fake, Proxy, config, http1, post, route, sample, send};

const POOLS: &str = r#"
[pools.p]
max_concurrent = 4
[pools.secs]
max_concurrent = 4
[pools.date]
max_concurrent = 4
[pools.o]
max_concurrent = 4
default_retry_after = "50ms"
[pools.q]
max_concurrent = 4
default_retry_after = "50ms"
[pools.e]
max_concurrent = 4
[pools.c]
max_concurrent = 4
[pools.f]
max_concurrent = 4
[pools.f.health.breaker]
enabled = true
when_open = "fail_fast"
[pools.b]
max_concurrent = 4
[pools.b.budget]
input_tokens_per_minute = 1000
output_tokens_per_minute = 1000
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_provider_429_pauses_every_other_client_and_shows_in_status() {
    let fake = Fake::start().await;
    let d = Daemon::start(POOLS).await;
    let proxy = Proxy::start(&config(&d.url(), &route("a", &fake.url(), "p", ""))).await;
    let c = http1();
    let url = proxy.url("/a/v1/messages");
    let (status, h, body) =
        send(&c, post(&url, &[("x-fake", "429"), ("x-fake-retry-after-ms", "600")])).await;
    // The provider's own 429 passes through unchanged, and is not marked as a local refusal.
    assert_eq!(status, 429);
    assert!(h.get("x-slotd-reason").is_none(), "{h:?}");
    assert_eq!(h["retry-after-ms"], "600");
    assert!(body.contains("rate_limit_error"), "{body}");
    // The pool is paused in slotd's Status (the release leaves as the body ends, in the background)...
    let s = d.wait_for("the pause", |s| pool_in(s, "p").paused_until.is_some()).await;
    let p = pool_in(&s, "p");
    let until = system_time(p.paused_until.as_ref().expect("paused"));
    assert!(until > SystemTime::now(), "{p:?}");
    // ...and another client waits through the pause instead of reaching the provider.
    let before = fake.total();
    let url2 = url.clone();
    let other = tokio::spawn(async move { send(&http1(), post(&url2, &[])).await });
    d.wait_for("the other client queued behind the pause", |s| pool_in(s, "p").queued == 1).await;
    assert_eq!(fake.total(), before, "a request reached the provider during the pause");
    let (status, h, _) = within("the other answer", other).await.unwrap();
    assert_eq!(status, 200);
    assert!(h.get("x-slotd-reason").is_none());
    assert!(SystemTime::now() >= until, "granted before the pause ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retry_after_in_seconds_and_as_an_http_date_set_the_pause() {
    let fake = Fake::start().await;
    let d = Daemon::start(POOLS).await;
    let routes =
        format!("{}{}", route("secs", &fake.url(), "secs", ""), route("date", &fake.url(), "date", ""));
    let proxy = Proxy::start(&config(&d.url(), &routes)).await;
    let c = http1();
    let t0 = SystemTime::now();
    let (status, _, _) =
        send(&c, post(&proxy.url("/secs/v1/messages"), &[("x-fake", "429"), ("x-fake-retry-after", "30")]))
            .await;
    assert_eq!(status, 429);
    let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(60));
    let (status, _, _) =
        send(&c, post(&proxy.url("/date/v1/messages"), &[("x-fake", "429"), ("x-fake-retry-after", &date)]))
            .await;
    assert_eq!(status, 429);
    let s = d
        .wait_for("both pauses", |s| {
            pool_in(s, "secs").paused_until.is_some() && pool_in(s, "date").paused_until.is_some()
        })
        .await;
    let secs = system_time(pool_in(&s, "secs").paused_until.as_ref().expect("secs paused"));
    let date = system_time(pool_in(&s, "date").paused_until.as_ref().expect("date paused"));
    let in_secs = secs.duration_since(t0).unwrap();
    assert!(in_secs >= Duration::from_secs(29) && in_secs <= Duration::from_secs(31), "{in_secs:?}");
    let in_date = date.duration_since(t0).unwrap();
    assert!(in_date >= Duration::from_secs(58) && in_date <= Duration::from_secs(61), "{in_date:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overloaded_quota_error_and_cut_streams_release_with_their_class() {
    let fake = Fake::start().await;
    let (d, metrics) = Daemon::start_with_metrics(POOLS).await;
    let routes: String = ["o", "q", "e", "c"].iter().map(|p| route(p, &fake.url(), p, "")).collect();
    let proxy = Proxy::start(&config(&d.url(), &routes)).await;
    let c = http1();
    for (r, kind, status) in [("o", "529", 529), ("q", "402", 402), ("e", "500", 500)] {
        let (s, h, _) = send(&c, post(&proxy.url(&format!("/{r}/v1/messages")), &[("x-fake", kind)])).await;
        assert_eq!(s, status);
        assert!(h.get("x-slotd-reason").is_none());
    }
    // A stream the provider cuts mid-body: the client sees the cut, slotd sees an error.
    let resp = within(
        "head",
        c.request(post(&proxy.url("/c/v1/messages"), &[("x-fake", "cut"), ("x-fake-interval-ms", "10")])),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(within("the cut", support::drain(resp.into_body())).await.is_err(), "the cut was hidden");

    d.wait_for("every lease released", |s| s.leases.is_empty()).await;
    let m = scrape(metrics).await;
    for (pool, outcome) in [("o", "overloaded"), ("q", "quota_exhausted"), ("e", "error"), ("c", "error")] {
        let key = format!(r#"slotd_leases_released_total{{outcome="{outcome}",pool="{pool}"}}"#);
        assert_eq!(sample(&m, &key), 1.0, "{key} in\n{m}");
    }
    let pm = send(&c, http::Request::get(proxy.url("/metrics")).body(Default::default()).unwrap()).await.2;
    assert_eq!(sample(&pm, r#"slotd_proxy_requests_total{outcome="overloaded",route="o"}"#), 1.0, "{pm}");
    assert_eq!(sample(&pm, r#"slotd_proxy_requests_total{outcome="error",route="c"}"#), 1.0, "{pm}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_refusals_look_like_the_providers_and_are_marked() {
    let fake = Fake::start().await;
    let d = Daemon::start("[pools.p]\nmax_concurrent = 1\nmax_queue_depth = 1\n").await;
    let routes = format!(
        "{}{}{}",
        route("a", &fake.url(), "p", ""),
        route("now", &fake.url(), "p", "max_wait = \"0s\""),
        "[routes.oai]\nprefix = \"/oai\"\nupstream = \"".to_owned()
            + &fake.url()
            + "\"\npool = \"p\"\ndialect = \"openai\"\nmax_wait = \"30ms\"\n"
    );
    let proxy = Proxy::start(&config(&d.url(), &routes)).await;
    let c = http1();
    // Hold the only slot with a long stream, and fill the queue (depth 1) with a waiter.
    let long = within(
        "head",
        c.request(post(
            &proxy.url("/a/v1/messages"),
            &[("x-fake", "sse"), ("x-fake-events", "1000"), ("x-fake-interval-ms", "50")],
        )),
    )
    .await
    .unwrap();
    let waiter_url = proxy.url("/a/v1/messages");
    let waiter = tokio::spawn(async move { send(&http1(), post(&waiter_url, &[])).await });
    d.wait_for("one waiter", |s| pool_in(s, "p").queued == 1).await;

    // Queue full: 429, Anthropic's shape, marked.
    let (status, h, body) = send(&c, post(&proxy.url("/a/v1/messages"), &[])).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(h["x-slotd-reason"], "queue_full");
    assert!(h.contains_key("retry-after"));
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((v["type"].as_str(), v["error"]["type"].as_str()), (Some("error"), Some("rate_limit_error")));

    // Free the queue place, then max_wait runs out on the OpenAI route: OpenAI's shape.
    drop(long);
    let (status, _, _) = within("the waiter", waiter).await.unwrap();
    assert_eq!(status, 200);
    let long = within(
        "head",
        c.request(post(
            &proxy.url("/a/v1/messages"),
            &[("x-fake", "sse"), ("x-fake-events", "1000"), ("x-fake-interval-ms", "50")],
        )),
    )
    .await
    .unwrap();
    let (status, h, body) = send(&c, post(&proxy.url("/oai/v1/chat/completions"), &[])).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(h["x-slotd-reason"], "max_wait");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "slotd_max_wait");
    drop(long);
    d.wait_for("idle", |s| s.leases.is_empty()).await;

    // A paused pool while failing fast (max_wait 0): 429 `paused`, retry-after from the pause.
    let (status, _, _) =
        send(&c, post(&proxy.url("/a/v1/messages"), &[("x-fake", "429"), ("x-fake-retry-after", "20")]))
            .await;
    assert_eq!(status, 429);
    d.wait_for("the pause", |s| pool_in(s, "p").paused_until.is_some()).await;
    let (status, h, body) = send(&c, post(&proxy.url("/now/v1/messages"), &[])).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(h["x-slotd-reason"], "paused");
    let secs: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((15..=20).contains(&secs), "retry-after {secs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_open_fail_fast_breaker_is_a_local_refusal_not_a_dead_daemon() {
    let fake = Fake::start().await;
    let d = Daemon::start(POOLS).await;
    // fail_open: were the breaker's refusal taken for a dead daemon, the request would go through.
    let proxy =
        Proxy::start(&config(&d.url(), &route("f", &fake.url(), "f", "on_daemon_down = \"fail_open\"")))
            .await;
    let mut admin = d.admin().await;
    admin
        .force_breaker(slotd_client::proto::BreakerForceRequest {
            pool: "f".into(),
            to: slotd_client::proto::BreakerForce::Open as i32,
            reason: "test".into(),
        })
        .await
        .expect("forced open");
    let before = fake.total();
    let (status, h, body) = send(&http1(), post(&proxy.url("/f/v1/messages"), &[])).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(h["x-slotd-reason"], "breaker_open");
    assert!(h.contains_key("retry-after"), "{h:?}");
    assert_eq!(fake.total(), before, "nothing reached the provider while the breaker is open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn token_estimate_headers_reserve_from_the_budget() {
    let fake = Fake::start().await;
    let d = Daemon::start(POOLS).await;
    let proxy = Proxy::start(&config(&d.url(), &route("b", &fake.url(), "b", ""))).await;
    let c = http1();
    let url = proxy.url("/b/v1/messages");
    // An estimate above the burst can never be granted: refused at once as a bad header.
    let headers = [("x-slotd-input-tokens", "5000"), ("x-slotd-max-output-tokens", "10")];
    let (status, h, _) = send(&c, post(&url, &headers)).await;
    assert_eq!(status, 400);
    assert_eq!(h["x-slotd-reason"], "bad_header");
    // A fitting one is reserved at grant, and the reservation is what the budget counted.
    let headers = [("x-slotd-input-tokens", "300"), ("x-slotd-max-output-tokens", "200")];
    let (status, _, _) = send(&c, post(&url, &headers)).await;
    assert_eq!(status, 200);
    let s = d.status().await;
    let counters = pool_in(&s, "b").budget.as_ref().and_then(|b| b.counters).expect("budget counters");
    assert_eq!((counters.reserved_input_tokens, counters.reserved_output_tokens), (300, 200));
}
