//! Extreme durations and timestamps in every field of Admin, agent and config input: each is refused
//! (INVALID_ARGUMENT, or a config error) or is harmless, and the daemon still grants afterwards with
//! health SERVING. Among them, the issue's case: `UpsertPool` with `cooldown = 9223372036854775807s`,
//! then a release and a 429 report; and a Watch with a huge `snapshot_interval`.

use std::{panic::Location, time::Duration};

use prost_types::{Duration as PbDuration, Timestamp};
use slotd::{
    config::Config,
    grpc::convert::{MAX_DURATION_SECONDS, MAX_TIMESTAMP_SECONDS, MIN_TIMESTAMP_SECONDS},
};
use slotd_proto::v1::{self as pb, admin_client::AdminClient, server_message::Msg};
use slotd_test_support::*;
use tonic::{Code, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const POOL: &str = "[pools.p]\nmax_concurrent = 2\n";

/// The issue's value: the largest `seconds` a protobuf Duration field can carry.
const I64_MAX_SECS: PbDuration = PbDuration { seconds: i64::MAX, nanos: 0 };

fn pb(seconds: i64, nanos: i32) -> PbDuration {
    PbDuration { seconds, nanos }
}

/// Extreme wire durations: zero, one nanosecond, negative, non-normalized, and huge (well-formed or not).
fn extremes() -> Vec<PbDuration> {
    vec![
        pb(0, 0),
        pb(0, 1),
        pb(-1, 0),
        pb(0, -1),
        pb(-1, -999_999_999),
        pb(i64::MIN, 0),
        pb(0, 2_000_000_000),
        pb(1, i32::MAX),
        pb(0, i32::MIN),
        pb(MAX_DURATION_SECONDS, 999_999_999),
        pb(MAX_DURATION_SECONDS + 1, 0),
        I64_MAX_SECS,
        pb(i64::MAX, 999_999_999),
    ]
}

/// Extreme wire timestamps.
fn extreme_timestamps() -> Vec<Timestamp> {
    let ts = |seconds, nanos| Timestamp { seconds, nanos };
    vec![
        ts(0, 0),
        ts(-1, 0),
        ts(0, -1),
        ts(0, 2_000_000_000),
        ts(i64::MAX, 0),
        ts(i64::MIN, 0),
        ts(MIN_TIMESTAMP_SECONDS, 0),
        ts(MIN_TIMESTAMP_SECONDS - 1, 0),
        ts(MAX_TIMESTAMP_SECONDS, 999_999_999),
        ts(MAX_TIMESTAMP_SECONDS + 1, 0),
    ]
}

/// A call that is either accepted or refused with INVALID_ARGUMENT; true when accepted.
#[track_caller]
fn accepted_or_invalid<T>(what: &str, res: Result<T, tonic::Status>) -> bool {
    match res {
        Ok(_) => true,
        Err(s) if s.code() == Code::InvalidArgument => {
            assert!(!s.message().is_empty(), "{what}: refused without a reason");
            false
        }
        Err(s) => panic!("{}: {what}: want OK or INVALID_ARGUMENT, got {s:?}", Location::caller()),
    }
}

/// Health (overall and for each service) is SERVING.
#[track_caller]
fn assert_serving(d: &Daemon) -> impl Future<Output = ()> + '_ {
    let at = Location::caller();
    async move {
        let mut h = HealthClient::new(d.channel().await);
        for service in ["", "slotd.v1.Slotd", "slotd.v1.Admin"] {
            let r = bounded(at, "health", h.check(HealthCheckRequest { service: service.into() }))
                .await
                .unwrap_or_else(|s| panic!("{at}: health {service:?}: {s}"))
                .into_inner();
            assert_eq!(r.status, ServingStatus::Serving as i32, "{at}: health of {service:?}");
        }
    }
}

/// A fresh agent is granted a slot on `p` and gives it back: the daemon still works.
#[track_caller]
fn assert_grants(d: &Daemon) -> impl Future<Output = ()> + '_ {
    let at = Location::caller();
    async move {
        let mut a = d.agent("after").await;
        let g = bounded(at, "a grant", a.acquire("after", "p")).await;
        a.release_ok(&g.lease_id).await;
    }
}

fn upsert(f: impl Fn(&mut pb::PoolSpec)) -> pb::UpsertPoolRequest {
    let mut spec = pb::PoolSpec { name: "p".into(), ..Default::default() };
    f(&mut spec);
    pb::UpsertPoolRequest { pool: Some(spec) }
}

