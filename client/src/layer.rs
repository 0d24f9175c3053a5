//! [`LeaseLayer`]: a tower layer that holds a lease around every HTTP request to an LLM provider.
//!
//! The lease lives inside the response future and then inside the response body, so a cancelled
//! request or a dropped body gives the slot back, and a streamed answer keeps it until its last byte.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::SystemTime,
};

use bytes::Buf;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::{
    Client, Lease, Outcome, ProviderLimit, Report,
    provider::{self, UsageScanner},
};

/// The error type of [`LeaseService`]: either the inner service's error or a slotd [`Error`](crate::Error).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Picks the pool for a request; `None` sends the request without a lease.
///
/// Implemented for closures `Fn(&http::Request<B>) -> Option<String>` and for [`FixedPool`].
pub trait SelectPool<B> {
    /// The pool to take a slot on for `req`.
    fn select_pool(&self, req: &Request<B>) -> Option<String>;
}

impl<B, F> SelectPool<B> for F
where
    F: Fn(&Request<B>) -> Option<String>,
{
    fn select_pool(&self, req: &Request<B>) -> Option<String> {
        self(req)
    }
}

/// Every request takes a slot on the same pool.
#[derive(Debug, Clone)]
pub struct FixedPool(pub String);

impl<B> SelectPool<B> for FixedPool {
    fn select_pool(&self, _: &Request<B>) -> Option<String> {
        Some(self.0.clone())
    }
}

/// Wraps a `Service<http::Request<B>>` in a [`LeaseService`]: a lease per request, held until the
/// response body ends, released with a [`Report`](crate::Report) read from the response: the outcome
/// class ([`provider::classify`]: status codes, Retry-After, the error `type` of a JSON error body the
/// caller read), the provider's rate-limit headers ([`provider::provider_limits`]) and the token
/// usage of a JSON or SSE body ([`UsageScanner`]).
///
/// | response | outcome |
/// |---|---|
/// | 429 (OpenAI's `insufficient_quota`: quota exhausted) | [`Outcome::RateLimited`] |
/// | 529, 503, `overloaded_error` | [`Outcome::Overloaded`] |
/// | 402, `insufficient_quota`, `billing_error` | [`Outcome::QuotaExhausted`] |
/// | other 5xx, an inner service error, a body error | [`Outcome::Error`] |
/// | a successful body dropped before its end | [`Outcome::Cancelled`] |
/// | anything else | [`Outcome::Ok`] |
#[derive(Clone)]
pub struct LeaseLayer<P> {
    client: Client,
    select: P,
}

impl<P> fmt::Debug for LeaseLayer<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaseLayer").field("client", &self.client).finish_non_exhaustive()
    }
}

impl LeaseLayer<FixedPool> {
    /// Every request takes a slot on `pool`.
    pub fn new(client: Client, pool: impl Into<String>) -> Self {
        LeaseLayer { client, select: FixedPool(pool.into()) }
    }
}

impl<P> LeaseLayer<P> {
    /// The pool is chosen per request by `select` (see [`SelectPool`]).
    pub fn with_selector(client: Client, select: P) -> Self {
        LeaseLayer { client, select }
    }
}

impl<S, P: Clone> Layer<S> for LeaseLayer<P> {
    type Service = LeaseService<S, P>;

    fn layer(&self, inner: S) -> Self::Service {
        LeaseService { inner, client: self.client.clone(), select: self.select.clone() }
    }
}

/// The service made by [`LeaseLayer`].
///
/// Readiness is the inner service's; the wait for the slot happens in the response future, so a
/// request waiting for its slot keeps the inner readiness it was given.
#[derive(Clone)]
pub struct LeaseService<S, P> {
    inner: S,
    client: Client,
    select: P,
}

impl<S: fmt::Debug, P> fmt::Debug for LeaseService<S, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaseService")
            .field("inner", &self.inner)
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

impl<S, P, B, RB> Service<Request<B>> for LeaseService<S, P>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    P: SelectPool<B>,
    B: Send + 'static,
    RB: Body,
{
    type Response = Response<LeaseBody<RB>>;
    type Error = BoxError;
    type Future = ResponseFuture<RB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let pool = self.select.select_pool(&req);
        // Take the instance that was driven to readiness, leave a fresh clone behind.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let client = self.client.clone();
        ResponseFuture {
            inner: Box::pin(async move {
                let lease = match pool {
                    Some(pool) => Some(client.acquire(pool).await.map_err(Box::new)?),
                    None => None,
                };
                let resp = match inner.call(req).await {
                    Ok(resp) => resp,
                    Err(e) => {
                        if let Some(lease) = &lease {
                            lease.set_outcome(Outcome::Error);
                        }
                        return Err(e.into());
                    }
                };
                let (parts, body) = resp.into_parts();
                let tracker = lease.map(|lease| Tracker::new(lease, parts.status, &parts.headers));
                let mut body = LeaseBody { body, tracker };
                if body.body.is_end_stream() {
                    body.end();
                }
                Ok(Response::from_parts(parts, body))
            }),
        }
    }
}

