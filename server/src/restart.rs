//! The restart marker: detects a restart after a crash or a stop with leases held, and remembers the
//! longest lease TTL granted so the next start learns for as long as a lease may still be live.
//!
//! The file exists while the daemon runs and is kept when it stops with leases held. Its contents:
//!
//! ```text
//! pid = 1234
//! max_granted_ttl_ms = 30000
//! ```
//!
//! `max_granted_ttl_ms` is the longest TTL granted since the marker was created (carried over
//! restarts until a clean stop removes the file). It is rewritten only when that maximum grows, off
//! the driver task, and once more at a stop with leases held. The learning period never falls below
//! the longest `default_ttl` among the pools served (a marker from an older slotd has no record; a
//! grant just before a crash may not be written yet).

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::watch;
use tracing::warn;

use crate::{driver::Observer, scheduler::Fact, state::Pools};

/// The key holding the longest TTL granted, in milliseconds.
const MAX_TTL_KEY: &str = "max_granted_ttl_ms";

/// The restart marker file of a running daemon.
#[derive(Debug)]
pub struct RestartMarker {
    path: PathBuf,
    written: Mutex<Written>,
    /// The longest TTL granted so far, in milliseconds (the file may lag behind it briefly).
    granted_ms: AtomicU64,
}

#[derive(Debug)]
struct Written {
    /// The longest TTL in the file.
    max_ttl: Duration,
    /// Removed at a clean stop: never written again.
    removed: bool,
}

/// What [`RestartMarker::open`] found.
#[derive(Debug)]
pub struct Startup {
    /// The marker, now (re)written for this run.
    pub marker: Arc<RestartMarker>,
    /// How long to grant only resumes.
    pub learning_period: Duration,
    /// Whether the previous run crashed or stopped with leases held.
    pub restarted: bool,
}

