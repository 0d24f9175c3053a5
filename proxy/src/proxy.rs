//! The request handler: route, read the agent's headers, take the lease (or refuse, or fail open),
//! forward, and hand back the upstream answer wrapped so that the lease lives until its last byte.

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, header};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use slotd_client::{Client, Error, Outcome};
use tokio::{sync::watch, time::Instant};

use crate::{
    body::{Attempt, BoxError, RequestBody, RequestState, ResponseBody},
    config::{Config, DaemonDown, Dialect},
    daemon::is_down,
    fingerprint::Fingerprinter,
    headers::{AgentHeaders, strip_hop_by_hop},
    metrics::Metrics,
    refusal::{Reason, Refusal},
    route::{Route, Routes},
    upstream::Upstream,
};

/// The body of every answer the proxy gives.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// The least time between two "forwarding without a lease" warnings.
pub const FAIL_OPEN_WARN_EVERY: Duration = Duration::from_secs(1);

/// Everything a request needs, shared by every connection.
pub struct Proxy {
    pub(crate) routes: Routes,
    pub(crate) client: Client,
    pub(crate) upstream: Upstream,
    pub(crate) metrics: Metrics,
    pub(crate) daemon_up: watch::Receiver<bool>,
    pub(crate) daemon_addr: String,
    pub(crate) fingerprinter: Option<Fingerprinter>,
    pub(crate) max_body_bytes: u64,
    epoch: Instant,
    /// Milliseconds after `epoch` of the last fail-open warning (0: never).
    last_open_warn: AtomicU64,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy").field("routes", &self.routes).finish_non_exhaustive()
    }
}

fn full(b: impl Into<Bytes>) -> ProxyBody {
    Full::new(b.into()).map_err(|never: Infallible| match never {}).boxed_unsync()
}

impl Proxy {
    pub(crate) fn new(
        cfg: &Config,
        client: Client,
        upstream: Upstream,
        metrics: Metrics,
        daemon_up: watch::Receiver<bool>,
        fingerprinter: Option<Fingerprinter>,
    ) -> Self {
        let routes = Routes::new(&cfg.routes);
        for r in routes.iter() {
            for outcome in ["ok", "error", "cancelled", "rate_limited", "overloaded", "quota_exhausted"] {
                metrics.requests.with_label_values(&[&r.name, outcome]);
            }
            metrics.in_flight.with_label_values(&[&r.name]);
        }
        Proxy {
            routes,
            client,
            upstream,
            metrics,
            daemon_up,
            daemon_addr: cfg.daemon.to_string(),
            fingerprinter,
            max_body_bytes: cfg.max_body_bytes,
            epoch: Instant::now(),
            last_open_warn: AtomicU64::new(0),
        }
    }