/// The response future of [`LeaseService`]: waits for the slot, then for the inner response.
///
/// Dropping it while waiting cancels the acquire; dropping it during the call releases the lease.
#[must_use = "futures do nothing unless polled"]
pub struct ResponseFuture<RB> {
    inner: BoxFuture<RB>,
}

type BoxFuture<RB> = Pin<Box<dyn Future<Output = Result<Response<LeaseBody<RB>>, BoxError>> + Send>>;

impl<RB> fmt::Debug for ResponseFuture<RB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<RB> Future for ResponseFuture<RB> {
    type Output = Result<Response<LeaseBody<RB>>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

pin_project! {
    /// A response body that holds the request's lease until its last frame (or until it is dropped),
    /// reading the usage (or, for an error answer, the error type) from the frames it passes on.
    #[derive(Debug)]
    pub struct LeaseBody<B> {
        #[pin]
        body: B,
        tracker: Option<Tracker>,
    }
}

/// The lease of one response and what is known so far about how the call ended. Dropped before
/// [`Tracker::finish`] (the body was dropped before its end), it reports the cut.
#[derive(Debug)]
struct Tracker(Option<Track>);

#[derive(Debug)]
struct Track {
    lease: Lease,
    status: StatusCode,
    limits: Vec<ProviderLimit>,
    body: BodyRead,
}

/// What is read from the body: usage for a success, the start of the body for an error.
#[derive(Debug)]
enum BodyRead {
    Usage(UsageScanner),
    Error { headers: HeaderMap, peek: Vec<u8> },
}

impl Tracker {
    fn new(lease: Lease, status: StatusCode, headers: &HeaderMap) -> Self {
        let limits = provider::provider_limits(headers, SystemTime::now());
        let body = if status.is_success() {
            BodyRead::Usage(UsageScanner::for_headers(headers))
        } else {
            BodyRead::Error { headers: headers.clone(), peek: Vec::new() }
        };
        Tracker(Some(Track { lease, status, limits, body }))
    }

    fn lease(&self) -> Option<&Lease> {
        self.0.as_ref().map(|t| &t.lease)
    }

    fn feed(&mut self, data: &[u8]) {
        match self.0.as_mut().map(|t| &mut t.body) {
            Some(BodyRead::Usage(scanner)) => scanner.feed(data),
            Some(BodyRead::Error { peek, .. }) => {
                let room = provider::ERROR_BODY_PEEK.saturating_sub(peek.len());
                peek.extend_from_slice(&data[..data.len().min(room)]);
            }
            None => {}
        }
    }

    /// Sets the release report (the lease is released when the tracker goes): `failed` is a body
    /// error, `cut` a body dropped before its end.
    fn finish(&mut self, failed: bool, cut: bool) {
        let Some(Track { lease, status, limits, body }) = self.0.take() else { return };
        let (outcome, usage) = match body {
            BodyRead::Usage(scanner) => {
                let outcome = match (failed, cut) {
                    (true, _) => Outcome::Error,
                    (false, true) => Outcome::Cancelled,
                    (false, false) => Outcome::Ok,
                };
                (outcome, scanner.finish())
            }
            BodyRead::Error { headers, peek } => {
                // An error answer keeps its class even when its body is cut or fails: a 429 stays
                // a 429.
                let outcome = provider::classify(status, &headers, Some(&peek), SystemTime::now());
                (if failed && outcome == Outcome::Ok { Outcome::Error } else { outcome }, None)
            }
        };
        lease.set_report(Report { outcome, usage, limits });
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.finish(false, true);
    }
}

impl<B> LeaseBody<B> {
    /// The lease, while it is held (`None` for unleased requests and once the body ended).
    pub fn lease(&self) -> Option<&Lease> {
        self.tracker.as_ref().and_then(Tracker::lease)
    }

    /// The inner body; its lease is released (as cancelled if a successful body had not ended).
    pub fn into_inner(self) -> B {
        self.body
    }

    /// Ends the lease at the end of the body.
    fn end(&mut self) {
        if let Some(mut t) = self.tracker.take() {
            t.finish(false, false);
        }
    }
}

impl<B: Body> Body for LeaseBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let mut this = self.project();
        let frame = this.body.as_mut().poll_frame(cx);
        match &frame {
            Poll::Ready(Some(Ok(f))) => {
                if let (Some(t), Some(data)) = (this.tracker.as_mut(), f.data_ref()) {
                    // hyper's frames are one slice; 16 covers any chained buffer in practice.
                    let mut slices = [std::io::IoSlice::new(&[]); 16];
                    let n = data.chunks_vectored(&mut slices);
                    slices[..n].iter().for_each(|s| t.feed(s));
                }
                if this.body.is_end_stream()
                    && let Some(mut t) = this.tracker.take()
                {
                    t.finish(false, false);
                }
            }
            Poll::Ready(None) => {
                if let Some(mut t) = this.tracker.take() {
                    t.finish(false, false);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(mut t) = this.tracker.take() {
                    t.finish(true, false);
                }
            }
            Poll::Pending => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
