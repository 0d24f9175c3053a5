//! `fanout`: N waiters (one per session) queued behind a full pool, then `ReportRateLimit`. For each
//! round, the time from sending the report until each waiter has received `Paused`, all on the
//! bench's clock.

use std::time::Duration;

use clap::Args;
use serde::Serialize;
use slotd_proto::v1::{self as pb, server_message::Msg as Down, slotd_client::SlotdClient};
use tokio::{sync::mpsc, time::Instant};

use super::{Ctx, Resources, emit};
use crate::{
    BoxError,
    stats::{self, Latency},
    wire,
};

/// Options of `fanout`.
#[derive(Debug, Args)]
pub struct Opts {
    /// Waiters (each its own Acquire stream, so each is told once).
    #[arg(long, default_value_t = 10_000)]
    pub waiters: usize,
    /// Acquire streams per HTTP/2 connection (1 = a TCP connection per waiter).
    #[arg(long, default_value_t = 1)]
    pub streams_per_connection: usize,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 128)]
    pub parallel: usize,
    /// Reports (each extends the pause, so each fans out to everyone).
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Pause between rounds.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "500ms")]
    pub gap: Duration,
}

/// One report's fan-out.
#[derive(Debug, Serialize)]
pub struct Round {
    /// ReportRateLimit sent -> its response received.
    pub report_rpc_us: f64,
    /// ReportRateLimit sent -> each waiter's Paused received.
    pub paused: Latency,
}

/// The result of `fanout`.
#[derive(Debug, Serialize)]
pub struct Report {
    /// "fanout".
    pub mode: &'static str,
    /// Waiters told per round.
    pub waiters: usize,
    /// TCP connections they use.
    pub connections: usize,
    /// Per round.
    pub rounds: Vec<Round>,
    /// Every round's per-waiter times together.
    pub all_rounds: Latency,
    /// Memory and CPU (over the rounds).
    pub resources: Resources,
}

impl Report {
    /// Prints the report.
    pub fn emit(&self, json: bool) {
        emit(self, json, |r| {
            let mut s = format!(
                "fanout: {} waiters over {} TCP connections; report -> every waiter has Paused\n",
                r.waiters, r.connections
            );
            for (i, round) in r.rounds.iter().enumerate() {
                s += &format!(
                    "  round {}: {}  (report RPC {})\n",
                    i + 1,
                    round.paused.line(),
                    stats::fmt_us(round.report_rpc_us)
                );
            }
            s += &format!("all rounds: {}\n{}", r.all_rounds.line(), r.resources.lines());
            s
        });
    }
}

/// Runs `fanout`.
pub async fn run(ctx: &Ctx<'_>, o: &Opts) -> Result<Report, BoxError> {
    let ep = &ctx.daemon.endpoint;
    let (_holder, _) = wire::fill_pool(ep, &ctx.pool, Duration::from_secs(600)).await?;
    let sessions =
        wire::queued_sessions(ep, &ctx.pool, o.waiters, o.streams_per_connection, o.parallel).await?;
    // Each waiter stamps its Paused on arrival; the collector reads the stamps.
    let (stamps, mut arrived) = mpsc::unbounded_channel::<Instant>();
    for mut s in sessions {
        let stamps = stamps.clone();
        tokio::spawn(async move {
            while let Ok(m) = s.next().await {
                if let Down::Paused(_) = m {
                    let _ = stamps.send(Instant::now());
                }
            }
        });
    }
    drop(stamps);
    let mut reporter = SlotdClient::new(wire::connect(ep).await?);
    let (mut resources, own) = Resources::start(ctx);
    let t_start = Instant::now();
    let mut all = stats::histogram();
    let mut rounds = Vec::new();
    for round in 0..o.rounds {
        tokio::time::sleep(o.gap).await;
        let mut h = stats::histogram();
        let t0 = Instant::now();
        reporter
            .report_rate_limit(pb::ReportRateLimitRequest {
                pool: ctx.pool.clone(),
                // Each round's pause ends later than the last one's, so it is announced again.
                retry_after: Some(prost_types::Duration { seconds: 3600 + round as i64, nanos: 0 }),
                reason: "slotd-bench fanout".into(),
                ..Default::default()
            })
            .await?;
        let rpc = t0.elapsed();
        for _ in 0..o.waiters {
            let at = tokio::time::timeout(Duration::from_secs(30), arrived.recv())
                .await
                .map_err(|_| "not every waiter was told within 30s")?
                .ok_or("waiter streams ended")?;
            stats::record(&mut h, at.saturating_duration_since(t0));
        }
        all.add(&h)?;
        rounds.push(Round { report_rpc_us: rpc.as_secs_f64() * 1e6, paused: Latency::of(&h) });
    }
    resources.finish(ctx, own, t_start.elapsed().as_secs_f64());
    Ok(Report {
        mode: "fanout",
        waiters: o.waiters,
        connections: o.waiters.div_ceil(o.streams_per_connection.max(1)),
        rounds,
        all_rounds: Latency::of(&all),
        resources,
    })
}
