//! Prometheus metrics: counters recorded by the driver from the decisions it routes, gauges refreshed
//! from a scheduler snapshot at scrape time, and a one-route HTTP/1 endpoint serving `GET /metrics`.
//!
//! The scheduler core stays free of metrics: the driver hands every [`Fact`] to the [`Recorder`] (an
//! [`Observer`]; the driver does not know metrics exist), which bumps pre-resolved per-pool handles, so the grant path costs a hash lookup and two atomic adds, and allocates nothing once a
//! pool has been seen. Label values only ever come from pools that exist (an unknown pool named by
//! a client is counted under `pool=""`), so a client cannot blow up the series count.

use std::{collections::HashMap, sync::Arc, time::Duration};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use tokio::{
    net::TcpListener,
    sync::{Mutex, Semaphore},
};
use tracing::{debug, warn};

use crate::{
    driver::{DriverHandle, Observer},
    scheduler::{
        BreakerState, BudgetFact, BudgetKind, Error, ExpiryReason, Fact, HoldKind, LeaseEnd, Outcome, PoolId,
    },
};

/// Upper bounds (seconds) of the queue-wait histogram: from an immediate grant to a ten-minute wait.
pub const QUEUE_WAIT_BUCKETS: &[f64] =
    &[0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];

/// The `outcome` label of `slotd_leases_released_total`: [`Outcome::LABELS`] plus a closed stream.
const RELEASE_OUTCOMES: [&str; 7] =
    ["ok", "error", "cancelled", "rate_limited", "overloaded", "quota_exhausted", "stream_closed"];
/// The `reason` label of `slotd_leases_expired_total`.
const EXPIRY_REASONS: [&str; 3] = ["ttl", "revoked", "pool_removed"];
/// The `reason` label of `slotd_rejections_total`.
const REJECTION_REASONS: [&str; 12] = [
    "invalid_argument",
    "unknown_pool",
    "duplicate_request",
    "unknown_request",
    "queue_full",
    "shed",
    "limit_exceeded",
    "wait_timeout",
    "pool_removed",
    "shutting_down",
    "other",
    "breaker_open",
];
/// The `kind` label of `slotd_holds_total`.
const HOLD_KINDS: [HoldKind; 3] = [HoldKind::Failure, HoldKind::Cancel, HoldKind::Phantom];
/// The `state` label of `slotd_breaker_transitions_total` and the value of `slotd_breaker_state`.
const BREAKER_STATES: [&str; 3] = ["closed", "open", "half_open"];

/// Every slotd metric, registered in its own [`Registry`]. Cheap to clone (the prometheus types are
/// shared handles).
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    granted: IntCounterVec,
    released: IntCounterVec,
    expired: IntCounterVec,
    rejections: IntCounterVec,
    pauses: IntCounterVec,
    queue_wait: HistogramVec,
    in_flight: IntGaugeVec,
    queued: IntGaugeVec,
    effective_limit: IntGaugeVec,
    limit: IntGaugeVec,
    paused: IntGaugeVec,
    blocked_by_ancestor: IntGaugeVec,
    holds: IntCounterVec,
    breaker_transitions: IntCounterVec,
    held: IntGaugeVec,
    breaker_state: IntGaugeVec,
    /// How long each pool's learning took (the per-pool side of `slotd_ha_learning_seconds`).
    learning_pool: prometheus::GaugeVec,
    budget: BudgetMetrics,
}

