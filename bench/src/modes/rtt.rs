//! `rtt`: one session on an uncontended pool; each iteration sends a request, waits for `Granted`,
//! sends the release and waits for `Released`. `--backend redis-list` times BLPOP and RPUSH on a Redis
//! list semaphore the same way (two round trips too).

use std::time::Duration;

use clap::Args;
use serde::Serialize;
use tokio::time::Instant;

use super::{Ctx, Resources, emit};
use crate::{
    BoxError,
    sem::{Backend, Sem},
    stats::{self, Latency},
};

/// Options of `rtt`.
#[derive(Debug, Args)]
pub struct Opts {
    /// Measured round trips.
    #[arg(long, default_value_t = 20_000)]
    pub count: u64,
    /// Unmeasured round trips first.
    #[arg(long, default_value_t = 2_000)]
    pub warmup: u64,
    /// Stop early after this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    pub max_duration: Duration,
    /// What to drive: slotd, or a Redis list semaphore at `--endpoint redis://HOST:PORT`.
    #[arg(long, value_enum, default_value_t = Backend::Slotd)]
    pub backend: Backend,
}

/// The result of `rtt`.
#[derive(Debug, Serialize)]
pub struct Report {
    /// "rtt".
    pub mode: &'static str,
    /// What was driven.
    pub backend: Backend,
    /// Request sent -> Granted received.
    pub acquire: Latency,
    /// Request sent -> Granted -> Release sent -> Released received.
    pub acquire_release: Latency,
    /// Round trips per second on this one session.
    pub per_sec: f64,
    /// Memory and CPU.
    pub resources: Resources,
}

impl Report {
    /// Prints the report.
    pub fn emit(&self, json: bool) {
        emit(self, json, |r| {
            format!(
                "rtt ({:?}, 1 session, uncontended)\n\
                 acquire (request -> Granted):                    {}\n\
                 acquire + release (... -> Release -> Released):  {}\n\
                 {:.0} round trips/s\n{}",
                r.backend,
                r.acquire.line(),
                r.acquire_release.line(),
                r.per_sec,
                r.resources.lines()
            )
        });
    }
}

/// Runs `rtt`.
pub async fn run(ctx: &Ctx<'_>, o: &Opts) -> Result<Report, BoxError> {
    let (mut sessions, cleanup) = Sem::open_all(o.backend, ctx, 1, 64).await?;
    let s = &mut sessions[0];
    let (mut acq, mut both) = (stats::histogram(), stats::histogram());
    let stop = Instant::now() + o.max_duration;
    let mut measured_from = None;
    for i in 0..o.warmup + o.count {
        if i == o.warmup {
            measured_from = Some((Instant::now(), Resources::start(ctx)));
        }
        let t0 = Instant::now();
        let lease = s.acquire().await?;
        let t1 = Instant::now();
        s.release_confirmed(lease).await?;
        let t2 = Instant::now();
        if i >= o.warmup {
            stats::record(&mut acq, t1 - t0);
            stats::record(&mut both, t2 - t0);
        }
        if t2 > stop {
            break;
        }
    }
    cleanup.run().await?;
    let (t_from, (mut resources, own)) = measured_from.ok_or("stopped before the warm-up ended")?;
    let wall = t_from.elapsed().as_secs_f64();
    resources.finish(ctx, own, wall);
    Ok(Report {
        mode: "rtt",
        backend: o.backend,
        acquire: Latency::of(&acq),
        acquire_release: Latency::of(&both),
        per_sec: both.len() as f64 / wall,
        resources,
    })
}
