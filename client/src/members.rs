//! Several daemon endpoints (slotd's high availability): which one to talk to, following the
//! `slotd-leader` address a standby answers with, else trying the next endpoint.

use std::sync::{Arc, Mutex};

use slotd_proto::{LEADER_HEADER, v1::slotd_client::SlotdClient};
use tonic::{Code, Status};

use crate::{AuthChannel, BearerAuth, Connector};

/// The endpoints of one deployment and the one in use; cheap to clone, shared by the session task
/// and the unary calls.
#[derive(Clone, Debug)]
pub(crate) struct Members(Arc<Mutex<State>>);

#[derive(Debug)]
struct State {
    /// Every configured endpoint, lazily connected.
    endpoints: Vec<SlotdClient<AuthChannel>>,
    /// The index in `endpoints` tried last.
    at: usize,
    /// The endpoint in use: one of `endpoints`, or the leader a standby named.
    current: SlotdClient<AuthChannel>,
    /// How to reach a leader named by a standby (`None`: a single preconnected channel).
    redirect: Option<(Connector, BearerAuth)>,
}

impl Members {
    /// Longest leader address followed (the daemon caps `[ha] advertise` at the same length).
    const MAX_LEADER_BYTES: usize = 256;

    /// One endpoint: never switches.
    pub(crate) fn single(grpc: SlotdClient<AuthChannel>) -> Self {
        Self::new(vec![grpc], None)
    }

    /// Several endpoints, the first in use; a standby's redirect is reached through `connector`.
    pub(crate) fn new(
        endpoints: Vec<SlotdClient<AuthChannel>>,
        redirect: Option<(Connector, BearerAuth)>,
    ) -> Self {
        let current = endpoints[0].clone();
        Self(Arc::new(Mutex::new(State { endpoints, at: 0, current, redirect })))
    }

    /// The endpoint to use now.
    pub(crate) fn current(&self) -> SlotdClient<AuthChannel> {
        self.0.lock().map(|s| s.current.clone()).unwrap_or_else(|p| p.into_inner().current.clone())
    }

    /// After a call failed with `status` (`None`: the connection broke): a standby's UNAVAILABLE with
    /// `slotd-leader` switches to that leader (returns true: retry at once); anything else moves to
    /// the next configured endpoint (returns false: retry after the usual backoff).
    pub(crate) fn failed(&self, status: Option<&Status>) -> bool {
        let Ok(mut s) = self.0.lock() else { return false };
        let leader = status
            .filter(|st| st.code() == Code::Unavailable)
            .and_then(|st| st.metadata().get(LEADER_HEADER))
            .and_then(|v| v.to_str().ok())
            .filter(|a| !a.is_empty() && a.len() <= Self::MAX_LEADER_BYTES);
        if let (Some(addr), Some((connector, auth))) = (leader, &s.redirect) {
            match connector.endpoint(addr) {
                Ok(ep) => {
                    tracing::info!(leader = %addr, "slotd standby redirected to the leader");
                    s.current = SlotdClient::new(auth.clone().wrap(ep.connect_lazy()));
                    return true;
                }
                Err(e) => {
                    tracing::warn!(leader = %addr, error = %e, "slotd standby named an unusable leader")
                }
            }
        }
        if s.endpoints.len() > 1 {
            s.at = (s.at + 1) % s.endpoints.len();
            s.current = s.endpoints[s.at].clone();
        }
        false
    }
}