/// The rate budgets' metrics: levels from the snapshot, counters from the facts.
#[derive(Clone, Debug)]
struct BudgetMetrics {
    level: IntGaugeVec,
    debt: IntGaugeVec,
    reserved: IntGaugeVec,
    refill: IntGaugeVec,
    reserved_total: IntCounterVec,
    settled_total: IntCounterVec,
    estimate_error: IntCounterVec,
    shadow_waits: IntCounterVec,
    shadow_wait_seconds: prometheus::CounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric at zero.
    pub fn new() -> Self {
        let registry = Registry::new();
        fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
            r.register(Box::new(c.clone())).expect("metric names are unique");
            c
        }
        fn gauge(r: &Registry, name: &str, help: &str) -> IntGaugeVec {
            let g = IntGaugeVec::new(Opts::new(name, help), &["pool"]).expect("valid metric definition");
            r.register(Box::new(g.clone())).expect("metric names are unique");
            g
        }
        let queue_wait = HistogramVec::new(
            HistogramOpts::new(
                "slotd_queue_wait_seconds",
                "Time from request to grant, per pool (zero when granted at once).",
            )
            .buckets(QUEUE_WAIT_BUCKETS.to_vec()),
            &["pool"],
        )
        .expect("valid metric definition");
        registry.register(Box::new(queue_wait.clone())).expect("metric names are unique");
        let budget_gauge = |name: &str, help: &str| {
            let g = IntGaugeVec::new(Opts::new(name, help), &["pool", "budget"])
                .expect("valid metric definition");
            registry.register(Box::new(g.clone())).expect("metric names are unique");
            g
        };
        let shadow_wait_seconds = prometheus::CounterVec::new(
            Opts::new(
                "slotd_budget_shadow_wait_seconds_total",
                "Shadow mode: total time grants would have waited.",
            ),
            &["pool", "budget"],
        )
        .expect("valid metric definition");
        registry.register(Box::new(shadow_wait_seconds.clone())).expect("metric names are unique");
        let budget = BudgetMetrics {
            level: budget_gauge(
                "slotd_budget_level",
                "Units available in the budget now (negative while in debt).",
            ),
            debt: budget_gauge("slotd_budget_debt", "Debt of the budget still to be paid back by refill."),
            reserved: budget_gauge(
                "slotd_budget_reserved",
                "Units held by open reservations of leases on the pool.",
            ),
            refill: budget_gauge(
                "slotd_budget_refill_per_window",
                "Refill per window in force (provider-clamped).",
            ),
            reserved_total: counter(
                &registry,
                "slotd_budget_reserved_total",
                "Units reserved at grant on the lease's pool (requests, input_tokens, output_tokens).",
                &["pool", "budget"],
            ),
            settled_total: counter(
                &registry,
                "slotd_budget_settled_total",
                "Units finally charged at settlement (the reservation when no usage came back).",
                &["pool", "budget"],
            ),
            estimate_error: counter(
                &registry,
                "slotd_budget_estimate_error_tokens_total",
                "Sum of |usage - estimate| over settlements that carried usage.",
                &["pool", "budget"],
            ),
            shadow_waits: counter(
                &registry,
                "slotd_budget_shadow_waits_total",
                "Shadow mode: grants let through that the budget would have held.",
                &["pool", "budget"],
            ),
            shadow_wait_seconds,
        };
        Self {
            budget,
            granted: counter(&registry, "slotd_leases_granted_total", "Leases granted.", &["pool"]),
            released: counter(
                &registry,
                "slotd_leases_released_total",
                "Leases given back, by the outcome the holder reported (stream_closed: its stream ended).",
                &["pool", "outcome"],
            ),
            expired: counter(
                &registry,
                "slotd_leases_expired_total",
                "Leases ended without a release: ttl (no heartbeat), revoked, pool_removed.",
                &["pool", "reason"],
            ),
            rejections: counter(
                &registry,
                "slotd_rejections_total",
                "Requests refused or given up on, by reason (pool=\"\" when no existing pool applies).",
                &["pool", "reason"],
            ),
            pauses: counter(
                &registry,
                "slotd_pauses_total",
                "Pauses applied to the pool: rate-limit (429) reports and operator pauses.",
                &["pool"],
            ),
            queue_wait,
            in_flight: gauge(&registry, "slotd_in_flight", "Leases held on the pool and its descendants."),
            queued: gauge(&registry, "slotd_queued", "Requests waiting on the pool."),
            effective_limit: gauge(
                &registry,
                "slotd_effective_limit",
                "The pool's limit now (below slotd_limit after 429s on an adaptive pool).",
            ),
            limit: gauge(&registry, "slotd_limit", "The pool's configured max_concurrent."),
            paused: gauge(&registry, "slotd_paused", "1 while the pool is paused."),
            blocked_by_ancestor: gauge(
                &registry,
                "slotd_pool_blocked_by_ancestor",
                "1 while a paused ancestor blocks the pool (slotd_paused covers the pool's own pause).",
            ),
            holds: counter(
                &registry,
                "slotd_holds_total",
                "Released slots kept held, by hold: failure_hold, cancel_cooldown, phantom_hold.",
                &["pool", "kind"],
            ),
            breaker_transitions: counter(
                &registry,
                "slotd_breaker_transitions_total",
                "Circuit breaker transitions, by the state entered: closed, open, half_open.",
                &["pool", "state"],
            ),
            held: gauge(&registry, "slotd_held", "Slots of the pool and its descendants kept by a hold."),
            breaker_state: gauge(
                &registry,
                "slotd_breaker_state",
                "The pool's breaker: 0 closed, 1 open, 2 half-open.",
            ),
            learning_pool: {
                let g = prometheus::GaugeVec::new(
                    Opts::new(
                        "slotd_ha_learning_pool_seconds",
                        "How long the pool's learning took in the current term (or after a restart): \
                         0 when the previous leader held nothing there, less than the learning period \
                         (slotd_ha_learning_seconds) when every lease it held came back earlier, the \
                         whole period otherwise. Absent while the pool learns.",
                    ),
                    &["pool"],
                )
                .expect("valid metric definition");
                registry.register(Box::new(g.clone())).expect("metric names are unique");
                g
            },
            registry,
        }
    }

    /// The registry, to register more collectors (the accept loop's connection counters).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Refreshes the gauges from the driver's snapshot, then encodes everything as Prometheus text.
    ///
    /// # Cancel safety
    /// Cancel safe: it changes nothing but the gauges, which the next scrape sets again.
    pub async fn render(&self, driver: &DriverHandle) -> Result<Vec<u8>, Error> {
        let snap = driver.status(None).await?;
        // Pools removed since the last scrape must not linger as gauges.
        for g in [
            &self.in_flight,
            &self.queued,
            &self.effective_limit,
            &self.limit,
            &self.paused,
            &self.blocked_by_ancestor,
            &self.budget.level,
            &self.budget.debt,
            &self.budget.reserved,
            &self.budget.refill,
            &self.held,
            &self.breaker_state,
        ] {
            g.reset();
        }
        self.learning_pool.reset();
        for p in &snap.pools {
            let l = [p.id.as_str()];
            self.in_flight.with_label_values(&l).set(i64::from(p.in_flight));
            self.queued.with_label_values(&l).set(i64::from(p.queued));
            self.effective_limit.with_label_values(&l).set(i64::from(p.effective_limit));
            self.limit.with_label_values(&l).set(i64::from(p.config.max_concurrent));
            self.paused.with_label_values(&l).set(i64::from(p.paused_until.is_some()));
            self.blocked_by_ancestor.with_label_values(&l).set(i64::from(p.blocked_by.is_some()));
            for b in p.budget.iter().flat_map(|b| &b.levels) {
                let l = [p.id.as_str(), b.kind.label()];
                self.budget.level.with_label_values(&l).set(b.level);
                self.budget.debt.with_label_values(&l).set(i64::try_from(b.debt).unwrap_or(i64::MAX));
                self.budget.reserved.with_label_values(&l).set(i64::try_from(b.reserved).unwrap_or(i64::MAX));
                self.budget.refill.with_label_values(&l).set(i64::try_from(b.rate).unwrap_or(i64::MAX));
            }
            self.held.with_label_values(&l).set(i64::from(p.held));
            self.breaker_state.with_label_values(&l).set(breaker_index(&p.breaker.state) as i64);
            if let Some(took) = p.learned_after {
                self.learning_pool.with_label_values(&l).set(took.as_secs_f64());
            }
        }
        let mut buf = Vec::with_capacity(8192);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .map_err(|e| Error::InvalidArgument(format!("encoding metrics: {e}")))?;
        Ok(buf)
    }
}

