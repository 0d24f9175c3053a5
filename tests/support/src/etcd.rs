//! [`Etcd`]: a real single-member etcd on free loopback ports with a temporary data directory, for
//! the high-availability tests. `None` when no `etcd` binary is installed (`.ci/run` installs one).

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::process::PROCESS_TIMEOUT;

/// A running etcd; killed and its data directory removed on drop.
pub struct Etcd {
    child: Child,
    dir: PathBuf,
    /// The client URL (`http://127.0.0.1:PORT`).
    pub url: String,
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
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new(&exe)
            .arg("--data-dir")
            .arg(&dir)
            .args(["--name", "default", "--listen-client-urls", &url, "--advertise-client-urls", &url])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("default={peer_url}"), "--log-level", "error"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{} does not start: {e}", exe.display()));
        let etcd = Etcd { child, dir, url };
        let addr: SocketAddr = format!("127.0.0.1:{client}").parse().expect("an address");
        let deadline = Instant::now() + PROCESS_TIMEOUT;
        while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
            assert!(Instant::now() < deadline, "etcd did not listen on {addr} within {PROCESS_TIMEOUT:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(etcd)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
