//! `slotd-bench`: a load generator for slotd over loopback. Every mode is bounded and stops by itself.
//!
//! It drives the daemon with the raw generated client (`SlotdClient`), not `slotd-client`, so the
//! numbers are the daemon's plus the thinnest possible client. Run a release daemon in a separate
//! process (`--spawn-daemon target/release/slotd`, or `--endpoint` with `--daemon-pid`) so its memory
//! and CPU can be read from `/proc`. See docs/BENCHMARKS.md for the commands and results.

mod daemon;
mod modes;
mod sem;
mod stats;
mod wire;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::daemon::{Daemon, PoolSpec};

/// Errors are reported, not matched on.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Load generator for slotd (loopback only; every mode is bounded in time or count).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    target: Target,
    /// Print one JSON object instead of the human-readable summary.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    mode: Mode,
}

/// Which daemon to measure.
#[derive(Debug, Args)]
struct Target {
    /// The daemon to drive, e.g. http://127.0.0.1:50051 (its pool `--pool` must exist).
    #[arg(long, global = true, conflicts_with = "spawn_daemon")]
    endpoint: Option<String>,
    /// Start this slotd binary on a free loopback port with a config written for the mode
    /// (pool `--pool`, adaptive = false, a large queue), and stop it at the end.
    #[arg(long, global = true, value_name = "PATH")]
    spawn_daemon: Option<PathBuf>,
    /// Pid of the `--endpoint` daemon, to report its memory and CPU.
    #[arg(long, global = true)]
    daemon_pid: Option<u32>,
    /// The pool to use.
    #[arg(long, global = true, default_value = "bench")]
    pool: String,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// C sessions (one connection each) loop request -> granted -> hold -> release on K slots.
    Cycles(modes::cycles::Opts),
    /// Uncontended acquire + release round trips on one session.
    Rtt(modes::rtt::Opts),
    /// Slot hand-off: one session releases, a queued one is granted; release sent -> Granted received.
    Handoff(modes::handoff::Opts),
    /// N sessions, each with one queued request behind a full pool: the daemon's memory.
    Idle(modes::idle::Opts),
    /// N queued waiters, then ReportRateLimit: time until every waiter has received Paused.
    Fanout(modes::fanout::Opts),
    /// The fan-out floor without slotd: raw TCP writes to N loopback connections from a child process.
    Floor(modes::floor::Opts),
    /// The child side of `floor` (started by it; not for direct use).
    #[command(hide = true)]
    FloorServe {
        /// Bytes per message.
        #[arg(long)]
        message_bytes: usize,
        /// Connections to wait for before answering `?`.
        #[arg(long)]
        sockets: usize,
    },
}

impl Mode {
    /// The pool a spawned daemon needs; `None` for the modes that run without a daemon.
    fn pool_spec(&self) -> Option<PoolSpec> {
        Some(match self {
            Mode::Cycles(o) => PoolSpec { slots: o.slots, streams: o.sessions },
            Mode::Rtt(o) => PoolSpec {
                slots: 64 + o.held_leases,
                streams: 1 + o.status_callers + o.held_leases as usize / 1000,
            },
            Mode::Handoff(_) => PoolSpec { slots: 1, streams: 2 },
            Mode::Idle(o) => PoolSpec { slots: 1, streams: o.sessions + 1 },
            Mode::Fanout(o) => PoolSpec { slots: 1, streams: o.waiters + 1 },
            Mode::Floor(_) | Mode::FloorServe { .. } => return None,
        })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Every session is a socket here (and one in the daemon, which inherits this when spawned).
    let nofile = daemon::raise_nofile(65_536);
    let Some(spec) = cli.mode.pool_spec() else {
        return run_without_daemon(&cli);
    };
    let daemon = match (&cli.target.endpoint, &cli.target.spawn_daemon) {
        (Some(ep), None) => Ok(Daemon::external(ep.clone(), cli.target.daemon_pid)),
        (None, Some(bin)) => Daemon::spawn(bin, &cli.target.pool, spec),
        _ => Err("give --endpoint URL or --spawn-daemon PATH".into()),
    };
    let daemon = match daemon {
        Ok(d) => d,
        Err(e) => {
            eprintln!("slotd-bench: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let ctx = modes::Ctx { daemon: &daemon, pool: cli.target.pool.clone(), nofile };
    let res = rt.block_on(async {
        match &cli.mode {
            Mode::Cycles(o) => modes::cycles::run(&ctx, o).await.map(|r| r.emit(cli.json)),
            Mode::Rtt(o) => modes::rtt::run(&ctx, o).await.map(|r| r.emit(cli.json)),
            Mode::Handoff(o) => modes::handoff::run(&ctx, o).await.map(|r| r.emit(cli.json)),
            Mode::Idle(o) => modes::idle::run(&ctx, o).await.map(|r| r.emit(cli.json)),
            Mode::Fanout(o) => modes::fanout::run(&ctx, o).await.map(|r| r.emit(cli.json)),
            Mode::Floor(_) | Mode::FloorServe { .. } => unreachable!("run without a daemon"),
        }
    });
    // Don't wait for sessions still winding down in the background.
    rt.shutdown_timeout(Duration::from_millis(500));
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("slotd-bench: {e}");
            if daemon.pid.is_some() && !daemon.log_path().is_empty() {
                eprintln!("slotd-bench: daemon log: {}", daemon.log_path());
            }
            ExitCode::FAILURE
        }
    }
}

/// The modes that need no daemon: `floor` and its child.
fn run_without_daemon(cli: &Cli) -> ExitCode {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let res = rt.block_on(async {
        match &cli.mode {
            Mode::Floor(o) => modes::floor::run(o).await.map(|r| r.emit(cli.json)),
            Mode::FloorServe { message_bytes, sockets } => {
                modes::floor::serve(*message_bytes, *sockets).await
            }
            _ => unreachable!("only the modes without a pool spec"),
        }
    });
    rt.shutdown_timeout(Duration::from_millis(500));
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("slotd-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
