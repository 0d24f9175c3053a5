//! `rtt`: one session on an uncontended pool; each iteration sends a request, waits for `Granted`,
//! sends the release and waits for `Released`. `--backend redis-list` times BLPOP and RPUSH on a Redis
//! list semaphore the same way (two round trips too).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use clap::Args;
use hdrhistogram::Histogram;
use serde::Serialize;
use slotd_proto::v1::{self as pb, server_message::Msg as Down, slotd_client::SlotdClient};
use tokio::time::Instant;
use tonic::transport::Channel;

use super::{Ctx, Resources, emit};
use crate::{
    BoxError,
    sem::{Backend, Sem},
    stats::{self, Latency},
    wire::{self, Session},
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
    /// Leases other sessions hold on the pool during the run (a large Status; slotd only).
    #[arg(long, default_value_t = 0)]
    pub held_leases: u32,
    /// Callers looping `Status` of everything during the run, each on its own connection (slotd only).
    #[arg(long, default_value_t = 0)]
    pub status_callers: usize,
}

/// Leases taken per session by `--held-leases` (below the daemon's default per-stream cap).
const LEASES_PER_HOLDER: u32 = 4000;

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
    /// Leases held by other sessions meanwhile.
    pub held_leases: u32,
    /// Status calls answered during the run, and their latency (`--status-callers`).
    pub status: Option<Latency>,
    /// Bytes of the last Status answer.
    pub status_bytes: Option<usize>,
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
                 {:.0} round trips/s\n{}{}",
                r.backend,
                r.acquire.line(),
                r.acquire_release.line(),
                r.per_sec,
                r.status.map_or(String::new(), |l| format!(
                    "meanwhile Status with {} leases held ({} bytes): {}\n",
                    r.held_leases,
                    r.status_bytes.unwrap_or(0),
                    l.line()
                )),
                r.resources.lines()
            )
        });
    }
}

/// Runs `rtt`.
pub async fn run(ctx: &Ctx<'_>, o: &Opts) -> Result<Report, BoxError> {
    let (mut sessions, cleanup) = Sem::open_all(o.backend, ctx, 1, 64).await?;
    let _holders = hold_leases(ctx, o.held_leases).await?;
    let stop_status = Arc::new(AtomicBool::new(false));
    let mut callers = Vec::new();
    for _ in 0..o.status_callers {
        let ch = wire::connect(&ctx.daemon.endpoint).await?;
        callers.push(tokio::spawn(status_loop(ch, stop_status.clone())));
    }
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
    stop_status.store(true, Ordering::Relaxed);
    let mut status_h = stats::histogram();
    let mut status_bytes = None;
    for c in callers {
        let (h, bytes) = c.await??;
        status_h.add(&h)?;
        status_bytes = status_bytes.or(bytes);
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
        held_leases: o.held_leases,
        status: (o.status_callers > 0).then(|| Latency::of(&status_h)),
        status_bytes,
        resources,
    })
}

/// Sessions holding `n` leases of the pool (kept open by the caller).
async fn hold_leases(ctx: &Ctx<'_>, n: u32) -> Result<Vec<Session>, BoxError> {
    let mut out = Vec::new();
    let mut left = n;
    while left > 0 {
        let k = left.min(LEASES_PER_HOLDER);
        let mut s = Session::open(wire::connect(&ctx.daemon.endpoint).await?).await?;
        for i in 0..k {
            s.send(wire::request(&format!("h{i}"), &ctx.pool, None)).await?;
        }
        let mut granted = 0;
        while granted < k {
            match s.next().await? {
                Down::Granted(_) => granted += 1,
                Down::Queued(_) => return Err("a held lease queued: the pool is too small".into()),
                _ => {}
            }
        }
        out.push(s);
        left -= k;
    }
    Ok(out)
}

/// Calls Status (of everything) until `stop`; returns the latencies and the size of an answer.
async fn status_loop(
    ch: Channel,
    stop: Arc<AtomicBool>,
) -> Result<(Histogram<u64>, Option<usize>), BoxError> {
    let mut client = SlotdClient::new(ch).max_decoding_message_size(usize::MAX);
    let mut h = stats::histogram();
    let mut bytes = None;
    while !stop.load(Ordering::Relaxed) {
        let t0 = Instant::now();
        let r = client.status(pb::StatusRequest { pool: String::new() }).await?.into_inner();
        stats::record(&mut h, t0.elapsed());
        bytes = Some(prost::Message::encoded_len(&r));
    }
    Ok((h, bytes))
}
