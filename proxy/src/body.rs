//! One upstream attempt and its bodies: the lease lives in the response body until the last byte, and
//! is released with a report (outcome class, Retry-After, rate-limit headers, usage) read as the bytes
//! stream through. Nothing is buffered except the start of an error body (for its error type).

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::SystemTime,
};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use slotd_client::{
    Lease, Lost, Outcome, ProviderLimit, Report,
    provider::{self, UsageScanner},
};
use tokio::time::Instant;

use crate::{metrics::Metrics, route::Route};

/// The error type of the bodies the proxy streams.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The metric label and log word of an outcome.
pub fn outcome_label(o: &Outcome) -> &'static str {
    match o {
        Outcome::Ok => "ok",
        Outcome::Error => "error",
        Outcome::Cancelled => "cancelled",
        Outcome::RateLimited { .. } => "rate_limited",
        Outcome::Overloaded { .. } => "overloaded",
        Outcome::QuotaExhausted { .. } => "quota_exhausted",
    }
}

/// The stream was cut because its lease was lost on a `strict` route.
#[derive(Debug, thiserror::Error)]
#[error("slotd lease lost ({0}); the route is strict")]
pub struct LeaseLostCut(pub Lost);

/// What the answer said so far.
struct Answer {
    status: StatusCode,
    /// Kept for non-2xx answers only: their class waits for the start of the error body.
    headers: Option<HeaderMap>,
    /// The start of a non-2xx body, at most [`provider::ERROR_BODY_PEEK`] bytes.
    peek: Vec<u8>,
    /// The class of a 2xx answer, known from its head.
    outcome: Outcome,
    limits: Vec<ProviderLimit>,
    usage: UsageScanner,
}

/// One upstream attempt: its lease (none when forwarded unleased), the answer as it streams, and the
/// bookkeeping that ends exactly once, however the attempt ends (last byte, error, drop).
pub struct Attempt {
    route: Arc<Route>,
    metrics: Metrics,
    lease: Option<Lease>,
    lost: Option<Pin<Box<dyn Future<Output = Lost> + Send>>>,
    answer: Option<Answer>,
    response_bytes: u64,
    started: Instant,
    finished: bool,
}

impl std::fmt::Debug for Attempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attempt").field("route", &self.route.name).finish_non_exhaustive()
    }
}

impl Attempt {
    /// Starts an attempt holding `lease` (counted in flight until it ends).
    pub fn start(route: Arc<Route>, metrics: Metrics, lease: Option<Lease>) -> Self {
        metrics.in_flight.with_label_values(&[&route.name]).inc();
        let lost = lease.as_ref().map(|l| Box::pin(l.lost()) as Pin<Box<dyn Future<Output = Lost> + Send>>);
        Attempt {
            route,
            metrics,
            lease,
            lost,
            answer: None,
            response_bytes: 0,
            started: Instant::now(),
            finished: false,
        }
    }

    /// The lease, while held.
    pub fn lease(&self) -> Option<&Lease> {
        self.lease.as_ref()
    }

    /// Resolves when the lease is lost (never for an unleased attempt); logs and counts the loss.
    ///
    /// # Cancel safety
    /// Cancel safe: it only watches the lease.
    pub async fn lost(&mut self) -> Lost {
        match self.lost.as_mut() {
            Some(fut) => {
                let why = fut.await;
                self.lost = None;
                self.note_lost(&why);
                why
            }
            None => std::future::pending().await,
        }
    }

    fn note_lost(&self, why: &Lost) {
        self.metrics.leases_lost.with_label_values(&[&self.route.name]).inc();
        tracing::warn!(
            route = %self.route.name,
            lease = self.lease.as_ref().map(|l| l.lease_id()).unwrap_or(""),
            reason = %why,
            strict = self.route.cfg.strict,
            "lease lost while the upstream attempt ran"
        );
    }

    /// Records the response head.
    pub fn on_response(&mut self, status: StatusCode, headers: &HeaderMap) {
        let now = SystemTime::now();
        let success = status.is_success();
        self.answer = Some(Answer {
            status,
            headers: (!success).then(|| headers.clone()),
            peek: Vec::new(),
            outcome: if success { provider::classify(status, headers, None, now) } else { Outcome::Ok },
            limits: provider::provider_limits(headers, now),
            usage: UsageScanner::for_headers(headers),
        });
    }

    fn on_data(&mut self, data: &[u8]) {
        self.response_bytes = self.response_bytes.saturating_add(data.len() as u64);
        if let Some(a) = &mut self.answer {
            a.usage.feed(data);
            if a.headers.is_some() && a.peek.len() < provider::ERROR_BODY_PEEK {
                let room = provider::ERROR_BODY_PEEK - a.peek.len();
                a.peek.extend_from_slice(&data[..data.len().min(room)]);
            }
        }
    }

