//! Only the grantee can resume, heartbeat or release a lease: lease theft with everything Status shows,
//! takeover with the resume credential, forged resumes during the learning period after a restart, and
//! credentials that outlive a restart with the same state directory.

use std::{path::PathBuf, time::Duration};

use slotd_proto::v1::{self as pb, server_message::Msg};
use slotd_test_support::{Agent, Daemon, ms, pool_in, resume_of};
use tokio::net::TcpListener;
use tonic::Code;

const LIMIT: u32 = 2;

fn pools() -> String {
    format!("[pools.p]\nmax_concurrent = {LIMIT}\nadaptive = false\n[pools.q]\nmax_concurrent = 1\n")
}

/// A fresh directory under the temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let dir = std::env::temp_dir().join(format!("slotd-trust-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Fails if any pool is over its limit.
#[track_caller]
fn assert_within_limits(s: &pb::StatusResponse) {
    for p in &s.pools {
        assert!(p.in_flight <= p.limit, "pool {} has {} in flight, limit {}", p.name, p.in_flight, p.limit);
    }
}

/// Every resume a thief could build from what Status shows of `lease`, with no credential or a made-up
/// one, and with the other stream's holder name or its own.
fn forgeries(lease: &pb::LeaseStatus) -> Vec<pb::ResumeLease> {
    let base = pb::ResumeLease {
        lease_id: lease.lease_id.clone(),
        fencing_token: lease.fencing_token,
        pool: lease.pool.clone(),
        holder: lease.holder.clone(),
        ..Default::default()
    };
    ["", "0", &"0".repeat(64), &"f".repeat(64), &lease.lease_id, "not hex at all"]
        .into_iter()
        .flat_map(|credential| {
            [lease.holder.clone(), "thief".to_owned()].map(|holder| pb::ResumeLease {
                credential: credential.to_owned(),
                holder,
                ..base.clone()
            })
        })
        .collect()
}

#[tokio::test]
async fn a_stream_knowing_everything_status_shows_cannot_take_heartbeat_or_release_a_lease() {
    let d = Daemon::start(&pools()).await;
    let mut victim = d.agent("victim").await;
    let g = victim.acquire("rv", "p").await;
    assert_eq!(g.resume_credential.len(), 64, "Granted carries the credential");
    let mut thief = d.agent("thief").await;

    // Status shows the lease's id, fencing token, pool and holder, but never its credential.
    let s = d.status().await;
    let lease = s.leases.iter().find(|l| l.lease_id == g.lease_id).expect("listed").clone();
    assert_eq!((lease.fencing_token, lease.pool.as_str()), (g.fencing_token, "p"));
    assert!(!format!("{s:?}").contains(&g.resume_credential), "Status shows the credential");

    for r in forgeries(&lease) {
        thief.resume(r).await;
        thief.expect_lease_error(&g.lease_id, Code::PermissionDenied).await;
        assert_within_limits(&d.status().await);
    }
    // Heartbeat and release of another stream's lease stay refused.
    thief.heartbeat(&[&g.lease_id]).await;
    thief.expect_lease_error(&g.lease_id, Code::FailedPrecondition).await;
    thief.expect_heartbeat_ack(0).await;
    thief.release(&g.lease_id).await;
    thief.expect_lease_error(&g.lease_id, Code::FailedPrecondition).await;

    // The thief gets only the slot that is left; past the limit it waits.
    let mine = thief.acquire("rt1", "p").await;
    thief.request(thief.req("rt2", "p")).await;
    thief.expect_queued("rt2").await;
    let s = d.status().await;
    assert_within_limits(&s);
    assert_eq!((pool_in(&s, "p").in_flight, s.leases.len()), (LIMIT, LIMIT as usize));

    // The victim was told nothing and still holds its lease: it renews and releases it.
    victim.expect_silence(Duration::from_millis(50)).await;
    victim.heartbeat(&[&g.lease_id]).await;
    victim.expect_heartbeat_ack(1).await;
    victim.release_ok(&g.lease_id).await;
    let next = thief.expect_granted("rt2").await;
    assert_within_limits(&d.status().await);
    thief.release_ok(&mine.lease_id).await;
    thief.release_ok(&next.lease_id).await;
    d.assert_idle().await;
    d.stop().await;
}

