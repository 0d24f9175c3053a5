//! The Prometheus endpoint: after grants, releases, a 429, rejections, an expiry and a dropped stream,
//! a scrape over loopback parses as Prometheus text (strictly, line by line) and every counter and
//! gauge has the value those steps imply.

use std::{collections::BTreeMap, time::Duration};

use slotd_proto::v1 as pb;
use slotd_test_support::{Daemon, http_get, ms};
use tonic::Code;

const CONFIG: &str = r#"
[pools.p]
max_concurrent = 1
max_queue_depth = 1
adaptive = false

[pools.q]
max_concurrent = 3
adaptive = true
"#;

/// One sample: metric name, sorted labels, value.
type Key = (String, BTreeMap<String, String>);

/// A scraped exposition: samples by (name, labels), and each metric family's TYPE.
struct Scrape {
    samples: BTreeMap<Key, f64>,
    types: BTreeMap<String, String>,
}

impl Scrape {
    #[track_caller]
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let key = (name.to_owned(), labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect());
        match self.samples.get(&key) {
            Some(v) => *v,
            None => {
                panic!("no sample {name}{labels:?}; have: {:#?}", self.samples.keys().collect::<Vec<_>>())
            }
        }
    }
}

/// Parses the text format strictly: every line is `# HELP`, `# TYPE`, or `name{labels} value`, and
/// every sample belongs to a family with a TYPE.
#[track_caller]
fn parse(text: &str) -> Scrape {
    let mut samples = BTreeMap::new();
    let mut types = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let bad = |why: &str| -> ! { fail(n + 1, line, why) };
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("HELP"), Some(name), Some(_)) if valid_name(name) => {}
                (Some("TYPE"), Some(name), Some(t))
                    if valid_name(name) && ["counter", "gauge", "histogram"].contains(&t) =>
                {
                    types.insert(name.to_owned(), t.to_owned());
                }
                _ => bad("malformed comment"),
            }
            continue;
        }
        let (name_labels, value) = line.rsplit_once(' ').unwrap_or_else(|| bad("no value"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| bad("value is not a number")),
        };
        let (name, labels) = match name_labels.split_once('{') {
            None => (name_labels, BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').unwrap_or_else(|| bad("unclosed labels"));
                (name, parse_labels(body).unwrap_or_else(|e| bad(&e)))
            }
        };
        if !valid_name(name) {
            bad("invalid metric name");
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| types.get(*f).is_some_and(|t| t == "histogram")))
            .unwrap_or(name);
        if !types.contains_key(family) {
            bad("sample without a TYPE");
        }
        if samples.insert((name.to_owned(), labels), value).is_some() {
            bad("duplicate sample");
        }
    }
    Scrape { samples, types }
}

#[track_caller]
fn fail(n: usize, line: &str, why: &str) -> ! {
    panic!("line {n}: {why}: {line:?}")
}

fn valid_name(n: &str) -> bool {
    let mut chars = n.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_labels(mut s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    while !s.is_empty() {
        let (k, rest) = s.split_once("=\"").ok_or("label without =\"")?;
        if !valid_name(k) {
            return Err(format!("invalid label name {k:?}"));
        }
        let mut v = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next().ok_or("unterminated label value")? {
                (i, '"') => break i,
                (_, '\\') => match chars.next().ok_or("dangling escape")?.1 {
                    'n' => v.push('\n'),
                    c @ ('\\' | '"') => v.push(c),
                    c => return Err(format!("bad escape \\{c}")),
                },
                (_, c) => v.push(c),
            }
        };
        out.insert(k.to_owned(), v);
        s = &rest[end + 1..];
        s = s.strip_prefix(',').unwrap_or(s);
    }
    Ok(out)
}