/// One pool's counter handles, resolved once.
#[derive(Debug)]
struct PoolHandles {
    granted: IntCounter,
    queue_wait: Histogram,
    released: [IntCounter; RELEASE_OUTCOMES.len()],
    expired: [IntCounter; EXPIRY_REASONS.len()],
    /// Resolved on first use: most pools never see most reasons, and a zero series per reason per
    /// pool would only be noise.
    rejections: [Option<IntCounter>; REJECTION_REASONS.len()],
    pauses: IntCounter,
}

/// The driver's side: turns facts into counter increments through per-pool handles.
#[derive(Debug)]
pub struct Recorder {
    metrics: Metrics,
    pools: HashMap<PoolId, PoolHandles>,
    /// `pool=""` rejections (no existing pool applies).
    unattributed: [Option<IntCounter>; REJECTION_REASONS.len()],
}

impl Observer for Recorder {
    fn fact(&mut self, fact: &Fact) {
        self.record(fact);
    }
}

impl Recorder {
    /// A recorder feeding `metrics`.
    pub fn new(metrics: Metrics) -> Self {
        Self { metrics, pools: HashMap::new(), unattributed: Default::default() }
    }

    fn pool(&mut self, pool: &PoolId) -> &mut PoolHandles {
        if !self.pools.contains_key(pool) {
            let m = &self.metrics;
            let p = pool.as_str();
            let handles = PoolHandles {
                granted: m.granted.with_label_values(&[p]),
                queue_wait: m.queue_wait.with_label_values(&[p]),
                released: RELEASE_OUTCOMES.map(|o| m.released.with_label_values(&[p, o])),
                expired: EXPIRY_REASONS.map(|r| m.expired.with_label_values(&[p, r])),
                rejections: Default::default(),
                pauses: m.pauses.with_label_values(&[p]),
            };
            self.pools.insert(pool.clone(), handles);
        }
        self.pools.get_mut(pool).expect("inserted above")
    }

