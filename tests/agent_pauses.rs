//! Pauses caused by agents, through the real daemon: the answers about one pause agree to the
//! nanosecond, and an agent's 429 report pauses a pool for at most its `max_agent_retry_after`, while
//! an operator's pause is not capped.

use std::{
    path::PathBuf,
    time::{Duration, SystemTime},
};

use slotd_proto::v1::{self as pb};
use slotd_test_support::{Daemon, dur, pool_in, system_time};
use tonic::Code;

/// `global` over `p`; `p` lets agents pause it for 300 ms at most (and keeps its limit after a 429),
/// `global` keeps the default.
const TREE: &str = r#"
[pools.global]
max_concurrent = 4

[pools.p]
parent = "global"
max_concurrent = 2
max_agent_retry_after = "300ms"
adaptive = false
"#;

const HOUR: Duration = Duration::from_secs(3600);

fn report(pool: &str, retry_after: Duration) -> pb::ReportRateLimitRequest {
    pb::ReportRateLimitRequest {
        pool: pool.into(),
        retry_after: Some(dur(retry_after)),
        reason: "429".into(),
        ..Default::default()
    }
}

fn temp_state_path(tag: &str) -> PathBuf {
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos();
    std::env::temp_dir().join(format!("slotd-e2e-{tag}-{}-{nanos}.toml", std::process::id()))
}

/// Regression: two ReportRateLimit answers for one pause returned `paused_until` values up to 20 ns
/// apart, the later one sometimes earlier; the proto promises "never earlier". Every answer about
/// one pause (reports, Status, the Paused event) now names the same instant.
#[tokio::test]
async fn every_answer_about_one_pause_names_the_same_instant() {
    let d = Daemon::start("[pools.p]\nmax_concurrent = 2").await;
    let mut c = d.client();
    let first = c.report_rate_limit(report("p", Duration::from_secs(2))).await.unwrap().into_inner();
    let until = first.paused_until.expect("paused_until");
    for _ in 0..50 {
        let again = c.report_rate_limit(report("p", Duration::from_millis(500))).await.unwrap().into_inner();
        assert_eq!(again.paused_until, Some(until), "a shorter report moved the pause");
        assert_eq!(d.pool("p").await.paused_until, Some(until));
    }
    // A longer report extends it; a waiter is told the very instant the report answered.
    let mut w = d.agent("w").await;
    w.request(w.req("r", "p")).await;
    w.expect_queued("r").await;
    assert_eq!(w.expect_paused("p").await.until, Some(until));
    let later = c.report_rate_limit(report("p", Duration::from_secs(3))).await.unwrap().into_inner();
    let later = later.paused_until.expect("paused_until");
    assert!(system_time(&later) > system_time(&until), "{until:?} -> {later:?}");
    assert_eq!(w.expect_paused("p").await.until, Some(later));
    assert_eq!(d.pool("p").await.paused_until, Some(later));
    d.stop().await;
}

/// Regression: any agent could pause any pool, `global` included, for 24 h with one ReportRateLimit.
/// An agent's report (or rate-limited release) now pauses a pool for at most its
/// `max_agent_retry_after` (default 5 min); an operator's PausePool is not capped.
#[tokio::test]
async fn an_agents_429_pauses_for_at_most_max_agent_retry_after() {
    let d = Daemon::start(TREE).await;
    let s = d.status().await;
    let cap = |name: &str| pool_in(&s, name).max_agent_retry_after.map(|d| Duration::try_from(d).unwrap());
    assert_eq!(cap("p"), Some(Duration::from_millis(300)));
    assert_eq!(cap("global"), Some(Duration::from_secs(300)), "the documented default");
    let mut c = d.client();
    let mut admin = d.admin().await;

    // A day on `global` becomes five minutes.
    let before = SystemTime::now();
    let r = c.report_rate_limit(report("global", 24 * HOUR)).await.unwrap().into_inner();
    let until = system_time(&r.paused_until.expect("paused_until"));
    let after = SystemTime::now();
    assert!(until >= before + Duration::from_secs(299), "{until:?}");
    assert!(until <= after + Duration::from_secs(301), "paused {:?} ahead", until.duration_since(after));
    admin.resume_pool(pb::ResumePoolRequest { pool: "global".into() }).await.unwrap();

    // An hour on `p`, reported by a release, becomes 300 ms: then the waiter is granted.
    let mut a = d.agent("a").await;
    let g = a.acquire("r", "p").await;
    let mut w = d.agent("w").await;
    let g2 = w.acquire("w1", "p").await;
    w.request(w.req("w2", "p")).await;
    w.expect_queued("w2").await;
    a.release_with(&g.lease_id, pb::Outcome::RateLimited, Some(HOUR)).await;
    a.expect_released(&g.lease_id).await;
    let paused = w.expect_paused("p").await;
    let until = system_time(paused.until.as_ref().unwrap());
    assert!(until <= SystemTime::now() + Duration::from_millis(300), "{paused:?}");
    w.expect_resumed("p").await;
    let g3 = w.expect_granted("w2").await;

    // An operator may pause for an hour.
    let before = SystemTime::now();
    let op =
        pb::PausePoolRequest { pool: "p".into(), duration: Some(dur(HOUR)), reason: "maintenance".into() };
    admin.pause_pool(op).await.unwrap();
    let until = system_time(&d.pool("p").await.paused_until.expect("paused"));
    assert!(until >= before + HOUR - Duration::from_secs(1), "{until:?}");
    admin.resume_pool(pb::ResumePoolRequest { pool: "p".into() }).await.unwrap();
    assert_eq!(w.expect_paused("p").await.reason, "paused by an operator: maintenance");
    w.expect_resumed("p").await;

    w.release_ok(&g2.lease_id).await;
    w.release_ok(&g3.lease_id).await;
    d.assert_idle().await;
    d.stop().await;
}

/// `max_agent_retry_after` is an Admin setting like the others: bounded (at most 24 h), shown in
/// Status, and kept in the state file across a restart.
#[tokio::test]
async fn max_agent_retry_after_is_set_by_admin_bounded_and_persisted() {
    let path = temp_state_path("agent-cap");
    let toml = format!("state_file = {:?}\n{TREE}", path.display().to_string());
    let d = Daemon::start(&toml).await;
    let mut admin = d.admin().await;
    let upsert = |cap: Duration| pb::UpsertPoolRequest {
        pool: Some(pb::PoolSpec {
            name: "global".into(),
            max_agent_retry_after: Some(dur(cap)),
            ..Default::default()
        }),
    };
    let e = admin.upsert_pool(upsert(25 * HOUR)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("max_agent_retry_after"), "{e:?}");
    let r = admin.upsert_pool(upsert(Duration::from_secs(7))).await.unwrap().into_inner();
    assert_eq!(r.pool.unwrap().max_agent_retry_after, Some(dur(Duration::from_secs(7))));
    d.stop().await;

    let d = Daemon::start(&toml).await;
    let g = d.pool("global").await;
    assert_eq!(g.max_agent_retry_after, Some(dur(Duration::from_secs(7))));
    let mut c = d.client();
    let r = c.report_rate_limit(report("global", HOUR)).await.unwrap().into_inner();
    let until = system_time(&r.paused_until.expect("paused_until"));
    assert!(until <= SystemTime::now() + Duration::from_secs(7), "{until:?}");
    d.stop().await;
    std::fs::remove_file(&path).unwrap();
}
