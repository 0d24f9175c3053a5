//! [`LeaseLayer`]: a tower layer that holds a lease around every HTTP request to an LLM provider.
//!
//! The lease lives inside the response future and then inside the response body, so a cancelled
//! request or a dropped body gives the slot back, and a streamed answer keeps it until its last byte.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::{Client, Lease, Outcome};

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
/// response body ends, released with an outcome read from the response status.
///
/// | response | outcome |
/// |---|---|
/// | 429, with `retry-after-ms` or `Retry-After` (seconds or HTTP date) | [`Outcome::RateLimited`] |
/// | 529 (Anthropic's `overloaded_error`) | [`Outcome::RateLimited`] |
/// | other 5xx, an inner service error, a body error | [`Outcome::Error`] |
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
                if let Some(lease) = &lease {
                    lease.set_outcome(outcome_of(resp.status(), resp.headers()));
                }
                Ok(resp.map(|body| LeaseBody { body, lease }))
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
    /// A response body that holds the request's lease until its last frame (or until it is dropped).
    #[derive(Debug)]
    pub struct LeaseBody<B> {
        #[pin]
        body: B,
        lease: Option<Lease>,
    }
}

impl<B> LeaseBody<B> {
    /// The lease, while it is held (`None` for unleased requests and once the body ended).
    pub fn lease(&self) -> Option<&Lease> {
        self.lease.as_ref()
    }

    /// The inner body; its lease is released.
    pub fn into_inner(self) -> B {
        self.body
    }
}

impl<B: Body> Body for LeaseBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let frame = this.body.poll_frame(cx);
        match &frame {
            Poll::Ready(None) => {
                this.lease.take();
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(lease) = this.lease.take() {
                    lease.set_outcome(Outcome::Error);
                }
            }
            _ => {}
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

/// The release outcome for a provider response.
pub fn outcome_of(status: StatusCode, headers: &HeaderMap) -> Outcome {
    match status.as_u16() {
        429 => Outcome::RateLimited { retry_after: retry_after(headers, SystemTime::now()) },
        503 | 529 => Outcome::Overloaded { retry_after: retry_after(headers, SystemTime::now()) },
        402 => Outcome::QuotaExhausted { retry_after: retry_after(headers, SystemTime::now()) },
        500..=599 => Outcome::Error,
        _ => Outcome::Ok,
    }
}

/// Reads a provider's retry hint: `retry-after-ms` (OpenAI), else `Retry-After` as seconds or as an
/// HTTP date (relative to `now`; a date in the past means zero).
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    if let Some(ms) = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|ms| ms.is_finite() && *ms >= 0.0)
    {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    let value = headers.get(http::header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(retry_after(&headers(&[("retry-after", "7")]), now), Some(Duration::from_secs(7)));
        assert_eq!(
            retry_after(&headers(&[("retry-after-ms", "250"), ("retry-after", "7")]), now),
            Some(Duration::from_millis(250))
        );
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(retry_after(&headers(&[("retry-after", &date)]), now), Some(Duration::from_secs(30)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(retry_after(&headers(&[("retry-after", &past)]), now), Some(Duration::ZERO));
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")]), now), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }

    #[test]
    fn outcomes_by_status() {
        let h = headers(&[("retry-after", "3")]);
        assert_eq!(
            outcome_of(StatusCode::TOO_MANY_REQUESTS, &h),
            Outcome::RateLimited { retry_after: Some(Duration::from_secs(3)) }
        );
        assert_eq!(
            outcome_of(StatusCode::from_u16(529).unwrap(), &HeaderMap::new()),
            Outcome::Overloaded { retry_after: None }
        );
        assert_eq!(outcome_of(StatusCode::BAD_GATEWAY, &HeaderMap::new()), Outcome::Error);
        assert_eq!(outcome_of(StatusCode::OK, &HeaderMap::new()), Outcome::Ok);
        assert_eq!(outcome_of(StatusCode::BAD_REQUEST, &HeaderMap::new()), Outcome::Ok);
    }
}
