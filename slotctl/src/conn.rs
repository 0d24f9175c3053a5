//! [`Conn`]: one channel to the daemon, with the agent token on the agent service and the admin token on the admin service.

use std::{path::PathBuf, time::Duration};

use slotd_client::{AuthChannel, BearerAuth, Connector};
use slotd_proto::v1::{self as pb, admin_client::AdminClient, slotd_client::SlotdClient};
use tonic::{Code, transport::Endpoint};

use super::{CtlError, error::chain};

/// Where the daemon is and how to reach it (from the global flags).
#[derive(Debug, Clone, Default)]
pub struct Target {
    /// The endpoint: `host:port` or a URL.
    pub endpoint: String,
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
    /// The connection settings: TLS for `https://` or a CA file, and [`Conn::CONNECT_TIMEOUT`].
    fn connector(&self) -> Result<Connector, CtlError> {
        let mut c = Connector::new().connect_timeout(Conn::CONNECT_TIMEOUT);
        if let Some(path) = &self.ca_cert {
            let pem = std::fs::read(path)
                .map_err(|e| CtlError::new(format!("reading --ca-cert {}: {e}", path.display())))?;
            c = c.tls(pem);
        }
        if let Some(domain) = &self.tls_domain {
            c = c.tls_domain(domain.clone());
        }
        Ok(c)
    }

    /// The configured tonic endpoint: timeouts, keepalives, and TLS for `https://` or a CA file.
    pub fn endpoint(&self) -> Result<Endpoint, CtlError> {
        self.connector()?.endpoint(&self.endpoint).map_err(|e| match e {
            slotd_client::Error::Transport(why) => CtlError::new(why),
            other => CtlError::new(other.to_string()),
        })
    }
}

/// A connection to the daemon's agent and admin services: one channel, each service with its token.
#[derive(Debug, Clone)]
pub struct Conn {
    endpoint: String,
    slotd: SlotdClient<AuthChannel>,
    admin: AdminClient<AuthChannel>,
}

impl Conn {
    /// How long connecting may take before `slotctl` gives up.
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

    /// Connects to `target`'s endpoint, over TLS when it asks for it. Calls to the agent service
    /// carry `authorization: Bearer <token>`; calls to the admin service carry the admin token, or
    /// the same token when no admin token is set.
    ///
    /// # Cancel safety
    /// Cancel safe: nothing is kept until the connection is made.
    pub async fn connect(target: &Target) -> Result<Conn, CtlError> {
        let bearer = |t: Option<&str>| {
            BearerAuth::new(t)
                .map_err(|_| CtlError::new("the token contains characters that cannot be sent in metadata"))
        };
        let auth = bearer(target.token.as_deref())?;
        let admin_auth = match target.admin_token.as_deref() {
            Some(t) => bearer(Some(t))?,
            None => auth.clone(),
        };
        let endpoint = &target.endpoint;
        let channel = target.endpoint()?.connect().await.map_err(|e| {
            CtlError::with_code(format!("cannot connect to {endpoint}: {}", chain(&e)), Code::Unavailable)
        })?;
        Ok(Conn {
            endpoint: endpoint.clone(),
            slotd: SlotdClient::new(auth.wrap(channel.clone())),
            admin: AdminClient::new(admin_auth.wrap(channel)),
        })
    }

    /// The endpoint this connection goes to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The agent service, with the agent token.
    pub fn slotd(&self) -> SlotdClient<AuthChannel> {
        self.slotd.clone()
    }

    /// The admin service, with the admin token (or the agent token).
    pub fn admin(&self) -> AdminClient<AuthChannel> {
        self.admin.clone()
    }

    /// A Status snapshot, with the member's role and epoch when the daemon runs with high
    /// availability (`slotd-role` / `slotd-epoch` response metadata).
    ///
    /// # Cancel safety
    /// Cancel safe: a read-only call.
    pub async fn status_ha(
        &self,
        pool: Option<&str>,
    ) -> Result<(pb::StatusResponse, Option<HaRole>), CtlError> {
        let req = pb::StatusRequest { pool: pool.unwrap_or_default().to_owned() };
        let resp = self.slotd().status(req).await?;
        let md = resp.metadata();
        let role = md.get(slotd_proto::ROLE_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let epoch =
            md.get(slotd_proto::EPOCH_HEADER).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
        let ha = role.map(|role| HaRole { role, epoch: epoch.unwrap_or(0) });
        Ok((resp.into_inner(), ha))
    }

    /// A Status snapshot (of one pool, or all).
    ///
    /// # Cancel safety
    /// Cancel safe: a read-only call.
    pub async fn status(&self, pool: Option<&str>) -> Result<pb::StatusResponse, CtlError> {
        let req = pb::StatusRequest { pool: pool.unwrap_or_default().to_owned() };
        Ok(self.slotd().status(req).await?.into_inner())
    }
}

/// A member's role in a highly available deployment, as Status reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HaRole {
    /// `leader` (a standby refuses Status with UNAVAILABLE and names the leader).
    pub role: String,
    /// The term's epoch: the high 32 bits of its fencing tokens.
    pub epoch: u64,
}