/// The issue's exact case: the poisoned cooldown (and headroom_recovery) is refused, so the release
/// and the 429 report that used to overflow `Instant` and kill the scheduler task are ordinary.
#[tokio::test]
async fn upsert_with_the_issues_cooldown_is_refused_and_release_and_429_still_work() {
    let d = Daemon::start(POOL).await;
    let mut admin = d.admin().await;
    let e = admin.upsert_pool(upsert(|s| s.cooldown = Some(I64_MAX_SECS))).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("cooldown"), "{e:?}");
    let e = admin.upsert_pool(upsert(|s| s.headroom_recovery = Some(I64_MAX_SECS))).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("headroom_recovery"), "{e:?}");
    // Well-formed on the wire but above the pool's documented maximum: refused too, naming the bound.
    let huge = pb(MAX_DURATION_SECONDS, 0);
    let e = admin.upsert_pool(upsert(|s| s.cooldown = Some(huge))).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("above the maximum"), "{e:?}");
    let p = d.pool("p").await;
    assert_eq!((p.limit, p.cooling), (2, 0), "nothing changed: {p:?}");

    // The release and the 429 report of the issue.
    let mut a = d.agent("a").await;
    let g = a.acquire("r1", "p").await;
    a.release_ok(&g.lease_id).await;
    let mut c = d.client();
    let r = c
        .report_rate_limit(pb::ReportRateLimitRequest {
            pool: "p".into(),
            retry_after: Some(ms(1)),
            reason: "429".into(),
        })
        .await
        .expect("a 429 report");
    assert!(r.into_inner().paused_until.is_some());
    assert_serving(&d).await;
    drop(a);
    d.wait_for("the 1 ms pause to end", |s| pool_in(s, "p").paused_until.is_none()).await;
    assert_grants(&d).await;
    d.stop().await;
}

/// Every duration of PoolSpec, PausePool, Drain and Watch set to each extreme value.
#[tokio::test]
async fn every_admin_duration_at_its_extremes_is_refused_or_harmless() {
    let d = Daemon::start(POOL).await;
    let mut admin: AdminClient<Channel> = d.admin().await;
    type Set = fn(&mut pb::PoolSpec, PbDuration);
    let fields: [(&str, Set); 6] = [
        ("cooldown", |s, v| s.cooldown = Some(v)),
        ("default_ttl", |s, v| s.default_ttl = Some(v)),
        ("max_ttl", |s, v| s.max_ttl = Some(v)),
        ("max_wait", |s, v| s.max_wait = Some(v)),
        ("default_retry_after", |s, v| s.default_retry_after = Some(v)),
        ("headroom_recovery", |s, v| s.headroom_recovery = Some(v)),
    ];
    for (field, set) in fields {
        for v in extremes() {
            let res = admin.upsert_pool(upsert(|s| set(s, v))).await;
            accepted_or_invalid(&format!("UpsertPool {field} = {v:?}"), res);
        }
        // Back to sane settings for the next field.
        let reset = upsert(|s| {
            s.cooldown = Some(ms(0));
            s.default_ttl = Some(dur(Duration::from_secs(30)));
            s.max_ttl = Some(dur(Duration::from_secs(600)));
            s.max_wait = Some(ms(0));
            s.default_retry_after = Some(ms(10));
            s.headroom_recovery = Some(ms(10));
        });
        admin.upsert_pool(reset).await.expect("sane settings");
    }
    assert_grants(&d).await;

    for v in extremes() {
        let req = pb::PausePoolRequest { pool: "p".into(), duration: Some(v), reason: "extreme".into() };
        if accepted_or_invalid(&format!("PausePool {v:?}"), admin.pause_pool(req).await) {
            admin.resume_pool(pb::ResumePoolRequest { pool: "p".into() }).await.expect("resume");
        }
    }
    for v in extremes() {
        let res = admin.drain(pb::DrainRequest { timeout: Some(v) }).await;
        if accepted_or_invalid(&format!("Drain {v:?}"), res) {
            admin.undrain(pb::UndrainRequest {}).await.expect("undrain");
        }
    }
    // Watch with a huge snapshot_interval: refused, and the daemon is unharmed. The longest valid one
    // streams.
    for v in extremes() {
        let res = admin.watch(pb::WatchRequest { pool: String::new(), snapshot_interval: Some(v) }).await;
        accepted_or_invalid(&format!("Watch {v:?}"), res);
    }
    let e = admin
        .watch(pb::WatchRequest { pool: String::new(), snapshot_interval: Some(I64_MAX_SECS) })
        .await
        .unwrap_err();
    assert!(e.message().contains("snapshot_interval"), "{e:?}");
    let hour = Some(dur(Duration::from_secs(3600)));
    let mut w = admin
        .watch(pb::WatchRequest { pool: String::new(), snapshot_interval: hour })
        .await
        .expect("the longest interval is accepted")
        .into_inner();
    let first = within("the first snapshot", w.message()).await.expect("a snapshot");
    assert!(matches!(first, Some(pb::WatchEvent { event: Some(pb::watch_event::Event::Snapshot(_)), .. })));

    assert_serving(&d).await;
    assert_grants(&d).await;
    d.stop().await;
}

