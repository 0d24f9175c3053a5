//! [`Conn`]: the connection to the daemon (to its leader, when several members are given), with the agent token on the agent service and the admin token on the admin service.

use std::{
    future::Future,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use slotd_client::{AuthChannel, BearerAuth, Connector, leader_of};
use slotd_proto::v1::{self as pb, admin_client::AdminClient, slotd_client::SlotdClient};
use tonic::{Code, Status, transport::Endpoint};

use super::{CtlError, error::chain};

/// Where the daemon is and how to reach it (from the global flags).
#[derive(Debug, Clone, Default)]
pub struct Target {
    /// The endpoints (`host:port` or URLs): one daemon, or every member of a highly available
    /// deployment, in any order.
    pub endpoints: Vec<String>,
    /// The bearer token.
    pub token: Option<String>,
    /// The admin service's bearer token, when it differs from `token`.
    pub admin_token: Option<String>,
    /// A CA certificate (PEM file) to verify the daemon with; implies TLS.
    pub ca_cert: Option<PathBuf>,
    /// The name the daemon's certificate must carry.
    pub tls_domain: Option<String>,
}

impl Target {
    /// Most endpoints accepted (a deployment has a handful of members).
    pub const MAX_ENDPOINTS: usize = 16;
    /// Most `slotd-leader` redirects one call follows (a failover in progress can name a leader
    /// that has just stepped down, which names the next one).
    pub const MAX_REDIRECTS: usize = 3;

    /// One endpoint, no token, no TLS settings.
    pub fn new(endpoint: impl Into<String>) -> Self {
        Target { endpoints: vec![endpoint.into()], ..Self::default() }
    }

    /// Checks the endpoint list: 1..=[`Self::MAX_ENDPOINTS`] entries, each a valid address.
    pub fn validate(&self) -> Result<(), CtlError> {
        let invalid = |m: String| CtlError::with_code(m, Code::InvalidArgument);
        if self.endpoints.is_empty() || self.endpoints.len() > Self::MAX_ENDPOINTS {
            return Err(invalid(format!(
                "give 1..={} endpoints (got {})",
                Self::MAX_ENDPOINTS,
                self.endpoints.len()
            )));
        }
        for e in &self.endpoints {
            slotd_client::parse_endpoint(e, self.ca_cert.is_some()).map_err(|e| invalid(e.to_string()))?;
        }
        Ok(())
    }

    /// The connection settings: TLS for `https://` or a CA file, and [`Conn::CONNECT_TIMEOUT`].
    pub fn connector(&self) -> Result<Connector, CtlError> {
        let mut c = Connector::new().connect_timeout(Conn::CONNECT_TIMEOUT);
        if let Some(path) = &self.ca_cert {
            c = c.tls(self.ca_pem(path)?);
        }
        if let Some(domain) = &self.tls_domain {
            c = c.tls_domain(domain.clone());
        }
        Ok(c)
    }

    /// The CA file's contents.
    pub fn ca_pem(&self, path: &std::path::Path) -> Result<Vec<u8>, CtlError> {
        std::fs::read(path).map_err(|e| CtlError::new(format!("reading --ca-cert {}: {e}", path.display())))
    }

    /// The configured tonic endpoint for `address`: timeouts, keepalives, and TLS for `https://`
    /// or a CA file.
    pub fn endpoint(&self, address: &str) -> Result<Endpoint, CtlError> {
        endpoint_with(&self.connector()?, address)
    }
}

fn endpoint_with(connector: &Connector, address: &str) -> Result<Endpoint, CtlError> {
    connector.endpoint(address).map_err(|e| match e {
        slotd_client::Error::Transport(why) => CtlError::new(why),
        other => CtlError::new(other.to_string()),
    })
}

/// One member, connected: its address and both services.
#[derive(Debug, Clone)]
struct Member {
    endpoint: String,
    slotd: SlotdClient<AuthChannel>,
    admin: AdminClient<AuthChannel>,
}

/// The member in use, and the index of the configured endpoint tried last.
#[derive(Debug)]
struct Current {
    member: Member,
    at: usize,
}

/// A connection to the daemon's agent and admin services: one channel, each service with its token.
/// With several endpoints, every call goes to the leader: a standby's UNAVAILABLE with
/// `slotd-leader` is followed (at most [`Target::MAX_REDIRECTS`] times per call, with the same TLS
/// and token settings); any other UNAVAILABLE moves to the next endpoint.
#[derive(Debug, Clone)]
pub struct Conn {
    endpoints: Arc<[String]>,
    connector: Connector,
    auth: BearerAuth,
    admin_auth: BearerAuth,
    current: Arc<Mutex<Current>>,
}

impl Conn {
    /// How long connecting may take before `slotctl` gives up.
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

    /// Connects to the first of `target`'s endpoints that accepts a connection, over TLS when it asks
    /// for it. Calls to the agent service carry `authorization: Bearer <token>`; calls to the admin
    /// service carry the admin token, or the same token when no admin token is set.
    ///
    /// # Cancel safety
    /// Cancel safe: nothing is kept until the connection is made.
    pub async fn connect(target: &Target) -> Result<Conn, CtlError> {
        target.validate()?;
        let bearer = |t: Option<&str>| {
            BearerAuth::new(t)
                .map_err(|_| CtlError::new("the token contains characters that cannot be sent in metadata"))
        };
        let auth = bearer(target.token.as_deref())?;
        let admin_auth = match target.admin_token.as_deref() {
            Some(t) => bearer(Some(t))?,
            None => auth.clone(),
        };
        let connector = target.connector()?;
        let mut last = None;
        for (at, endpoint) in target.endpoints.iter().enumerate() {
            match open(&connector, &auth, &admin_auth, endpoint).await {
                Ok(member) => {
                    return Ok(Conn {
                        endpoints: target.endpoints.clone().into(),
                        connector,
                        auth,
                        admin_auth,
                        current: Arc::new(Mutex::new(Current { member, at })),
                    });
                }
                Err(e) => last = Some(e),
            }
        }
        let last = last.unwrap_or_else(|| CtlError::with_code("no endpoint", Code::Unavailable));
        if target.endpoints.len() == 1 {
            return Err(last);
        }
        Err(CtlError::with_code(
            format!("cannot connect to any of {}; last: {}", target.endpoints.join(", "), last.message),
            Code::Unavailable,
        ))
    }

    fn current(&self) -> Member {
        self.current.lock().unwrap_or_else(|p| p.into_inner()).member.clone()
    }

    /// The endpoint in use: a configured one, or the leader a standby named.
    pub fn endpoint(&self) -> String {
        self.current().endpoint
    }

    /// The agent service of the member in use, with the agent token.
    pub fn slotd(&self) -> SlotdClient<AuthChannel> {
        self.current().slotd
    }

    /// The admin service of the member in use, with the admin token (or the agent token).
    pub fn admin(&self) -> AdminClient<AuthChannel> {
        self.current().admin
    }

    /// Runs `call` on the member in use; returns the answer and the endpoint that gave it. A
    /// standby's refusal naming the leader moves to that leader and calls again (at
    /// most [`Target::MAX_REDIRECTS`] times); any other UNAVAILABLE (a member that is down or
    /// stepping down) moves to the next configured endpoint and calls again, until each was tried
    /// once. A refused call changed nothing, so calling again is safe for every command. A stream
    /// that breaks later (Watch, Drain) is the caller's to call again.
    ///
    /// # Cancel safety
    /// Cancel safe when `call` is: dropping it abandons the call in flight.
    pub async fn call<T, F, Fut>(&self, mut call: F) -> Result<(T, String), Status>
    where
        F: FnMut(SlotdClient<AuthChannel>, AdminClient<AuthChannel>) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let mut redirects = 0;
        let mut moves = 0;
        loop {
            let m = self.current();
            let status = match call(m.slotd, m.admin).await {
                Ok(v) => return Ok((v, m.endpoint)),
                Err(s) => s,
            };
            if let Some(leader) = leader_of(&status)
                && redirects < Target::MAX_REDIRECTS
            {
                redirects += 1;
                if let Ok(member) = open(&self.connector, &self.auth, &self.admin_auth, leader).await {
                    self.current.lock().unwrap_or_else(|p| p.into_inner()).member = member;
                    continue;
                }
            }
            if status.code() != Code::Unavailable || !self.next_endpoint(&mut moves).await {
                return Err(status);
            }
        }
    }

    /// Moves to the next configured endpoint that accepts a connection; false once each of them
    /// was tried (`moves` counts them across one call).
    async fn next_endpoint(&self, moves: &mut usize) -> bool {
        let n = self.endpoints.len();
        while *moves + 1 < n {
            *moves += 1;
            let at = {
                let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
                cur.at = (cur.at + 1) % n;
                cur.at
            };
            if let Ok(member) = open(&self.connector, &self.auth, &self.admin_auth, &self.endpoints[at]).await
            {
                self.current.lock().unwrap_or_else(|p| p.into_inner()).member = member;
                return true;
            }
        }
        false
    }

    /// A Status snapshot, the endpoint that answered it, and the member's role and epoch when the
    /// daemon runs with high availability (`slotd-role` / `slotd-epoch` response metadata).
    ///
    /// # Cancel safety
    /// Cancel safe: a read-only call.
    pub async fn status_ha(
        &self,
        pool: Option<&str>,
    ) -> Result<(pb::StatusResponse, Option<HaRole>), CtlError> {
        let req = pb::StatusRequest { pool: pool.unwrap_or_default().to_owned() };
        let (resp, member) = self
            .call(|mut s, _| {
                let r = req.clone();
                async move { s.status(r).await }
            })
            .await?;
        let md = resp.metadata();
        let role = md.get(slotd_proto::ROLE_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let epoch =
            md.get(slotd_proto::EPOCH_HEADER).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
        let ha = role.map(|role| HaRole { role, epoch: epoch.unwrap_or(0), member });
        Ok((resp.into_inner(), ha))
    }

    /// A Status snapshot (of one pool, or all).
    ///
    /// # Cancel safety
    /// Cancel safe: a read-only call.
    pub async fn status(&self, pool: Option<&str>) -> Result<pb::StatusResponse, CtlError> {
        let req = pb::StatusRequest { pool: pool.unwrap_or_default().to_owned() };
        Ok(self
            .call(|mut s, _| {
                let r = req.clone();
                async move { s.status(r).await }
            })
            .await?
            .0
            .into_inner())
    }
}

/// Connects to one member (bounded by the connector's timeout).
async fn open(
    connector: &Connector,
    auth: &BearerAuth,
    admin_auth: &BearerAuth,
    endpoint: &str,
) -> Result<Member, CtlError> {
    let channel = endpoint_with(connector, endpoint)?.connect().await.map_err(|e| {
        CtlError::with_code(format!("cannot connect to {endpoint}: {}", chain(&e)), Code::Unavailable)
    })?;
    Ok(Member {
        endpoint: endpoint.to_owned(),
        slotd: SlotdClient::new(auth.clone().wrap(channel.clone())),
        admin: AdminClient::new(admin_auth.clone().wrap(channel)),
    })
}

/// A member's role in a highly available deployment, as Status reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HaRole {
    /// `leader` (a standby refuses Status with UNAVAILABLE and names the leader).
    pub role: String,
    /// The term's epoch: the high 32 bits of its fencing tokens.
    pub epoch: u64,
    /// The endpoint that answered: a configured one, or the leader a standby named.
    pub member: String,
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::Cli;

    #[test]
    fn endpoints_repeat_or_come_as_a_comma_list() {
        let cli = Cli::try_parse_from([
            "slotctl",
            "--endpoint",
            "http://10.0.0.1:50051",
            "--endpoint",
            "10.0.0.2:50051,10.0.0.3:50051",
            "status",
        ])
        .expect("parses");
        assert_eq!(cli.endpoint, ["http://10.0.0.1:50051", "10.0.0.2:50051", "10.0.0.3:50051"]);
        let cli = Cli::try_parse_from(["slotctl", "status"]).expect("parses");
        assert_eq!(cli.endpoint, [crate::cli::DEFAULT_ENDPOINT]);
    }

    #[test]
    fn the_endpoint_list_is_bounded_and_checked() {
        let target = |endpoints: Vec<String>| Target { endpoints, ..Target::default() };
        assert!(target(vec!["127.0.0.1:1".into(), "http://[::1]:2".into()]).validate().is_ok());
        let too_many = (0..=Target::MAX_ENDPOINTS).map(|i| format!("10.0.0.{i}:1")).collect();
        for bad in [vec![], too_many, vec!["127.0.0.1:1".into(), "no-port".into()]] {
            let e = target(bad.clone()).validate().expect_err(&format!("{bad:?} accepted"));
            assert_eq!(e.code, Some(Code::InvalidArgument), "{e}");
        }
    }
}
