//! TLS to upstreams: a provider whose certificate comes from a private CA is reached once that CA is
//! the proxy's `extra_ca_file` (over HTTP/2 by ALPN), and refused (502) without it.

mod support;

use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use slotd_test_support::{Daemon, client::one_pool};
use support::{Proxy, config, http1, post, route, send};
use tokio::net::TcpListener;

/// A TLS provider for `localhost` that answers 200 with the HTTP version it was spoken to in.
async fn tls_provider() -> (u16, String) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let pem = ck.cert.pem();
    let cert = CertificateDer::from(ck.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else { return };
                let svc = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                    let body = format!(
                        r#"{{"version":"{:?}","usage":{{"input_tokens":1,"output_tokens":2}}}}"#,
                        req.version()
                    );
                    Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                        bytes::Bytes::from(body),
                    )))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (port, pem)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_extra_ca_is_trusted_and_nothing_else_is() {
    let (port, pem) = tls_provider().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, pem).unwrap();
    let d = Daemon::start(&one_pool("p", 2, "")).await;
    let upstream = format!("https://localhost:{port}");

    let trusted = Proxy::start(&config(
        &d.url(),
        &format!("extra_ca_file = \"{}\"\n{}", ca.display(), route("a", &upstream, "p", "")),
    ))
    .await;
    let (status, h, body) = send(&http1(), post(&trusted.url("/a/v1/messages"), &[])).await;
    assert_eq!(status, 200, "{h:?} {body}");
    assert!(body.contains("HTTP/2.0"), "ALPN did not pick HTTP/2: {body}");

    let untrusted = Proxy::start(&config(&d.url(), &route("a", &upstream, "p", ""))).await;
    let (status, h, _) = send(&http1(), post(&untrusted.url("/a/v1/messages"), &[])).await;
    assert_eq!(status, 502);
    assert_eq!(h["x-slotd-reason"], "upstream_error");
    d.wait_for("idle", |s| s.leases.is_empty()).await;

    // A file without a certificate is refused at startup.
    std::fs::write(&ca, "not a certificate").unwrap();
    let cfg = slotd_proxy::Config::from_toml_str(&config(
        &d.url(),
        &format!("extra_ca_file = \"{}\"\n{}", ca.display(), route("a", &upstream, "p", "")),
    ))
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = slotd_proxy::serve(cfg, listener, std::future::pending()).await.unwrap_err();
    assert!(err.to_string().contains("extra_ca_file"), "{err}");
}
