//! Provider health through the real daemon: eight agents against a failing provider (one probe at a
//! time while the breaker is open, then recovery), holds in Status and metrics, fail-fast with retry
//! info, breaker events pushed to waiters, and an operator forcing the breaker through Admin.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst},
    },
    time::Duration,
};

use slotd_client::{Client, Outcome, proto as pb};
use slotd_proto::v1::server_message::Msg;
use slotd_test_support::{
    Daemon,
    client::{pool, wait_until},
    scrape, within,
};
use tonic::Code;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A provider that answers 5xx until it is healthy, and audits the probes it sees.
#[derive(Default)]
struct Provider {
    healthy: AtomicBool,
    /// Probe calls running now, and the most ever seen at once.
    probes_now: AtomicUsize,
    probes_max: AtomicUsize,
    /// Calls made while it was failing, by whether their lease was a probe.
    sick_calls: AtomicUsize,
    sick_probes: AtomicUsize,
    ok_calls: AtomicUsize,
}

impl Provider {
    async fn call(&self, probe: bool) -> Outcome {
        if probe {
            let now = self.probes_now.fetch_add(1, SeqCst) + 1;
            self.probes_max.fetch_max(now, SeqCst);
        }
        let healthy = self.healthy.load(SeqCst);
        if !healthy {
            self.sick_calls.fetch_add(1, SeqCst);
            self.sick_probes.fetch_add(usize::from(probe), SeqCst);
        }
        tokio::time::sleep(ms(5)).await;
        if probe {
            self.probes_now.fetch_sub(1, SeqCst);
        }
        if healthy {
            self.ok_calls.fetch_add(1, SeqCst);
            Outcome::Ok
        } else {
            Outcome::Error
        }
    }
}

fn breaker_state(p: &pb::PoolStatus) -> pb::BreakerState {
    p.breaker.as_ref().map(|b| b.state()).unwrap_or_default()
}

