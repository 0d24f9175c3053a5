//! `slotctl` and provider health, end to end: `run` over several pools (acquire_any), `breaker` forcing
//! a pool's circuit breaker through Admin, and `top`'s health cell.

use std::time::{Duration, SystemTime};

use slotd_proto::v1 as pb;
use slotd_test_support::{
    Daemon,
    process::{assert_exit_code, output_within, text},
};

const POOLS: &str = "[pools.key-a]\nmax_concurrent = 1\n[pools.key-b]\nmax_concurrent = 1\n";

/// Runs slotctl with `args` against `url` and waits for it.
fn run_ctl<'a>(url: &'a str, args: &'a [&'a str]) -> impl Future<Output = std::process::Output> + 'a {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_slotctl"));
    cmd.env_remove("SLOTD_ENDPOINT")
        .env_remove("SLOTD_TOKEN")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .arg("--endpoint")
        .arg(url)
        .args(args);
    async move { output_within(&mut cmd).await }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_takes_the_first_listed_pool_with_room() {
    let d = Daemon::start(POOLS).await;
    let args = ["run", "--pool", "key-a", "--pool", "key-b", "--", "sh", "-c", "echo $SLOTD_POOL"];
    let out = run_ctl(&d.url(), &args).await;
    assert_exit_code(&out, 0);
    assert_eq!(text(&out.stdout).trim(), "key-a");
    // With key-a held, the same command runs on key-b.
    let mut holder = d.agent("holder").await;
    holder.acquire("h", "key-a").await;
    let out = run_ctl(&d.url(), &args).await;
    assert_exit_code(&out, 0);
    assert_eq!(text(&out.stdout).trim(), "key-b");
    d.wait_for("key-b released", |s| s.pools.iter().all(|p| p.name != "key-b" || p.in_flight == 0)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_forces_a_pool_open_and_closed() {
    let d = Daemon::start(POOLS).await;
    let out = run_ctl(&d.url(), &["breaker", "open", "key-a", "--reason", "maintenance"]).await;
    assert_exit_code(&out, 0);
    assert!(text(&out.stdout).contains("forced open"), "{}", text(&out.stdout));
    let b = d.pool("key-a").await.breaker.unwrap();
    assert_eq!((b.state(), b.forced), (pb::BreakerState::Open, true));
    // Nothing is granted on it: a zero-wait run gives up.
    let out = run_ctl(&d.url(), &["run", "--pool", "key-a", "--max-wait", "0s", "--", "true"]).await;
    assert_ne!(out.status.code(), Some(0));
    let out = run_ctl(&d.url(), &["breaker", "close", "key-a"]).await;
    assert_exit_code(&out, 0);
    assert_eq!(d.pool("key-a").await.breaker.unwrap().state(), pb::BreakerState::Closed);
    let out = run_ctl(&d.url(), &["run", "--pool", "key-a", "--", "true"]).await;
    assert_exit_code(&out, 0);
    // An unknown pool is NOT_FOUND, in one line.
    let out = run_ctl(&d.url(), &["breaker", "open", "nope"]).await;
    assert_exit_code(&out, 1);
    assert!(text(&out.stderr).contains("unknown pool"), "{}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_set_turns_the_breaker_and_holds_on() {
    let d = Daemon::start(POOLS).await;
    let args =
        ["pool", "set", "key-a", "--breaker", "true", "--failure-hold", "10s", "--cancel-cooldown", "1s"];
    let out = run_ctl(&d.url(), &args).await;
    assert_exit_code(&out, 0);
    assert!(d.pool("key-a").await.breaker.unwrap().enabled);
    // The hold applies: a failed run keeps the slot held.
    let out = run_ctl(&d.url(), &["run", "--pool", "key-a", "--", "false"]).await;
    assert_exit_code(&out, 1);
    let s = d.wait_for("held", |s| s.pools.iter().any(|p| p.name == "key-a" && p.held == 1)).await;
    assert!(s.leases.is_empty());
}

#[test]
fn top_shows_the_breaker_before_the_holds() {
    let now = SystemTime::now();
    let mut p = pb::PoolStatus {
        name: "p".into(),
        held: 2,
        held_until: Some((now + Duration::from_secs(5)).into()),
        ..Default::default()
    };
    assert_eq!(slotctl::top::health_label(&p, now).as_deref(), Some(" held 2 for 5.0s"));
    p.breaker = Some(pb::BreakerStatus {
        state: pb::BreakerState::Open as i32,
        open_until: Some((now + Duration::from_secs(12)).into()),
        ..Default::default()
    });
    assert_eq!(slotctl::top::health_label(&p, now).as_deref(), Some(" breaker open 12s"));
    p.breaker = Some(pb::BreakerStatus {
        state: pb::BreakerState::HalfOpen as i32,
        probe_lease_id: "ab".into(),
        ..Default::default()
    });
    assert_eq!(slotctl::top::health_label(&p, now).as_deref(), Some(" breaker half-open, probing"));
    p.breaker = None;
    p.held = 0;
    assert_eq!(slotctl::top::health_label(&p, now), None);
}
