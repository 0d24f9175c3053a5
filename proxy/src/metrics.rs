//! Prometheus metrics of the proxy: requests by route and outcome, lease waits, upstream latency,
//! bytes, in-flight attempts, lost leases and daemon reachability. No label ever holds a credential.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Buckets of the wait and latency histograms, in seconds: 100 µs up to 10 min.
const BUCKETS: &[f64] = &[
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0,
];

/// Every metric, registered in one registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Finished requests by route and outcome (`ok`, `error`, `cancelled`, `rate_limited`,
    /// `overloaded`, `quota_exhausted`, or `refused_<reason>` for local answers).
    pub requests: IntCounterVec,
    /// Time from arrival to grant, by route.
    pub lease_wait: HistogramVec,
    /// Time from sending upstream to the response head, by route.
    pub upstream_latency: HistogramVec,
    /// Body bytes by route and direction (`request`, `response`).
    pub bytes: IntCounterVec,
    /// Upstream attempts in flight (from grant to the last byte), by route.
    pub in_flight: IntGaugeVec,
    /// Leases lost (revoked, expired) while their stream ran, by route.
    pub leases_lost: IntCounterVec,
    /// Requests forwarded without a lease because slotd was down (fail_open), by route.
    pub unleased: IntCounterVec,
    /// 1 while the daemon answers, 0 otherwise.
    pub daemon_up: IntGauge,
    /// Client connections open.
    pub connections: IntGauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// A fresh registry with every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("slotd_proxy_requests_total", "Finished requests by route and outcome"),
            &["route", "outcome"],
        )
        .expect("valid metric");
        let lease_wait = HistogramVec::new(
            HistogramOpts::new("slotd_proxy_lease_wait_seconds", "Time waiting for the slotd lease")
                .buckets(BUCKETS.to_vec()),
            &["route"],
        )
        .expect("valid metric");
        let upstream_latency = HistogramVec::new(
            HistogramOpts::new("slotd_proxy_upstream_latency_seconds", "Time to the upstream response head")
                .buckets(BUCKETS.to_vec()),
            &["route"],
        )
        .expect("valid metric");
        let bytes = IntCounterVec::new(
            Opts::new("slotd_proxy_bytes_total", "Body bytes by route and direction"),
            &["route", "direction"],
        )
        .expect("valid metric");
        let in_flight =
            IntGaugeVec::new(Opts::new("slotd_proxy_in_flight", "Upstream attempts in flight"), &["route"])
                .expect("valid metric");
        let leases_lost = IntCounterVec::new(
            Opts::new("slotd_proxy_leases_lost_total", "Leases lost while their stream ran"),
            &["route"],
        )
        .expect("valid metric");
        let unleased = IntCounterVec::new(
            Opts::new("slotd_proxy_unleased_total", "Requests forwarded without a lease (fail_open)"),
            &["route"],
        )
        .expect("valid metric");
        let daemon_up =
            IntGauge::new("slotd_proxy_daemon_up", "1 while slotd answers").expect("valid metric");
        let connections =
            IntGauge::new("slotd_proxy_client_connections", "Client connections open").expect("valid metric");
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(lease_wait.clone()),
            Box::new(upstream_latency.clone()),
            Box::new(bytes.clone()),
            Box::new(in_flight.clone()),
            Box::new(leases_lost.clone()),
            Box::new(unleased.clone()),
            Box::new(daemon_up.clone()),
            Box::new(connections.clone()),
        ] {
            registry.register(c).expect("unique metric names");
        }
        Metrics {
            registry,
            requests,
            lease_wait,
            upstream_latency,
            bytes,
            in_flight,
            leases_lost,
            unleased,
            daemon_up,
            connections,
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
