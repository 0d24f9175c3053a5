//! While slotd is unreachable: fail_closed answers 503 naming the daemon, fail_open forwards without a
//! lease and warns at most once a second; leases are taken again once the daemon is back.

mod support;

use std::{sync::Mutex, time::Instant};

use slotd_test_support::{Daemon, client::one_pool, http_get};
use support::{Fake, Proxy, config, http1, post, route, sample, send};

/// Everything this suite logs (the proxy at debug).
fn logs() -> &'static Mutex<Vec<u8>> {
    support::captured_logs("slotd_proxy=debug,warn")
}

/// An address where nothing listens.
async fn nobody() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fail_closed_and_fail_open_while_slotd_is_down() {
    logs();
    let fake = Fake::start().await;
    let daemon = nobody().await;
    let routes = format!(
        "{}{}",
        route("closed", &fake.url(), "p", ""),
        route("open", &fake.url(), "p", "on_daemon_down = \"fail_open\"")
    );
    let proxy = Proxy::start(&config(&daemon, &routes)).await;
    let c = http1();

    let (status, h, body) = send(&c, post(&proxy.url("/closed/v1/messages"), &[])).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(h["x-slotd-reason"], "daemon_down");
    assert!(h.contains_key("retry-after"));
    assert!(body.contains(&daemon), "the body does not name the daemon: {body}");
    assert!(body.contains("overloaded_error"), "{body}");
    assert_eq!(fake.total(), 0);

    let t0 = Instant::now();
    for _ in 0..20 {
        let (status, h, body) = send(&c, post(&proxy.url("/open/v1/messages"), &[])).await;
        assert_eq!(status, 200, "{body}");
        assert!(h.get("x-slotd-reason").is_none());
    }
    let elapsed = t0.elapsed();
    assert_eq!(fake.total(), 20);
    let text = String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
    let warnings = text.matches("forwarding without a lease").count();
    assert!(warnings >= 1, "no warning:\n{text}");
    assert!(warnings as u64 <= 1 + elapsed.as_secs(), "{warnings} warnings in {elapsed:?}:\n{text}");

    let (code, health) = http_get(proxy.addr, "/healthz").await;
    assert_eq!(code, 200);
    assert!(health.contains("\"daemon\":\"down\""), "{health}");
    let m = send(&c, http::Request::get(proxy.url("/metrics")).body(Default::default()).unwrap()).await.2;
    assert_eq!(sample(&m, r#"slotd_proxy_unleased_total{route="open"}"#), 20.0, "{m}");
    assert_eq!(sample(&m, "slotd_proxy_daemon_up"), 0.0, "{m}");
}

/// A TCP relay to the daemon that can be cut (every connection closed, the port closed) and brought
/// back on the same port: slotd going away and coming back, as the proxy sees it.
struct Relay {
    addr: std::net::SocketAddr,
    cut: Option<tokio::sync::watch::Sender<bool>>,
}

impl Relay {
    async fn start(bind: std::net::SocketAddr, target: std::net::SocketAddr) -> Relay {
        let listener = tokio::net::TcpListener::bind(bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, cut_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            loop {
                let mut stop = cut_rx.clone();
                let (mut inbound, _) = tokio::select! {
                    r = listener.accept() => r.unwrap(),
                    _ = stop.wait_for(|c| *c) => return,
                };
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = stop.wait_for(|c| *c) => {}
                    }
                });
            }
        });
        Relay { addr, cut: Some(cut) }
    }

    fn cut(&mut self) {
        let _ = self.cut.take().unwrap().send(true);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slotd_going_away_and_coming_back() {
    logs();
    let fake = Fake::start().await;
    let d = Daemon::start(&one_pool("p", 2, "")).await;
    let mut relay = Relay::start("127.0.0.1:0".parse().unwrap(), d.addr).await;
    let proxy =
        Proxy::start(&config(&format!("http://{}", relay.addr), &route("a", &fake.url(), "p", ""))).await;
    let c = http1();
    let url = proxy.url("/a/v1/messages");
    let (status, _, body) = send(&c, post(&url, &[])).await;
    assert_eq!(status, 200, "{body}");

    relay.cut();
    let health = || {
        let addr = proxy.addr;
        async move { http_get(addr, "/healthz").await.1 }
    };
    let deadline = Instant::now() + slotd_test_support::TIMEOUT;
    while !health().await.contains("down") {
        assert!(Instant::now() < deadline, "the proxy never noticed slotd was gone");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let (status, h, _) = send(&c, post(&url, &[])).await;
    assert_eq!(status, 503);
    assert_eq!(h["x-slotd-reason"], "daemon_down");

    let _back = Relay::start(relay.addr, d.addr).await;
    let deadline = Instant::now() + slotd_test_support::TIMEOUT;
    loop {
        let (status, _, _) = send(&c, post(&url, &[])).await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the proxy never used slotd again: {status}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    d.wait_for("idle", |s| s.leases.is_empty()).await;
    assert_eq!(fake.total(), 2, "only the leased requests reached the provider");
}

/// `daemon` as a list (the members of a highly available deployment): a member that is down is
/// skipped, requests are served under leases of the one that answers, and the proxy counts the
/// daemon as up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_daemon_list_skips_a_member_that_is_down() {
    logs();
    let fake = Fake::start().await;
    let d = Daemon::start(&one_pool("p", 2, "")).await;
    let down = nobody().await;
    let toml = format!(
        "listen = \"127.0.0.1:0\"\ndaemon = [\"{down}\", \"{}\"]\ndaemon_probe_interval = \"50ms\"\n{}",
        d.url(),
        route("a", &fake.url(), "p", "")
    );
    let proxy = Proxy::start(&toml).await;
    let c = http1();
    for _ in 0..3 {
        let (status, h, body) = send(&c, post(&proxy.url("/a/v1/messages"), &[])).await;
        assert_eq!(status, 200, "{body}");
        assert!(h.get("x-slotd-reason").is_none());
    }
    assert_eq!(fake.total(), 3);
    let deadline = Instant::now() + slotd_test_support::TIMEOUT;
    loop {
        let (code, health) = http_get(proxy.addr, "/healthz").await;
        assert_eq!(code, 200);
        if health.contains("\"daemon\":\"up\"") {
            break;
        }
        assert!(Instant::now() < deadline, "{health}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Every lease goes back once its answer ended (released in the background).
    loop {
        let s = d.status().await;
        if s.leases.is_empty() && s.pools.iter().all(|p| p.in_flight == 0) {
            break;
        }
        assert!(Instant::now() < deadline, "still held: {s:#?}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    proxy.stop().await;
}
