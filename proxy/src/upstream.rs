//! The HTTP client to upstream providers: HTTP/1.1 and HTTP/2 (ALPN), TLS with the webpki roots, the
//! system roots when asked, and an optional extra CA.

use std::time::Duration;

use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use rustls::pki_types::{CertificateDer, pem::PemObject};

use crate::{body::RequestBody, config::ConfigError};

/// The client type.
pub type Upstream = Client<HttpsConnector<HttpConnector>, RequestBody>;

/// How long an idle upstream connection is kept for reuse.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Builds the upstream client.
pub fn client(
    connect_timeout: Duration,
    system_roots: bool,
    extra_ca: Option<&[u8]>,
) -> Result<Upstream, ConfigError> {
    let invalid = |m: String| ConfigError::Invalid(m);
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if system_roots {
        let found = rustls_native_certs::load_native_certs();
        for cert in found.certs {
            // A system store may hold certificates rustls cannot use; skip those, like browsers do.
            let _ = roots.add(cert);
        }
    }
    if let Some(pem) = extra_ca {
        let mut n = 0;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| invalid(format!("extra_ca_file: {e}")))?;
            roots.add(cert).map_err(|e| invalid(format!("extra_ca_file: {e}")))?;
            n += 1;
        }
        if n == 0 {
            return Err(invalid("extra_ca_file: no PEM certificate in it".into()));
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(format!("tls: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new()).pool_idle_timeout(POOL_IDLE_TIMEOUT).build(https))
}