    /// Records one fact.
    pub fn record(&mut self, fact: &Fact) {
        match fact {
            Fact::Granted { lease, waited, .. } => {
                let h = self.pool(&lease.pool);
                h.granted.inc();
                h.queue_wait.observe(waited.as_secs_f64());
            }
            Fact::Ended { lease, end } => {
                let h = self.pool(&lease.pool);
                match end {
                    LeaseEnd::Released(outcome) => h.released[outcome.index()].inc(),
                    LeaseEnd::StreamClosed => h.released[Outcome::LABELS.len()].inc(),
                    LeaseEnd::Expired(reason) => {
                        let i = match reason {
                            ExpiryReason::Ttl => 0,
                            ExpiryReason::Revoked => 1,
                            ExpiryReason::PoolRemoved => 2,
                        };
                        h.expired[i].inc();
                    }
                }
            }
            // Every 429 and operator pause counts, whether or not it moved the pause's end.
            Fact::Paused { pool, .. } => self.pool(pool).pauses.inc(),
            Fact::Rejected { error, .. } => self.rejection(error),
            Fact::Budget { pool, fact } => self.budget(pool, fact),
            Fact::Held { pool, kind, .. } => {
                let i = HOLD_KINDS.iter().position(|k| k == kind).unwrap_or_default();
                self.metrics.holds.with_label_values(&[pool.as_str(), HOLD_KINDS[i].label()]).inc();
            }
            // Granting the probe is not a transition (the state stays half-open).
            Fact::Breaker { pool, view, .. }
                if !matches!(view.state, BreakerState::HalfOpen { probe: Some(_) }) =>
            {
                let state = BREAKER_STATES[breaker_index(&view.state)];
                self.metrics.breaker_transitions.with_label_values(&[pool.as_str(), state]).inc();
            }
            Fact::Breaker { .. } | Fact::HoldEnded { .. } => {}
            Fact::Resumed { .. }
            | Fact::Effective { .. }
            | Fact::PoolChanged { .. }
            | Fact::LeaseRefused { .. } => {}
        }
    }

    /// Budget counters, labelled by budget. Rare enough (once per grant and release) that resolving
    /// the label set each time costs nothing next to the grant itself.
    fn budget(&mut self, pool: &PoolId, fact: &BudgetFact) {
        let m = &self.metrics.budget;
        let p = pool.as_str();
        match fact {
            BudgetFact::Reserved { cost, .. } => {
                for k in BudgetKind::ALL {
                    m.reserved_total.with_label_values(&[p, k.label()]).inc_by(cost.0[k.index()]);
                }
            }
            BudgetFact::Settled { reserved, charged, .. } => {
                for k in BudgetKind::ALL {
                    let i = k.index();
                    m.settled_total.with_label_values(&[p, k.label()]).inc_by(charged.0[i]);
                    m.estimate_error
                        .with_label_values(&[p, k.label()])
                        .inc_by(charged.0[i].abs_diff(reserved.0[i]));
                }
            }
            BudgetFact::ShadowWait { kind, level, would_wait } => {
                let l = [level.as_str(), kind.label()];
                m.shadow_waits.with_label_values(&l).inc();
                m.shadow_wait_seconds.with_label_values(&l).inc_by(would_wait.as_secs_f64());
            }
            BudgetFact::ProviderWord { .. } | BudgetFact::Charged { .. } => {}
        }
    }

