//! Test support for every slotd test suite: the real daemon on 127.0.0.1:0 ([`Daemon`]), raw Acquire
//! streams driven message by message ([`Agent`]), the built binaries ([`process`]) and, with the
//! `client` feature, `slotd-client` helpers ([`client`]); for the HA suites a real etcd ([`etcd`]) and
//! a loopback TCP relay that can be cut ([`TcpProxy`]).
//!
//! Every await that could hang is bounded by [`TIMEOUT`], so a broken daemon fails a test instead of
//! stalling the suite. The async helpers are plain `#[track_caller]` functions that return a future:
//! they capture the caller's location up front, so a failure names the line of the test that failed.

use std::{
    future::{Future, IntoFuture},
    panic::Location,
    time::{Duration, SystemTime},
};

mod agent;
#[cfg(feature = "client")]
pub mod client;
mod daemon;
pub mod etcd;
mod http;
pub mod process;
mod proxy;
pub mod tcp_proxy;

pub use agent::{Agent, resume_of};
pub use daemon::{Daemon, pool_in};
pub use http::{http_get, scrape};
pub use proxy::Proxy;
/// The daemon's configuration and token types, for a [`Config`] built by hand (TLS files, tokens) and
/// served with [`Daemon::serve`], so that a test suite needs no direct dependency on `slotd`.
pub use slotd::{config::Config, grpc::auth::Token};
pub use tcp_proxy::TcpProxy;

/// The longest any single step may take before the test fails.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// How often the Status waits poll.
pub(crate) const POLL: Duration = Duration::from_millis(5);

/// Bounds a future by [`TIMEOUT`], failing at `at` with `what` when it does not finish.
///
/// # Cancel safety
///
/// As cancel-safe as `fut`: dropping this drops `fut`.
pub async fn bounded<T>(at: &Location<'_>, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(TIMEOUT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{at}: timed out after {TIMEOUT:?} waiting for {what}"),
    }
}

/// Bounds `fut` by [`TIMEOUT`], failing at the caller's line.
#[track_caller]
pub fn within<F: IntoFuture>(what: &'static str, fut: F) -> impl Future<Output = F::Output> {
    let at = Location::caller();
    async move { bounded(at, what, fut.into_future()).await }
}

/// A wire duration.
#[track_caller]
pub fn dur(d: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(d).expect("small durations convert")
}

/// A wire duration of `n` milliseconds.
#[track_caller]
pub fn ms(n: u64) -> prost_types::Duration {
    dur(Duration::from_millis(n))
}

/// A wall-clock timestamp `d` in the past.
pub fn ago(d: Duration) -> prost_types::Timestamp {
    prost_types::Timestamp::from(SystemTime::now() - d)
}

/// A wire timestamp as a `SystemTime`.
#[track_caller]
pub fn system_time(ts: &prost_types::Timestamp) -> SystemTime {
    SystemTime::try_from(*ts).expect("valid timestamp")
}

/// `a - b` in milliseconds, signed.
pub fn diff_ms(a: &prost_types::Timestamp, b: &prost_types::Timestamp) -> i128 {
    let nanos = |t: &prost_types::Timestamp| i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos);
    (nanos(a) - nanos(b)) / 1_000_000
}
