//! The one way to reach a daemon: [`Connector`] (endpoint, TLS, timeouts) and [`BearerAuth`] (the token).

use std::{fmt, time::Duration};

use http::Uri;
use slotd_proto::AUTHORIZATION_HEADER;
use tonic::{
    Request, Status,
    metadata::AsciiMetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};

use crate::Error;

/// A channel whose every call carries a bearer token (when one is set).
pub type AuthChannel = InterceptedService<Channel, BearerAuth>;

/// How to reach a daemon: TLS trust, the name its certificate carries, and the connect timeout.
/// [`Connector::endpoint`] turns a target (`host:port`, `http://...` or `https://...`) into a
/// configured tonic [`Endpoint`].
#[derive(Clone)]
pub struct Connector {
    /// PEM CA bundle trusted for the daemon's certificate (implies TLS).
    tls_ca: Option<Vec<u8>>,
    /// Name checked against the daemon's certificate, when not the endpoint's host.
    tls_domain: Option<String>,
    connect_timeout: Duration,
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("tls_ca", &self.tls_ca.as_ref().map(|_| "<pem>"))
            .field("tls_domain", &self.tls_domain)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

impl Default for Connector {
    fn default() -> Self {
        Connector { tls_ca: None, tls_domain: None, connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT }
    }
}

impl Connector {
    /// How long making the connection may take.
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    /// How often an HTTP/2 ping checks that the connection is alive, even while idle: a daemon that
    /// vanished without closing the socket is noticed, and middleboxes keep the flow open.
    pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
    /// How long a keepalive ping may go unanswered before the connection counts as broken.
    pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

    /// Plain connections, the default timeout.
    pub fn new() -> Self {
        Self::default()
    }

    /// Uses TLS, trusting the CA certificates in `ca_pem` (PEM). An `https://` target without this
    /// trusts the system's roots.
    pub fn tls(mut self, ca_pem: impl Into<Vec<u8>>) -> Self {
        self.tls_ca = Some(ca_pem.into());
        self
    }

    /// The name to check the daemon's certificate against, when it is not the target's host (for
    /// example connecting to an IP address with a certificate for `slotd.internal`).
    pub fn tls_domain(mut self, name: impl Into<String>) -> Self {
        self.tls_domain = Some(name.into());
        self
    }

    /// How long making the connection may take (default [`Self::DEFAULT_CONNECT_TIMEOUT`]).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The configured endpoint for `target` (see [`parse_endpoint`]): TLS when the target is
    /// `https://` or a CA is set, the connect timeout, keepalives, and `TCP_NODELAY` (a release and
    /// the next grant are small writes that must not wait for a delayed ACK).
    pub fn endpoint(&self, target: &str) -> Result<Endpoint, Error> {
        let uri = parse_endpoint(target, self.tls_ca.is_some())?;
        let https = uri.scheme_str() == Some("https");
        let mut endpoint = Endpoint::from(uri)
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Self::KEEPALIVE_INTERVAL)
            .keep_alive_timeout(Self::KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        if https {
            let mut tls = ClientTlsConfig::new();
            tls = match &self.tls_ca {
                Some(pem) => tls.ca_certificate(Certificate::from_pem(pem)),
                None => tls.with_native_roots(),
            };
            if let Some(domain) = &self.tls_domain {
                tls = tls.domain_name(domain.clone());
            }
            endpoint = endpoint.tls_config(tls)?;
        }
        Ok(endpoint)
    }
}

/// Parses a daemon address: `host:port` (for example `127.0.0.1:50051` or `[::1]:50051`), or an
/// `http://` or `https://` URL. With `tls`, the scheme becomes `https` whatever was written, since
/// tonic picks plain text or TLS from the scheme alone.
pub fn parse_endpoint(target: &str, tls: bool) -> Result<Uri, Error> {
    let invalid = |why: &str| Error::Transport(format!("invalid endpoint {target:?}: {why}"));
    let text = target.trim();
    if text.is_empty() {
        return Err(invalid("it is empty"));
    }
    let scheme = if tls { "https" } else { "http" };
    let (url, bare) = match text.split_once("://") {
        Some((s, rest)) if s.eq_ignore_ascii_case("http") || s.eq_ignore_ascii_case("https") => {
            let s = if tls { scheme } else { s };
            (format!("{}://{rest}", s.to_ascii_lowercase()), false)
        }
        Some((s, _)) => {
            return Err(invalid(&format!("unsupported scheme {s:?}; use host:port, http:// or https://")));
        }
        None => (format!("{scheme}://{text}"), true),
    };
    let uri: Uri = url.parse().map_err(|e: http::uri::InvalidUri| invalid(&e.to_string()))?;
    if uri.host().is_none_or(str::is_empty) {
        return Err(invalid("no host"));
    }
    if bare && uri.port().is_none() {
        return Err(invalid("no port; write host:port or a URL"));
    }
    if bare && uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        return Err(invalid("host:port takes no path"));
    }
    Ok(uri)
}

