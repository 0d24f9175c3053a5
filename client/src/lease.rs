//! The [`Lease`] guard: one granted slot, released when it is dropped.

use std::{
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tokio::sync::{mpsc, oneshot, watch};

use crate::{Error, Lost, Outcome, ProviderLimit, Report, Usage, command::Command};

/// State shared by a [`Lease`], its [`LeaseHandle`]s and the session task.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) lease_id: String,
    pub(crate) pool: String,
    pub(crate) fencing_token: u64,
    pub(crate) ttl: Duration,
    pub(crate) expires_at: Mutex<SystemTime>,
    pub(crate) lost: watch::Sender<Option<Lost>>,
    /// What a drop (or the closure form) reports, as far as someone set it.
    pub(crate) report: Mutex<PendingReport>,
}

/// The parts of a release's [`Report`] set on a lease before it is released.
#[derive(Debug, Default)]
pub(crate) struct PendingReport {
    outcome: Option<Outcome>,
    usage: Option<Usage>,
    limits: Vec<ProviderLimit>,
}

impl PendingReport {
    /// The report, with `default` as the outcome if none was set.
    fn finish(self, default: Outcome) -> Report {
        Report { outcome: self.outcome.unwrap_or(default), usage: self.usage, limits: self.limits }
    }
}

impl Shared {
    pub(crate) fn new(
        lease_id: String,
        pool: String,
        fencing_token: u64,
        ttl: Duration,
        expires_at: SystemTime,
    ) -> Arc<Self> {
        Arc::new(Shared {
            lease_id,
            pool,
            fencing_token,
            ttl,
            expires_at: Mutex::new(expires_at),
            lost: watch::Sender::new(None),
            report: Mutex::new(PendingReport::default()),
        })
    }

    pub(crate) fn set_expires_at(&self, t: SystemTime) {
        // A poisoned lock only means another thread panicked mid-assignment of a plain value.
        *self.expires_at.lock().unwrap_or_else(|e| e.into_inner()) = t;
    }

