//! TLS: a self-signed certificate made at test time, the daemon serving with it on loopback, the
//! client crate trusting it as a CA: acquire and release work; a plaintext client gets nowhere.

use std::path::PathBuf;

use slotd::config::Config;
use slotd_client::{Client, Outcome};
use slotd_test_support::{Daemon, TIMEOUT};

/// A fresh directory holding `cert.pem` and `key.pem` for `localhost`; returns it and the cert PEM.
fn self_signed(tag: &str) -> (PathBuf, String) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("generate a cert");
    let dir = std::env::temp_dir().join(format!("slotd-tls-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cert = ck.cert.pem();
    std::fs::write(dir.join("cert.pem"), &cert).unwrap();
    std::fs::write(dir.join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
    (dir, cert)
}

#[tokio::test]
async fn tls_serves_the_client_crate_and_refuses_plaintext() {
    let (dir, ca) = self_signed("ok");
    let mut cfg = Config::from_toml_str("[pools.p]\nmax_concurrent = 1").unwrap();
    cfg.tls_cert = Some(dir.join("cert.pem"));
    cfg.tls_key = Some(dir.join("key.pem"));
    let d = Daemon::serve(cfg, "127.0.0.1:0").await;
    let port = d.addr.port();

    // The certificate names localhost; connect by IP and check that name.
    let client = Client::builder()
        .tls(ca.clone())
        .tls_domain("localhost")
        .connect(format!("https://127.0.0.1:{port}"))
        .await
        .expect("TLS connect");
    let lease = tokio::time::timeout(TIMEOUT, client.acquire("p")).await.expect("in time").expect("granted");
    assert_eq!(client.status(Some("p")).await.unwrap().pools[0].in_flight, 1);
    lease.release(Outcome::Ok).await.expect("released");
    assert_eq!(client.status(Some("p")).await.unwrap().pools[0].in_flight, 0);

    // `http://` with a CA is upgraded to TLS too.
    let upgraded = Client::builder()
        .tls(ca)
        .tls_domain("localhost")
        .connect(format!("http://127.0.0.1:{port}"))
        .await
        .expect("TLS connect from an http:// URL with a CA");
    upgraded.status(None).await.expect("status over TLS");

    // Plaintext HTTP/2 to a TLS port fails, at connect or at the first call.
    let plain = tokio::time::timeout(TIMEOUT, async {
        match Client::connect(format!("http://127.0.0.1:{port}")).await {
            Err(e) => Err(e),
            Ok(c) => c.status(None).await.map(|_| ()),
        }
    })
    .await
    .expect("plaintext fails in time");
    assert!(plain.is_err(), "a plaintext client got through: {plain:?}");

    // A client that does not trust the certificate is refused by its own TLS check.
    let (_, other_ca) = self_signed("other");
    let untrusted = tokio::time::timeout(TIMEOUT, async {
        match Client::builder()
            .tls(other_ca)
            .tls_domain("localhost")
            .connect(format!("https://127.0.0.1:{port}"))
            .await
        {
            Err(e) => Err(e),
            Ok(c) => c.status(None).await.map(|_| ()),
        }
    })
    .await
    .expect("fails in time");
    assert!(untrusted.is_err(), "an untrusted certificate was accepted");

    d.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_missing_key_file_is_a_clear_startup_error() {
    let mut cfg = Config::from_toml_str("[pools.p]\nmax_concurrent = 1").unwrap();
    cfg.tls_cert = Some("/nonexistent/cert.pem".into());
    cfg.tls_key = Some("/nonexistent/key.pem".into());
    let err = Daemon::serve(cfg, "127.0.0.1:0").await.join().await.unwrap_err();
    assert!(err.to_string().contains("cannot read tls_cert /nonexistent/cert.pem"), "{err}");

    let e = Config::from_toml_str("tls_cert = \"c.pem\"").unwrap_err().to_string();
    assert!(e.contains("tls_cert and tls_key"), "{e}");
}
