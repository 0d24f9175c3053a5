//! `Lease::hold`: a streamed answer keeps its slot until the stream ends or is dropped.

use futures::StreamExt;
use slotd_test_support::{
    Daemon,
    client::{idle, one_pool, pool, wait_until},
    within,
};
use tokio_stream::wrappers::UnboundedReceiverStream;

#[tokio::test]
async fn the_lease_is_held_until_the_stream_ends() {
    let d = Daemon::start(&one_pool("p", 1, "")).await;
    let c = d.connect().await;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<&str>();
    let lease = within("acquire", c.acquire("p")).await.unwrap();
    let mut tokens = lease.hold(UnboundedReceiverStream::new(rx));

    tx.send("hel").unwrap();
    tx.send("lo").unwrap();
    assert_eq!(within("token", tokens.next()).await, Some("hel"));
    assert_eq!(within("token", tokens.next()).await, Some("lo"));
    assert!(tokens.lease().is_some());
    let st = c.status(None).await.unwrap();
    assert_eq!(pool(&st, "p").in_flight, 1, "held while the stream is open");

    drop(tx);
    assert_eq!(within("end", tokens.next()).await, None);
    assert!(tokens.lease().is_none(), "released at the end of the stream");
    wait_until(&c, "released at the end of the stream", |st| idle(st, "p")).await;
    // The Hold itself is still alive: only the end of the stream released the slot.
    drop(tokens);
}

#[tokio::test]
async fn dropping_the_stream_early_releases() {
    let d = Daemon::start(&one_pool("p", 1, "")).await;
    let c = d.connect().await;
    let lease = within("acquire", c.acquire("p")).await.unwrap();
    let mut tokens = lease.hold(futures::stream::iter(["a", "b", "c"]));
    assert_eq!(tokens.next().await, Some("a"));
    drop(tokens);
    wait_until(&c, "released when the stream is dropped", |st| idle(st, "p")).await;
}
