//! Connection hygiene: connections that never speak HTTP/2 are closed after the handshake timeout,
//! and a connection beyond `limits.max_connections` is refused at once, while real clients are served.

use std::{net::SocketAddr, time::Duration};

use slotd_test_support::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// How long a test waits for the daemon to close a socket: far beyond the handshake timeout, only so
/// a regression fails instead of hanging.
const GUARD: Duration = Duration::from_secs(20);

/// Reads until the daemon closes the connection (EOF or reset); returns what it sent first.
#[track_caller]
fn read_until_closed(mut s: TcpStream) -> impl std::future::Future<Output = Vec<u8>> {
    let at = std::panic::Location::caller();
    async move {
        let mut got = Vec::new();
        let read_all = async {
            let mut buf = [0u8; 1024];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        };
        tokio::time::timeout(GUARD, read_all)
            .await
            .unwrap_or_else(|_| panic!("{at}: the daemon left the connection open for {GUARD:?}"));
        got
    }
}

#[track_caller]
fn connect(addr: SocketAddr) -> impl std::future::Future<Output = TcpStream> {
    let at = std::panic::Location::caller();
    async move {
        within("tcp connect", TcpStream::connect(addr))
            .await
            .unwrap_or_else(|e| panic!("{at}: connect to {addr}: {e}"))
    }
}

#[tokio::test]
async fn silent_connections_are_closed_after_the_handshake_timeout_while_a_new_client_is_served() {
    let d = Daemon::start(
        "[limits]\nhandshake_timeout = \"200ms\"\nmax_connections = 1000\n[pools.p]\nmax_concurrent = 1\n",
    )
    .await;
    let mut silent = Vec::with_capacity(500);
    for _ in 0..500 {
        silent.push(connect(d.addr).await);
    }
    // One that sends half a preface and stalls is no better.
    let mut partial = connect(d.addr).await;
    partial.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    silent.push(partial);

    // Meanwhile a real client is served.
    let mut a = d.agent("newcomer").await;
    let g = a.acquire("r1", "p").await;
    a.release_ok(&g.lease_id).await;

    let closed = futures::future::join_all(silent.into_iter().map(read_until_closed)).await;
    assert_eq!(closed.len(), 501);

    // Still serving, on a connection opened after all of that.
    let mut b = d.agent("after").await;
    let g = b.acquire("r2", "p").await;
    b.release_ok(&g.lease_id).await;
    drop((a, b));
    d.stop().await;
}

#[tokio::test]
async fn a_connection_beyond_max_connections_is_refused_while_open_ones_keep_working() {
    // The daemon's own shared client is the first of the three connections.
    let (d, metrics) =
        Daemon::start_with_metrics("[limits]\nmax_connections = 3\n[pools.p]\nmax_concurrent = 2\n").await;
    let mut a = d.agent("a").await;
    let mut b = d.agent("b").await;

    let refused = read_until_closed(connect(d.addr).await).await;
    let reason = String::from_utf8_lossy(&refused);
    assert!(reason.contains("limits.max_connections"), "the refusal says why: {refused:?}");

    // The open connections are unaffected.
    let ga = a.acquire("r1", "p").await;
    let gb = b.acquire("r2", "p").await;
    a.release_ok(&ga.lease_id).await;
    b.release_ok(&gb.lease_id).await;
    assert_eq!(d.status().await.pools.len(), 1);

    let text = scrape(metrics).await;
    assert!(text.contains("slotd_connections_refused_total 1"), "{text}");
    assert!(text.contains("slotd_connections_open 3"), "{text}");

    // A closed connection gives its place back.
    drop(b);
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while !scrape(metrics).await.contains("slotd_connections_open 2") {
        assert!(tokio::time::Instant::now() < deadline, "the closed connection's place never came free");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut c = d.agent("c").await;
    let gc = c.acquire("r3", "p").await;
    c.release_ok(&gc.lease_id).await;
    drop((a, c));
    d.stop().await;
}
