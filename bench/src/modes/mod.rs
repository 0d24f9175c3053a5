//! The bench modes. Each returns a report that prints itself as text or JSON.

pub mod cycles;
pub mod fanout;
pub mod floor;
pub mod handoff;
pub mod idle;
pub mod rtt;

use serde::Serialize;

use crate::daemon::{Daemon, ProcSample};

/// What every mode gets.
pub struct Ctx<'a> {
    /// The daemon under test.
    pub daemon: &'a Daemon,
    /// The pool to use.
    pub pool: String,
    /// RLIMIT_NOFILE of this process (and of a spawned daemon).
    pub nofile: u64,
}

/// The daemon's and the bench's resource use over a run.
#[derive(Debug, Default, Serialize)]
pub struct Resources {
    /// The daemon's pid, if known.
    pub daemon_pid: Option<u32>,
    /// Daemon before the run.
    pub daemon_before: Option<ProcSample>,
    /// Daemon after the run.
    pub daemon_after: Option<ProcSample>,
    /// Daemon CPU over the measured window, as a share of one core.
    pub daemon_cpu_cores: Option<f64>,
    /// The bench process's CPU over the measured window, as a share of one core.
    pub bench_cpu_cores: Option<f64>,
    /// Online CPUs.
    pub nproc: usize,
    /// 1-minute load average at the start.
    pub loadavg_1m_before: Option<f64>,
}

impl Resources {
    /// Starts a measurement.
    pub fn start(ctx: &Ctx<'_>) -> (Self, Option<ProcSample>) {
        let r = Self {
            daemon_pid: ctx.daemon.pid,
            daemon_before: ctx.daemon.sample(),
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            loadavg_1m_before: std::fs::read_to_string("/proc/loadavg")
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse().ok()),
            ..Self::default()
        };
        (r, ProcSample::own())
    }

    /// Ends it, over `wall_secs` of measured time.
    pub fn finish(&mut self, ctx: &Ctx<'_>, own_before: Option<ProcSample>, wall_secs: f64) {
        self.daemon_after = ctx.daemon.sample();
        if let (Some(a), Some(b)) = (self.daemon_after, self.daemon_before) {
            self.daemon_cpu_cores = Some((a.cpu_secs - b.cpu_secs) / wall_secs);
        }
        if let (Some(a), Some(b)) = (ProcSample::own(), own_before) {
            self.bench_cpu_cores = Some((a.cpu_secs - b.cpu_secs) / wall_secs);
        }
    }

    /// Lines for humans.
    pub fn lines(&self) -> String {
        let mut s = String::new();
        match (self.daemon_before, self.daemon_after) {
            (Some(b), Some(a)) => {
                s += &format!(
                    "daemon pid {}: RSS {:.1} MiB -> {:.1} MiB, peak (VmHWM) {:.1} MiB\n",
                    self.daemon_pid.unwrap_or(0),
                    mib(b.rss_kib),
                    mib(a.rss_kib),
                    mib(a.hwm_kib)
                );
            }
            _ => s += "daemon memory: unknown (give --daemon-pid or --spawn-daemon)\n",
        }
        if let Some(c) = self.daemon_cpu_cores {
            s += &format!("daemon CPU: {c:.2} cores");
            if let Some(b) = self.bench_cpu_cores {
                s += &format!(", bench CPU: {b:.2} cores");
            }
            s += &format!(" (of {} online)\n", self.nproc);
        }
        if let Some(l) = self.loadavg_1m_before {
            s += &format!("load average (1 min) before the run: {l:.2}\n");
        }
        s
    }
}

/// KiB to MiB.
pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Prints `report` as JSON or via `text`.
pub fn emit<T: Serialize>(report: &T, json: bool, text: impl FnOnce(&T) -> String) {
    if json {
        println!("{}", serde_json::to_string_pretty(report).expect("report serialises"));
    } else {
        print!("{}", text(report));
    }
}
