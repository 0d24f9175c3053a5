//! Connection loss while the daemon stays up: the client reconnects, resumes its held leases within the
//! resume grace (same id and fencing token, `lost()` never fires) and re-sends its queued requests.
//!
//! A small TCP proxy (the support crate's `Proxy`) sits between the client and the daemon so the test can cut every connection.

use std::time::Duration;

use slotd_client::Client;
use slotd_test_support::{
    Daemon, Proxy,
    client::{idle, one_pool, pool, wait_until},
    within,
};

async fn client_via(proxy: &Proxy) -> Client {
    Client::builder()
        .holder("via-proxy")
        .resume_grace(Some(Duration::from_secs(3)))
        .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(100))
        .connect(format!("http://{}", proxy.addr))
        .await
        .expect("connect through the proxy")
}

#[tokio::test]
async fn a_lost_connection_resumes_held_leases_and_resends_queued_requests() {
    let daemon = Daemon::start(&one_pool("p", 1, "adaptive = false\ndefault_ttl = \"5s\"")).await;
    let observer = daemon.connect().await;
    let proxy = Proxy::start(daemon.addr).await;
    let agent = client_via(&proxy).await;
    let other = client_via(&proxy).await;

    let lease = within("grant", agent.acquire("p")).await.expect("granted");
    let (id, token) = (lease.lease_id().to_owned(), lease.fencing_token());
    // A second request queues behind it on another client, also through the proxy.
    let waiting = tokio::spawn({
        let other = other.clone();
        async move { other.acquire("p").await }
    });
    wait_until(&observer, "the second request is queued", |st| pool(st, "p").queued == 1).await;

    proxy.cut();

    // The lease survives: same id and token, still exactly one holder, and the client does not report it lost.
    let st = wait_until(&observer, "the queued request is back after the reconnect", |st| {
        pool(st, "p").queued == 1 && st.leases.len() == 1
    })
    .await;
    assert_eq!(st.leases[0].lease_id, id);
    assert_eq!(st.leases[0].fencing_token, token);
    assert_eq!(pool(&st, "p").in_flight, 1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!lease.is_lost(), "a resumed lease must not be reported lost");

    // The resumed lease is still this client's to release; the re-sent request then gets the slot.
    within("release", lease.release(slotd_client::Outcome::Ok)).await.expect("release after resume");
    let next = within("the re-sent request is granted", waiting).await.expect("task").expect("granted");
    assert!(next.fencing_token() > token);
    drop(next);
    wait_until(&observer, "everything is released", |st| idle(st, "p")).await;
}

#[tokio::test]
async fn without_a_grace_a_lost_connection_loses_the_lease_and_says_so() {
    let daemon = Daemon::start(&one_pool("p", 1, "adaptive = false")).await;
    let observer = daemon.connect().await;
    let proxy = Proxy::start(daemon.addr).await;
    let agent = Client::builder()
        .resume_grace(None)
        .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(100))
        .connect(format!("http://{}", proxy.addr))
        .await
        .expect("connect");
    let lease = within("grant", agent.acquire("p")).await.expect("granted");
    proxy.cut();
    within("lost() fires", lease.lost()).await;
    // The daemon freed the slot at once, and the client keeps working after reconnecting.
    wait_until(&observer, "the slot is free", |st| pool(st, "p").in_flight == 0).await;
    let again = within("a new grant after the reconnect", agent.acquire("p")).await.expect("granted");
    drop(again);
    drop(lease);
    wait_until(&observer, "everything is released", |st| idle(st, "p")).await;
}
