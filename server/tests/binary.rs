//! The `slotd` binary itself: starts on the embedded default config with each runtime flavour, grants
//! a lease over loopback, and stops cleanly on SIGTERM.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::Duration,
};

use slotd_proto::v1::{self as pb, client_message::Msg as Up, server_message::Msg as Down};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Kills the daemon if a test fails before stopping it.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `slotd --listen 127.0.0.1:0 <args>` and returns it with the address it logged.
fn start(args: &[&str]) -> (Running, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_slotd"))
        .args(["--listen", "127.0.0.1:0", "--restart-marker", "none", "--log-format", "json"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("slotd starts");
    let stderr = child.stderr.take().expect("piped stderr");
    let running = Running(child);
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines.next().expect("slotd logged its address before exiting").expect("utf-8 log");
        let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
        if let Some(a) = v["fields"]["addr"].as_str() {
            break a.to_owned();
        }
    };
    // Keep draining the log so the daemon never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (running, format!("http://{addr}"))
}

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

fn stop(mut d: Running) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(d.0.id() as libc::pid_t, libc::SIGTERM) };
    for _ in 0..500 {
        if let Some(status) = d.0.try_wait().expect("wait") {
            assert!(status.success(), "slotd exited with {status}");
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("slotd did not stop within 5s of SIGTERM");
}

#[test]
fn serves_on_the_default_config_with_one_thread_per_cpu_and_with_one_thread() {
    for threads in ["0", "1"] {
        let (d, url) = start(&["--worker-threads", threads]);
        // The client's runtime (and with it its connection) is gone before the daemon is stopped, so
        // graceful shutdown has no open connection to wait for.
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), acquire_once(&url)).await })
            .unwrap_or_else(|_| panic!("worker_threads = {threads}: no grant within 10s"));
        drop(rt);
        stop(d);
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
