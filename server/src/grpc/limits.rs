//! Bounds on open `Acquire` streams (in all, and per connection) and on message size, each refused
//! with RESOURCE_EXHAUSTED naming the limit.
//!
//! HTTP/2's own `SETTINGS_MAX_CONCURRENT_STREAMS` cannot give that error: a client past it just
//! queues the stream locally. So the daemon sets the HTTP/2 limit a little above
//! `max_streams_per_connection` (room for unary calls beside the streams) and counts streams here.
//!
//! tonic answers a unary request above `max_decoding_message_size` with OUT_OF_RANGE before any
//! handler runs; [`OversizeAsExhausted`] turns that answer into the RESOURCE_EXHAUSTED the README
//! promises for every bound (an Acquire stream's oversized message already ends it so, in `session`).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use futures::{TryFutureExt, future::MapOk};
use tonic::{
    Code, Status,
    codegen::{Service, http},
    server::NamedService,
};

use crate::scheduler::Error;

/// The start of tonic's message when a received message is above `max_decoding_message_size`
/// (tonic 0.14 `codec::decode`). Only that OUT_OF_RANGE answer is rewritten.
const TONIC_TOO_LARGE: &str = "Error, decoded message length too large";

/// Counts open streams; hands out a [`StreamPermit`] per stream.
#[derive(Clone, Debug)]
pub struct StreamLimits {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    max_total: usize,
    max_per_connection: usize,
    counts: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    /// Keyed by the peer's address, which names one TCP connection.
    per_connection: HashMap<SocketAddr, usize>,
}

/// One open stream's place in the counts; given back on drop.
#[derive(Debug)]
#[must_use = "the stream's place is given back when the permit is dropped"]
pub struct StreamPermit {
    inner: Arc<Inner>,
    peer: Option<SocketAddr>,
}

impl StreamLimits {
    /// At most `max_total` streams in all and `max_per_connection` on one connection.
    pub fn new(max_total: usize, max_per_connection: usize) -> Self {
        Self { inner: Arc::new(Inner { max_total, max_per_connection, counts: Mutex::default() }) }
    }

    /// Takes a place for a new stream from `peer` (unknown peers count only towards the total).
    pub fn admit(&self, peer: Option<SocketAddr>) -> Result<StreamPermit, Error> {
        let inner = &self.inner;
        // A poisoned lock only means another stream panicked mid-update of plain counters.
        let mut c = inner.counts.lock().unwrap_or_else(|p| p.into_inner());
        if c.total >= inner.max_total {
            return Err(Error::LimitExceeded(format!(
                "{} Acquire streams are open, the daemon's limit (limits.max_streams); retry later",
                inner.max_total
            )));
        }
        if let Some(peer) = peer {
            let n = c.per_connection.entry(peer).or_default();
            if *n >= inner.max_per_connection {
                return Err(Error::LimitExceeded(format!(
                    "{} Acquire streams are open on this connection (limits.max_streams_per_connection); \
                     use one stream for many leases, or another connection",
                    inner.max_per_connection
                )));
            }
            *n += 1;
        }
        c.total += 1;
        Ok(StreamPermit { inner: self.inner.clone(), peer })
    }

    /// Streams open now.
    pub fn open(&self) -> usize {
        self.inner.counts.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut c = self.inner.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(peer) = self.peer
            && let Some(n) = c.per_connection.get_mut(&peer)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_connection.remove(&peer);
            }
        }
    }
}

/// Wraps a gRPC service so that its "message too large" answer is RESOURCE_EXHAUSTED, not tonic's
/// OUT_OF_RANGE. Every other response passes through untouched.
#[derive(Clone, Debug)]
pub struct OversizeAsExhausted<S> {
    inner: S,
}

impl<S> OversizeAsExhausted<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S: NamedService> NamedService for OversizeAsExhausted<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B, RB> Service<http::Request<B>> for OversizeAsExhausted<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = MapOk<S::Future, fn(http::Response<RB>) -> http::Response<RB>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        self.inner.call(req).map_ok(oversize_as_exhausted as fn(_) -> _)
    }
}

/// Rewrites a trailers-only OUT_OF_RANGE "message too large" response (the status is in the headers,
/// since no handler ran) to RESOURCE_EXHAUSTED, naming the setting.
fn oversize_as_exhausted<RB>(mut res: http::Response<RB>) -> http::Response<RB> {
    let Some(status) = Status::from_header_map(res.headers()) else { return res };
    if status.code() != Code::OutOfRange || !status.message().starts_with(TONIC_TOO_LARGE) {
        return res;
    }
    let status = Status::resource_exhausted(format!("{} (limits.max_message_bytes)", status.message()));
    res.headers_mut().remove(Status::GRPC_MESSAGE);
    if status.add_header(res.headers_mut()).is_ok() {
        res.extensions_mut().insert(status);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_in_all_and_per_connection_and_gives_back_on_drop() {
        let l = StreamLimits::new(3, 2);
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let a1 = l.admit(Some(a)).unwrap();
        let _a2 = l.admit(Some(a)).unwrap();
        let e = l.admit(Some(a)).unwrap_err().to_string();
        assert!(e.contains("max_streams_per_connection"), "{e}");
        let _b1 = l.admit(Some(b)).unwrap();
        let e = l.admit(Some(b)).unwrap_err().to_string();
        assert!(e.contains("limits.max_streams"), "{e}");
        drop(a1);
        assert_eq!(l.open(), 2);
        let _b2 = l.admit(Some(b)).unwrap();
    }

    #[test]
    fn only_the_too_large_answer_becomes_resource_exhausted() {
        let too_large =
            Status::out_of_range(format!("{TONIC_TOO_LARGE}: found 70000 bytes, the limit is: 65536 bytes"));
        let res = oversize_as_exhausted(too_large.into_http::<()>());
        let got = Status::from_header_map(res.headers()).unwrap();
        assert_eq!(got.code(), Code::ResourceExhausted);
        assert!(got.message().contains("found 70000 bytes") && got.message().contains("max_message_bytes"));
        assert_eq!(res.extensions().get::<Status>().map(Status::code), Some(Code::ResourceExhausted));
        for other in [Status::out_of_range("something else"), Status::not_found("x")] {
            let code = other.code();
            let res = oversize_as_exhausted(other.into_http::<()>());
            assert_eq!(Status::from_header_map(res.headers()).unwrap().code(), code);
        }
        let ok = oversize_as_exhausted(http::Response::new(()));
        assert!(Status::from_header_map(ok.headers()).is_none());
    }
}
