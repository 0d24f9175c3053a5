//! [`Conn`]: one channel to the daemon, plus the bearer token every request carries.

use std::{path::PathBuf, time::Duration};

use slotd_proto::v1::{self as pb, admin_client::AdminClient, slotd_client::SlotdClient};
use tonic::{
    Code,
    metadata::AsciiMetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};

use super::{CtlError, error::chain};

/// Where the daemon is and how to reach it (from the global flags).
#[derive(Debug, Clone, Default)]
pub struct Target {
    /// The endpoint URL.
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
    /// The configured tonic endpoint: timeouts, keepalives, and TLS for `https://` or a CA file.
    pub fn endpoint(&self) -> Result<Endpoint, CtlError> {
        let url = &self.endpoint;
        let mut ep = Endpoint::from_shared(url.clone())
            .map_err(|e| CtlError::new(format!("invalid endpoint {url:?}: {}", chain(&e))))?
            .connect_timeout(Conn::CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        if url.starts_with("https://") || self.ca_cert.is_some() {
            let mut tls = ClientTlsConfig::new();
            if let Some(path) = &self.ca_cert {
                let pem = std::fs::read(path)
                    .map_err(|e| CtlError::new(format!("reading --ca-cert {}: {e}", path.display())))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            if let Some(domain) = &self.tls_domain {
                tls = tls.domain_name(domain.clone());
            }
            ep = ep.tls_config(tls).map_err(|e| CtlError::new(format!("tls: {}", chain(&e))))?;
        }
        Ok(ep)
    }
}

/// A connection to the daemon's agent and admin services.
#[derive(Debug, Clone)]
pub struct Conn {
    endpoint: String,
    channel: Channel,
    auth: Option<AsciiMetadataValue>,
    admin_auth: Option<AsciiMetadataValue>,
}

fn bearer(token: Option<&str>) -> Result<Option<AsciiMetadataValue>, CtlError> {
    token
        .map(|t| {
            AsciiMetadataValue::try_from(format!("Bearer {t}"))
                .map_err(|_| CtlError::new("the token contains characters that cannot be sent in metadata"))
        })
        .transpose()
}

impl Conn {
    /// How long connecting may take before `slotctl` gives up.
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

    /// Connects to `target`'s endpoint, over TLS when it asks for it; its token is sent as
    /// `authorization: Bearer <token>`.
    ///
    /// # Cancel safety
    /// Cancel safe: nothing is kept until the connection is made.
    pub async fn connect(target: &Target) -> Result<Conn, CtlError> {
        let auth = bearer(target.token.as_deref())?;
        let admin_auth = match target.admin_token.as_deref() {
            Some(t) => bearer(Some(t))?,
            None => auth.clone(),
        };
        let endpoint = &target.endpoint;
        let channel = target.endpoint()?.connect().await.map_err(|e| {
            CtlError::with_code(format!("cannot connect to {endpoint}: {}", chain(&e)), Code::Unavailable)
        })?;
        Ok(Conn { endpoint: endpoint.clone(), channel, auth, admin_auth })
    }

    /// The endpoint this connection goes to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// A request to the agent service, carrying the bearer token.
    pub fn request<T>(&self, msg: T) -> tonic::Request<T> {
        with_auth(msg, self.auth.as_ref())
    }

    /// A request to the admin service, carrying the admin token (or the bearer token).
    pub fn admin_request<T>(&self, msg: T) -> tonic::Request<T> {
        with_auth(msg, self.admin_auth.as_ref())
    }

    /// The agent service.
    pub fn slotd(&self) -> SlotdClient<Channel> {
        SlotdClient::new(self.channel.clone())
    }

    /// The admin service.
    pub fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel.clone())
    }

    /// A Status snapshot (of one pool, or all).
    ///
    /// # Cancel safety
    /// Cancel safe: a read-only call.
    pub async fn status(&self, pool: Option<&str>) -> Result<pb::StatusResponse, CtlError> {
        let req = self.request(pb::StatusRequest { pool: pool.unwrap_or_default().to_owned() });
        Ok(self.slotd().status(req).await?.into_inner())
    }
}

fn with_auth<T>(msg: T, auth: Option<&AsciiMetadataValue>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(auth) = auth {
        req.metadata_mut().insert("authorization", auth.clone());
    }
    req
}