    /// Serves one request.
    ///
    /// # Cancel safety
    /// Dropping the future (the client went away) cancels a queued acquire, or releases a held lease
    /// as `cancelled`.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Result<Response<ProxyBody>, Infallible> {
        let path = req.uri().path();
        if path == "/healthz" {
            let up = *self.daemon_up.borrow();
            let body = format!("{{\"status\":\"ok\",\"daemon\":\"{}\"}}\n", if up { "up" } else { "down" });
            return Ok(Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .body(full(body))
                .expect("valid response"));
        }
        if path == "/metrics" {
            return Ok(Response::builder()
                .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
                .body(full(self.metrics.render()))
                .expect("valid response"));
        }
        let Some(route) = self.routes.find(path).cloned() else {
            tracing::debug!(path = %path, "no route");
            let r = Refusal::new(Reason::NoRoute, "no route for this path");
            return Ok(self.refuse(None, r, Dialect::Anthropic));
        };
        let dialect = route.cfg.dialect;
        Ok(match self.forward(&route, req).await {
            Ok(resp) => resp,
            Err(r) => self.refuse(Some(&route), r, dialect),
        })
    }

    fn refuse(&self, route: Option<&Route>, r: Refusal, dialect: Dialect) -> Response<ProxyBody> {
        let name = route.map(|r| r.name.as_str()).unwrap_or("-");
        let label = format!("refused_{}", r.reason.label());
        self.metrics.requests.with_label_values(&[name, &label]).inc();
        tracing::info!(route = name, reason = r.reason.label(), message = %r.message, "refused locally");
        r.render(dialect).map(full)
    }

    async fn forward(
        &self,
        route: &Arc<Route>,
        req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, Refusal> {
        let arrived = Instant::now();
        let (mut parts, body) = req.into_parts();
        let agent = AgentHeaders::take(&mut parts.headers, &route.cfg)
            .map_err(|e| Refusal::new(Reason::BadHeader, e.to_string()))?;
        let pool = route.pool(agent.pool.clone(), &parts.headers, self.fingerprinter.as_ref())?;
        if let Some(len) = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok())
            && len.parse::<u64>().map_or(true, |n| n > self.max_body_bytes)
        {
            return Err(Refusal::new(
                Reason::BodyTooLarge,
                format!("request body larger than {} bytes", self.max_body_bytes),
            ));
        }
        let uri = route
            .upstream_uri(&parts.uri)
            .map_err(|e| Refusal::new(Reason::BadHeader, format!("request path: {e}")))?;

        let lease = self.lease(route, &pool, &agent).await?;
        if lease.is_some() {
            self.metrics
                .lease_wait
                .with_label_values(&[&route.name])
                .observe(arrived.elapsed().as_secs_f64());
        }
        let mut attempt = Attempt::start(route.clone(), self.metrics.clone(), lease);
        if let Some(l) = attempt.lease() {
            // Whatever ends this attempt before its last byte reports cancelled unless told otherwise.
            l.set_outcome(Outcome::Cancelled);
        }

        strip_hop_by_hop(&mut parts.headers);
        // The upstream client sets `Host` (HTTP/1.1) or `:authority` (HTTP/2) from the URI.
        parts.headers.remove(header::HOST);
        parts.uri = uri;
        // The upstream connection's version is negotiated (ALPN); the client adapts the request.
        parts.version = http::Version::HTTP_11;
        let state = Arc::new(RequestState::default());
        let body =
            RequestBody::new(body, self.max_body_bytes, state.clone(), route.clone(), self.metrics.clone());
        let upstream_req = Request::from_parts(parts, body);

        let sent = Instant::now();
        let call = self.upstream.request(upstream_req);
        let result = if route.cfg.strict {
            tokio::select! {
                r = call => r,
                why = attempt.lost() => {
                    attempt.finish(Some(Outcome::Cancelled));
                    return Err(Refusal::new(Reason::LeaseLost, format!("the slotd lease was lost ({why}) before the answer")));
                }
            }
        } else {
            call.await
        };
        let resp = match result {
            Ok(resp) => resp,
            Err(e) => {
                if state.too_large.load(Ordering::Relaxed) {
                    attempt.finish(Some(Outcome::Cancelled));
                    return Err(Refusal::new(
                        Reason::BodyTooLarge,
                        format!("request body larger than {} bytes", self.max_body_bytes),
                    ));
                }
                if state.client_failed.load(Ordering::Relaxed) {
                    attempt.finish(Some(Outcome::Cancelled));
                    return Err(Refusal::new(Reason::UpstreamError, "the client's request body failed"));
                }
                tracing::warn!(route = %route.name, error = %e, "upstream request failed");
                attempt.finish(Some(Outcome::Error));
                return Err(Refusal::new(Reason::UpstreamError, "the upstream could not be reached"));
            }
        };
        self.metrics.upstream_latency.with_label_values(&[&route.name]).observe(sent.elapsed().as_secs_f64());
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        attempt.on_response(parts.status, &parts.headers);
        let body = ResponseBody::new(body, attempt).boxed_unsync();
        Ok(Response::from_parts(parts, body))
    }

    /// Takes the lease for one attempt; `Ok(None)` forwards without one (fail_open).
    async fn lease(
        &self,
        route: &Route,
        pool: &str,
        agent: &AgentHeaders,
    ) -> Result<Option<slotd_client::Lease>, Refusal> {
        let mut up = self.daemon_up.clone();
        if !*up.borrow_and_update() {
            return self.daemon_down(route);
        }
        let mut acquire = self
            .client
            .acquire(pool)
            .priority(agent.priority.unwrap_or(route.cfg.priority))
            .max_wait(route.cfg.max_wait);
        if let Some(t) = agent.started_at {
            acquire = acquire.started_at(t);
        }
        if let Some(h) = &agent.holder {
            acquire = acquire.holder(h.clone());
        }
        if let Some(ttl) = route.cfg.ttl {
            acquire = acquire.ttl(ttl);
        }
        if let Some((input, max_output)) = agent.tokens {
            acquire = acquire.tokens(input, max_output);
        }
        let result = tokio::select! {
            r = acquire => r,
            _ = up.wait_for(|up| !*up) => return self.daemon_down(route),
        };
        match result {
            Ok(lease) => Ok(Some(lease)),
            Err(e) if is_down(&e) && !matches!(e, Error::SessionClosed) => self.daemon_down(route),
            Err(e) => Err(refusal_of(pool, &e)),
        }
    }

    fn daemon_down(&self, route: &Route) -> Result<Option<slotd_client::Lease>, Refusal> {
        match route.cfg.on_daemon_down {
            DaemonDown::FailClosed => Err(Refusal::new(
                Reason::DaemonDown,
                format!("the slotd daemon at {} is unreachable; this route fails closed", self.daemon_addr),
            )),
            DaemonDown::FailOpen => {
                self.metrics.unleased.with_label_values(&[&route.name]).inc();
                let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX).max(1);
                let every = u64::try_from(FAIL_OPEN_WARN_EVERY.as_millis()).unwrap_or(u64::MAX);
                let last = self.last_open_warn.load(Ordering::Relaxed);
                if (last == 0 || now.saturating_sub(last) >= every)
                    && self
                        .last_open_warn
                        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    tracing::warn!(
                        route = %route.name,
                        daemon = %self.daemon_addr,
                        "slotd is unreachable: forwarding without a lease (fail_open)"
                    );
                }
                Ok(None)
            }
        }
    }
}