    fn rejection(&mut self, error: &Error) {
        let (i, pool) = rejection_reason(error);
        let slot = match pool {
            Some(pool) => {
                let metrics = self.metrics.clone();
                let h = self.pool(pool);
                let p = pool.as_str();
                h.rejections[i]
                    .get_or_insert_with(|| metrics.rejections.with_label_values(&[p, REJECTION_REASONS[i]]))
            }
            None => {
                let m = &self.metrics;
                self.unattributed[i]
                    .get_or_insert_with(|| m.rejections.with_label_values(&["", REJECTION_REASONS[i]]))
            }
        };
        slot.inc();
    }
}

/// The index into [`REJECTION_REASONS`], and the pool when the error names one that exists.
fn rejection_reason(e: &Error) -> (usize, Option<&PoolId>) {
    match e {
        Error::InvalidArgument(_) | Error::PriorityOutOfRange { .. } => (0, None),
        Error::InvalidTtl { pool, .. } => (0, Some(pool)),
        // The name came from the client and names no pool: never a label value.
        Error::UnknownPool(_) => (1, None),
        Error::DuplicateRequest(_) => (2, None),
        Error::UnknownRequest(_) => (3, None),
        Error::QueueFull { pool, .. } => (4, Some(pool)),
        Error::Shed(pool) => (5, Some(pool)),
        Error::LimitExceeded(_) => (6, None),
        Error::WaitTimeout { pool, .. } => (7, Some(pool)),
        Error::PoolRemoved(pool) => (8, Some(pool)),
        Error::ShuttingDown => (9, None),
        Error::BreakerOpen { pool, .. } => (11, Some(pool)),
        _ => (10, None),
    }
}

/// A breaker state's index in [`BREAKER_STATES`].
fn breaker_index(state: &BreakerState) -> usize {
    match state {
        BreakerState::Closed => 0,
        BreakerState::Open { .. } => 1,
        BreakerState::HalfOpen { .. } => 2,
    }
}

/// Most concurrent connections to the metrics endpoint; more wait in the accept backlog.
pub const MAX_METRICS_CONNECTIONS: usize = 64;
/// How long a metrics client gets to send its request headers.
pub const METRICS_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait after a failed accept (out of file descriptors and the like) before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// The Content-Type of Prometheus text format 0.0.4.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What a scrape needs.
struct Scrape {
    metrics: Metrics,
    driver: DriverHandle,
    /// Gauges are reset and refilled per scrape; two scrapes at once must not interleave that.
    one_at_a_time: Mutex<()>,
}

/// Serves `GET /metrics` (Prometheus text format 0.0.4) on `listener` until `shutdown` resolves.
/// Anything else gets 404 (other paths) or 405 (other methods).
///
/// The routing is a one-route axum `Router`; the accept loop stays here because `axum::serve` has
/// neither a connection cap ([`MAX_METRICS_CONNECTIONS`]) nor a header read timeout
/// ([`METRICS_HEADER_TIMEOUT`]), and without them idle clients could hold file descriptors forever.
///
/// # Cancel safety
/// Dropping the future stops accepting; connections already accepted finish their request.
pub async fn serve_metrics(
    listener: TcpListener,
    metrics: Metrics,
    driver: DriverHandle,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let app = Router::new()
        .route("/metrics", get(scrape))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found; try /metrics\n") })
        .with_state(Arc::new(Scrape { metrics, driver, one_at_a_time: Mutex::new(()) }));
    let permits = Arc::new(Semaphore::new(MAX_METRICS_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => return,
            a = async { (permits.clone().acquire_owned().await, listener.accept().await) } => a,
        };
        let (permit, (stream, peer)) = match accepted {
            (Ok(permit), Ok(conn)) => (permit, conn),
            // The semaphore is never closed.
            (Err(_), _) => return,
            (_, Err(e)) => {
                warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let svc = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let res = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(METRICS_HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
            if let Err(e) = res {
                debug!(%peer, error = %e, "metrics connection ended with an error");
            }
        });
    }
}

async fn scrape(State(s): State<Arc<Scrape>>) -> Response {
    let _one_at_a_time = s.one_at_a_time.lock().await;
    match s.metrics.render(&s.driver).await {
        Ok(body) => ([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], body).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
    }
}