    /// Ends the attempt. `cut`: the outcome when the answer did not end normally (`None`: it did).
    pub fn finish(&mut self, cut: Option<Outcome>) {
        if self.finished {
            return;
        }
        self.finished = true;
        let report = match self.answer.take() {
            None => Report::from(cut.unwrap_or(Outcome::Error)),
            Some(a) => {
                let classified = match &a.headers {
                    // An error answer keeps its class even when the client left during its body: a 429
                    // must pause the pool whoever reads it.
                    Some(h) => Some(provider::classify(a.status, h, Some(&a.peek), SystemTime::now())),
                    None => None,
                };
                let outcome = match (classified, cut) {
                    (Some(c), _) => c,
                    (None, Some(c)) => c,
                    (None, None) => a.outcome,
                };
                Report { outcome, usage: a.usage.finish(), limits: a.limits }
            }
        };
        let label = outcome_label(&report.outcome);
        let m = &self.metrics;
        m.requests.with_label_values(&[&self.route.name, label]).inc();
        m.in_flight.with_label_values(&[&self.route.name]).dec();
        m.bytes.with_label_values(&[&self.route.name, "response"]).inc_by(self.response_bytes);
        let usage = report.usage.unwrap_or_default();
        tracing::info!(
            route = %self.route.name,
            pool = self.lease.as_ref().map(|l| l.pool()).unwrap_or("-"),
            lease = self.lease.as_ref().map(|l| l.lease_id()).unwrap_or("-"),
            status = self.answer_status(),
            outcome = label,
            response_bytes = self.response_bytes,
            input_tokens = usage.input_tokens,
            output_tokens = usage.output_tokens,
            elapsed_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "attempt ended"
        );
        if let Some(lease) = self.lease.take() {
            // Dropping sends the release with this report; it never blocks.
            lease.set_report(report);
        }
    }

    fn answer_status(&self) -> u16 {
        self.answer.as_ref().map(|a| a.status.as_u16()).unwrap_or(0)
    }

    fn poll_lost(&mut self, cx: &mut Context<'_>) -> Option<Lost> {
        let fut = self.lost.as_mut()?;
        match fut.as_mut().poll(cx) {
            Poll::Pending => None,
            Poll::Ready(why) => {
                self.lost = None;
                self.note_lost(&why);
                Some(why)
            }
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        // Dropped before its end: the client went away (or the handler was cancelled).
        self.finish(Some(Outcome::Cancelled));
    }
}

pin_project! {
    /// The upstream response body, streamed to the client frame by frame with its attempt.
    pub struct ResponseBody {
        #[pin]
        inner: Incoming,
        attempt: Attempt,
    }
}

impl ResponseBody {
    /// Wraps `inner`; the attempt ends with the body.
    pub fn new(inner: Incoming, attempt: Attempt) -> Self {
        ResponseBody { inner, attempt }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if let Some(why) = this.attempt.poll_lost(cx)
            && this.attempt.route.cfg.strict
        {
            this.attempt.finish(Some(Outcome::Cancelled));
            return Poll::Ready(Some(Err(Box::new(LeaseLostCut(why)))));
        }
        if this.attempt.finished {
            return Poll::Ready(None);
        }
        match this.inner.poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                this.attempt.finish(None);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.attempt.on_data(data);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                tracing::warn!(route = %this.attempt.route.name, error = %e, "upstream body failed mid-stream");
                this.attempt.finish(Some(Outcome::Error));
                Poll::Ready(Some(Err(Box::new(e))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What happened to a request body on its way upstream.
#[derive(Debug, Default)]
pub struct RequestState {
    /// It grew past `max_body_bytes`.
    pub too_large: AtomicBool,
    /// The client's side failed (it disconnected mid-upload).
    pub client_failed: AtomicBool,
}

/// The request body grew past `max_body_bytes`.
#[derive(Debug, thiserror::Error)]
#[error("request body larger than {0} bytes")]
pub struct TooLarge(pub u64);

pin_project! {
    /// The client's request body, streamed upstream with a size limit and a byte count.
    pub struct RequestBody {
        #[pin]
        inner: Incoming,
        limit: u64,
        seen: u64,
        state: Arc<RequestState>,
        route: Arc<Route>,
        metrics: Metrics,
    }

    impl PinnedDrop for RequestBody {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            this.metrics.bytes.with_label_values(&[&this.route.name, "request"]).inc_by(*this.seen);
        }
    }
}

impl RequestBody {
    /// Wraps `inner`.
    pub fn new(
        inner: Incoming,
        limit: u64,
        state: Arc<RequestState>,
        route: Arc<Route>,
        metrics: Metrics,
    ) -> Self {
        RequestBody { inner, limit, seen: 0, state, route, metrics }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    *this.seen = this.seen.saturating_add(data.len() as u64);
                    if *this.seen > *this.limit {
                        this.state.too_large.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(Box::new(TooLarge(*this.limit)))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.state.client_failed.store(true, Ordering::Relaxed);
                Poll::Ready(Some(Err(Box::new(e))))
            }
            other => other.map_err(|e| -> BoxError { Box::new(e) }),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
