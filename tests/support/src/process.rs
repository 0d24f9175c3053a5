//! The built binaries as child processes: [`Slotd`] (the daemon on `--listen 127.0.0.1:0`, its address
//! read from its JSON log) and bounded runs of a command with exit-code checks.

use std::{
    future::Future,
    io::{BufRead, BufReader},
    panic::Location,
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

/// The longest a child process may take to start, answer or stop (a fresh process on a loaded
/// machine is slower than an in-process daemon).
pub const PROCESS_TIMEOUT: Duration = Duration::from_secs(10);

/// With this environment variable set, [`Slotd::spawn`] echoes the child's log lines to stderr.
pub const CHILD_LOGS: &str = "SLOTD_TEST_CHILD_LOGS";

/// A `slotd` binary serving on an ephemeral loopback port; killed and reaped on drop if a test fails
/// before [`Slotd::terminate`].
pub struct Slotd {
    child: Child,
    /// The daemon's URL (`http://127.0.0.1:PORT`), from the address it logged.
    pub url: String,
    /// The metrics address (`127.0.0.1:PORT`), when the line with the address also had `metrics`.
    pub metrics: Option<String>,
}

impl Slotd {
    /// Starts `exe --listen 127.0.0.1:0 --restart-marker none --log-format json <args>` (pass
    /// `env!("CARGO_BIN_EXE_slotd")`) and waits for the address it logs.
    #[track_caller]
    pub fn start(exe: &str, args: &[&str]) -> Slotd {
        Self::start_with(exe, args, |_| {})
    }

    /// [`Slotd::start`], letting `configure` adjust the command first (environment, limits).
    #[track_caller]
    pub fn start_with(exe: &str, args: &[&str], configure: impl FnOnce(&mut Command)) -> Slotd {
        let mut cmd = Command::new(exe);
        cmd.args(["--listen", "127.0.0.1:0", "--restart-marker", "none", "--log-format", "json"]).args(args);
        configure(&mut cmd);
        Self::spawn(cmd)
    }

    /// Runs `cmd`, a daemon that logs JSON lines to stderr (a test binary serving in a child, say),
    /// and waits for the line carrying its address (`fields.addr`).
    #[track_caller]
    pub fn spawn(mut cmd: Command) -> Slotd {
        let at = Location::caller();
        let exe = cmd.get_program().to_string_lossy().into_owned();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{at}: {exe} does not start: {e}"));
        let stderr = child.stderr.take().expect("piped stderr");
        // From here on a panic kills the child.
        let mut running = Slotd { child, url: String::new(), metrics: None };
        let mut lines = BufReader::new(stderr).lines();
        let addr = loop {
            let line = lines
                .next()
                .unwrap_or_else(|| panic!("{at}: slotd exited before logging its address"))
                .expect("utf-8 log");
            let v: serde_json::Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("{at}: not a JSON log line ({e}): {line}"));
            if let Some(a) = v["fields"]["addr"].as_str() {
                running.metrics = v["fields"]["metrics"].as_str().map(str::to_owned);
                break a.to_owned();
            }
        };
        // Keep draining the log so the daemon never blocks on a full pipe (echoed with
        // `SLOTD_TEST_CHILD_LOGS` set, to see what a child did).
        let echo = std::env::var_os(CHILD_LOGS).is_some();
        let pid = running.child.id();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if echo {
                    eprintln!("[{pid}] {line}");
                }
            }
        });
        running.url = format!("http://{addr}");
        running
    }

    /// The child's process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The exit code once the child has exited (`Some(None)`: killed by a signal), without waiting.
    pub fn try_exit(&mut self) -> Option<Option<i32>> {
        self.child.try_wait().expect("wait").map(|s| s.code())
    }

    /// Sends SIGTERM and waits (up to [`PROCESS_TIMEOUT`]) for a successful exit.
    #[track_caller]
    pub fn terminate(mut self) {
        let at = Location::caller();
        let pid = libc::pid_t::try_from(self.child.id()).expect("a pid fits pid_t");
        // SAFETY: kill(2) on our own, not yet reaped, child's pid.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + PROCESS_TIMEOUT;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(status.success(), "{at}: slotd exited with {status}");
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("{at}: slotd did not stop within {PROCESS_TIMEOUT:?} of SIGTERM");
    }
}

impl Drop for Slotd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `cmd` to completion and collects its output, failing after [`PROCESS_TIMEOUT`]. Set
/// `kill_on_drop(true)` on `cmd` so that a timed-out child does not outlive the test.
///
/// # Cancel safety
///
/// Dropping the future drops the child (killed when `cmd` had `kill_on_drop(true)`).
#[track_caller]
pub fn output_within(cmd: &mut tokio::process::Command) -> impl Future<Output = Output> + '_ {
    let at = Location::caller();
    async move {
        tokio::time::timeout(PROCESS_TIMEOUT, cmd.output())
            .await
            .unwrap_or_else(|_| panic!("{at}: {cmd:?} took longer than {PROCESS_TIMEOUT:?}"))
            .unwrap_or_else(|e| panic!("{at}: {cmd:?} does not run: {e}"))
    }
}

/// Bytes from a child's stdout or stderr, as text.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Asserts a child's exit code, showing its stdout and stderr when it differs.
#[track_caller]
pub fn assert_exit_code(out: &Output, code: i32) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "exit status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}
