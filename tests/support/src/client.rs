//! Helpers on `slotd-client` (feature `client`): a connected [`Client`], Status waits through it and
//! small config builders.

use std::{
    future::Future,
    panic::Location,
    time::{Duration, Instant},
};

use slotd_client::{Client, proto as pb};

use crate::{Daemon, POLL, TIMEOUT, bounded};

impl Daemon {
    /// A `slotd-client` [`Client`] on its own connection, with fast reconnects.
    #[track_caller]
    pub fn connect(&self) -> impl Future<Output = Client> + '_ {
        let at = Location::caller();
        async move {
            bounded(
                at,
                "connect",
                Client::builder()
                    .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(100))
                    .connect(self.url()),
            )
            .await
            .unwrap_or_else(|e| panic!("{at}: connect: {e}"))
        }
    }
}

/// Polls Status through `client` until `pred` holds, returning that Status; fails after [`TIMEOUT`].
#[track_caller]
pub fn wait_until<'a>(
    client: &'a Client,
    what: &'a str,
    pred: impl Fn(&pb::StatusResponse) -> bool + 'a,
) -> impl Future<Output = pb::StatusResponse> + 'a {
    let at = Location::caller();
    async move {
        // Real time: the wait must not end early when a test pauses tokio's clock.
        let start = Instant::now();
        loop {
            let st = client.status(None).await.unwrap_or_else(|e| panic!("{at}: status: {e}"));
            if pred(&st) {
                return st;
            }
            if start.elapsed() > TIMEOUT {
                panic!("{at}: timed out waiting until {what}; last status: {st:#?}");
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// The named pool in a Status.
#[track_caller]
pub fn pool<'a>(st: &'a pb::StatusResponse, name: &str) -> &'a pb::PoolStatus {
    st.pools.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no pool {name} in {st:#?}"))
}

/// True when nothing is held or queued on `name`.
#[track_caller]
pub fn idle(st: &pb::StatusResponse, name: &str) -> bool {
    let p = pool(st, name);
    p.in_flight == 0 && p.queued == 0 && st.leases.iter().all(|l| l.pool != name)
}

/// A one-pool config: `[pools.NAME] max_concurrent = LIMIT` plus `extra` lines.
pub fn one_pool(name: &str, limit: u32, extra: &str) -> String {
    format!("[pools.{name}]\nmax_concurrent = {limit}\n{extra}\n")
}
