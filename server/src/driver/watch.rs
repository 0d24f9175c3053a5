//! The operator's long-running views: Watch (a snapshot, then every change) and Drain (the counts
//! until the leases are gone). Each runs in a task of its own and hands domain values to a channel;
//! `grpc::admin` turns them into messages.

use std::time::Duration;

use tokio::{
    sync::{broadcast::error::RecvError, mpsc},
    time::Instant,
};

use super::{DrainCounts, DriverHandle, Published};
use crate::scheduler::{Error, PoolId, Snapshot, time};

/// One message of a Watch.
#[derive(Debug)]
pub enum WatchItem {
    /// The state at one instant (first, periodically, and after falling behind).
    Snapshot(Snapshot),
    /// A change after the last snapshot.
    Change(Box<Published>),
}

/// Starts a Watch of `pool` (or everything): a snapshot, then every change, plus a fresh snapshot
/// every `interval` (none when `None`). The stream ends with an error when the driver stops.
///
/// # Cancel safety
/// Cancel safe: nothing is subscribed until the future completes; the task ends when the receiver
/// is dropped.
pub async fn watch(
    driver: DriverHandle,
    pool: Option<PoolId>,
    interval: Option<Duration>,
) -> Result<mpsc::Receiver<Result<WatchItem, Error>>, Error> {
    let (snapshot, mut changes) = driver.watch(pool.clone()).await?;
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        if tx.send(Ok(WatchItem::Snapshot(snapshot))).await.is_err() {
            return;
        }
        // `interval` is bounded by the Admin service; the checked start keeps an unbounded caller
        // from panicking this task all the same.
        let mut ticker = interval.map(|d| tokio::time::interval_at(time::after(Instant::now(), d), d));
        loop {
            let periodic = async {
                match ticker.as_mut() {
                    Some(t) => {
                        t.tick().await;
                    }
                    None => std::future::pending().await,
                }
            };
            let msg = tokio::select! {
                () = tx.closed() => return,
                () = periodic => driver.status(pool.clone()).await.map(WatchItem::Snapshot),
                change = changes.recv() => match change {
                    Ok(p) => {
                        if pool.as_ref().is_some_and(|want| p.fact.pool() != Some(want)) {
                            continue;
                        }
                        Ok(WatchItem::Change(Box::new(p)))
                    }
                    // Too slow for the change rate: start over from a fresh snapshot rather than
                    // end the stream (a dashboard wants the current state, not every step).
                    Err(RecvError::Lagged(_)) => driver.watch(pool.clone()).await.map(|(s, rx)| {
                        changes = rx;
                        WatchItem::Snapshot(s)
                    }),
                    Err(RecvError::Closed) => Err(Error::ShuttingDown),
                },
            };
            let end = msg.is_err();
            if tx.send(msg).await.is_err() || end {
                return;
            }
        }
    });
    Ok(rx)
}

/// Why a Drain stream ended early.
#[derive(Debug)]
pub enum DrainError {
    /// The timeout passed with this many leases still held.
    Timeout {
        /// Leases still held.
        leases: usize,
    },
    /// The driver stopped.
    Driver(Error),
}

/// Starts an operator's drain and follows the counts: every change, until no lease is held (or
/// `timeout` passes, which ends the stream with [`DrainError::Timeout`]; the drain stays on).
///
/// # Cancel safety
/// Not cancel safe: once the driver has the command, the drain is on even if the caller stops
/// waiting. The following task ends when the receiver is dropped.
pub async fn drain(
    driver: DriverHandle,
    timeout: Option<Duration>,
) -> Result<mpsc::Receiver<Result<DrainCounts, DrainError>>, Error> {
    let mut updates = driver.counts();
    let first = driver.set_draining(true).await?;
    updates.mark_unchanged();
    let deadline = timeout.map(|t| time::after(Instant::now(), t));
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let mut counts = first;
        let mut last = None;
        loop {
            if last != Some(counts) {
                if tx.send(Ok(counts)).await.is_err() {
                    return;
                }
                last = Some(counts);
            }
            if counts.leases == 0 {
                return;
            }
            let timed_out = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = tx.closed() => return,
                () = timed_out => {
                    let _ = tx.send(Err(DrainError::Timeout { leases: counts.leases })).await;
                    return;
                }
                changed = updates.changed() => {
                    if changed.is_err() {
                        let _ = tx.send(Err(DrainError::Driver(Error::ShuttingDown))).await;
                        return;
                    }
                    counts = *updates.borrow_and_update();
                }
            }
        }
    });
    Ok(rx)
}