/// Sends `authorization: Bearer <token>` on every call of the channel it wraps (nothing without a
/// token). The value is marked sensitive, so HTTP/2 never adds it to a compression table.
#[derive(Clone, Default)]
pub struct BearerAuth(Option<AsciiMetadataValue>);

impl fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() { "BearerAuth(<redacted>)" } else { "BearerAuth(None)" })
    }
}

impl BearerAuth {
    /// Sends `token`, or nothing when `None`. Fails when the token cannot travel as header text.
    pub fn new(token: Option<&str>) -> Result<Self, Error> {
        let Some(token) = token else { return Ok(Self(None)) };
        let mut value = AsciiMetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| Error::Config("bearer token is not valid metadata".into()))?;
        value.set_sensitive(true);
        Ok(Self(Some(value)))
    }

    /// Wraps `channel` so that every call carries the token.
    pub fn wrap(self, channel: Channel) -> AuthChannel {
        InterceptedService::new(channel, self)
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            req.metadata_mut().insert(AUTHORIZATION_HEADER, value.clone());
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn parsed(target: &str, tls: bool) -> String {
        parse_endpoint(target, tls).unwrap_or_else(|e| panic!("{target:?}: {e}")).to_string()
    }

    #[track_caller]
    fn refused(target: &str) -> String {
        match parse_endpoint(target, false) {
            Ok(uri) => panic!("{target:?} was accepted as {uri}"),
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains("invalid endpoint") && msg.contains(target.trim()), "{msg}");
                msg
            }
        }
    }

    #[test]
    fn host_and_port_become_a_url() {
        assert_eq!(parsed("127.0.0.1:50051", false), "http://127.0.0.1:50051/");
        assert_eq!(parsed("[::1]:7070", false), "http://[::1]:7070/");
        assert_eq!(parsed("slotd.internal:443", false), "http://slotd.internal:443/");
        assert_eq!(parsed(" localhost:7070\n", false), "http://localhost:7070/");
        // A CA means TLS.
        assert_eq!(parsed("slotd.internal:443", true), "https://slotd.internal:443/");
    }

    #[test]
    fn urls_keep_their_scheme_unless_tls_is_asked_for() {
        assert_eq!(parsed("http://127.0.0.1:50051", false), "http://127.0.0.1:50051/");
        assert_eq!(parsed("HTTP://127.0.0.1:50051", false), "http://127.0.0.1:50051/");
        assert_eq!(parsed("https://slotd.internal", false), "https://slotd.internal/");
        assert_eq!(parsed("https://slotd.internal:8443", true), "https://slotd.internal:8443/");
        assert_eq!(parsed("http://127.0.0.1:50051", true), "https://127.0.0.1:50051/");
    }

    #[test]
    fn garbage_is_refused_with_a_clear_error() {
        assert!(refused("").contains("empty"));
        assert!(refused("   ").contains("empty"));
        assert!(refused("ftp://host:21").contains("unsupported scheme \"ftp\""));
        assert!(refused("unix:///tmp/slotd.sock").contains("unsupported scheme"));
        assert!(refused("localhost").contains("no port"));
        assert!(refused("localhost:7070/v1").contains("no path"));
        refused("not a url");
        refused("host:port");
        refused("http://");
        refused("http://[::1");
    }

    #[test]
    fn endpoints_get_tls_from_the_scheme_or_a_ca() {
        let plain = Connector::new().endpoint("127.0.0.1:1").unwrap();
        assert_eq!(plain.uri().scheme_str(), Some("http"));
        let ca = Connector::new().tls(b"not checked until connecting".to_vec()).tls_domain("x");
        assert_eq!(ca.endpoint("http://127.0.0.1:1").unwrap().uri().scheme_str(), Some("https"));
        assert!(format!("{ca:?}").contains("<pem>"));
    }

    #[test]
    fn the_token_rides_in_the_interceptor_and_is_never_printed() {
        let mut auth = BearerAuth::new(Some("s3cret")).unwrap();
        assert!(!format!("{auth:?}").contains("s3cret"));
        let req = auth.call(Request::new(())).unwrap();
        let value = req.metadata().get(AUTHORIZATION_HEADER).expect("authorization set");
        assert_eq!(value.to_str().unwrap(), "Bearer s3cret");
        assert!(value.is_sensitive());

        let req = BearerAuth::new(None).unwrap().call(Request::new(())).unwrap();
        assert!(req.metadata().get(AUTHORIZATION_HEADER).is_none());
        assert!(matches!(BearerAuth::new(Some("line\nbreak")), Err(Error::Config(_))));
    }
}