#[tokio::test]
async fn with_the_credential_a_takeover_works_and_the_old_stream_is_told() {
    let d = Daemon::start(&pools()).await;
    let mut old = d.agent("worker").await;
    let g = old.acquire("r", "p").await;
    let mut new = d.agent("worker-again").await;

    new.resume(resume_of(&g, "worker")).await;
    let r = new.expect_lease_resumed(&g.lease_id).await;
    assert_eq!(r.fencing_token, g.fencing_token);
    let e = old.expect_expired(&g.lease_id).await;
    assert_eq!(e.reason, pb::ExpiryReason::ResumedElsewhere as i32, "{e:?}");

    // Still one lease on one slot; the old stream can no longer touch it.
    let s = d.status().await;
    assert_eq!((pool_in(&s, "p").in_flight, s.leases.len()), (1, 1));
    old.heartbeat(&[&g.lease_id]).await;
    old.expect_lease_error(&g.lease_id, Code::FailedPrecondition).await;
    old.expect_heartbeat_ack(0).await;
    old.release(&g.lease_id).await;
    old.expect_lease_error(&g.lease_id, Code::FailedPrecondition).await;

    new.heartbeat(&[]).await;
    new.expect_heartbeat_ack(1).await;
    new.release_ok(&g.lease_id).await;
    // A released lease cannot be resumed, even with its credential.
    old.resume(resume_of(&g, "worker")).await;
    old.expect_lease_error(&g.lease_id, Code::FailedPrecondition).await;
    d.assert_idle().await;
    d.stop().await;
}

/// The toml of a daemon keeping its key and restart marker in `dir`, whose restart learns for 5 s.
fn restartable(dir: &TempDir) -> String {
    let marker = dir.0.join("slotd.running");
    format!(
        "state_dir = {:?}\nrestart_marker = {:?}\n[pools.p]\nmax_concurrent = {LIMIT}\nadaptive = false\n\
         default_ttl = \"5s\"\n[pools.q]\nmax_concurrent = 1\nparent = \"p\"\ndefault_ttl = \"5s\"\n",
        dir.0.display().to_string(),
        marker.display().to_string()
    )
}

/// Stops `d` with `holder`'s lease held, so the next start with the same directory learns.
async fn restart(d: Daemon, toml: &str, holder: Agent) -> Daemon {
    d.stop().await;
    drop(holder);
    let d = Daemon::start(toml).await;
    assert!(d.status().await.learning, "the restart learns");
    d
}

#[tokio::test]
async fn forged_resumes_during_learning_create_nothing_and_leave_fencing_counters_alone() {
    let dir = TempDir::new("forged");
    let toml = restartable(&dir);
    let d = Daemon::start(&toml).await;
    let mut holder = d.agent("holder").await;
    let g = holder.acquire("r", "q").await;
    let d = restart(d, &toml, holder).await;

    let counters = |s: &pb::StatusResponse| -> Vec<(String, u64)> {
        s.pools.iter().map(|p| (p.name.clone(), p.next_fencing_token)).collect()
    };
    let before = counters(&d.status().await);
    let mut forger = d.agent("forger").await;
    let real = resume_of(&g, "holder");
    let never = "0123456789abcdef0123456789abcdef";
    let mut forged = Vec::new();
    for token in [1, g.fencing_token, g.fencing_token + 1, (1 << 63) - 1, 1 << 63, u64::MAX] {
        for pool in ["p", "q"] {
            for lease_id in [never, g.lease_id.as_str()] {
                let r = pb::ResumeLease {
                    lease_id: lease_id.into(),
                    fencing_token: token,
                    pool: pool.into(),
                    holder: "holder".into(),
                    ..Default::default()
                };
                // No credential, a made-up one, and the real lease's credential on other fields.
                forged.push(r.clone());
                forged.push(pb::ResumeLease { credential: "a".repeat(64), ..r.clone() });
                if (lease_id, token, pool) != (g.lease_id.as_str(), g.fencing_token, "q") {
                    forged.push(pb::ResumeLease { credential: real.credential.clone(), ..r });
                }
            }
        }
    }
    for r in forged {
        let id = r.lease_id.clone();
        forger.resume(r).await;
        forger.expect_lease_error(&id, Code::PermissionDenied).await;
    }
    let s = d.status().await;
    assert!(s.learning && s.leases.is_empty(), "a forged resume created a lease: {s:?}");
    assert!(s.pools.iter().all(|p| p.in_flight == 0));
    assert_eq!(counters(&s), before, "a forged resume moved a fencing counter");

    // The real holder's credential, from before the restart, still resumes it.
    let mut back = d.agent("holder-again").await;
    back.resume(real).await;
    let r = back.expect_lease_resumed(&g.lease_id).await;
    assert_eq!(r.fencing_token, g.fencing_token);
    assert_eq!(counters(&d.status().await), before, "the daemon issued this token: no counter moves");
    back.release_ok(&g.lease_id).await;
    d.assert_idle().await;
    d.stop().await;
}

