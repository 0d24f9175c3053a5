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
    /// The leader address `current` was redirected to (`None`: `current` is `endpoints[at]`).
    leader: Option<String>,
    /// How to reach a leader named by a standby (`None`: a single preconnected channel).
    redirect: Option<(Connector, BearerAuth)>,
}

/// What to do after a member failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Retry {
    /// A standby named the leader: try it at once.
    Now,
    /// The leader a standby named failed: a failover is likely under way (the standby answers, the
    /// leader it knows does not). Retry with a backoff of at most [`ELECTION_RETRY_MAX`], so that
    /// the new leader is found soon after it is elected.
    Soon,
    /// Anything else: retry after the usual backoff.
    Later,
}

/// Longest backoff between tries while a failover is under way ([`Retry::Soon`]): an election
/// takes about the daemon's `[ha] lease_ttl`; the leases a client re-presents hold the new leader's
/// learning period open until they are back.
pub const ELECTION_RETRY_MAX: std::time::Duration = std::time::Duration::from_millis(500);

/// Longest leader address followed (the daemon caps `[ha] advertise` at the same length).
pub const MAX_LEADER_BYTES: usize = 256;

/// The leader a standby names in a refusal: the `slotd-leader` metadata of an UNAVAILABLE status,
/// when it is non-empty text of at most [`MAX_LEADER_BYTES`]. `None` for any other status (a leader
/// that is shutting down, a transport failure, a standby that knows no leader yet).
///
/// Every tool that talks to a highly available deployment follows this address with its own
/// TLS and token settings, a bounded number of times.
pub fn leader_of(status: &Status) -> Option<&str> {
    if status.code() != Code::Unavailable {
        return None;
    }
    let leader = status.metadata().get(LEADER_HEADER)?.to_str().ok()?;
    (!leader.is_empty() && leader.len() <= MAX_LEADER_BYTES).then_some(leader)
}

impl Members {
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
        Self(Arc::new(Mutex::new(State { endpoints, at: 0, current, leader: None, redirect })))
    }

    /// How many endpoints are configured.
    pub(crate) fn len(&self) -> usize {
        self.0.lock().map_or(1, |s| s.endpoints.len())
    }

    /// The endpoint to use now.
    pub(crate) fn current(&self) -> SlotdClient<AuthChannel> {
        self.0.lock().map(|s| s.current.clone()).unwrap_or_else(|p| p.into_inner().current.clone())
    }

    /// After a call failed with `status` (`None`: the connection broke): a standby's UNAVAILABLE with
    /// `slotd-leader` switches to that leader ([`Retry::Now`]); anything else moves to the next
    /// configured endpoint ([`Retry::Later`]). A redirected leader that fails is forgotten: the next
    /// try goes back to the configured endpoints (with a single one too), whose standbys name the
    /// new leader once it is elected ([`Retry::Soon`]).
    pub(crate) fn failed(&self, status: Option<&Status>) -> Retry {
        let Ok(mut s) = self.0.lock() else { return Retry::Later };
        let leader = status.and_then(leader_of);
        if let (Some(addr), Some((connector, auth))) = (leader, &s.redirect) {
            match connector.endpoint(addr) {
                Ok(ep) => {
                    tracing::info!(leader = %addr, "slotd standby redirected to the leader");
                    s.current = SlotdClient::new(auth.clone().wrap(ep.connect_lazy()));
                    s.leader = Some(addr.to_owned());
                    return Retry::Now;
                }
                Err(e) => {
                    tracing::warn!(leader = %addr, error = %e, "slotd standby named an unusable leader")
                }
            }
        }
        let retry = if s.leader.take().is_some() {
            Retry::Soon
        } else {
            s.at = (s.at + 1) % s.endpoints.len();
            Retry::Later
        };
        s.current = s.endpoints[s.at].clone();
        retry
    }
}

#[cfg(test)]
mod tests {
    use tonic::metadata::MetadataValue;

    use super::*;

    fn refusal(code: Code, leader: Option<&str>) -> Status {
        let mut s = Status::new(code, "standby");
        if let Some(l) = leader {
            s.metadata_mut().insert(LEADER_HEADER, MetadataValue::try_from(l).expect("ascii"));
        }
        s
    }

    #[tokio::test]
    async fn a_failed_redirect_goes_back_to_the_configured_endpoint() {
        let auth = BearerAuth::new(None).expect("no token");
        let connector = Connector::new();
        let configured = connector.endpoint("127.0.0.1:1").expect("endpoint").connect_lazy();
        let members =
            Members::new(vec![SlotdClient::new(auth.clone().wrap(configured))], Some((connector, auth)));
        let leader = |m: &Members| m.0.lock().expect("lock").leader.clone();
        // A standby names the leader: followed at once.
        let named = refusal(Code::Unavailable, Some("http://127.0.0.1:2"));
        assert_eq!(members.failed(Some(&named)), Retry::Now);
        assert_eq!(leader(&members).as_deref(), Some("http://127.0.0.1:2"));
        // That leader dies: back to the one configured endpoint (its standby names the next), soon.
        assert_eq!(members.failed(None), Retry::Soon);
        assert_eq!(leader(&members), None);
        assert_eq!(members.failed(None), Retry::Later, "a failure of a configured endpoint backs off");
        assert_eq!(members.0.lock().expect("lock").at, 0);
    }

    #[test]
    fn only_a_standby_s_unavailable_names_a_leader() {
        let to = "http://10.0.0.2:50051";
        assert_eq!(leader_of(&refusal(Code::Unavailable, Some(to))), Some(to));
        assert_eq!(leader_of(&refusal(Code::Unavailable, None)), None);
        assert_eq!(leader_of(&refusal(Code::Unavailable, Some(""))), None);
        assert_eq!(leader_of(&refusal(Code::FailedPrecondition, Some(to))), None);
        let long = format!("http://{}:1", "a".repeat(MAX_LEADER_BYTES));
        assert_eq!(leader_of(&refusal(Code::Unavailable, Some(&long))), None);
    }
}
