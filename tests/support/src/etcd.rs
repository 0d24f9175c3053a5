//! [`Etcd`]: a real single-member etcd on free loopback ports with a temporary data directory, for
//! the high-availability tests. `None` when no `etcd` binary is installed (`.ci/run` installs one).
//! [`Etcd::kill`] and [`Etcd::start_again`] restart it on the same ports and data directory.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::process::PROCESS_TIMEOUT;

/// etcd's `--heartbeat-interval` (ms) in tests.
const HEARTBEAT_MS: &str = "25";
/// etcd's `--election-timeout` (ms) in tests: how long a restarted etcd waits before electing itself.
const ELECTION_TIMEOUT_MS: &str = "250";

/// A running etcd; killed and its data directory removed on drop.
pub struct Etcd {
    child: Option<Child>,
    exe: PathBuf,
    dir: PathBuf,
    peer: u16,
    /// The client URL (`http://127.0.0.1:PORT`).
    pub url: String,
    /// The client address (`127.0.0.1:PORT`).
    pub addr: SocketAddr,
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("an ephemeral port").port()
}

impl Etcd {
    /// The `etcd` binary, from `$SLOTD_TEST_ETCD` or the `PATH`.
    pub fn binary() -> Option<PathBuf> {
        if let Some(p) = std::env::var_os("SLOTD_TEST_ETCD") {
            return Some(PathBuf::from(p));
        }
        std::env::var_os("PATH")?
            .to_str()?
            .split(':')
            .map(|d| PathBuf::from(d).join("etcd"))
            .find(|p| p.is_file())
    }

    /// Starts etcd and waits until it accepts connections; `None` without an `etcd` binary.
    #[track_caller]
    pub fn start() -> Option<Etcd> {
        let exe = Self::binary()?;
        let (client, peer) = (free_port(), free_port());
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!("slotd-etcd-{}-{nanos}", std::process::id()));
        let url = format!("http://127.0.0.1:{client}");
        let addr: SocketAddr = format!("127.0.0.1:{client}").parse().expect("an address");
        let mut etcd = Etcd { child: None, exe, dir, peer, url, addr };
        etcd.start_again();
        Some(etcd)
    }

    /// Kills etcd (SIGKILL: no goodbye to its clients) and reaps it; its data directory stays.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd (again, after [`kill`](Self::kill)) on the same ports and data directory, and
    /// waits until it accepts connections.
    #[track_caller]
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "etcd is already running");
        let url = &self.url;
        let peer_url = format!("http://127.0.0.1:{}", self.peer);
        let child = Command::new(&self.exe)
            .arg("--data-dir")
            .arg(&self.dir)
            .args(["--name", "default", "--listen-client-urls", url, "--advertise-client-urls", url])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("default={peer_url}"), "--log-level", "error"])
            // Elects itself in a fraction of a second after a restart, rather than in about 2 s
            // with the defaults (100 ms / 1 s): an outage is as long as the test makes it.
            .args(["--heartbeat-interval", HEARTBEAT_MS, "--election-timeout", ELECTION_TIMEOUT_MS])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{} does not start: {e}", self.exe.display()));
        self.child = Some(child);
        let deadline = Instant::now() + PROCESS_TIMEOUT;
        while !self.healthy() {
            assert!(
                Instant::now() < deadline,
                "etcd on {} was not healthy within {PROCESS_TIMEOUT:?}",
                self.addr
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// etcd answers `GET /health` with `"health":"true"`: it listens and has elected itself.
    pub fn healthy(&self) -> bool {
        let probe = || -> std::io::Result<String> {
            let mut c = TcpStream::connect_timeout(&self.addr, Duration::from_millis(100))?;
            c.set_read_timeout(Some(Duration::from_millis(500)))?;
            c.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
            let mut body = String::new();
            c.read_to_string(&mut body)?;
            Ok(body)
        };
        probe().is_ok_and(|b| b.contains("\"health\":\"true\""))
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