#[tokio::test]
async fn a_credential_is_only_good_with_the_key_that_issued_it() {
    let (one, two) = (TempDir::new("key-one"), TempDir::new("key-two"));
    let d = Daemon::start(&restartable(&one)).await;
    let mut holder = d.agent("holder").await;
    let g = holder.acquire("r", "p").await;
    d.stop().await;
    drop(holder);
    // The key file was created with mode 0600.
    let key = one.0.join("lease.key");
    assert_eq!(std::fs::read(&key).unwrap().len(), 32);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    }

    // Another state directory means another key: the restart learns, but the credential is refused.
    std::fs::copy(one.0.join("slotd.running"), two.0.join("slotd.running")).unwrap();
    let d = Daemon::start(&restartable(&two)).await;
    assert!(d.status().await.learning);
    let mut back = d.agent("holder-again").await;
    back.resume(resume_of(&g, "holder")).await;
    back.expect_lease_error(&g.lease_id, Code::PermissionDenied).await;
    d.assert_idle().await;
    d.stop().await;
}

#[tokio::test]
async fn a_key_file_of_the_wrong_size_or_readable_by_others_stops_the_daemon_with_a_reason() {
    let dir = TempDir::new("bad-key");
    let key = dir.0.join("lease.key");
    let serve = |key: &std::path::Path| {
        let toml = format!("key_file = {:?}\n[pools.p]\nmax_concurrent = 1\n", key.display().to_string());
        async move {
            let cfg = slotd::config::Config::from_toml_str(&toml).unwrap();
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let serve = slotd::serve(cfg, listener, std::future::pending());
            match tokio::time::timeout(Duration::from_secs(10), serve).await {
                Ok(Err(e)) => e.to_string(),
                other => panic!("the daemon started with a bad key file: {other:?}"),
            }
        }
    };
    std::fs::write(&key, [7u8; 16]).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = serve(&key).await;
        assert!(err.contains("16 bytes long, want 32"), "{err}");
        std::fs::write(&key, [7u8; 32]).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = serve(&key).await;
        assert!(err.contains("mode 0644") && err.contains("chmod 600"), "{err}");
    }
    #[cfg(not(unix))]
    {
        let err = serve(&key).await;
        assert!(err.contains("16 bytes long, want 32"), "{err}");
    }
}

/// Granted is the only message that carries a credential: Watch shows the grant without it.
#[tokio::test]
async fn watch_never_shows_a_credential() {
    let d = Daemon::start(&pools()).await;
    let mut admin = d.admin().await;
    let mut watch = admin
        .watch(pb::WatchRequest { pool: String::new(), snapshot_interval: Some(ms(0)) })
        .await
        .unwrap()
        .into_inner();
    let mut a = d.agent("a").await;
    let g = a.acquire("r", "p").await;
    let mut seen = String::new();
    while !seen.contains(&g.lease_id) {
        let ev = tokio::time::timeout(Duration::from_secs(10), watch.message())
            .await
            .expect("a Watch event in time")
            .expect("Watch ok")
            .expect("Watch open");
        seen.push_str(&format!("{ev:?}"));
    }
    assert!(!seen.contains(&g.resume_credential), "Watch shows the credential: {seen}");
    a.release_ok(&g.lease_id).await;
    // Nothing else on the agent's own stream repeats it either.
    match a.next_within(Duration::from_millis(50)).await {
        None => {}
        Some(Msg::Granted(_)) => panic!("a second grant"),
        Some(other) => assert!(!format!("{other:?}").contains(&g.resume_credential)),
    }
    d.assert_idle().await;
    d.stop().await;
}
