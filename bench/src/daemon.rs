//! The daemon under test: an endpoint, and the pid whose memory and CPU we read. Either one we spawn
//! (with a config written for the mode) or one the user started (`--endpoint`, `--daemon-pid`).

use std::{
    fs,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::BoxError;

/// Pool settings the bench writes into a spawned daemon's config.
#[derive(Clone, Copy, Debug)]
pub struct PoolSpec {
    /// `max_concurrent`.
    pub slots: u32,
    /// Acquire streams the mode opens (to raise `limits.max_streams` above it, where the daemon has it).
    pub streams: usize,
}

/// The daemon being measured.
pub struct Daemon {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// Its pid, when known (spawned, or `--daemon-pid`).
    pub pid: Option<u32>,
    child: Option<Child>,
    dir: Option<PathBuf>,
}

impl Daemon {
    /// A daemon someone else started.
    pub fn external(endpoint: String, pid: Option<u32>) -> Self {
        Self { endpoint, pid, child: None, dir: None }
    }

    /// Starts `binary --config <tmp> --listen 127.0.0.1:PORT` with one pool `pool` and waits until it
    /// accepts connections. The child inherits this process's RLIMIT_NOFILE (raise it first).
    pub fn spawn(binary: &Path, pool: &str, spec: PoolSpec) -> Result<Self, BoxError> {
        let dir = std::env::temp_dir().join(format!("slotd-bench-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        let config = dir.join("slotd.toml");
        // A large queue and long TTLs: the bench measures scheduling, not admission or expiry.
        let pools = format!(
            "[pools.{pool}]\nmax_concurrent = {}\nadaptive = false\nmax_queue_depth = 1000000\n\
             default_ttl = \"1h\"\nmax_ttl = \"1h\"\n",
            spec.slots
        );
        // Daemons with a stream cap need it above the bench's sessions; older ones refuse the key.
        let limits = format!("[limits]\nmax_streams = {}\n\n", spec.streams + 64);
        fs::write(&config, format!("{limits}{pools}"))?;
        let checked = Command::new(binary)
            .arg("--config")
            .arg(&config)
            .arg("--check")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        if !checked.success() {
            fs::write(&config, &pools)?;
        }
        // Pick a free port; the tiny race with other binders is acceptable for a benchmark.
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let log = fs::File::create(dir.join("slotd.log"))?;
        let child = Command::new(binary)
            .arg("--config")
            .arg(&config)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        let pid = child.id();
        let mut me = Self {
            endpoint: format!("http://127.0.0.1:{port}"),
            pid: Some(pid),
            child: Some(child),
            dir: Some(dir),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = me.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                return Err(format!("slotd exited at start ({status}); see {}", me.log_path()).into());
            }
            if Instant::now() > deadline {
                return Err(format!("slotd did not listen within 10s; see {}", me.log_path()).into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(me)
    }

    /// Where a spawned daemon logs.
    pub fn log_path(&self) -> String {
        self.dir.as_ref().map_or_else(String::new, |d| d.join("slotd.log").display().to_string())
    }

    /// Memory and CPU of the daemon now, if its pid is known.
    pub fn sample(&self) -> Option<ProcSample> {
        self.pid.and_then(ProcSample::read)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM for a graceful stop, then SIGKILL if it lingers.
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(dir) = self.dir.take() {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// One reading of `/proc/<pid>/status` and `/proc/<pid>/stat`.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct ProcSample {
    /// Resident set size now, KiB.
    pub rss_kib: u64,
    /// Peak resident set size, KiB.
    pub hwm_kib: u64,
    /// User + system CPU time consumed so far, seconds.
    pub cpu_secs: f64,
}

impl ProcSample {
    /// Reads the sample for `pid` (`None` if the process is gone).
    pub fn read(pid: u32) -> Option<Self> {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        };
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name (which may contain spaces) start at field 3 (state).
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        Some(Self { rss_kib: kib("VmRSS:"), hwm_kib: kib("VmHWM:"), cpu_secs: ticks as f64 / hz })
    }

    /// This process.
    pub fn own() -> Option<Self> {
        Self::read(std::process::id())
    }
}

/// Raises RLIMIT_NOFILE's soft limit to `want` (and the hard limit too when allowed, e.g. as root).
/// Returns the soft limit in force afterwards.
pub fn raise_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur >= want {
            return lim.rlim_cur;
        }
        let raised = libc::rlimit { rlim_cur: want, rlim_max: lim.rlim_max.max(want) };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            let soft = libc::rlimit { rlim_cur: want.min(lim.rlim_max), rlim_max: lim.rlim_max };
            libc::setrlimit(libc::RLIMIT_NOFILE, &soft);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}
