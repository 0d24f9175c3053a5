//! End-to-end: the slotd.v1.Admin service against the real daemon — every operation, the Watch
//! stream, persistence across a restart, and bad input.

use std::{panic::Location, path::PathBuf, time::Duration};

use slotd_proto::v1::{self as pb, admin_client::AdminClient, server_message::Msg, watch_event::Event as W};
use slotd_test_support::*;
use tonic::{Code, Streaming, transport::Channel};

const ONE_POOL: &str = "[pools.p]\nmax_concurrent = 1\n";

fn spec(name: &str, max_concurrent: u32) -> pb::UpsertPoolRequest {
    pb::UpsertPoolRequest {
        pool: Some(pb::PoolSpec {
            name: name.into(),
            max_concurrent: Some(max_concurrent),
            ..Default::default()
        }),
    }
}

/// A unique path in the system temp dir (the file is not created).
fn temp_state_path(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    std::env::temp_dir().join(format!("slotd-e2e-{tag}-{}-{nanos}.toml", std::process::id()))
}

/// The next Watch message's event, within [`TIMEOUT`].
#[track_caller]
fn next_watch(s: &mut Streaming<pb::WatchEvent>) -> impl Future<Output = W> + '_ {
    let at = Location::caller();
    async move {
        match bounded(at, "the next Watch message", s.message()).await {
            Ok(Some(pb::WatchEvent { event: Some(e), at: Some(_) })) => e,
            other => panic!("{at}: expected a Watch event, got {other:?}"),
        }
    }
}

/// Skips Watch messages until `pick` accepts one.
#[track_caller]
fn watch_until<'a, T>(
    s: &'a mut Streaming<pb::WatchEvent>,
    what: &'a str,
    pick: impl Fn(&W) -> Option<T> + 'a,
) -> impl Future<Output = T> + 'a {
    let at = Location::caller();
    async move {
        loop {
            let e = match bounded(at, what, s.message()).await {
                Ok(Some(pb::WatchEvent { event: Some(e), .. })) => e,
                other => panic!("{at}: waiting for {what}: {other:?}"),
            };
            if let Some(t) = pick(&e) {
                return t;
            }
        }
    }
}

#[track_caller]
fn assert_code<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, needle: &str) {
    match r {
        Err(s) => {
            assert_eq!(s.code(), code, "{s:?}");
            assert!(s.message().contains(needle), "{needle:?} not in {:?}", s.message());
        }
        Ok(v) => panic!("expected {code:?}, got {v:?}"),
    }
}

#[tokio::test]
async fn upsert_raises_a_limit_at_once_and_lowering_it_revokes_nothing() {
    let d = Daemon::start(ONE_POOL).await;
    let mut admin = d.admin().await;
    let mut a = d.agent("a").await;
    let first = a.acquire("1", "p").await;
    a.request(a.req("2", "p")).await;
    a.expect_queued("2").await;

    let r = admin.upsert_pool(spec("p", 2)).await.unwrap().into_inner();
    assert!(!r.created);
    let p = r.pool.unwrap();
    assert_eq!((p.limit, p.effective_limit), (2, 2));
    let second = a.expect_granted("2").await;

    // Lowering below what is held revokes nothing; the next request waits until below the limit.
    admin.upsert_pool(spec("p", 1)).await.unwrap();
    a.expect_silence(Duration::from_millis(50)).await;
    assert_eq!(d.pool("p").await.in_flight, 2);
    a.request(a.req("3", "p")).await;
    a.expect_queued("3").await;
    a.release_ok(&first.lease_id).await;
    a.expect_silence(Duration::from_millis(50)).await;
    a.release_ok(&second.lease_id).await;
    a.expect_granted("3").await;

    // A new pool, with defaults for unset fields, usable at once.
    let r = admin.upsert_pool(spec("fresh", 3)).await.unwrap().into_inner();
    assert!(r.created);
    a.acquire("4", "fresh").await;
}

