//! Agent identity through the proxy: priority and turn start from headers decide the grant order,
//! credentials choose their pool by fingerprint, `x-slotd-pool` only where allowed, and the provider
//! keys never appear in the proxy's logs.

mod support;

use std::{
    sync::Mutex,
    time::{Duration, SystemTime},
};

use http_body_util::BodyExt;
use slotd_proxy::fingerprint::Fingerprinter;
use slotd_test_support::{Daemon, client::one_pool, pool_in, within};
use support::{Fake, Proxy, config, http1, post, route, send};

/// Every log line the proxy wrote in this test binary.
/// Everything this suite logs (the proxy and the client, at every level).
fn logs() -> &'static Mutex<Vec<u8>> {
    support::captured_logs("slotd_proxy=trace,slotd_client=trace,info")
}

fn captured() -> String {
    String::from_utf8_lossy(&logs().lock().unwrap()).into_owned()
}

const LONG: [(&str, &str); 3] = [("x-fake", "sse"), ("x-fake-events", "1000"), ("x-fake-interval-ms", "50")];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn priority_and_turn_start_headers_decide_the_grant_order() {
    logs();
    let fake = Fake::start().await;
    let d = Daemon::start(&one_pool("p", 1, "")).await;
    let proxy = Proxy::start(&config(&d.url(), &route("a", &fake.url(), "p", ""))).await;
    let url = proxy.url("/a/v1/messages");
    let holder = within("head", http1().request(post(&url, &LONG))).await.unwrap();
    // One priority level is worth 30 s of turn age in slotd's order: a turn one minute older beats
    // one level, not three.
    let old_turn = (SystemTime::now() - Duration::from_secs(60))
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        .to_string();
    let new_turn = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
    // Queued one by one so that arrival order is the opposite of the expected grant order.
    let waiters = [
        ("new-turn", vec![("x-slotd-started-at", new_turn.clone())]),
        ("old-turn", vec![("x-slotd-started-at", old_turn.clone())]),
        ("urgent", vec![("x-slotd-priority", "8".to_owned()), ("x-slotd-started-at", new_turn.clone())]),
        ("background", vec![("x-slotd-priority", "1".to_owned())]),
    ];
    let mut tasks = Vec::new();
    for (i, (agent, hs)) in waiters.into_iter().enumerate() {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut h: Vec<(&str, &str)> = hs.iter().map(|(k, v)| (*k, v.as_str())).collect();
            h.push(("x-agent", agent));
            send(&http1(), post(&url, &h)).await
        }));
        d.wait_for("the waiter queued", |s| pool_in(s, "p").queued as usize == i + 1).await;
    }
    drop(holder);
    for t in tasks {
        let (status, _, body) = within("an answer", t).await.unwrap();
        assert_eq!(status, 200, "{body}");
    }
    let order = fake.seen.agents.lock().unwrap().clone();
    assert_eq!(order, ["urgent", "old-turn", "new-turn", "background"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn credentials_choose_their_pool_and_never_reach_the_logs() {
    logs();
    let fake = Fake::start().await;
    let d = Daemon::start("[pools.team-a]\nmax_concurrent = 2\n[pools.team-b]\nmax_concurrent = 2\n[pools.batch]\nmax_concurrent = 2\n")
        .await;
    const KEY: &str = "fingerprint-key-for-tests-0001";
    let (key_a, key_b, key_c) =
        ("sk-ant-api03-AAAA-secret-a", "sk-ant-api03-BBBB-secret-b", "sk-unknown-CCCC-secret");
    let f = Fingerprinter::new(KEY.as_bytes());
    let toml = config(
        &d.url(),
        &format!(
            "fingerprint_key = \"{KEY}\"\n[routes.a]\nprefix = \"/a\"\nupstream = \"{}\"\ndialect = \"anthropic\"\n\
             allowed_pools = [\"batch\"]\n[routes.a.credential_pools]\n\"{}\" = \"team-a\"\n\"{}\" = \"team-b\"\n",
            fake.url(),
            f.fingerprint(key_a.as_bytes()),
            f.fingerprint(key_b.as_bytes()),
        ),
    );
    let proxy = Proxy::start(&toml).await;
    let url = proxy.url("/a/v1/messages");
    let c = http1();

    // x-api-key (Anthropic) and Authorization: Bearer (OpenAI) are both fingerprinted.
    let bearer_b = format!("Bearer {key_b}");
    let mut held = Vec::new();
    for (header, value, pool) in
        [("x-api-key", key_a, "team-a"), ("authorization", bearer_b.as_str(), "team-b")]
    {
        let mut h = LONG.to_vec();
        h.push((header, value));
        let resp = within("head", c.request(post(&url, &h))).await.unwrap();
        assert_eq!(resp.status(), 200);
        held.push(resp);
        d.wait_for("the lease on the credential's pool", |s| pool_in(s, pool).in_flight == 1).await;
    }
    // x-slotd-pool picks an allowed pool over the credential's.
    let (status, _, body) = send(&c, post(&url, &[("x-api-key", key_a), ("x-slotd-pool", "batch")])).await;
    assert_eq!(status, 200, "{body}");
    // No pool for an unknown key on a route without a fallback pool: refused, marked.
    let (status, h, body) = send(&c, post(&url, &[("x-api-key", key_c)])).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(h["x-slotd-reason"], "unknown_credential");
    assert!(!body.contains(key_c), "{body}");
    drop(held);
    d.wait_for("idle", |s| s.leases.is_empty()).await;

    // A whole SSE answer: its usage is read and logged with the release.
    let mut h = vec![("x-fake", "sse"), ("x-fake-events", "2"), ("x-fake-interval-ms", "5")];
    h.push(("x-api-key", key_a));
    let resp = within("head", c.request(post(&url, &h))).await.unwrap();
    within("the body", resp.into_body().collect()).await.unwrap();
    d.wait_for("idle", |s| s.leases.is_empty()).await;

    let logs = captured();
    assert!(logs.contains("attempt ended"), "nothing was logged:\n{logs}");
    assert!(logs.contains("output_tokens=42"), "usage not read:\n{logs}");
    for secret in [key_a, key_b, key_c, "secret", KEY] {
        assert!(!logs.contains(secret), "{secret:?} appears in the logs:\n{logs}");
    }
    let metrics =
        send(&c, http::Request::get(proxy.url("/metrics")).body(Default::default()).unwrap()).await.2;
    assert!(!metrics.contains("secret"), "{metrics}");
}