/// The local refusal for a daemon's answer to an acquire.
fn refusal_of(pool: &str, e: &Error) -> Refusal {
    let retry = e.retry_after();
    let (reason, message) = match e.code() {
        Some(tonic::Code::ResourceExhausted) => {
            (Reason::QueueFull, format!("slotd's queue for pool {pool} is full"))
        }
        Some(tonic::Code::DeadlineExceeded) if retry.is_some() => {
            (Reason::Paused, format!("pool {pool} is paused and the request would not wait longer"))
        }
        Some(tonic::Code::DeadlineExceeded) => {
            (Reason::MaxWait, format!("no slot on pool {pool} within the route's max_wait"))
        }
        Some(tonic::Code::NotFound) => (Reason::UnknownPool, format!("slotd has no pool {pool}")),
        Some(tonic::Code::Unavailable) if retry.is_some() => {
            (Reason::BreakerOpen, format!("pool {pool}'s circuit breaker is open: the provider is failing"))
        }
        // The only agent-set input slotd can refuse here is the token estimate of the headers.
        Some(tonic::Code::InvalidArgument) => (Reason::BadHeader, format!("slotd refused the request: {e}")),
        _ if matches!(e, Error::SessionClosed) => {
            (Reason::ShuttingDown, "the proxy is shutting down".to_owned())
        }
        _ => (Reason::Rejected, format!("slotd refused the request: {e}")),
    };
    Refusal::new(reason, message).retry_after(retry)
}