/// Releases a lease, which may have expired already (a 1 ns TTL is valid).
#[track_caller]
fn give_back<'a>(a: &'a mut Agent, lease_id: &'a str) -> impl Future<Output = ()> + 'a {
    let at = Location::caller();
    async move {
        a.release(lease_id).await;
        match a.next().await {
            Msg::Released(r) => assert_eq!(r.lease_id, lease_id, "{at}"),
            Msg::Expired(e) => {
                assert_eq!(e.lease_id, lease_id, "{at}");
                a.expect_lease_error(lease_id, Code::FailedPrecondition).await;
            }
            other => panic!("{at}: release of {lease_id}: unexpected {other:?}"),
        }
    }
}

/// The agent's answer to one request: refused with INVALID_ARGUMENT, or harmless (a grant, given
/// back; a queue place, cancelled).
#[track_caller]
fn answered<'a>(a: &'a mut Agent, what: &'a str, id: &'a str) -> impl Future<Output = ()> + 'a {
    let at = Location::caller();
    async move {
        match a.next().await {
            Msg::Rejected(r) => {
                assert_eq!(Code::from_i32(r.code), Code::InvalidArgument, "{at}: {what}: {r:?}");
                assert_eq!(r.request_id, id, "{at}: {what}");
            }
            Msg::Granted(g) => {
                assert_eq!(g.request_id, id, "{at}: {what}");
                give_back(a, &g.lease_id).await;
            }
            Msg::Queued(q) => {
                assert_eq!(q.request_id, id, "{at}: {what}");
                a.cancel(id).await;
                a.expect_cancelled(id).await;
            }
            other => panic!("{at}: {what}: unexpected {other:?}"),
        }
    }
}

/// Every duration and timestamp an agent sends, at each extreme.
#[tokio::test]
async fn every_agent_duration_and_timestamp_at_its_extremes_is_refused_or_harmless() {
    let d = Daemon::start(POOL).await;
    let mut a = d.agent("a").await;
    let mut n = 0;
    let mut next_id = || {
        n += 1;
        format!("r{n}")
    };
    for v in extremes() {
        let id = next_id();
        a.request(pb::LeaseRequest { ttl: Some(v), ..a.req(&id, "p") }).await;
        answered(&mut a, &format!("request ttl = {v:?}"), &id).await;
        let id = next_id();
        a.request(pb::LeaseRequest { max_wait: Some(v), ..a.req(&id, "p") }).await;
        answered(&mut a, &format!("request max_wait = {v:?}"), &id).await;
    }
    for ts in extreme_timestamps() {
        let id = next_id();
        a.request(pb::LeaseRequest { started_at: Some(ts), ..a.req(&id, "p") }).await;
        answered(&mut a, &format!("request started_at = {ts:?}"), &id).await;
    }

    // Resume of a live lease with an extreme TTL (a tiny one is allowed: the lease then expires).
    for v in extremes() {
        let g = a.acquire(&next_id(), "p").await;
        let holder = a.name.clone();
        a.resume(pb::ResumeLease { ttl: Some(v), ..resume_of(&g, &holder) }).await;
        match a.next().await {
            Msg::LeaseResumed(r) => assert_eq!(r.lease_id, g.lease_id),
            Msg::LeaseError(e) => {
                assert_eq!(Code::from_i32(e.code), Code::InvalidArgument, "resume ttl = {v:?}: {e:?}")
            }
            other => panic!("resume ttl = {v:?}: unexpected {other:?}"),
        }
        give_back(&mut a, &g.lease_id).await;
    }

    // Release with OUTCOME_RATE_LIMITED and an extreme retry_after: a malformed one is refused (the
    // lease stays held), a huge one pauses for at most the documented maximum. The same for a
    // ReportRateLimit.
    let mut c = d.client();
    let mut admin = d.admin().await;
    for v in extremes() {
        let g = a.acquire(&next_id(), "p").await;
        a.send(pb::client_message::Msg::Release(pb::ReleaseLease {
            lease_id: g.lease_id.clone(),
            outcome: pb::Outcome::RateLimited as i32,
            retry_after: Some(v),
            ..Default::default()
        }))
        .await;
        match a.next().await {
            Msg::Released(r) => assert_eq!(r.lease_id, g.lease_id),
            Msg::LeaseError(e) => {
                let code = Code::from_i32(e.code);
                assert_eq!(code, Code::InvalidArgument, "release retry_after = {v:?}: {e:?}");
                a.release_ok(&g.lease_id).await;
            }
            other => panic!("release retry_after = {v:?}: unexpected {other:?}"),
        }
        let res = c
            .report_rate_limit(pb::ReportRateLimitRequest {
                pool: "p".into(),
                retry_after: Some(v),
                reason: "extreme".into(),
            })
            .await;
        accepted_or_invalid(&format!("ReportRateLimit {v:?}"), res);
        let until = d.pool("p").await.paused_until.map(|t| system_time(&t));
        let day = std::time::SystemTime::now() + Duration::from_secs(24 * 3600 + 60);
        assert!(until.is_none_or(|u| u <= day), "a pause beyond the documented maximum: {until:?}");
        admin.resume_pool(pb::ResumePoolRequest { pool: "p".into() }).await.expect("resume");
    }

    assert_serving(&d).await;
    drop(a);
    assert_grants(&d).await;
    d.stop().await;
}

