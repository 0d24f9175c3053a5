//! [`Conn`]: one channel to the daemon, plus the bearer token every request carries.

use std::time::Duration;

use slotd_proto::v1::{self as pb, admin_client::AdminClient, slotd_client::SlotdClient};
use tonic::{
    Code,
    metadata::AsciiMetadataValue,
    transport::{Channel, Endpoint},
};

use super::{CtlError, error::chain};

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

    /// Connects to `endpoint`; `token` is sent as `authorization: Bearer <token>`.
    ///
    /// # Cancel safety
    /// Cancel safe: nothing is kept until the connection is made.
    pub async fn connect(endpoint: &str, token: Option<&str>) -> Result<Conn, CtlError> {
        let auth = match token {
            None => None,
            Some(t) => Some(AsciiMetadataValue::try_from(format!("Bearer {t}")).map_err(|_| {
                CtlError::new("the token contains characters that cannot be sent in metadata")
            })?),
        };
        let ep = Endpoint::from_shared(endpoint.to_owned())
            .map_err(|e| CtlError::new(format!("invalid endpoint {endpoint:?}: {}", chain(&e))))?
            .connect_timeout(Self::CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        let channel = ep.connect().await.map_err(|e| {
            CtlError::with_code(format!("cannot connect to {endpoint}: {}", chain(&e)), Code::Unavailable)
        })?;
        Ok(Conn { endpoint: endpoint.to_owned(), channel, auth })
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
