//! The `slotd-proxy` binary: `--print-default-config`, `--check`, `--fingerprint`, and serving the
//! embedded default on a given address until SIGTERM.

use std::{
    io::Write,
    process::{Command, Stdio},
    time::Duration,
};

use slotd_proxy::{DEFAULT_TOML, fingerprint::Fingerprinter};
use slotd_test_support::http_get;

const BIN: &str = env!("CARGO_BIN_EXE_slotd-proxy");

#[test]
fn print_default_config_and_check() {
    let out = Command::new(BIN).arg("--print-default-config").output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), DEFAULT_TOML);

    let out = Command::new(BIN).arg("--check").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("2 route(s)"), "{out:?}");

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, DEFAULT_TOML.replace("max_connections = 1024", "max_connections = 0")).unwrap();
    let out = Command::new(BIN).arg("--check").arg("--config").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_connections"), "{out:?}");
}

#[test]
fn fingerprint_reads_the_key_on_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("fp.toml");
    let key = "a-fingerprint-key-of-some-length";
    std::fs::write(
        &cfg,
        DEFAULT_TOML.replacen(
            "[routes.anthropic]",
            &format!("fingerprint_key = \"{key}\"\n\n[routes.anthropic]"),
            1,
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .arg("--fingerprint")
        .arg("--config")
        .arg(&cfg)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"sk-ant-secret\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8(out.stdout).unwrap();
    assert_eq!(printed.trim(), Fingerprinter::new(key.as_bytes()).fingerprint(b"sk-ant-secret"));
    assert!(!printed.contains("secret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_the_embedded_default_until_sigterm() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut child = tokio::process::Command::new(BIN)
        .arg("--listen")
        .arg(addr.to_string())
        // Nobody listens there: the default routes fail closed.
        .arg("--daemon")
        .arg("127.0.0.1:1")
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + slotd_test_support::TIMEOUT;
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(std::time::Instant::now() < deadline, "the proxy never listened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (code, body) = http_get(addr, "/healthz").await;
    assert_eq!(code, 200);
    assert!(body.contains("down"), "{body}");
    let (code, _) = http_get(addr, "/anthropic/v1/messages").await;
    assert_eq!(code, 503);
    // SIGTERM: a graceful exit.
    let pid = child.id().unwrap();
    assert!(Command::new("kill").arg("-TERM").arg(pid.to_string()).status().unwrap().success());
    let status = slotd_test_support::within("exit", child.wait()).await.unwrap();
    assert!(status.success(), "{status:?}");
}
