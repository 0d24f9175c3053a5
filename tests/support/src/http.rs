//! A plain HTTP/1.1 GET over loopback, for the `/metrics` endpoint (no HTTP client dependency).

use std::net::SocketAddr;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::TIMEOUT;

/// `GET path` over a fresh connection: the status code and the body.
///
/// # Cancel safety
/// Cancel safe: the connection is dropped with the future.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let fut = async {
        let mut s = TcpStream::connect(addr).await.expect("connect to the metrics endpoint");
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).await.unwrap();
        raw
    };
    let raw = tokio::time::timeout(TIMEOUT, fut).await.expect("the scrape answered in time");
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    let code = head.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("a status line");
    (code, body.to_owned())
}

/// The body of `GET /metrics`, which must answer 200.
///
/// # Cancel safety
/// Cancel safe, like [`http_get`].
pub async fn scrape(addr: SocketAddr) -> String {
    let (code, body) = http_get(addr, "/metrics").await;
    assert_eq!(code, 200, "{body}");
    body
}