#[tokio::test]
async fn a_scrape_parses_and_counts_what_happened() {
    let (d, metrics) = Daemon::start_with_metrics(CONFIG).await;

    // p: a grant at once, one that queues, one refused by the full queue.
    let mut a = d.agent("a").await;
    let mut b = d.agent("b").await;
    let mut c = d.agent("c").await;
    let first = a.acquire("a1", "p").await;
    b.request(b.req("b1", "p")).await;
    b.expect_queued("b1").await;
    c.request(c.req("c1", "p")).await;
    c.expect_rejected("c1", Code::ResourceExhausted).await;
    // An unknown pool is counted, but never under the client's name for it.
    c.request(c.req("c2", "no-such-pool")).await;
    c.expect_rejected("c2", Code::NotFound).await;

    // The queued request waits a little, then gets the released slot.
    tokio::time::sleep(Duration::from_millis(30)).await;
    a.release_ok(&first.lease_id).await;
    let second = b.expect_granted("b1").await;
    // A 429 on release pauses p (briefly).
    b.release_with(&second.lease_id, pb::Outcome::RateLimited, Some(Duration::from_millis(20))).await;
    b.expect_released(&second.lease_id).await;

    // q: a lease that is never heartbeated expires; one whose stream is dropped is released; a
    // ReportRateLimit pauses q and, q being adaptive, lowers its effective limit to 2.
    let short = a.acquire_with(pb::LeaseRequest { ttl: Some(ms(40)), ..a.req("a2", "q") }).await;
    a.expect_expired(&short.lease_id).await;
    let mut e = d.agent("e").await;
    e.acquire("e1", "q").await;
    drop(e);
    d.wait_for("q to be idle", |s| slotd_test_support::pool_in(s, "q").in_flight == 0).await;
    // One lease held on q at scrape time.
    let held = c.acquire("c3", "q").await;
    let mut client = d.client();
    client
        .report_rate_limit(pb::ReportRateLimitRequest {
            pool: "q".into(),
            retry_after: Some(ms(60_000)),
            reason: "test".into(),
            ..Default::default()
        })
        .await
        .expect("ReportRateLimit");

    let (code, body) = http_get(metrics, "/metrics").await;
    assert_eq!(code, 200, "{body}");
    let s = parse(&body);
    let p = [("pool", "p")];
    let q = [("pool", "q")];

    assert_eq!(s.get("slotd_leases_granted_total", &p), 2.0);
    assert_eq!(s.get("slotd_leases_granted_total", &q), 3.0);
    assert_eq!(s.get("slotd_leases_released_total", &[("pool", "p"), ("outcome", "ok")]), 1.0);
    assert_eq!(s.get("slotd_leases_released_total", &[("pool", "p"), ("outcome", "rate_limited")]), 1.0);
    assert_eq!(s.get("slotd_leases_released_total", &[("pool", "q"), ("outcome", "stream_closed")]), 1.0);
    assert_eq!(s.get("slotd_leases_released_total", &[("pool", "q"), ("outcome", "ok")]), 0.0);
    assert_eq!(s.get("slotd_leases_expired_total", &[("pool", "q"), ("reason", "ttl")]), 1.0);
    assert_eq!(s.get("slotd_leases_expired_total", &[("pool", "p"), ("reason", "ttl")]), 0.0);
    assert_eq!(s.get("slotd_rejections_total", &[("pool", "p"), ("reason", "queue_full")]), 1.0);
    assert_eq!(s.get("slotd_rejections_total", &[("pool", ""), ("reason", "unknown_pool")]), 1.0);
    assert!(
        !s.samples.keys().any(|(_, l)| l.values().any(|v| v == "no-such-pool")),
        "a client-supplied pool name became a label value"
    );
    assert_eq!(s.get("slotd_pauses_total", &p), 1.0);
    assert_eq!(s.get("slotd_pauses_total", &q), 1.0);

    // Queue wait: two grants on p, one of them after waiting at least 30ms.
    assert_eq!(s.types["slotd_queue_wait_seconds"], "histogram");
    assert_eq!(s.get("slotd_queue_wait_seconds_count", &p), 2.0);
    assert!(s.get("slotd_queue_wait_seconds_sum", &p) >= 0.03);
    assert_eq!(s.get("slotd_queue_wait_seconds_bucket", &[("pool", "p"), ("le", "0.005")]), 1.0);
    assert_eq!(s.get("slotd_queue_wait_seconds_bucket", &[("pool", "p"), ("le", "+Inf")]), 2.0);

    // Gauges, from a snapshot at scrape time.
    assert_eq!(s.get("slotd_in_flight", &p), 0.0);
    assert_eq!(s.get("slotd_in_flight", &q), 1.0);
    assert_eq!(s.get("slotd_queued", &p), 0.0);
    assert_eq!(s.get("slotd_limit", &q), 3.0);
    assert_eq!(s.get("slotd_effective_limit", &q), 2.0);
    assert_eq!(s.get("slotd_effective_limit", &p), 1.0);
    assert_eq!(s.get("slotd_paused", &q), 1.0);
    assert_eq!(s.get("slotd_paused", &p), 0.0);
    for (name, t) in [("slotd_leases_granted_total", "counter"), ("slotd_in_flight", "gauge")] {
        assert_eq!(s.types[name], t);
    }

    // The endpoint serves only /metrics.
    assert_eq!(http_get(metrics, "/").await.0, 404);

    c.expect_paused("q").await;
    c.release_ok(&held.lease_id).await;
    d.stop().await;
}

#[tokio::test]
async fn metrics_are_off_unless_configured() {
    assert_eq!(slotd::config::Config::embedded().metrics_listen, None);
    let cfg = slotd::config::Config::from_toml_str("metrics_listen = \"127.0.0.1:9464\"").unwrap();
    assert_eq!(cfg.metrics_listen, Some("127.0.0.1:9464".parse().unwrap()));
}