/// The resume-grace header at its extremes: refused when it is not a duration, else capped by
/// `limits.max_resume_grace` (here 50 ms), so a dropped stream's lease is gone soon after.
#[tokio::test]
async fn the_resume_grace_header_at_its_extremes_is_refused_or_capped() {
    let d = Daemon::start("[limits]\nmax_resume_grace = \"50ms\"\n[pools.p]\nmax_concurrent = 1\n").await;
    for grace in
        ["0s", "1ns", "9223372036854775807s", "18446744073709551615s", "99999999999999999999999s", "-1s"]
    {
        match d.try_agent("g", Some(grace)).await {
            Ok(mut g) => {
                g.acquire("x", "p").await;
                drop(g);
                d.wait_for("the dropped stream's lease to end", |s| s.leases.is_empty()).await;
            }
            Err(s) => assert_eq!(s.code(), Code::InvalidArgument, "grace {grace:?}: {s:?}"),
        }
    }
    assert_serving(&d).await;
    assert_grants(&d).await;
    d.stop().await;
}

/// Config and state-file durations above their maximum are refused with a clear error naming the
/// key; a poisoned state file stops the daemon at startup instead of at the first release.
#[tokio::test]
async fn config_and_state_file_durations_above_their_maximum_are_refused() {
    let huge = "9223372036854775807s";
    for (section, key) in [
        ("[pools.p]\nmax_concurrent = 1", "cooldown"),
        ("[pools.p]\nmax_concurrent = 1", "headroom_recovery"),
        ("[pools.p]\nmax_concurrent = 1", "default_retry_after"),
        ("[pools.p]\nmax_concurrent = 1", "max_wait"),
        ("[pools.p]\nmax_concurrent = 1", "max_ttl"),
        ("[pools.p]\nmax_concurrent = 1", "default_ttl"),
        ("[scheduler]", "aging_step"),
        ("[scheduler]", "learning_period"),
        ("[limits]", "max_resume_grace"),
        ("[limits]", "drain_timeout"),
    ] {
        let toml = format!("{section}\n{key} = \"{huge}\"\n");
        let e = Config::from_toml_str(&toml).expect_err(&toml).to_string();
        assert!(e.contains(key), "{toml}: {e}");
    }

    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let state = std::env::temp_dir().join(format!("slotd-e2e-poisoned-{}-{nanos}.toml", std::process::id()));
    std::fs::write(&state, format!("version = 1\n[pools.p]\nmax_concurrent = 1\ncooldown = \"{huge}\"\n"))
        .unwrap();
    let mut cfg = Config::from_toml_str(POOL).unwrap();
    cfg.state_file = Some(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let res =
        within("serve to refuse the state file", slotd::serve(cfg, listener, std::future::pending())).await;
    let e = res.expect_err("a poisoned state file is refused").to_string();
    assert!(e.contains("cooldown") && e.contains("above the maximum"), "{e}");
    std::fs::remove_file(&state).unwrap();
}