impl RestartMarker {
    /// Reads the marker left by the previous run (if any), decides this start's learning period, and
    /// rewrites the marker for this run. After a restart the period is the longer of `configured` and
    /// the longest TTL that may still be live: the recorded maximum or the longest `default_ttl` of
    /// `pools`, whichever is longer (a grant in the last moments before a crash may not be recorded
    /// yet), never above the longest `max_ttl` of `pools`, since no lease can outlive that. The new
    /// marker starts from that value, so a crash during learning still learns long enough next time.
    pub fn open(path: PathBuf, configured: Duration, pools: &Pools) -> Startup {
        let previous = match std::fs::read_to_string(&path) {
            Ok(text) => Some(parse_max_ttl(&text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                // Unreadable but present: assume the worst.
                warn!(path = %path.display(), error = %e, "cannot read the restart marker; treating this start as a restart");
                Some(None)
            }
        };
        let longest_max = pools.values().map(|p| p.max_ttl).max().unwrap_or_default();
        let longest_default = pools.values().map(|p| p.default_ttl).max().unwrap_or_default();
        let (restarted, live) = match previous {
            None => (false, Duration::ZERO),
            Some(recorded) => (true, recorded.unwrap_or_default().max(longest_default).min(longest_max)),
        };
        let marker = Arc::new(RestartMarker {
            path,
            written: Mutex::new(Written { max_ttl: live, removed: false }),
            granted_ms: AtomicU64::new(millis(live)),
        });
        marker.write(live);
        Startup { marker, learning_period: configured.max(live), restarted }
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records a granted TTL: rewrites the file when it is longer than any recorded so far.
    pub fn record(&self, ttl: Duration) {
        // A poisoned lock only means a panic mid-write of plain values.
        let mut w = self.written.lock().unwrap_or_else(|p| p.into_inner());
        if w.removed || ttl <= w.max_ttl {
            return;
        }
        w.max_ttl = ttl;
        self.write(ttl);
    }

    /// Removes the marker (a clean stop with nothing held); later [`RestartMarker::record`]s do nothing.
    pub fn remove(&self) {
        let mut w = self.written.lock().unwrap_or_else(|p| p.into_inner());
        w.removed = true;
        if let Err(e) = std::fs::remove_file(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!(path = %self.path.display(), error = %e, "cannot remove the restart marker; the next start will learn");
        }
    }

    /// Writes the longest TTL granted so far now, if the writer task has not yet (at shutdown with
    /// leases held, so the next start learns long enough).
    pub fn flush(&self) {
        self.record(Duration::from_millis(self.granted_ms.load(Ordering::Relaxed)));
    }

    fn write(&self, max_ttl: Duration) {
        let text = format!("pid = {}\n{MAX_TTL_KEY} = {}\n", std::process::id(), millis(max_ttl));
        if let Err(e) = std::fs::write(&self.path, text) {
            warn!(path = %self.path.display(), error = %e, "cannot write the restart marker; restarts will not be detected");
        }
    }

    /// An observer recording every granted TTL, and the task that writes the marker when the
    /// maximum grows (spawn it). The driver only compares and hands over the new maximum; the file
    /// is written on a blocking thread.
    ///
    /// # Cancel safety
    /// Dropping the writer only stops recording; the file keeps the last maximum written.
    pub fn recorder(
        self: &Arc<Self>,
    ) -> (TtlObserver, impl std::future::Future<Output = ()> + Send + 'static) {
        let (tx, mut rx) = watch::channel(());
        let marker = self.clone();
        let writer = async move {
            while rx.changed().await.is_ok() {
                let m = marker.clone();
                let _ = tokio::task::spawn_blocking(move || m.flush()).await;
            }
        };
        (TtlObserver { marker: self.clone(), tx }, writer)
    }
}

/// Hands the longest granted TTL seen so far to the marker's writer (see [`RestartMarker::recorder`]).
#[derive(Debug)]
pub struct TtlObserver {
    marker: Arc<RestartMarker>,
    tx: watch::Sender<()>,
}

impl Observer for TtlObserver {
    fn fact(&mut self, fact: &Fact) {
        if let Fact::Granted { lease, .. } = fact {
            let ms = millis(lease.ttl);
            if self.marker.granted_ms.fetch_max(ms, Ordering::Relaxed) < ms {
                self.tx.send_replace(());
            }
        }
    }
}

/// Whole milliseconds, saturating.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The recorded TTL, or `None` when the marker has none (older format, or unreadable).
fn parse_max_ttl(text: &str) -> Option<Duration> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once('=')?;
        (key.trim() == MAX_TTL_KEY).then(|| value.trim().parse::<u64>().ok().map(Duration::from_millis))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::{PoolConfig, PoolId};

    fn temp_path(tag: &str) -> PathBuf {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        std::env::temp_dir().join(format!("slotd-marker-{tag}-{}-{nanos}.running", std::process::id()))
    }

    fn pools(default_ttl: Duration, max_ttl: Duration) -> Pools {
        let mut p = Pools::new();
        p.insert(PoolId::new("p"), PoolConfig { default_ttl, max_ttl, ..PoolConfig::with_limit(1) });
        p
    }

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn the_recorded_ttl_parses_and_older_markers_have_none() {
        assert_eq!(parse_max_ttl("pid = 7\nmax_granted_ttl_ms = 2500\n"), Some(Duration::from_millis(2500)));
        assert_eq!(parse_max_ttl("1234\n"), None);
        assert_eq!(parse_max_ttl("max_granted_ttl_ms = soon\n"), None);
    }

    #[test]
    fn learning_covers_the_longest_ttl_that_may_be_live_bounded_by_max_ttl() {
        let path = temp_path("learn");
        let pools = pools(S(1), S(60));
        // First start: no marker, no learning beyond the configured one.
        let s = RestartMarker::open(path.clone(), S(2), &pools);
        assert!(!s.restarted);
        assert_eq!(s.learning_period, S(2));
        s.marker.record(S(30));
        s.marker.record(S(10));
        assert!(std::fs::read_to_string(&path).unwrap().contains("max_granted_ttl_ms = 30000"));
        // Restart: the recorded 30 s, not the default_ttl of 1 s.
        let s = RestartMarker::open(path.clone(), S(2), &pools);
        assert!(s.restarted);
        assert_eq!(s.learning_period, S(30));
        // And again (a crash during learning): the maximum is carried over.
        let s = RestartMarker::open(path.clone(), Duration::ZERO, &pools);
        assert_eq!(s.learning_period, S(30));
        // Never beyond the pools' longest max_ttl; never below the configured period.
        assert_eq!(RestartMarker::open(path.clone(), S(2), &self::pools(S(1), S(5))).learning_period, S(5));
        assert_eq!(RestartMarker::open(path.clone(), S(9), &self::pools(S(1), S(5))).learning_period, S(9));
        // A record below the longest default_ttl (a grant just before a crash, not yet written) is
        // raised to it.
        std::fs::write(&path, "pid = 1\nmax_granted_ttl_ms = 0\n").unwrap();
        assert_eq!(RestartMarker::open(path.clone(), S(0), &pools).learning_period, S(1));
        // An older marker without a record: the served pools' longest default_ttl.
        std::fs::write(&path, "1234\n").unwrap();
        assert_eq!(RestartMarker::open(path.clone(), S(0), &pools).learning_period, S(1));
        // A clean stop removes it for good.
        let s = RestartMarker::open(path.clone(), S(0), &pools);
        s.marker.remove();
        s.marker.record(S(50));
        assert!(!path.exists());
    }
}
