//! `slotctl` end to end: the real binary against the real daemon on 127.0.0.1:0 (slotd-test-support's
//! [`Daemon`]): status, run and its exit-code contract, the 75 -> pause path, usage errors,
//! completions, TLS and tokens; plus a `top` frame rendered with ratatui's `TestBackend` from a
//! constructed `App`.

use std::{
    path::Path,
    process::Output,
    time::{Duration, SystemTime},
};

use ratatui::{Terminal, backend::TestBackend};
use slotctl::top::{self, App, EventKind, EventSource};
use slotd_proto::v1 as pb;
use slotd_test_support::{
    Config, Daemon, TIMEOUT, Token,
    process::{PROCESS_TIMEOUT, assert_exit_code, output_within, text},
};

const POOLS: &str = r#"
[pools.anthropic]
max_concurrent = 2

[pools.opus]
max_concurrent = 1
parent = "anthropic"

[pools.solo]
max_concurrent = 1
"#;

fn slotctl() -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_slotctl"));
    cmd.env_remove("SLOTD_ENDPOINT")
        .env_remove("SLOTD_TOKEN")
        .env_remove("SLOTCTL_RATE_LIMIT_EXIT_CODE")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Runs slotctl with `args` against `url` and waits for it.
fn run_ctl<'a>(url: &'a str, args: &'a [&'a str]) -> impl Future<Output = Output> + 'a {
    let mut cmd = slotctl();
    cmd.arg("--endpoint").arg(url).args(args);
    // The timeout's message names the command and its arguments.
    async move { output_within(&mut cmd).await }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_lists_pools_and_leases() {
    let d = Daemon::start(POOLS).await;
    let out = run_ctl(&d.url(), &["status"]).await;
    assert_exit_code(&out, 0);
    let stdout = text(&out.stdout);
    for want in ["POOL", "IN_FLIGHT/EFF/LIMIT", "anthropic", "opus", "solo", "0/2/2", "no leases"] {
        assert!(stdout.contains(want), "missing {want:?} in:\n{stdout}");
    }
    assert!(stdout.lines().any(|l| l.starts_with("opus") && l.contains("anthropic")), "{stdout}");

    let out = run_ctl(&d.url(), &["status", "--output", "json", "--pool", "solo"]).await;
    assert_exit_code(&out, 0);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["pools"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["pools"][0]["name"], "solo");
    assert_eq!(v["pools"][0]["limit"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_one_line_with_the_grpc_code() {
    let d = Daemon::start(POOLS).await;
    let out = run_ctl(&d.url(), &["status", "--pool", "nope"]).await;
    assert_exit_code(&out, 1);
    let stderr = text(&out.stderr);
    assert!(stderr.starts_with("slotctl: ") && stderr.trim_end().ends_with("(NOT_FOUND)"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");

    // Nothing listens on port 1.
    let out = run_ctl("http://127.0.0.1:1", &["status"]).await;
    assert_exit_code(&out, 1);
    assert!(text(&out.stderr).contains("(UNAVAILABLE)"), "{}", text(&out.stderr));

    let out = run_ctl(&d.url(), &["run", "--pool", "nope", "--", "true"]).await;
    assert_exit_code(&out, 1);
    assert!(text(&out.stderr).contains("(NOT_FOUND)"), "{}", text(&out.stderr));
}

/// Several endpoints (the members of a highly available deployment): one that is down is skipped,
/// by every command and by `run`; when none answers, the error names them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_is_down_is_skipped() {
    let d = Daemon::start(POOLS).await;
    let list = format!("http://127.0.0.1:1,{}", d.url());
    let out = run_ctl(&list, &["status", "--pool", "solo"]).await;
    assert_exit_code(&out, 0);
    assert!(text(&out.stdout).contains("solo"), "{}", text(&out.stdout));
    let out = run_ctl(&list, &["pause", "solo", "--for", "30s"]).await;
    assert_exit_code(&out, 0);
    let out = run_ctl(&list, &["run", "--pool", "anthropic", "--", "true"]).await;
    assert_exit_code(&out, 0);
    let s = d.status().await;
    assert!(s.pools.iter().any(|p| p.name == "solo" && p.paused_until.is_some()), "{s:#?}");
    assert!(s.leases.is_empty(), "run released its lease: {s:#?}");

    let out = run_ctl("http://127.0.0.1:1,127.0.0.1:2", &["status"]).await;
    assert_exit_code(&out, 1);
    let stderr = text(&out.stderr);
    assert!(stderr.contains("cannot connect to any of http://127.0.0.1:1, 127.0.0.1:2"), "{stderr}");
    assert!(stderr.trim_end().ends_with("(UNAVAILABLE)"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_passes_the_exit_code_through_and_releases_the_lease() {
    let d = Daemon::start(POOLS).await;
    let out =
        run_ctl(&d.url(), &["run", "--pool", "anthropic", "--", "sh", "-c", "echo $SLOTD_LEASE_ID; exit 3"])
            .await;
    assert_exit_code(&out, 3);
    let id = text(&out.stdout).trim().to_owned();
    assert_eq!(id.len(), 32, "a lease id on stdout: {id:?}");
    assert!(id.chars().all(|c| c.is_ascii_hexdigit()), "{id:?}");
    let s = d.status().await;
    assert!(s.leases.is_empty(), "released afterwards: {s:#?}");
    assert!(s.pools.iter().all(|p| p.in_flight == 0 && p.paused_until.is_none()), "{s:#?}");

    let out = run_ctl(&d.url(), &["run", "--pool", "solo", "--", "true"]).await;
    assert_exit_code(&out, 0);

    // A signal N comes back as 128 + N.
    let out = run_ctl(&d.url(), &["run", "--pool", "solo", "--", "sh", "-c", "kill -TERM $$"]).await;
    assert_exit_code(&out, 128 + 15);

    let out = run_ctl(&d.url(), &["run", "--pool", "solo", "--", "/nonexistent/command"]).await;
    assert_exit_code(&out, 127);
    assert!(text(&out.stderr).contains("cannot run"), "{}", text(&out.stderr));
    d.wait_for("every lease released", |s| s.leases.is_empty()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_75_releases_as_rate_limited_and_pauses_the_pool() {
    let d = Daemon::start(POOLS).await;
    let out =
        run_ctl(&d.url(), &["run", "--pool", "solo", "--retry-after", "30s", "--", "sh", "-c", "exit 75"])
            .await;
    assert_exit_code(&out, 75);
    let p = d.pool("solo").await;
    let until = SystemTime::try_from(p.paused_until.expect("solo is paused")).expect("valid time");
    let left = until.duration_since(SystemTime::now()).expect("pause in the future");
    assert!(left > Duration::from_secs(25) && left <= Duration::from_secs(30), "{left:?}");
    assert!(d.status().await.leases.is_empty());
    // Other pools are untouched.
    assert!(d.pool("anthropic").await.paused_until.is_none());

    // The rate-limit code can be configured; 75 then counts as an ordinary failure.
    let mut cmd = slotctl();
    cmd.env("SLOTCTL_RATE_LIMIT_EXIT_CODE", "42")
        .args(["--endpoint", &d.url(), "run", "--pool", "anthropic", "--retry-after", "20s", "--"])
        .args(["sh", "-c", "exit 42"]);
    let out = output_within(&mut cmd).await;
    assert_exit_code(&out, 42);
    assert!(d.pool("anthropic").await.paused_until.is_some(), "42 paused anthropic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_holds_the_only_slot_while_the_command_runs() {
    let d = Daemon::start(POOLS).await;
    let dir = std::env::temp_dir().join(format!("slotctl-test-{}-{}", std::process::id(), line!()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let go = dir.join("go");
    let env_file = dir.join("env");
    let script = r#"echo "$SLOTD_LEASE_ID $SLOTD_FENCING_TOKEN $SLOTD_POOL" > "$ENV_FILE"
        while [ ! -e "$GO" ]; do sleep 0.02; done"#;
    let mut cmd = slotctl();
    cmd.env("GO", &go).env("ENV_FILE", &env_file).args([
        "--endpoint",
        &d.url(),
        "run",
        "--pool",
        "solo",
        "--holder",
        "test-holder",
        "--priority",
        "7",
        "--ttl",
        "2s",
        "--",
        "sh",
        "-c",
        script,
    ]);
    let child = cmd.spawn().expect("spawn slotctl");
    let s =
        d.wait_for("the slot held", |s| s.pools.iter().any(|p| p.name == "solo" && p.in_flight == 1)).await;
    let lease = s.leases.iter().find(|l| l.pool == "solo").expect("a lease on solo");
    assert_eq!(lease.holder, "test-holder");
    assert_eq!(lease.priority, 7);

    let out = run_ctl(&d.url(), &["status"]).await;
    let stdout = text(&out.stdout);
    assert!(stdout.contains("test-holder") && stdout.contains(&lease.lease_id[..8]), "{stdout}");

    // Nobody else gets the slot meanwhile: a second run gives up after --max-wait with 75.
    let out = run_ctl(&d.url(), &["run", "--pool", "solo", "--max-wait", "300ms", "--", "true"]).await;
    assert_exit_code(&out, 75);
    assert!(text(&out.stderr).contains("gave up waiting"), "{}", text(&out.stderr));

    // The environment the command saw names this lease.
    let env = wait_for_file(&env_file).await;
    let fields: Vec<&str> = env.split_whitespace().collect();
    assert_eq!(fields, [lease.lease_id.as_str(), &lease.fencing_token.to_string(), "solo"]);

    std::fs::write(&go, b"").expect("write go");
    let out = tokio::time::timeout(PROCESS_TIMEOUT, child.wait_with_output())
        .await
        .expect("in time")
        .expect("wait");
    assert_exit_code(&out, 0);
    let s = d.status().await;
    assert!(s.leases.is_empty(), "{s:#?}");
    let _ = std::fs::remove_dir_all(&dir);
}

async fn wait_for_file(path: &Path) -> String {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if let Ok(s) = std::fs::read_to_string(path)
            && s.ends_with('\n')
        {
            return s;
        }
        assert!(tokio::time::Instant::now() < deadline, "{} never appeared", path.display());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_waits_through_a_pause() {
    let d = Daemon::start(POOLS).await;
    let mut c = d.client();
    c.report_rate_limit(pb::ReportRateLimitRequest {
        pool: "solo".into(),
        retry_after: Some(prost_types::Duration { seconds: 0, nanos: 400_000_000 }),
        reason: "test".into(),
        ..Default::default()
    })
    .await
    .expect("report");
    let started = tokio::time::Instant::now();
    let out = run_ctl(&d.url(), &["run", "--pool", "solo", "--", "true"]).await;
    assert_exit_code(&out, 0);
    assert!(started.elapsed() >= Duration::from_millis(300), "granted only after the pause");
    assert!(text(&out.stderr).contains("paused"), "told about the pause: {}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_says_which_ancestor_s_pause_it_waits_through() {
    let d = Daemon::start(POOLS).await;
    let mut c = d.client();
    c.report_rate_limit(pb::ReportRateLimitRequest {
        pool: "anthropic".into(),
        retry_after: Some(prost_types::Duration { seconds: 0, nanos: 400_000_000 }),
        reason: "test".into(),
        ..Default::default()
    })
    .await
    .expect("report");
    let out = run_ctl(&d.url(), &["run", "--pool", "opus", "--", "true"]).await;
    assert_exit_code(&out, 0);
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("pool opus is paused by anthropic for"),
        "told about the parent's pause: {stderr}"
    );
}

#[tokio::test]
async fn usage_errors_exit_2() {
    for args in [
        &["run", "--pool", "p"][..],
        &["pause", "p", "--for", "soon"],
        &["run", "--pool", "p", "--priority", "12", "--", "true"],
        &["pool", "set", "p", "--on-overflow", "sometimes"],
        &["frobnicate"],
    ] {
        let out = run_ctl("http://127.0.0.1:1", args).await;
        assert_exit_code(&out, 2);
        assert!(!out.stderr.is_empty(), "{args:?}");
    }
}

#[tokio::test]
async fn completions_are_printed() {
    for shell in ["bash", "zsh", "fish"] {
        let out = run_ctl("http://127.0.0.1:1", &["completions", shell]).await;
        assert_exit_code(&out, 0);
        let script = text(&out.stdout);
        assert!(script.len() > 200 && script.contains("slotctl"), "{shell}: {script}");
        assert!(script.contains("drain"), "{shell} completes subcommands");
    }
}

/// The rows of a rendered buffer as strings.
fn rows(terminal: &Terminal<TestBackend>) -> Vec<String> {
    let buf = terminal.backend().buffer();
    (0..buf.area.height)
        .map(|y| (0..buf.area.width).map(|x| buf[(x, y)].symbol().to_owned()).collect::<String>())
        .collect()
}

#[test]
fn top_frame_shows_bars_queues_pause_countdown_and_events() {
    let now = SystemTime::now();
    let mut app = App::new("http://127.0.0.1:50051", now);
    app.source = EventSource::Watch;
    app.apply_status(
        pb::StatusResponse {
            pools: vec![
                pb::PoolStatus {
                    name: "anthropic".into(),
                    limit: 4,
                    effective_limit: 4,
                    in_flight: 2,
                    queued: 3,
                    ..Default::default()
                },
                pb::PoolStatus { name: "openai".into(), limit: 3, effective_limit: 3, ..Default::default() },
                pb::PoolStatus {
                    name: "opus".into(),
                    parent: "anthropic".into(),
                    limit: 2,
                    effective_limit: 1,
                    in_flight: 2,
                    queued: 0,
                    paused_until: Some((now + Duration::from_secs(30)).into()),
                    pause_reason: "429".into(),
                    ..Default::default()
                },
            ],
            leases: vec![],
            ..Default::default()
        },
        now,
    );
    app.push_event(
        now - Duration::from_secs(2),
        EventKind::Granted,
        "granted anthropic lease 0123abcd to agent-1",
    );
    app.push_event(now, EventKind::Paused, "paused opus: rate limited");

    let mut terminal = Terminal::new(TestBackend::new(100, 14)).expect("terminal");
    terminal.draw(|f| top::draw(f, &app)).expect("draw");
    let rows = rows(&terminal);
    let screen = rows.join("\n");

    assert!(rows[0].contains("slotctl top") && rows[0].contains("events: watch"), "{screen}");
    let anthropic = rows.iter().find(|r| r.contains("anthropic ")).expect("a row for anthropic");
    assert!(anthropic.contains("2/4") && anthropic.contains("queued 3"), "{screen}");
    let filled = anthropic.matches('█').count();
    assert!(filled >= 20, "half of the bar is filled: {filled} in {anthropic:?}");
    assert!(!anthropic.contains("paused"), "{screen}");

    let at =
        |name: &str| rows.iter().position(|r| r.contains(name)).unwrap_or_else(|| panic!("{name}: {screen}"));
    assert_eq!(at("  opus"), at("anthropic ") + 1, "a child right under its parent: {screen}");
    assert!(at("openai") > at("  opus"), "{screen}");
    let opus = rows.iter().find(|r| r.contains("  opus")).expect("opus indented under its parent");
    assert!(opus.contains("2/2 (eff 1)") && opus.contains("queued 0"), "{screen}");
    assert!(opus.contains("paused 30s"), "pause countdown: {screen}");

    // Newest event first.
    let ev_paused = rows.iter().position(|r| r.contains("paused opus: rate limited")).expect("paused event");
    let ev_granted = rows
        .iter()
        .position(|r| r.contains("2.0s ago  granted anthropic lease 0123abcd"))
        .expect("granted event");
    assert!(ev_paused < ev_granted, "{screen}");

    // A second later the countdown moved and events age.
    app.now = now + Duration::from_secs(1);
    terminal.draw(|f| top::draw(f, &app)).expect("draw");
    let screen = self::rows(&terminal).join("\n");
    assert!(screen.contains("paused 29s"), "{screen}");
    assert!(screen.contains("3.0s ago  granted"), "{screen}");
}

#[test]
fn top_derives_events_from_snapshots_without_watch() {
    let now = SystemTime::now();
    let mut app = App::new("x", now);
    app.source = EventSource::Polling { why: "Admin.Watch not served".into() };
    let pool = |in_flight, paused: bool| pb::PoolStatus {
        name: "p".into(),
        limit: 2,
        effective_limit: 2,
        in_flight,
        paused_until: paused.then(|| (now + Duration::from_secs(5)).into()),
        ..Default::default()
    };
    let lease = pb::LeaseStatus {
        lease_id: "feedface00".into(),
        pool: "p".into(),
        holder: "h".into(),
        ..Default::default()
    };
    app.apply_status(pb::StatusResponse { pools: vec![pool(0, false)], ..Default::default() }, now);
    assert!(app.events.is_empty(), "the first snapshot is not a change");
    app.apply_status(
        pb::StatusResponse { pools: vec![pool(1, false)], leases: vec![lease], ..Default::default() },
        now,
    );
    app.apply_status(pb::StatusResponse { pools: vec![pool(0, true)], ..Default::default() }, now);
    app.apply_status(pb::StatusResponse { pools: vec![pool(0, false)], ..Default::default() }, now);
    let texts: Vec<&str> = app.events.iter().rev().map(|e| e.text.as_str()).collect();
    assert_eq!(
        texts,
        ["granted p lease feedface to h", "paused p for 5.0s", "ended p lease feedface of h", "resumed p"]
    );
}

/// A `slotctl run` that holds a slot on `pool` until [`Held::finish`].
struct Held {
    child: tokio::process::Child,
    dir: std::path::PathBuf,
    lease: pb::LeaseStatus,
}

impl Held {
    /// Starts `slotctl run [extra] -- <wait for a file>` and waits until its lease shows in Status.
    async fn start(d: &Daemon, pool: &str, holder: &str, extra: &[&str], cmd: &[&str]) -> Held {
        let dir = std::env::temp_dir().join(format!("slotctl-test-{}-{holder}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut c = slotctl();
        c.env("GO", dir.join("go"))
            .args(["--endpoint", &d.url(), "run", "--pool", pool, "--holder", holder])
            .args(extra)
            .arg("--")
            .args(cmd)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let child = c.spawn().expect("spawn slotctl");
        let s = d.wait_for("the lease", |s| s.leases.iter().any(|l| l.holder == holder)).await;
        let lease = s.leases.into_iter().find(|l| l.holder == holder).expect("found above");
        Held { child, dir, lease }
    }

    /// The command that waits for the go file.
    const WAIT: &[&str] = &["sh", "-c", r#"while [ ! -e "$GO" ]; do sleep 0.02; done"#];

    /// Lets the command finish and returns slotctl's output.
    async fn finish(self) -> Output {
        std::fs::write(self.dir.join("go"), b"").expect("write go");
        let out = tokio::time::timeout(PROCESS_TIMEOUT, self.child.wait_with_output())
            .await
            .expect("in time")
            .expect("wait");
        let _ = std::fs::remove_dir_all(&self.dir);
        out
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_set_rm_pause_resume_end_to_end() {
    let d = Daemon::start(POOLS).await;
    let out = run_ctl(
        &d.url(),
        &[
            "pool",
            "set",
            "gpt",
            "--max-concurrent",
            "3",
            "--cooldown",
            "200ms",
            "--max-queue-depth",
            "10",
            "--on-overflow",
            "shed_oldest",
        ],
    )
    .await;
    assert_exit_code(&out, 0);
    assert!(text(&out.stdout).contains("created pool gpt"), "{}", text(&out.stdout));
    assert_eq!(d.pool("gpt").await.limit, 3);

    let out = run_ctl(&d.url(), &["pool", "set", "gpt", "--max-concurrent", "5"]).await;
    assert_exit_code(&out, 0);
    assert!(text(&out.stdout).contains("updated pool gpt"), "{}", text(&out.stdout));
    assert_eq!(d.pool("gpt").await.limit, 5);

    let out =
        run_ctl(&d.url(), &["pool", "set", "gpt-mini", "--max-concurrent", "1", "--parent", "gpt"]).await;
    assert_exit_code(&out, 0);
    assert_eq!(d.pool("gpt-mini").await.parent, "gpt");

    let out =
        run_ctl(&d.url(), &["--output", "json", "pool", "set", "gpt-mini", "--max-concurrent", "2"]).await;
    assert_exit_code(&out, 0);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!((v["created"].as_bool(), v["limit"].as_u64()), (Some(false), Some(2)), "{v}");

    let out = run_ctl(&d.url(), &["pool", "set", "bad", "--max-concurrent", "0"]).await;
    assert_exit_code(&out, 1);
    assert!(text(&out.stderr).trim_end().ends_with("(INVALID_ARGUMENT)"), "{}", text(&out.stderr));

    let out = run_ctl(&d.url(), &["pause", "gpt", "--for", "30s", "--reason", "maintenance"]).await;
    assert_exit_code(&out, 0);
    assert!(text(&out.stdout).contains("paused gpt for"), "{}", text(&out.stdout));
    let p = d.pool("gpt").await;
    assert!(p.paused_until.is_some() && p.pause_reason.contains("maintenance"), "{p:?}");
    let out = run_ctl(&d.url(), &["status"]).await;
    assert!(text(&out.stdout).contains("maintenance"), "{}", text(&out.stdout));

    let out = run_ctl(&d.url(), &["resume", "gpt"]).await;
    assert_exit_code(&out, 0);
    assert_eq!(text(&out.stdout).trim(), "resumed gpt");
    assert!(d.pool("gpt").await.paused_until.is_none());
    let out = run_ctl(&d.url(), &["resume", "gpt"]).await;
    assert_eq!(text(&out.stdout).trim(), "gpt was not paused");

    let out = run_ctl(&d.url(), &["pool", "rm", "gpt-mini"]).await;
    assert_exit_code(&out, 0);
    assert!(text(&out.stdout).starts_with("removed pool gpt-mini"), "{}", text(&out.stdout));
    assert!(!d.status().await.pools.iter().any(|p| p.name == "gpt-mini"));
    let out = run_ctl(&d.url(), &["pool", "rm", "gpt-mini"]).await;
    assert_exit_code(&out, 1);
    assert!(text(&out.stderr).trim_end().ends_with("(NOT_FOUND)"), "{}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_warns_the_running_command_and_kill_on_lost_stops_it() {
    let d = Daemon::start(POOLS).await;
    let held = Held::start(&d, "solo", "revoked-holder", &[], Held::WAIT).await;
    let id = held.lease.lease_id.clone();
    let out = run_ctl(&d.url(), &["revoke", &id]).await;
    assert_exit_code(&out, 0);
    assert!(text(&out.stdout).contains("pool solo, holder revoked-holder"), "{}", text(&out.stdout));
    d.wait_for("the lease gone", |s| s.leases.is_empty()).await;
    // The command keeps running and its exit code still comes through; slotctl warned.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let out = held.finish().await;
    assert_exit_code(&out, 0);
    let stderr = text(&out.stderr);
    assert!(stderr.contains("warning: lease") && stderr.contains("lost"), "{stderr}");

    let out = run_ctl(&d.url(), &["revoke", &id]).await;
    assert_exit_code(&out, 1);

    let out = run_ctl(&d.url(), &["revoke", "zz"]).await;
    assert_exit_code(&out, 1);
    assert!(text(&out.stderr).trim_end().ends_with("(NOT_FOUND)"), "{}", text(&out.stderr));

    let held = Held::start(&d, "solo", "killed-holder", &["--kill-on-lost"], &["sleep", "30"]).await;
    let started = tokio::time::Instant::now();
    // The short id that `slotctl status` shows is enough.
    let short = held.lease.lease_id[..8].to_owned();
    assert_exit_code(&run_ctl(&d.url(), &["revoke", &short]).await, 0);
    let out = tokio::time::timeout(PROCESS_TIMEOUT, held.child.wait_with_output())
        .await
        .expect("in time")
        .expect("wait");
    assert_exit_code(&out, 128 + 15);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_reports_until_done_and_undrain_grants_again() {
    let d = Daemon::start(POOLS).await;
    let held = Held::start(&d, "anthropic", "drained-holder", &[], Held::WAIT).await;

    let out = run_ctl(&d.url(), &["drain", "--timeout", "300ms"]).await;
    assert_exit_code(&out, 1);
    assert!(text(&out.stdout).contains("draining: 1 leases remaining"), "{}", text(&out.stdout));
    assert!(text(&out.stderr).contains("slotctl undrain"), "{}", text(&out.stderr));

    // Granting is stopped: a new run gives up.
    let out = run_ctl(&d.url(), &["run", "--pool", "solo", "--max-wait", "300ms", "--", "true"]).await;
    assert_exit_code(&out, 75);

    let mut drain = slotctl();
    drain.args(["--endpoint", &d.url(), "drain"]).stdout(std::process::Stdio::piped());
    let drain = drain.spawn().expect("spawn drain");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_exit_code(&held.finish().await, 0);
    let out = tokio::time::timeout(PROCESS_TIMEOUT, drain.wait_with_output())
        .await
        .expect("in time")
        .expect("wait");
    assert_exit_code(&out, 0);
    assert!(text(&out.stdout).contains("drained: no lease is held"), "{}", text(&out.stdout));

    let out = run_ctl(&d.url(), &["undrain"]).await;
    assert_exit_code(&out, 0);
    assert_eq!(text(&out.stdout).trim(), "granting again");
    let out = run_ctl(&d.url(), &["run", "--pool", "solo", "--max-wait", "2s", "--", "true"]).await;
    assert_exit_code(&out, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_app_follows_real_watch_events() {
    let d = Daemon::start(POOLS).await;
    let mut admin = d.admin().await;
    let mut watch = admin
        .watch(pb::WatchRequest { pool: String::new(), snapshot_interval: None })
        .await
        .expect("Admin.Watch")
        .into_inner();
    let mut app = App::new(d.url(), SystemTime::now());
    app.source = EventSource::Watch;

    let out = run_ctl(&d.url(), &["run", "--pool", "solo", "--holder", "watched", "--", "true"]).await;
    assert_exit_code(&out, 0);
    assert_exit_code(
        &run_ctl(&d.url(), &["pause", "solo", "--for", "20s", "--reason", "watched pause"]).await,
        0,
    );
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while !app.events.iter().any(|e| e.kind == EventKind::Paused) {
        let ev = tokio::time::timeout_at(deadline, watch.message())
            .await
            .expect("events in time")
            .expect("watch stream")
            .expect("watch open");
        app.apply_watch(ev, SystemTime::now());
    }
    let texts: Vec<&str> = app.events.iter().rev().map(|e| e.text.as_str()).collect();
    assert!(texts.iter().any(|t| t.starts_with("granted solo lease") && t.contains("watched")), "{texts:#?}");
    assert!(texts.iter().any(|t| t.starts_with("released solo lease")), "{texts:#?}");
    assert!(app.has_snapshot && app.status.pools.iter().any(|p| p.name == "solo"), "snapshot applied");

    let mut terminal = Terminal::new(TestBackend::new(120, 16)).expect("terminal");
    terminal.draw(|f| top::draw(f, &app)).expect("draw");
    let screen = rows(&terminal).join("\n");
    let solo = screen.lines().find(|r| r.contains("solo")).expect("solo row");
    assert!(solo.contains("paused 19s") || solo.contains("paused 20s"), "{screen}");
    assert!(screen.contains("watched pause"), "{screen}");
}

#[test]
fn top_draws_on_tiny_terminals_and_odd_states_without_panicking() {
    let now = SystemTime::now();
    let mut app = App::new("http://127.0.0.1:50051", now);
    let pools = (0..50)
        .map(|i| pb::PoolStatus {
            name: format!("pool-with-a-rather-long-name-{i}"),
            // A parent cycle and missing parents: refused by the daemon, but never a panic here.
            parent: format!("pool-with-a-rather-long-name-{}", (i + 1) % 3),
            limit: i % 3,
            effective_limit: 5,
            in_flight: 7,
            paused_until: Some((now - Duration::from_secs(5)).into()),
            ..Default::default()
        })
        .collect();
    app.apply_status(pb::StatusResponse { pools, ..Default::default() }, now);
    for i in 0..100 {
        app.push_event(now + Duration::from_secs(1), EventKind::Info, format!("event {i} from the future"));
    }
    for (w, h) in [(1, 1), (5, 2), (20, 5), (40, 8), (200, 60)] {
        let mut terminal = Terminal::new(TestBackend::new(w, h)).expect("terminal");
        terminal.draw(|f| top::draw(f, &app)).expect("draw");
    }
}

#[tokio::test]
async fn top_refuses_to_run_without_a_terminal() {
    let out = run_ctl("http://127.0.0.1:1", &["top"]).await;
    assert_exit_code(&out, 1);
    assert!(text(&out.stderr).contains("needs a terminal"), "{}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_run_over_tls_with_a_ca_file() {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("generate a cert");
    let dir = std::env::temp_dir().join(format!("slotctl-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).expect("write cert");
    std::fs::write(&key, ck.signing_key.serialize_pem()).expect("write key");
    let mut cfg = Config::from_toml_str(POOLS).expect("config");
    cfg.tls_cert = Some(cert.clone());
    cfg.tls_key = Some(key);
    let d = Daemon::serve(cfg, "127.0.0.1:0").await;
    let url = format!("https://{}", d.addr);
    let ca = cert.to_string_lossy().into_owned();
    let tls = ["--ca-cert", ca.as_str(), "--tls-domain", "localhost"];

    let args: Vec<&str> = tls.iter().copied().chain(["status"]).collect();
    let out = run_ctl(&url, &args).await;
    assert_exit_code(&out, 0);
    assert!(text(&out.stdout).contains("anthropic"), "{}", text(&out.stdout));

    let args: Vec<&str> =
        tls.iter().copied().chain(["run", "--pool", "solo", "--", "sh", "-c", "exit 4"]).collect();
    assert_exit_code(&run_ctl(&url, &args).await, 4);

    // Without the CA the daemon's certificate is not trusted.
    let out = run_ctl(&url, &["status"]).await;
    assert_exit_code(&out, 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_go_to_the_right_service() {
    let mut cfg = Config::from_toml_str(POOLS).expect("config");
    cfg.agent_token = Some(Token::new("agent-secret").expect("token"));
    cfg.admin_token = Some(Token::new("admin-secret").expect("token"));
    let d = Daemon::serve(cfg, "127.0.0.1:0").await;
    let url = d.url();

    let out = run_ctl(&url, &["status"]).await;
    assert_exit_code(&out, 1);
    assert!(text(&out.stderr).trim_end().ends_with("(UNAUTHENTICATED)"), "{}", text(&out.stderr));

    let agent = ["--token", "agent-secret"];
    let both = ["--token", "agent-secret", "--admin-token", "admin-secret"];
    let with = |pre: &[&'static str], rest: &[&'static str]| -> Vec<&'static str> {
        pre.iter().chain(rest).copied().collect()
    };
    assert_exit_code(&run_ctl(&url, &with(&agent, &["status"])).await, 0);
    assert_exit_code(&run_ctl(&url, &with(&agent, &["run", "--pool", "solo", "--", "true"])).await, 0);
    let out = run_ctl(&url, &with(&agent, &["pause", "solo", "--for", "5s"])).await;
    assert_exit_code(&out, 1);
    assert!(text(&out.stderr).trim_end().ends_with("(PERMISSION_DENIED)"), "{}", text(&out.stderr));
    assert_exit_code(&run_ctl(&url, &with(&both, &["pause", "solo", "--for", "5s"])).await, 0);
    assert_exit_code(&run_ctl(&url, &with(&both, &["resume", "solo"])).await, 0);
    // One token for both, from the environment.
    let mut cmd = slotctl();
    cmd.env("SLOTD_TOKEN", "admin-secret").args(["--endpoint", &url, "resume", "solo"]);
    let out = output_within(&mut cmd).await;
    assert_exit_code(&out, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_reserves_its_tokens_and_refuses_an_estimate_above_the_burst() {
    let toml = "[pools.llm]\nmax_concurrent = 2\n\n[pools.llm.budget]\ninput_tokens_per_minute = 1000\n\
                output_tokens_per_minute = 1000\ndefault_input_tokens = 10\ndefault_output_tokens = 10\n";
    let d = Daemon::start(toml).await;
    let out = run_ctl(
        &d.url(),
        &["run", "--pool", "llm", "--tokens", "300", "--max-output-tokens", "50", "--", "true"],
    )
    .await;
    assert_exit_code(&out, 0);
    let s = d.status().await;
    let b = s.pools[0].budget.clone().expect("budget in Status");
    let c = b.counters.expect("counters");
    assert_eq!((c.reserved_input_tokens, c.reserved_output_tokens), (300, 50));
    // Released without usage: the estimate stays charged.
    assert_eq!((c.settled_input_tokens, b.reservations), (300, 0));

    let out = run_ctl(&d.url(), &["run", "--pool", "llm", "--tokens", "2000", "--", "true"]).await;
    assert_exit_code(&out, 1);
    let stderr = text(&out.stderr);
    assert!(stderr.contains("burst 1000") && stderr.contains("(INVALID_ARGUMENT)"), "{stderr}");
}

#[test]
fn top_shows_each_budget_level_refill_debt_and_reservations() {
    let level = |kind: pb::BudgetKind, level: i64, refill: u64, debt: u64| pb::BudgetLevelStatus {
        kind: kind as i32,
        refill,
        burst: refill,
        level,
        debt,
        ..Default::default()
    };
    let p = pb::PoolStatus {
        name: "llm".into(),
        budget: Some(pb::BudgetStatus {
            levels: vec![
                level(pb::BudgetKind::Requests, 3, 20, 0),
                level(pb::BudgetKind::InputTokens, 1234, 4000, 0),
                level(pb::BudgetKind::OutputTokens, -300, 2000, 300),
            ],
            reservations: 2,
            shadow: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    assert_eq!(top::budget_label(&p).as_deref(), Some(" req 3/20 in 1.2k/4.0k out debt 300 res 2 shadow"));
    assert_eq!(top::budget_label(&pb::PoolStatus::default()), None);
}
