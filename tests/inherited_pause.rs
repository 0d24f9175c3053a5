//! A pool blocked by an ancestor's pause says so: Status names the ancestor, until when and why; the
//! metrics endpoint exports `slotd_pool_blocked_by_ancestor`; Watch snapshots carry it too.

use std::time::Duration;

use slotd_proto::v1::{self as pb, watch_event::Event};
use slotd_test_support::{Daemon, diff_ms, dur, scrape, within};

const CONFIG: &str = r#"
[pools.global]
max_concurrent = 4

[pools.anthropic]
max_concurrent = 2
parent = "global"

[pools.opus]
max_concurrent = 1
parent = "anthropic"

[pools.openai]
max_concurrent = 1
"#;

#[tokio::test]
async fn a_pool_blocked_by_its_ancestors_pause_shows_it_in_status_metrics_and_watch() {
    let (d, metrics) = Daemon::start_with_metrics(CONFIG).await;
    for pool in ["global", "anthropic", "opus", "openai"] {
        assert_eq!(d.pool(pool).await.blocked_by, None, "{pool} is not blocked before any pause");
    }
    let mut admin = d.admin().await;
    let req = pb::PausePoolRequest {
        pool: "global".into(),
        duration: Some(dur(Duration::from_secs(60))),
        reason: "provider incident".into(),
    };
    let until = admin.pause_pool(req).await.expect("pause global").into_inner().paused_until.expect("until");

    // An agent on the grandchild waits: the pool is really blocked.
    let mut a = d.agent("a").await;
    a.request(a.req("r1", "opus")).await;
    a.expect_queued("r1").await;
    a.expect_paused("global").await;

    for pool in ["anthropic", "opus"] {
        let p = d.pool(pool).await;
        assert_eq!(p.paused_until, None, "{pool} is not paused itself");
        let b = p.blocked_by.clone().unwrap_or_else(|| panic!("{pool} shows the inherited pause: {p:#?}"));
        assert_eq!(b.pool, "global", "{pool}");
        assert!(diff_ms(&b.until.expect("until"), &until).abs() <= 1, "{pool}: {b:?} vs {until:?}");
        assert!(b.reason.contains("provider incident"), "{pool}: {b:?}");
    }
    let global = d.pool("global").await;
    assert!(global.paused_until.is_some() && global.blocked_by.is_none(), "{global:#?}");
    assert_eq!(d.pool("openai").await.blocked_by, None, "another tree is not blocked");

    let text = scrape(metrics).await;
    assert_eq!(gauge(&text, "slotd_pool_blocked_by_ancestor", "anthropic"), Some(1), "{text}");
    assert_eq!(gauge(&text, "slotd_pool_blocked_by_ancestor", "opus"), Some(1), "{text}");
    assert_eq!(gauge(&text, "slotd_pool_blocked_by_ancestor", "global"), Some(0), "{text}");
    assert_eq!(gauge(&text, "slotd_pool_blocked_by_ancestor", "openai"), Some(0), "{text}");
    assert_eq!(gauge(&text, "slotd_paused", "opus"), Some(0), "{text}");

    let req = pb::WatchRequest { pool: "opus".into(), snapshot_interval: Some(Default::default()) };
    let mut watch = within("watch", admin.watch(req)).await.expect("watch").into_inner();
    let first = within("snapshot", watch.message()).await.expect("event").expect("a first event");
    let Some(Event::Snapshot(s)) = first.event else { panic!("a snapshot first: {first:?}") };
    assert_eq!(s.pools[0].blocked_by.as_ref().map(|b| b.pool.as_str()), Some("global"), "{s:#?}");

    // The pause ends: nothing is blocked any more, and the waiter gets its slot.
    admin.resume_pool(pb::ResumePoolRequest { pool: "global".into() }).await.expect("resume global");
    a.expect_resumed("global").await;
    a.expect_granted("r1").await;
    for pool in ["anthropic", "opus"] {
        assert_eq!(d.pool(pool).await.blocked_by, None, "{pool}");
    }
    let text = scrape(metrics).await;
    assert_eq!(gauge(&text, "slotd_pool_blocked_by_ancestor", "opus"), Some(0), "{text}");
}

/// The value of `name{pool="POOL"}`, if exported.
fn gauge(text: &str, name: &str, pool: &str) -> Option<i64> {
    let prefix = format!("{name}{{pool=\"{pool}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok())
}