    pub(crate) fn mark_lost(&self, why: Lost) {
        self.lost.send_if_modified(|l| {
            if l.is_none() {
                *l = Some(why);
                true
            } else {
                false
            }
        });
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, PendingReport> {
        // A poisoned lock only means another thread panicked mid-assignment of plain values.
        self.report.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes what was set, with `default` as the outcome if none was.
    pub(crate) fn take_report(&self, default: Outcome) -> Report {
        std::mem::take(&mut *self.pending()).finish(default)
    }
}

/// A cheap, cloneable view of a lease: its identity, expiry and loss signal, without ownership.
///
/// Dropping a handle does nothing; the [`Lease`] it came from decides when the slot goes back.
#[derive(Debug, Clone)]
pub struct LeaseHandle {
    shared: Arc<Shared>,
}

impl LeaseHandle {
    /// The daemon's id of the lease (32 hex digits).
    pub fn lease_id(&self) -> &str {
        &self.shared.lease_id
    }

    /// The pool the slot is on.
    pub fn pool(&self) -> &str {
        &self.shared.pool
    }

    /// Strictly increasing per pool: pass it to anything that must reject stale holders.
    pub fn fencing_token(&self) -> u64 {
        self.shared.fencing_token
    }

    /// The lease's TTL; the client heartbeats at about a third of it.
    pub fn ttl(&self) -> Duration {
        self.shared.ttl
    }

    /// When the lease expires unless renewed (updated as heartbeats are sent).
    pub fn expires_at(&self) -> SystemTime {
        *self.shared.expires_at.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True once the lease is known to be lost (see [`lost`](Self::lost)).
    pub fn is_lost(&self) -> bool {
        self.shared.lost.borrow().is_some()
    }

    /// Resolves when the daemon expires or revokes the lease, or a resume after a reconnect fails.
    ///
    /// Never resolves for a lease that is released normally.
    ///
    /// # Cancel safety
    /// Cancel safe: the returned future only watches; dropping it changes nothing.
    pub fn lost(&self) -> impl Future<Output = Lost> + Send + 'static {
        let mut rx = self.shared.lost.subscribe();
        async move {
            match rx.wait_for(Option::is_some).await {
                Ok(lost) => lost.clone().unwrap_or(Lost::SessionClosed),
                Err(_) => Lost::SessionClosed,
            }
        }
    }

    /// Takes the report set so far, with `default` as the outcome if none was set.
    pub(crate) fn take_report(&self, default: Outcome) -> Report {
        self.shared.take_report(default)
    }

    /// Sets the outcome reported when the lease is released by drop (or by
    /// [`Client::run`](crate::Client::run)). Usage and limits set before are kept.
    pub fn set_outcome(&self, outcome: Outcome) {
        self.shared.pending().outcome = Some(outcome);
    }

    /// Sets the whole report (outcome, usage, provider limits) sent when the lease is released by
    /// drop (or by [`Client::run`](crate::Client::run)); replaces anything set before.
    pub fn set_report(&self, report: Report) {
        let Report { outcome, usage, limits } = report;
        *self.shared.pending() = PendingReport { outcome: Some(outcome), usage, limits };
    }

    /// Records the tokens the call used; sent with the release, whatever its outcome.
    pub fn set_usage(&self, usage: Usage) {
        self.shared.pending().usage = Some(usage);
    }
}

/// One granted slot. The slot goes back to the daemon when the lease is dropped or released.
///
/// Dropping a lease releases it with outcome [`Outcome::Ok`] (or the outcome given to
/// [`set_outcome`](Self::set_outcome); [`Outcome::Error`] if the thread is panicking). The drop only
/// sends a message to the client's session task: it never blocks, awaits or panics. If even that
/// message cannot be delivered, the daemon reclaims the slot when its TTL runs out.
#[must_use = "dropping a Lease releases its slot at once"]
#[derive(Debug)]
pub struct Lease {
    handle: LeaseHandle,
    cmd: mpsc::UnboundedSender<Command<Lease>>,
    released: bool,
}

impl Lease {
    pub(crate) fn new(shared: Arc<Shared>, cmd: mpsc::UnboundedSender<Command<Lease>>) -> Self {
        Lease { handle: LeaseHandle { shared }, cmd, released: false }
    }

    /// A cloneable view of this lease (identity, expiry, [`lost`](LeaseHandle::lost), outcome).
    pub fn handle(&self) -> LeaseHandle {
        self.handle.clone()
    }

    /// The daemon's id of the lease (32 hex digits).
    pub fn lease_id(&self) -> &str {
        self.handle.lease_id()
    }

    /// The pool the slot is on.
    pub fn pool(&self) -> &str {
        self.handle.pool()
    }

    /// Strictly increasing per pool: pass it to anything that must reject stale holders.
    pub fn fencing_token(&self) -> u64 {
        self.handle.fencing_token()
    }

    /// The lease's TTL; the client heartbeats at about a third of it.
    pub fn ttl(&self) -> Duration {
        self.handle.ttl()
    }

    /// When the lease expires unless renewed (updated as heartbeats are sent).
    pub fn expires_at(&self) -> SystemTime {
        self.handle.expires_at()
    }

    /// True once the lease is known to be lost.
    pub fn is_lost(&self) -> bool {
        self.handle.is_lost()
    }

    /// Resolves when the daemon expires or revokes the lease, or a resume after a reconnect fails.
    ///
    /// # Cancel safety
    /// Cancel safe: the returned future only watches; dropping it changes nothing.
    pub fn lost(&self) -> impl Future<Output = Lost> + Send + 'static {
        self.handle.lost()
    }

    /// Sets the outcome reported when this lease is dropped.
    pub fn set_outcome(&self, outcome: Outcome) {
        self.handle.set_outcome(outcome);
    }

    /// Sets the whole report (outcome, usage, provider limits) sent when this lease is dropped.
    pub fn set_report(&self, report: Report) {
        self.handle.set_report(report);
    }

    /// Releases the lease with `outcome` (plus any usage set before) and waits until the daemon
    /// applied it.
    ///
    /// While the client is reconnecting, this waits until the lease was resumed and released.
    ///
    /// # Cancel safety
    /// The release is sent on the first poll; dropping the future afterwards only stops waiting for
    /// the answer. Dropping it before the first poll drops the lease, which releases it with
    /// [`Outcome::Ok`].
    pub async fn release(self, outcome: Outcome) -> Result<(), Error> {
        let report = self.handle.take_report(outcome).with_outcome(outcome);
        self.release_with(report).await
    }

    /// Releases the lease with a whole [`Report`] (outcome, usage, the provider's rate-limit
    /// headers) and waits until the daemon applied it.
    ///
    /// # Cancel safety
    /// As for [`release`](Self::release).
    pub async fn release_with(mut self, report: Report) -> Result<(), Error> {
        self.released = true;
        if let Some(why) = self.handle.shared.lost.borrow().clone() {
            return Err(Error::Lost { lease_id: self.lease_id().to_owned(), reason: why });
        }
        let (tx, rx) = oneshot::channel();
        self.cmd
            .send(Command::Release { lease_id: self.lease_id().to_owned(), report, reply: Some(tx) })
            .map_err(|_| Error::SessionClosed)?;
        rx.await.unwrap_or(Err(Error::SessionClosed))
    }

    /// Releases the lease reporting the tokens the call used, with the outcome set before (default
    /// [`Outcome::Ok`]) and any provider limits set before. The daemon settles the reservation made
    /// at grant: the unused part of the estimate goes back to the pool's budgets, usage above it is
    /// charged as debt. For a report with the provider's rate-limit headers, use
    /// [`release_with`](Self::release_with) with a [`Report`] whose `limits` come from
    /// [`provider::provider_limits`](crate::provider).
    ///
    /// # Cancel safety
    /// As for [`release`](Self::release).
    pub async fn settle(self, usage: Usage) -> Result<(), Error> {
        let mut report = self.handle.take_report(Outcome::Ok);
        report.usage = Some(usage);
        self.release_with(report).await
    }

    /// Releases the lease reporting a provider 429 (pauses the pool for `retry_after`, or the pool's
    /// default when `None`).
    ///
    /// # Cancel safety
    /// As for [`release`](Self::release).
    pub async fn rate_limited(self, retry_after: Option<Duration>) -> Result<(), Error> {
        self.release(Outcome::RateLimited { retry_after }).await
    }

    /// Releases the lease reporting a failed provider call.
    ///
    /// # Cancel safety
    /// As for [`release`](Self::release).
    pub async fn failed(self) -> Result<(), Error> {
        self.release(Outcome::Error).await
    }

    /// Releases without waiting for the answer: what `Drop` does, with an explicit outcome.
    pub(crate) fn release_in_background(mut self, report: Report) {
        self.released = true;
        let _ = self.cmd.send(Command::Release { lease_id: self.lease_id().to_owned(), report, reply: None });
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let report =
            self.handle.take_report(if std::thread::panicking() { Outcome::Error } else { Outcome::Ok });
        // An unbounded send never blocks; if the session is gone the daemon's TTL covers the slot.
        let _ = self.cmd.send(Command::Release {
            lease_id: self.handle.shared.lease_id.clone(),
            report,
            reply: None,
        });
    }
}
