//! The `slotd` binary itself: starts on the embedded default config with each runtime flavour, grants
//! a lease over loopback, and stops cleanly on SIGTERM.

use std::{process::Command, time::Duration};

use slotd_proto::v1::{self as pb, client_message::Msg as Up, server_message::Msg as Down};
use slotd_test_support::process::Slotd;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

async fn acquire_once(url: &str) {
    let mut client = pb::slotd_client::SlotdClient::connect(url.to_owned()).await.expect("connect");
    let (tx, rx) = mpsc::channel(4);
    let mut down = client.acquire(ReceiverStream::new(rx)).await.expect("Acquire").into_inner();
    let req = pb::LeaseRequest {
        request_id: "r1".into(),
        pool: "default".into(),
        holder: "binary-test".into(),
        ..Default::default()
    };
    tx.send(pb::ClientMessage { msg: Some(Up::Request(req)) }).await.unwrap();
    let lease = match down.message().await.expect("a message").and_then(|m| m.msg) {
        Some(Down::Granted(g)) => g.lease_id,
        other => panic!("expected Granted, got {other:?}"),
    };
    tx.send(pb::ClientMessage {
        msg: Some(Up::Release(pb::ReleaseLease { lease_id: lease.clone(), ..Default::default() })),
    })
    .await
    .unwrap();
    match down.message().await.expect("a message").and_then(|m| m.msg) {
        Some(Down::Released(r)) => assert_eq!(r.lease_id, lease),
        other => panic!("expected Released, got {other:?}"),
    }
}

#[test]
fn serves_on_the_default_config_with_one_thread_per_cpu_and_with_one_thread() {
    for threads in ["0", "1"] {
        let d = Slotd::start(env!("CARGO_BIN_EXE_slotd"), &["--worker-threads", threads]);
        // The client's runtime (and with it its connection) is gone before the daemon is stopped, so
        // graceful shutdown has no open connection to wait for.
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), acquire_once(&d.url)).await })
            .unwrap_or_else(|_| panic!("worker_threads = {threads}: no grant within 10s"));
        drop(rt);
        d.terminate();
    }
}

#[test]
fn refuses_an_absurd_thread_count_with_a_reason() {
    let out = Command::new(env!("CARGO_BIN_EXE_slotd"))
        .args(["--worker-threads", "100000", "--check"])
        .output()
        .expect("slotd runs");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("worker_threads"), "{err}");
}

/// `--state-dir` (what systemd's `StateDirectory=` sets through $STATE_DIRECTORY) holds the key of
/// resume credentials: created 0600 on first start, the same key on the next; an exposed one is refused.
#[test]
fn the_state_dir_keeps_the_resume_credential_key_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let key = state.join("lease.key");
    let args = ["--state-dir", state.to_str().unwrap()];
    // One grant before SIGTERM: the signal handler is installed once serving has begun.
    let serve_once = || {
        let d = Slotd::start(env!("CARGO_BIN_EXE_slotd"), &args);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), acquire_once(&d.url)).await })
            .expect("a grant within 10s");
        drop(rt);
        d.terminate();
    };
    serve_once();
    let first = std::fs::read(&key).expect("the key file was created");
    assert_eq!(first.len(), 32);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        serve_once();
        assert_eq!(std::fs::read(&key).unwrap(), first, "the key is kept");

        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_slotd"))
            .args(["--listen", "127.0.0.1:0", "--restart-marker", "none"])
            .args(args)
            .output()
            .expect("slotd runs");
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("lease.key") && err.contains("chmod 600"), "{err}");
    }
}
