//! Bounds on open `Acquire` streams: in all, and per connection. An over-limit stream is refused at
//! once with RESOURCE_EXHAUSTED naming the limit, instead of waiting invisibly for a slot.
//!
//! HTTP/2's own `SETTINGS_MAX_CONCURRENT_STREAMS` cannot give that error: a client past it just
//! queues the stream locally. So the daemon sets the HTTP/2 limit a little above
//! `max_streams_per_connection` (room for unary calls beside the streams) and counts streams here.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use crate::scheduler::Error;

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
}
