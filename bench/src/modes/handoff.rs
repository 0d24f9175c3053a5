//! `handoff`: two sessions on a pool of one slot. One holds it, the other waits; the holder releases
//! and the waiter's grant is timed from the release's send to the grant's arrival. Then the roles
//! swap. `--backend redis-list` does the same with RPUSH and a blocked BLPOP.
//!
//! The figure is two one-way loopback hops plus the daemon's turnaround (release in -> next grant
//! out); `slotd-bench floor`'s ping-pong p50 is one loopback round trip, so `handoff - floor` is the
//! daemon's own share.

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

/// Options of `handoff`.
#[derive(Debug, Args)]
pub struct Opts {
    /// Measured hand-offs.
    #[arg(long, default_value_t = 3_000)]
    pub count: u64,
    /// Unmeasured hand-offs first.
    #[arg(long, default_value_t = 200)]
    pub warmup: u64,
    /// How long the waiter's request sits in the queue before the holder releases (long enough for
    /// it to be queued; not measured).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1ms")]
    pub queued_for: Duration,
    /// What to drive: slotd, or a Redis list semaphore at `--endpoint redis://HOST:PORT`.
    #[arg(long, value_enum, default_value_t = Backend::Slotd)]
    pub backend: Backend,
}

/// The result of `handoff`.
#[derive(Debug, Serialize)]
pub struct Report {
    /// "handoff".
    pub mode: &'static str,
    /// What was driven.
    pub backend: Backend,
    /// Release sent by the holder -> Granted received by the waiter.
    pub handoff: Latency,
    /// Memory and CPU.
    pub resources: Resources,
}

impl Report {
    /// Prints the report.
    pub fn emit(&self, json: bool) {
        emit(self, json, |r| {
            format!(
                "handoff ({:?}, 2 sessions, 1 slot)\nrelease sent -> next Granted received: {}\n{}",
                r.backend,
                r.handoff.line(),
                r.resources.lines()
            )
        });
    }
}

/// Runs `handoff`.
pub async fn run(ctx: &Ctx<'_>, o: &Opts) -> Result<Report, BoxError> {
    let (mut sessions, cleanup) = Sem::open_all(o.backend, ctx, 2, 1).await?;
    let (mut a, mut b) = {
        let b = sessions.pop().ok_or("no session")?;
        (sessions.pop().ok_or("no session")?, b)
    };
    let mut h = stats::histogram();
    let mut token = a.acquire().await?;
    let mut measured_from = None;
    for i in 0..o.warmup + o.count {
        if i == o.warmup {
            measured_from = Some((Instant::now(), Resources::start(ctx)));
        }
        let (holder, waiter) = if i % 2 == 0 { (&mut a, &mut b) } else { (&mut b, &mut a) };
        let release = async {
            tokio::time::sleep(o.queued_for).await;
            let t0 = Instant::now();
            holder.release(token.clone()).await?;
            Ok::<_, BoxError>(t0)
        };
        let (granted, released) = tokio::join!(waiter.acquire(), release);
        let t1 = Instant::now();
        let t0 = released?;
        token = granted?;
        if i >= o.warmup {
            stats::record(&mut h, t1.saturating_duration_since(t0));
        }
    }
    let (t_from, (mut resources, own)) = measured_from.ok_or("no measured hand-off")?;
    resources.finish(ctx, own, t_from.elapsed().as_secs_f64());
    cleanup.run().await?;
    Ok(Report { mode: "handoff", backend: o.backend, handoff: Latency::of(&h), resources })
}
