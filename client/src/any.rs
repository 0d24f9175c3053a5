//! `acquire_any`: one request over an ordered list of pools.

use crate::{AcquireBuilder, Client};

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
}
