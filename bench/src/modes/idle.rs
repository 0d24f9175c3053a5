//! `idle`: a full pool and N connected sessions, each with one queued request. Reports the daemon's
//! memory once every session has seen `Queued`.

use std::time::Duration;

use clap::Args;
use serde::Serialize;
use tokio::time::Instant;

use super::{Ctx, Resources, emit, mib};
use crate::{BoxError, wire};

/// Options of `idle`.
#[derive(Debug, Args)]
pub struct Opts {
    /// Sessions (Acquire streams), each with one queued request.
    #[arg(long, default_value_t = 10_000)]
    pub sessions: usize,
    /// Acquire streams per HTTP/2 connection (1 = a TCP connection per session).
    #[arg(long, default_value_t = 1)]
    pub streams_per_connection: usize,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 128)]
    pub parallel: usize,
    /// How long to stay connected after the last Queued before reading memory.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    pub settle: Duration,
}

/// The result of `idle`.
#[derive(Debug, Serialize)]
pub struct Report {
    /// "idle".
    pub mode: &'static str,
    /// Queued sessions.
    pub sessions: usize,
    /// TCP connections they use.
    pub connections: usize,
    /// Seconds to connect and queue them all.
    pub setup_secs: f64,
    /// Daemon RSS with everything queued, MiB.
    pub daemon_rss_mib: Option<f64>,
    /// Daemon peak RSS, MiB.
    pub daemon_peak_rss_mib: Option<f64>,
    /// (RSS queued − RSS before) / sessions, bytes.
    pub bytes_per_session: Option<f64>,
    /// RLIMIT_NOFILE of the bench (and of a spawned daemon).
    pub nofile_limit: u64,
    /// Memory and CPU (over the setup).
    pub resources: Resources,
}

impl Report {
    /// Prints the report.
    pub fn emit(&self, json: bool) {
        emit(self, json, |r| {
            let opt = |v: Option<f64>, unit: &str| v.map_or("unknown".into(), |v| format!("{v:.1} {unit}"));
            format!(
                "idle: {} sessions with a queued request over {} TCP connections (set up in {:.1}s)\n\
                 daemon RSS: {} (peak {}), {} per session\nRLIMIT_NOFILE: {}\n{}",
                r.sessions,
                r.connections,
                r.setup_secs,
                opt(r.daemon_rss_mib, "MiB"),
                opt(r.daemon_peak_rss_mib, "MiB"),
                opt(r.bytes_per_session, "bytes"),
                r.nofile_limit,
                r.resources.lines()
            )
        });
    }
}

/// Runs `idle`.
pub async fn run(ctx: &Ctx<'_>, o: &Opts) -> Result<Report, BoxError> {
    let ep = &ctx.daemon.endpoint;
    let (mut resources, own) = Resources::start(ctx);
    let t0 = Instant::now();
    let (_holder, _) = wire::fill_pool(ep, &ctx.pool, Duration::from_secs(600)).await?;
    let sessions =
        wire::queued_sessions(ep, &ctx.pool, o.sessions, o.streams_per_connection, o.parallel).await?;
    let setup = t0.elapsed().as_secs_f64();
    tokio::time::sleep(o.settle).await;
    resources.finish(ctx, own, setup);
    let after = resources.daemon_after;
    let before = resources.daemon_before;
    let report = Report {
        mode: "idle",
        sessions: sessions.len(),
        connections: o.sessions.div_ceil(o.streams_per_connection.max(1)),
        setup_secs: setup,
        daemon_rss_mib: after.map(|a| mib(a.rss_kib)),
        daemon_peak_rss_mib: after.map(|a| mib(a.hwm_kib)),
        bytes_per_session: after
            .zip(before)
            .map(|(a, b)| (a.rss_kib.saturating_sub(b.rss_kib) * 1024) as f64 / o.sessions.max(1) as f64),
        nofile_limit: ctx.nofile,
        resources,
    };
    drop(sessions);
    Ok(report)
}
