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
        let auth = match &target.token {
            None => None,
            Some(t) => Some(AsciiMetadataValue::try_from(format!("Bearer {t}")).map_err(|_| {
                CtlError::new("the token contains characters that cannot be sent in metadata")
            })?),
        };
        let endpoint = &target.endpoint;
        let channel = target.endpoint()?.connect().await.map_err(|e| {
            CtlError::with_code(format!("cannot connect to {endpoint}: {}", chain(&e)), Code::Unavailable)
        })?;
        Ok(Conn { endpoint: endpoint.clone(), channel, auth })
    }

    /// The endpoint this connection goes to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The bearer token's metadata value, if any.
    pub fn auth(&self) -> Option<&AsciiMetadataValue> {
        self.auth.as_ref()
    }

    /// A request carrying the bearer token.
    pub fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Some(auth) = &self.auth {
            req.metadata_mut().insert("authorization", auth.clone());
        }
        req
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
