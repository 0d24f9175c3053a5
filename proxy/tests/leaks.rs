//! Nothing leaks: 1,000 short requests of every kind, a third of them abandoned at a random moment
//! (queued, waiting for the provider, or mid-body), leave slotd idle, the provider idle and the
//! proxy's in-flight gauges and connections at zero.

mod support;

use std::time::Duration;

use slotd_test_support::{Daemon, client::one_pool, pool_in, scrape, within};
use support::{Fake, Proxy, config, eventually, http1, post, route, sample, send};

const REQUESTS: usize = 1000;
const AT_ONCE: usize = 32;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_requests_with_random_disconnects_leave_nothing_behind() {
    let fake = Fake::start().await;
    let (d, daemon_metrics) = Daemon::start_with_metrics(&one_pool("p", 8, "")).await;
    let proxy = Proxy::start(&config(&d.url(), &route("a", &fake.url(), "p", ""))).await;
    let url = proxy.url("/a/v1/messages");
    let mut tasks = tokio::task::JoinSet::new();
    let mut abandoned = 0;
    for i in 0..REQUESTS {
        if tasks.len() >= AT_ONCE {
            within("a request", tasks.join_next()).await.unwrap().unwrap();
        }
        let kind = ["ok", "sse", "500", "cut", "ok"][i % 5];
        let abandon = rand::random_range(0..3) == 0;
        abandoned += usize::from(abandon);
        let after = Duration::from_micros(rand::random_range(0..4000));
        let url = url.clone();
        tasks.spawn(async move {
            let c = http1();
            let req = post(&url, &[("x-fake", kind), ("x-fake-events", "3"), ("x-fake-interval-ms", "1")]);
            let fut = async {
                let resp = c.request(req).await.map_err(|e| e.to_string())?;
                support::drain(resp.into_body()).await.map(|_| ()).map_err(|e| e.to_string())
            };
            if abandon {
                // Dropping the future closes the connection wherever the request is.
                let _ = tokio::time::timeout(after, fut).await;
            } else {
                let r = fut.await;
                if kind == "ok" || kind == "sse" {
                    r.unwrap();
                }
            }
        });
    }
    while let Some(r) = within("the last requests", tasks.join_next()).await {
        r.unwrap();
    }
    assert!(abandoned > 0);

    d.wait_for("every lease released", |s| s.leases.is_empty() && pool_in(s, "p").queued == 0).await;
    d.assert_idle().await;
    eventually("the provider idle", || fake.current() == 0).await;
    let c = http1();
    let metrics_url = proxy.url("/metrics");
    let deadline = tokio::time::Instant::now() + slotd_test_support::TIMEOUT;
    loop {
        let m = send(&c, http::Request::get(metrics_url.as_str()).body(Default::default()).unwrap()).await.2;
        // This scrape's own connection is the only one left.
        if sample(&m, r#"slotd_proxy_in_flight{route="a"}"#) == 0.0
            && sample(&m, "slotd_proxy_client_connections") <= 1.0
        {
            let requests: f64 = m
                .lines()
                .filter(|l| l.starts_with("slotd_proxy_requests_total{") && l.contains("route=\"a\""))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            assert!(
                requests <= REQUESTS as f64 && requests >= (REQUESTS - abandoned) as f64,
                "{requests}\n{m}"
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the proxy kept state:\n{m}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Every lease slotd granted came back by a release, none by expiry.
    let m = scrape(daemon_metrics).await;
    let granted = sample(&m, r#"slotd_leases_granted_total{pool="p"}"#);
    let released: f64 = m
        .lines()
        .filter(|l| l.starts_with("slotd_leases_released_total{") && l.contains("pool=\"p\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(granted, released, "{m}");
    assert!(granted >= (REQUESTS - abandoned) as f64, "{m}");
    // A request abandoned between its grant and the provider's accept never reaches the provider.
    assert!(fake.total() as f64 <= granted, "a request reached the provider without a lease");
    assert!(fake.total() >= REQUESTS - abandoned);
}