#[tokio::test]
async fn delete_rejects_waiters_expires_leases_and_refuses_a_parent() {
    let d =
        Daemon::start("[pools.g]\nmax_concurrent = 4\n[pools.c]\nmax_concurrent = 1\nparent = \"g\"\n").await;
    let mut admin = d.admin().await;
    let mut a = d.agent("a").await;
    let held = a.acquire("1", "c").await;
    a.request(a.req("2", "c")).await;
    a.expect_queued("2").await;

    let del = |name: &str| pb::DeletePoolRequest { name: name.into() };
    assert_code(admin.delete_pool(del("g")).await, Code::FailedPrecondition, "child pools (c)");
    assert_code(admin.delete_pool(del("nope")).await, Code::NotFound, "nope");

    let r = admin.delete_pool(del("c")).await.unwrap().into_inner();
    assert_eq!((r.rejected_waiters, r.expired_leases), (1, 1));
    let mut saw = (false, false);
    for _ in 0..2 {
        match a.next().await {
            Msg::Rejected(r) if r.request_id == "2" => {
                assert_eq!(Code::from_i32(r.code), Code::Aborted);
                saw.0 = true;
            }
            Msg::Expired(e) if e.lease_id == held.lease_id => {
                assert_eq!(e.reason, pb::ExpiryReason::PoolRemoved as i32);
                saw.1 = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(saw, (true, true));
    let s = d.status().await;
    assert_eq!(s.pools.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["g"]);
    assert_eq!(pool_in(&s, "g").in_flight, 0);
    // Now that g has no children it can go too.
    admin.delete_pool(del("g")).await.unwrap();
}

#[tokio::test]
async fn pause_and_resume_reach_holders_and_waiters() {
    let d = Daemon::start(ONE_POOL).await;
    let mut admin = d.admin().await;
    let mut a = d.agent("a").await;
    let mut b = d.agent("b").await;
    let held = a.acquire("1", "p").await;
    b.request(b.req("w", "p")).await;
    b.expect_queued("w").await;

    let r = admin
        .pause_pool(pb::PausePoolRequest {
            pool: "p".into(),
            duration: Some(ms(60_000)),
            reason: "deploy".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let until = r.paused_until.unwrap();
    for agent in [&mut a, &mut b] {
        let p = agent.expect_paused("p").await;
        assert!(p.reason.contains("deploy"), "{p:?}");
        assert_eq!(diff_ms(&p.until.unwrap(), &until), 0);
    }
    let st = d.pool("p").await;
    assert_eq!(st.effective_limit, 1, "a manual pause is not a 429: no adaptive decrease");
    assert!(st.pause_reason.contains("operator"));

    // The slot frees, but nothing is granted while paused.
    a.release_ok(&held.lease_id).await;
    b.expect_silence(Duration::from_millis(50)).await;

    let r = admin.resume_pool(pb::ResumePoolRequest { pool: "p".into() }).await.unwrap().into_inner();
    assert!(r.was_paused);
    b.expect_resumed("p").await;
    b.expect_granted("w").await;
    let r = admin.resume_pool(pb::ResumePoolRequest { pool: "p".into() }).await.unwrap().into_inner();
    assert!(!r.was_paused);
}

#[tokio::test]
async fn revoke_tells_the_holder_and_frees_the_slot() {
    let d = Daemon::start(ONE_POOL).await;
    let mut admin = d.admin().await;
    let mut a = d.agent("holder-a").await;
    let mut b = d.agent("b").await;
    let held = a.acquire("1", "p").await;
    b.request(b.req("w", "p")).await;
    b.expect_queued("w").await;

    let r = admin
        .revoke_lease(pb::RevokeLeaseRequest { lease_id: held.lease_id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.pool.as_str(), r.holder.as_str()), ("p", "holder-a"));
    let e = a.expect_expired(&held.lease_id).await;
    assert_eq!(e.reason, pb::ExpiryReason::Revoked as i32);
    b.expect_granted("w").await;

    // Revoking it again: it already ended.
    let again = admin.revoke_lease(pb::RevokeLeaseRequest { lease_id: held.lease_id.clone() }).await;
    assert_code(again, Code::FailedPrecondition, "revoked");
}

#[tokio::test]
async fn drain_stops_granting_waits_for_leases_and_undrain_restarts() {
    let d = Daemon::start("[pools.p]\nmax_concurrent = 2\n").await;
    let mut admin = d.admin().await;
    let mut a = d.agent("a").await;
    let held = a.acquire("1", "p").await;

    let mut progress = admin.drain(pb::DrainRequest::default()).await.unwrap().into_inner();
    let at = Location::caller();
    let first = bounded(at, "first progress", progress.message()).await.unwrap().unwrap();
    assert_eq!((first.leases_remaining, first.queued, first.done), (1, 0, false));

    // Room on the pool, but a drain grants nothing; the request stays queued.
    a.request(a.req("2", "p")).await;
    a.expect_queued("2").await;
    a.release_ok(&held.lease_id).await;
    let mut last = first;
    while !last.done {
        last = bounded(at, "drain progress", progress.message()).await.unwrap().expect("done before the end");
    }
    assert_eq!((last.leases_remaining, last.queued), (0, 1));
    assert!(bounded(at, "drain end", progress.message()).await.unwrap().is_none());
    a.expect_silence(Duration::from_millis(50)).await;

    admin.undrain(pb::UndrainRequest {}).await.unwrap();
    a.expect_granted("2").await;
}

#[tokio::test]
async fn a_drain_that_times_out_says_so_and_keeps_draining() {
    let d = Daemon::start(ONE_POOL).await;
    let mut admin = d.admin().await;
    let mut a = d.agent("a").await;
    a.acquire("1", "p").await;
    let mut progress = admin.drain(pb::DrainRequest { timeout: Some(ms(150)) }).await.unwrap().into_inner();
    let at = Location::caller();
    let first = bounded(at, "progress", progress.message()).await.unwrap().unwrap();
    assert!(!first.done);
    let end = bounded(at, "timeout", progress.message()).await.unwrap_err();
    assert_eq!(end.code(), Code::DeadlineExceeded, "{end:?}");
    let mut b = d.agent("b").await;
    b.request(b.req("x", "p")).await;
    b.expect_queued("x").await;
}

#[tokio::test]
async fn watch_sends_a_snapshot_then_changes() {
    let d = Daemon::start("[pools.p]\nmax_concurrent = 2\n[pools.q]\nmax_concurrent = 1\n").await;
    let mut admin = d.admin().await;
    let mut watch = admin
        .watch(pb::WatchRequest { pool: "p".into(), snapshot_interval: Some(ms(0)) })
        .await
        .unwrap()
        .into_inner();
    match next_watch(&mut watch).await {
        W::Snapshot(s) => assert_eq!(s.pools.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["p"]),
        other => panic!("expected a snapshot first, got {other:?}"),
    }

    let mut a = d.agent("watched").await;
    a.acquire("other", "q").await; // filtered out: another pool
    let g = a.acquire("1", "p").await;
    let W::Granted(c) = next_watch(&mut watch).await else { panic!("expected Granted") };
    assert_eq!(
        (c.pool.as_str(), c.lease_id.as_str(), c.holder.as_str()),
        ("p", g.lease_id.as_str(), "watched")
    );

    a.release_with(&g.lease_id, pb::Outcome::Error, None).await;
    a.expect_released(&g.lease_id).await;
    let W::Released(c) = next_watch(&mut watch).await else { panic!("expected Released") };
    assert_eq!((c.lease_id.as_str(), c.detail.as_str()), (g.lease_id.as_str(), "error"));

    // A pause of a pool nobody holds or waits on is still seen.
    admin
        .pause_pool(pb::PausePoolRequest { pool: "p".into(), duration: Some(ms(100)), reason: "look".into() })
        .await
        .unwrap();
    let W::Paused(c) = next_watch(&mut watch).await else { panic!("expected Paused") };
    assert!(c.detail.contains("look") && c.status.as_ref().unwrap().paused_until.is_some(), "{c:?}");
    let W::Resumed(c) = next_watch(&mut watch).await else { panic!("expected Resumed") };
    assert_eq!(c.pool, "p");

    admin.upsert_pool(spec("p", 5)).await.unwrap();
    let W::LimitChanged(c) = next_watch(&mut watch).await else { panic!("expected LimitChanged") };
    assert_eq!((c.detail.as_str(), c.status.unwrap().limit), ("changed", 5));
}

#[tokio::test]
async fn watch_repeats_snapshots_and_sees_revocations_and_rejections() {
    let d = Daemon::start("[pools.p]\nmax_concurrent = 1\nmax_queue_depth = 1\n").await;
    let mut admin = d.admin().await;
    let mut watch = admin
        .watch(pb::WatchRequest { pool: String::new(), snapshot_interval: Some(ms(100)) })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(next_watch(&mut watch).await, W::Snapshot(_)));
    assert!(matches!(next_watch(&mut watch).await, W::Snapshot(_)), "a periodic snapshot follows");

    let mut a = d.agent("a").await;
    let g = a.acquire("1", "p").await;
    a.request(a.req("2", "p")).await;
    a.expect_queued("2").await;
    a.request(a.req("3", "p")).await;
    a.expect_rejected("3", Code::ResourceExhausted).await;
    let rej = watch_until(&mut watch, "Rejected", |e| match e {
        W::Rejected(c) => Some(c.clone()),
        _ => None,
    })
    .await;
    assert!(rej.pool == "p" && rej.detail.contains("full"), "{rej:?}");
    admin.revoke_lease(pb::RevokeLeaseRequest { lease_id: g.lease_id.clone() }).await.unwrap();
    let exp = watch_until(&mut watch, "Expired", |e| match e {
        W::Expired(c) => Some(c.clone()),
        _ => None,
    })
    .await;
    assert_eq!((exp.lease_id.as_str(), exp.detail.as_str()), (g.lease_id.as_str(), "revoked"));
}

#[tokio::test]
async fn pool_changes_survive_a_restart_through_the_state_file() {
    let path = temp_state_path("restart");
    let toml = format!("state_file = {:?}\n{ONE_POOL}", path.display().to_string());
    let d = Daemon::start(&toml).await;
    let mut admin = d.admin().await;
    admin.upsert_pool(spec("added", 7)).await.unwrap();
    admin.upsert_pool(spec("p", 3)).await.unwrap();
    d.stop().await;
    let written = std::fs::read_to_string(&path).unwrap();
    assert!(written.contains("[pools.added]"), "{written}");

    // Same config (p = 1), same state file: the state file wins.
    let d = Daemon::start(&toml).await;
    let s = d.status().await;
    assert_eq!((pool_in(&s, "added").limit, pool_in(&s, "p").limit), (7, 3));
    let mut admin = d.admin().await;
    admin.delete_pool(pb::DeletePoolRequest { name: "added".into() }).await.unwrap();
    d.stop().await;
    let d = Daemon::start(&toml).await;
    assert_eq!(d.status().await.pools.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["p"]);
    d.stop().await;
    std::fs::remove_file(&path).unwrap();
}

#[tokio::test]
async fn without_a_state_file_the_config_stays_the_seed() {
    let path = temp_state_path("seed");
    let toml = format!("state_file = {:?}\n{ONE_POOL}", path.display().to_string());
    let d = Daemon::start(&toml).await;
    assert_eq!(d.pool("p").await.limit, 1);
    assert!(!path.exists(), "nothing is written until an operator changes something");
    d.stop().await;
}

#[tokio::test]
async fn a_reload_merges_the_config_under_the_state_file() {
    let path = temp_state_path("reload");
    let toml = format!("state_file = {:?}\n{ONE_POOL}", path.display().to_string());
    let d = Daemon::start_with_reload(&toml).await;
    let mut admin = d.admin().await;
    admin.upsert_pool(spec("p", 4)).await.unwrap();
    // The config adds a pool and (losing to the state file) sets p back to 2.
    d.reload(&format!(
        "state_file = {:?}\n[pools.p]\nmax_concurrent = 2\n[pools.new]\nmax_concurrent = 9\n",
        path.display().to_string()
    ))
    .await;
    let s = d.wait_for("the reload", |s| s.pools.iter().any(|p| p.name == "new")).await;
    assert_eq!(pool_in(&s, "p").limit, 4);
    // The merged pool set is written back by the persistence task, just after it is applied.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let written = loop {
        let written = std::fs::read_to_string(&path).unwrap_or_default();
        if written.contains("[pools.new]") || std::time::Instant::now() > deadline {
            break written;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(written.contains("[pools.new]"), "{written}");
    d.stop().await;
    std::fs::remove_file(&path).unwrap();
}

#[tokio::test]
async fn bad_admin_input_is_refused_and_changes_nothing() {
    let d =
        Daemon::start("[pools.a]\nmax_concurrent = 1\n[pools.b]\nmax_concurrent = 1\nparent = \"a\"\n").await;
    let mut admin: AdminClient<Channel> = d.admin().await;
    let before = d.status().await;

    assert_code(admin.upsert_pool(spec("a", 0)).await, Code::InvalidArgument, "max_concurrent");
    assert_code(admin.upsert_pool(spec("a", 10_001)).await, Code::InvalidArgument, "max_concurrent");
    let cycle = pb::UpsertPoolRequest {
        pool: Some(pb::PoolSpec { name: "a".into(), parent: Some("b".into()), ..Default::default() }),
    };
    assert_code(admin.upsert_pool(cycle).await, Code::InvalidArgument, "cycle");
    let orphan = pb::UpsertPoolRequest {
        pool: Some(pb::PoolSpec { name: "x".into(), parent: Some("nope".into()), ..Default::default() }),
    };
    assert_code(admin.upsert_pool(orphan).await, Code::InvalidArgument, "does not exist");
    let overflow = pb::UpsertPoolRequest {
        pool: Some(pb::PoolSpec {
            name: "a".into(),
            on_overflow: Some("explode".into()),
            ..Default::default()
        }),
    };
    assert_code(admin.upsert_pool(overflow).await, Code::InvalidArgument, "on_overflow");
    assert_code(admin.upsert_pool(pb::UpsertPoolRequest { pool: None }).await, Code::InvalidArgument, "pool");
    assert_code(admin.upsert_pool(spec("bad name", 1)).await, Code::InvalidArgument, "");

    let pause = |pool: &str, d: Option<prost_types::Duration>| pb::PausePoolRequest {
        pool: pool.into(),
        duration: d,
        reason: String::new(),
    };
    assert_code(admin.pause_pool(pause("nope", Some(ms(100)))).await, Code::NotFound, "nope");
    assert_code(admin.pause_pool(pause("a", None)).await, Code::InvalidArgument, "duration");
    assert_code(admin.pause_pool(pause("a", Some(ms(0)))).await, Code::InvalidArgument, "duration");
    let negative = prost_types::Duration { seconds: -1, nanos: 0 };
    assert_code(admin.pause_pool(pause("a", Some(negative))).await, Code::InvalidArgument, "duration");
    assert_code(admin.resume_pool(pb::ResumePoolRequest { pool: "nope".into() }).await, Code::NotFound, "");

    let revoke = |id: &str| pb::RevokeLeaseRequest { lease_id: id.into() };
    assert_code(admin.revoke_lease(revoke("not-a-lease")).await, Code::InvalidArgument, "");
    assert_code(admin.revoke_lease(revoke("")).await, Code::InvalidArgument, "");
    let unknown = "0".repeat(32);
    assert_code(admin.revoke_lease(revoke(&unknown)).await, Code::NotFound, "unknown lease");

    let watch = admin.watch(pb::WatchRequest { pool: "nope".into(), snapshot_interval: None }).await;
    assert_code(watch.map(|_| ()), Code::NotFound, "nope");

    let after = d.status().await;
    assert_eq!(format!("{:?}", before.pools), format!("{:?}", after.pools));
}

#[tokio::test]
async fn health_reports_the_admin_service() {
    let d = Daemon::start(ONE_POOL).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(d.channel().await);
    let r = health
        .check(tonic_health::pb::HealthCheckRequest { service: "slotd.v1.Admin".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
}
