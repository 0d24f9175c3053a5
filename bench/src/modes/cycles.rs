//! `cycles`: C sessions, each on its own connection with one request outstanding at a time, loop
//! request -> Granted -> hold -> Release on a pool of K slots for a bounded time.
//!
//! The next request follows the release on the same stream without waiting for `Released` (the
//! stream keeps them in order), as a real client's release-on-drop does.
//!
//! `--backend redis-list` runs the same loop against a Redis list semaphore instead (K tokens;
//! acquire = `BLPOP`, release = `RPUSH`), with the same Rust runtime and measurements, so slotd is
//! compared with Redis through clients of the same weight. `--endpoint` is then the Redis URL.

use std::time::Duration;

use clap::Args;
use futures::future::try_join_all;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::time::Instant;

use super::{Ctx, Resources, emit};
use crate::{
    BoxError,
    sem::{Backend, Sem},
    stats::{self, Latency, jain},
};

/// Options of `cycles`.
#[derive(Debug, Args)]
pub struct Opts {
    /// Concurrent sessions (C), each on its own connection.
    #[arg(long, default_value_t = 64)]
    pub sessions: usize,
    /// Slots of the spawned daemon's pool (K). With --endpoint, the pool's own limit applies.
    #[arg(long, default_value_t = 8)]
    pub slots: u32,
    /// How long each lease is held (h).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    pub hold: Duration,
    /// Measured time.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// Unmeasured warm-up before it.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    pub warmup: Duration,
    /// What to drive: slotd, or a Redis list semaphore at `--endpoint redis://HOST:PORT`.
    #[arg(long, value_enum, default_value_t = Backend::Slotd)]
    pub backend: Backend,
}

/// The result of `cycles`.
#[derive(Debug, Serialize)]
pub struct Report {
    /// "cycles".
    pub mode: &'static str,
    /// What was driven.
    pub backend: Backend,
    /// C.
    pub sessions: usize,
    /// K as configured (spawned) or given.
    pub slots: u32,
    /// h, ms.
    pub hold_ms: f64,
    /// Measured seconds.
    pub wall_secs: f64,
    /// Completed cycles in the window.
    pub cycles: u64,
    /// Cycles per second.
    pub cycles_per_sec: f64,
    /// Request sent -> Granted received.
    pub acquire_latency: Latency,
    /// Jain's index over cycles per session.
    pub jain: f64,
    /// Fewest and most cycles of one session.
    pub min_max_session_cycles: (u64, u64),
    /// Held time (Granted received -> Release sent, client side) over K × wall time.
    pub slot_use: f64,
    /// Memory and CPU.
    pub resources: Resources,
}

impl Report {
    /// Prints the report.
    pub fn emit(&self, json: bool) {
        emit(self, json, |r| {
            format!(
                "cycles ({:?}): C={} K={} h={} over {:.1}s\n\
                 cycles/s: {:.0} ({} cycles)\n\
                 acquire->grant: {}\n\
                 Jain fairness: {:.4} (per-session cycles min {} max {})\n\
                 slot use: {:.2}%\n{}",
                r.backend,
                r.sessions,
                r.slots,
                humantime::format_duration(Duration::from_secs_f64(r.hold_ms / 1000.0)),
                r.wall_secs,
                r.cycles_per_sec,
                r.cycles,
                r.acquire_latency.line(),
                r.jain,
                r.min_max_session_cycles.0,
                r.min_max_session_cycles.1,
                r.slot_use * 100.0,
                r.resources.lines()
            )
        });
    }
}

struct PerSession {
    cycles: u64,
    held: Duration,
    hist: Histogram<u64>,
}

/// The part of `[a, b]` inside `[lo, hi]`.
fn overlap(a: Instant, b: Instant, lo: Instant, hi: Instant) -> Duration {
    b.min(hi).saturating_duration_since(a.max(lo))
}

async fn session_loop(
    mut sem: Sem,
    hold: Duration,
    from: Instant,
    end: Instant,
) -> Result<PerSession, BoxError> {
    let mut out = PerSession { cycles: 0, held: Duration::ZERO, hist: stats::histogram() };
    // Sessions start a little apart from each other, as they were connected.
    while Instant::now() < end {
        let t0 = Instant::now();
        let lease = sem.acquire().await?;
        let t1 = Instant::now();
        if !hold.is_zero() {
            tokio::time::sleep_until((t1 + hold).min(end)).await;
        }
        let t2 = Instant::now();
        sem.release(lease).await?;
        if t0 >= from && t1 <= end {
            stats::record(&mut out.hist, t1 - t0);
        }
        out.held += overlap(t1, t2, from, end);
        if t2 >= from && t2 <= end && t1 + hold <= t2 {
            out.cycles += 1;
        }
    }
    Ok(out)
}

/// Runs `cycles`.
pub async fn run(ctx: &Ctx<'_>, o: &Opts) -> Result<Report, BoxError> {
    // Separate connections, opened before the clock starts.
    let (sessions, cleanup) = Sem::open_all(o.backend, ctx, o.sessions, o.slots).await?;
    let start = Instant::now();
    let from = start + o.warmup;
    let end = from + o.duration;
    let tasks: Vec<_> =
        sessions.into_iter().map(|s| tokio::spawn(session_loop(s, o.hold, from, end))).collect();
    tokio::time::sleep_until(from).await;
    let (mut resources, own) = Resources::start(ctx);
    tokio::time::sleep_until(end).await;
    let wall = (end - from).as_secs_f64();
    resources.finish(ctx, own, wall);
    // A session still waiting for a grant at the end gets it within a few holds.
    let results = tokio::time::timeout(o.hold * 100 + Duration::from_secs(30), try_join_all(tasks))
        .await
        .map_err(|_| "sessions did not finish within 30s of the end")??;
    cleanup.run().await?;
    let mut hist = stats::histogram();
    let (mut cycles, mut held, mut per) = (0u64, Duration::ZERO, Vec::new());
    for r in results {
        let r = r?;
        hist.add(&r.hist)?;
        cycles += r.cycles;
        held += r.held;
        per.push(r.cycles);
    }
    let xs: Vec<f64> = per.iter().map(|&c| c as f64).collect();
    Ok(Report {
        mode: "cycles",
        backend: o.backend,
        sessions: o.sessions,
        slots: o.slots,
        hold_ms: o.hold.as_secs_f64() * 1000.0,
        wall_secs: wall,
        cycles,
        cycles_per_sec: cycles as f64 / wall,
        acquire_latency: Latency::of(&hist),
        jain: jain(&xs),
        min_max_session_cycles: (
            per.iter().copied().min().unwrap_or(0),
            per.iter().copied().max().unwrap_or(0),
        ),
        slot_use: held.as_secs_f64() / (o.slots as f64 * wall),
        resources,
    })
}
