//! The `slotd` binary itself: starts on the embedded default config with each runtime flavour, grants
//! a lease over loopback, and stops cleanly on SIGTERM; tells systemd READY and STOPPING; and backs
//! off instead of spinning when it runs out of file descriptors.

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

/// The daemon as systemd's `Type=notify` sees it: READY=1 once serving, STOPPING=1 on SIGTERM.
#[cfg(unix)]
#[test]
fn notifies_systemd_ready_once_serving_and_stopping_on_sigterm() {
    use std::os::unix::net::UnixDatagram;

    let dir = std::env::temp_dir().join(format!("slotd-notify-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let recv = |what: &str| {
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).unwrap_or_else(|e| panic!("no {what} notification: {e}"));
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };

    let d = Slotd::start_with(env!("CARGO_BIN_EXE_slotd"), &[], |cmd| {
        cmd.env("NOTIFY_SOCKET", &path);
    });
    assert_eq!(recv("READY"), "READY=1\n");
    // Ready means serving: a grant works now.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), acquire_once(&d.url)).await })
        .expect("a grant after READY");
    drop(rt);
    d.terminate();
    assert_eq!(recv("STOPPING"), "STOPPING=1\n");
    let _ = std::fs::remove_dir_all(&dir);
}

/// CPU time (user + system, in clock ticks) a process has used, from /proc.
#[cfg(target_os = "linux")]
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th overall.
    let rest = &stat[stat.rfind(')').expect("a stat line") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// At the open-file limit `accept` fails (EMFILE) while connections wait in the backlog: the daemon
/// retries with a backoff instead of spinning, and serves again once descriptors free up.
#[cfg(target_os = "linux")]
#[test]
fn at_the_open_file_limit_accept_backs_off_and_recovers() {
    use std::os::unix::process::CommandExt;

    const FD_LIMIT: libc::rlim_t = 48;
    let d = Slotd::start_with(env!("CARGO_BIN_EXE_slotd"), &["--worker-threads", "1"], |cmd| {
        // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                let lim = libc::rlimit { rlim_cur: FD_LIMIT, rlim_max: FD_LIMIT };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    let addr = d.url.trim_start_matches("http://").to_owned();
    // More silent connections than the daemon has descriptors: the rest wait in the backlog.
    let hogs: Vec<std::net::TcpStream> =
        (0..2 * FD_LIMIT).map(|_| std::net::TcpStream::connect(&addr).expect("connect")).collect();
    std::thread::sleep(Duration::from_millis(200));
    let (t0, c0) = (std::time::Instant::now(), cpu_ticks(d.id()));
    std::thread::sleep(Duration::from_millis(500));
    let (elapsed, used) = (t0.elapsed(), cpu_ticks(d.id()) - c0);
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
    let busy = Duration::from_millis(used * 1000 / hz);
    assert!(busy < elapsed / 4, "the accept loop used {busy:?} of CPU in {elapsed:?}: spinning");

    drop(hogs);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), acquire_once(&d.url)).await })
        .expect("served again once descriptors were free");
    drop(rt);
    d.terminate();
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