const EIGHT: &str = r#"
[pools.llm]
max_concurrent = 8
[pools.llm.health.breaker]
enabled = true
failures = 3
window = "30s"
open_base = "40ms"
open_max = "160ms"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_agents_against_a_failing_provider_probe_one_at_a_time_then_recover() {
    let d = Daemon::start(EIGHT).await;
    let provider = Arc::new(Provider::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut agents = Vec::new();
    for _ in 0..8 {
        let client = d.connect().await;
        let (provider, stop) = (provider.clone(), stop.clone());
        agents.push(tokio::spawn(async move {
            let mut ok = 0;
            while !stop.load(SeqCst) {
                let lease = client.acquire("llm").await.expect("acquire");
                let outcome = provider.call(lease.is_probe()).await;
                ok += usize::from(outcome == Outcome::Ok);
                lease.release(outcome).await.expect("release");
            }
            client.close().await.expect("close");
            ok
        }));
    }
    let watcher = d.connect().await;
    // The breaker opens, and two probes fail (it re-opened for twice, then four times as long).
    wait_until(&watcher, "the breaker re-opened after two failed probes", |st| {
        pool(st, "llm").breaker.as_ref().is_some_and(|b| b.opens >= 3)
    })
    .await;
    let st = watcher.status(Some("llm")).await.unwrap();
    assert_ne!(breaker_state(pool(&st, "llm")), pb::BreakerState::Closed, "{st:#?}");
    provider.healthy.store(true, SeqCst);

    // The next probe succeeds: closed, the backoff forgotten, and every agent works again.
    let before = provider.ok_calls.load(SeqCst);
    wait_until(&watcher, "the breaker closed", |st| {
        pool(st, "llm")
            .breaker
            .as_ref()
            .is_some_and(|b| b.state() == pb::BreakerState::Closed && b.opens == 0)
    })
    .await;
    within("calls flow again", async {
        while provider.ok_calls.load(SeqCst) < before + 40 {
            tokio::time::sleep(ms(5)).await;
        }
    })
    .await;
    stop.store(true, SeqCst);
    let mut oks = Vec::new();
    for a in agents {
        oks.push(within("agent ends", a).await.expect("agent task"));
    }

    assert_eq!(provider.probes_max.load(SeqCst), 1, "never two probes at once");
    let (sick, probes) = (provider.sick_calls.load(SeqCst), provider.sick_probes.load(SeqCst));
    assert!(probes >= 2, "the failing provider saw {probes} probes");
    // Before the breaker opened: the first eight leases plus at most the two granted after the first two
    // failures; after it: probes only.
    assert!(sick - probes <= 8 + 2, "{sick} calls hit the failing provider, {probes} of them probes");
    assert!(oks.iter().filter(|n| **n > 0).count() >= 2, "work resumed across agents: {oks:?}");
    d.assert_idle().await;
}

#[tokio::test]
async fn a_failure_hold_shows_in_status_and_metrics_and_then_frees_the_slot() {
    let toml = "[pools.p]\nmax_concurrent = 1\n[pools.p.health]\nfailure_hold = \"200ms\"\n";
    let (d, metrics) = Daemon::start_with_metrics(toml).await;
    let client = d.connect().await;
    let lease = client.acquire("p").await.unwrap();
    lease.release(Outcome::Error).await.unwrap();
    let p = d.pool("p").await;
    assert_eq!((p.in_flight, p.held), (0, 1), "{p:#?}");
    assert!(p.held_until.is_some());
    let text = scrape(metrics).await;
    assert!(text.contains("slotd_holds_total{kind=\"failure_hold\",pool=\"p\"} 1"), "{text}");
    assert!(text.contains("slotd_held{pool=\"p\"} 1"), "{text}");
    // The held slot counts like a lease: a zero-wait request is refused while it lasts.
    let refused = client.acquire("p").max_wait(Duration::ZERO).await;
    assert!(refused.is_err(), "granted during the hold");
    // Then it is free again.
    let lease = within("the hold ends", client.acquire("p")).await.unwrap();
    assert_eq!(d.pool("p").await.held, 0);
    lease.release(Outcome::Ok).await.unwrap();
    client.close().await.unwrap();
}

const FAIL_FAST: &str = r#"
[pools.p]
max_concurrent = 2
[pools.p.health.breaker]
enabled = true
failures = 1
open_base = "10s"
open_max = "10s"
when_open = "fail_fast"
"#;

#[tokio::test]
async fn a_fail_fast_breaker_refuses_with_unavailable_and_retry_info() {
    let d = Daemon::start(FAIL_FAST).await;
    let mut a = d.agent("a").await;
    let g = a.acquire("r1", "p").await;
    a.release_with(&g.lease_id, pb::Outcome::Error, None).await;
    a.expect_released(&g.lease_id).await;
    a.request(a.req("r2", "p")).await;
    let r = a.expect_rejected("r2", Code::Unavailable).await;
    assert!(r.message.contains("circuit breaker"), "{r:?}");
    let retry = Duration::try_from(r.retry_after.expect("retry info")).unwrap();
    assert!(retry > Duration::from_secs(9) && retry <= Duration::from_secs(10), "{retry:?}");
    let b = d.pool("p").await.breaker.unwrap();
    assert_eq!((b.state(), b.opens, b.enabled), (pb::BreakerState::Open, 1, true));
    assert!(b.open_until.is_some());
}

#[tokio::test]
async fn an_operator_forces_the_breaker_and_waiters_hear_of_it() {
    let d = Daemon::start("[pools.p]\nmax_concurrent = 1\n").await;
    let mut admin = d.admin().await;
    let force = |to: pb::BreakerForce| pb::BreakerForceRequest {
        pool: "p".into(),
        to: to as i32,
        reason: "provider maintenance".into(),
    };
    let open = admin.force_breaker(force(pb::BreakerForce::Open)).await.unwrap().into_inner();
    let s = open.status.unwrap();
    assert_eq!((s.state(), s.forced, s.open_until), (pb::BreakerState::Open, true, None));

    // A request waits (the default), is told the breaker is open, and is told again when it closes.
    let mut a = d.agent("a").await;
    a.request(a.req("r", "p")).await;
    a.expect_queued("r").await;
    match a.next().await {
        Msg::Breaker(b) => {
            assert_eq!((b.pool.as_str(), b.status.unwrap().state()), ("p", pb::BreakerState::Open))
        }
        other => panic!("expected BreakerChanged (open), got {other:?}"),
    }
    a.expect_silence(ms(50)).await;
    let closed = admin.force_breaker(force(pb::BreakerForce::Closed)).await.unwrap().into_inner();
    assert_eq!(closed.status.unwrap().state(), pb::BreakerState::Closed);
    match a.next().await {
        Msg::Breaker(b) => {
            assert_eq!(b.pool, "p");
            assert_eq!(b.status.as_ref().unwrap().state(), pb::BreakerState::Closed);
            assert!(b.reason.contains("provider maintenance"), "{b:?}");
        }
        other => panic!("expected BreakerChanged, got {other:?}"),
    }
    a.expect_granted("r").await;
    // Bad input changes nothing.
    let bad = admin.force_breaker(force(pb::BreakerForce::Unspecified)).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    let unknown = admin
        .force_breaker(pb::BreakerForceRequest {
            pool: "nope".into(),
            to: pb::BreakerForce::Open as i32,
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
}

#[tokio::test]
async fn report_outcome_outside_a_lease_applies_the_class() {
    let d = Daemon::start("[pools.p]\nmax_concurrent = 1\nmax_agent_retry_after = \"1h\"\n").await;
    let client: Client = d.connect().await;
    let until =
        client.report_outcome("p", Outcome::QuotaExhausted { retry_after: None }, "billing").await.unwrap();
    assert!(until.is_some());
    let p = d.pool("p").await;
    assert!(p.pause_reason.contains("quota exhausted (402)"), "{p:#?}");
    // The default quota pause is an hour.
    let left = p.paused_until.map(|t| std::time::SystemTime::try_from(t).unwrap());
    let left = left.unwrap().duration_since(std::time::SystemTime::now()).unwrap();
    assert!(left > Duration::from_secs(3500), "{left:?}");
    let e = client.report_outcome("p", Outcome::Error, "").await.unwrap_err();
    assert!(e.to_string().contains("cannot be reported outside a lease"), "{e}");
    client.close().await.unwrap();
}

#[tokio::test]
async fn upsert_pool_sets_health_settings_and_refuses_bad_ones() {
    let d = Daemon::start("[pools.p]\nmax_concurrent = 1\n").await;
    let mut admin = d.admin().await;
    let dur = |ms: u64| Some(prost_types::Duration::try_from(Duration::from_millis(ms)).unwrap());
    let spec = pb::PoolSpec {
        name: "p".into(),
        failure_hold: dur(150),
        breaker_enabled: Some(true),
        breaker_failures: Some(1),
        breaker_open_base: dur(10_000),
        breaker_open_max: dur(10_000),
        breaker_when_open: Some("fail_fast".into()),
        ..Default::default()
    };
    admin.upsert_pool(pb::UpsertPoolRequest { pool: Some(spec) }).await.unwrap();
    let mut a = d.agent("a").await;
    let g = a.acquire("r1", "p").await;
    a.release_with(&g.lease_id, pb::Outcome::Error, None).await;
    a.expect_released(&g.lease_id).await;
    let p = d.pool("p").await;
    assert_eq!(p.held, 1, "the failure hold applies: {p:#?}");
    assert_eq!(p.breaker.unwrap().state(), pb::BreakerState::Open);
    a.request(a.req("r2", "p")).await;
    a.expect_rejected("r2", Code::Unavailable).await;

    for bad in [
        pb::PoolSpec { name: "p".into(), breaker_when_open: Some("later".into()), ..Default::default() },
        pb::PoolSpec { name: "p".into(), breaker_failure_percent: Some(101), ..Default::default() },
        pb::PoolSpec { name: "p".into(), failure_hold: dur(3_600_001), ..Default::default() },
    ] {
        let e = admin.upsert_pool(pb::UpsertPoolRequest { pool: Some(bad.clone()) }).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}: {e:?}");
    }
}

/// The README's "Provider health" config example is a valid configuration, with the settings it names.
#[tokio::test]
async fn the_readme_example_config_is_valid() {
    let readme = include_str!("../README.md");
    let section = &readme[readme.find("## Provider health").expect("the section")..];
    let toml = section.split("```toml\n").nth(1).and_then(|s| s.split("```").next()).expect("a toml block");
    let d = Daemon::start(toml).await;
    let st = d.status().await;
    let anthropic = st.pools.iter().find(|p| p.name == "anthropic").expect("anthropic");
    assert!(anthropic.breaker.as_ref().is_some_and(|b| b.enabled), "{anthropic:#?}");
    assert_eq!(d.pool("key-a").await.parent, "anthropic");
}
