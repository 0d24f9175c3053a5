//! `acquire_any` (one request over an ordered list of pools) and outcome reports outside a lease.

use std::time::SystemTime;

use slotd_proto::v1::{self as pb, slotd_client::SlotdClient};

use crate::{AcquireBuilder, AuthChannel, Client, Error, Outcome};

impl Client {
    /// Asks for one slot on any of `pools`, in order of preference: for example two API keys, or two
    /// providers. `.await` the builder for a [`Lease`](crate::Lease); its [`pool`](crate::Lease::pool)
    /// names the pool it was granted on.
    ///
    /// The daemon queues the request in every listed pool at once and grants it on the first listed
    /// pool whose gates pass. It never holds two slots, nor one while waiting for another, and the
    /// request leaves every queue when granted, cancelled or rejected. At most 8 pools, none twice;
    /// a single pool is the same as [`acquire`](Client::acquire).
    ///
    /// ```no_run
    /// # async fn f(client: slotd_client::Client) -> Result<(), slotd_client::Error> {
    /// let lease = client.acquire_any(["key-a", "key-b"]).priority(7).await?;
    /// println!("granted on {}", lease.pool());
    /// # Ok(()) }
    /// ```
    ///
    /// # Panics
    /// When `pools` is empty.
    pub fn acquire_any<I, S>(&self, pools: I) -> AcquireBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut pools = pools.into_iter().map(Into::into);
        let first = pools.next().expect("acquire_any needs at least one pool");
        let mut builder = self.acquire(first);
        builder.spec.any_pools = pools.collect();
        builder
    }

    /// Reports a provider answer seen outside a lease: [`Outcome::RateLimited`], [`Outcome::Overloaded`]
    /// or [`Outcome::QuotaExhausted`] (the daemon refuses the other classes with INVALID_ARGUMENT). The
    /// pool's policy for the class applies (by default a pause; an overload also counts as a failure
    /// for the pool's circuit breaker). Returns when the pool's pause now ends, if it is paused.
    ///
    /// # Cancel safety
    /// Dropping the future may or may not have delivered the report.
    pub async fn report_outcome(
        &self,
        pool: impl Into<String>,
        outcome: Outcome,
        reason: impl Into<String>,
    ) -> Result<Option<SystemTime>, Error> {
        let (code, retry_after) = crate::session::wire::outcome(outcome);
        let req = pb::ReportRateLimitRequest {
            pool: pool.into(),
            retry_after: retry_after.and_then(|d| prost_types::Duration::try_from(d).ok()),
            reason: reason.into(),
            outcome: code as i32,
        };
        let call = |mut c: SlotdClient<AuthChannel>| {
            let req = req.clone();
            async move { c.report_rate_limit(req).await }
        };
        let resp = self.unary(call).await?.into_inner();
        Ok(resp.paused_until.and_then(|t| SystemTime::try_from(t).ok()))
    }
}
