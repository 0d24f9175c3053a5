//! Cancel safety: a dropped acquire leaves the daemon's queue, and a grant racing the cancel goes back.

use std::{future::IntoFuture, time::Duration};

use slotd_test_support::{
    Daemon,
    client::{idle, one_pool, pool, wait_until},
    within,
};

#[tokio::test]
async fn a_timed_out_acquire_leaves_the_queue() {
    let d = Daemon::start(&one_pool("p", 1, "")).await;
    let holder = d.connect().await;
    let waiter = d.connect().await;
    let lease = within("acquire", holder.acquire("p")).await.unwrap();

    tokio::select! {
        _ = waiter.acquire("p") => panic!("the pool is full"),
        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
    }
    // The request was queued while the select ran, and the drop withdrew it.
    wait_until(&waiter, "the cancelled request leaves the queue", |st| pool(st, "p").queued == 0).await;

    // The slot now goes to nobody else: releasing leaves the pool idle.
    drop(lease);
    wait_until(&holder, "idle", |st| idle(st, "p")).await;
}

#[tokio::test]
async fn a_queued_acquire_shows_in_status_until_dropped() {
    let d = Daemon::start(&one_pool("p", 1, "")).await;
    let c = d.connect().await;
    let _lease = within("acquire", c.acquire("p")).await.unwrap();
    let waiting = tokio::spawn({
        let c = c.clone();
        async move { c.acquire("p").await }
    });
    wait_until(&c, "queued", |st| pool(st, "p").queued == 1).await;
    waiting.abort();
    wait_until(&c, "dequeued", |st| pool(st, "p").queued == 0).await;
}

#[tokio::test]
async fn a_grant_racing_the_cancel_returns_the_slot() {
    let d = Daemon::start(&one_pool("p", 1, "")).await;
    let holder = d.connect().await;
    let waiter = d.connect().await;
    for round in 0..20 {
        let lease = within("acquire", holder.acquire("p")).await.unwrap();
        let mut acquire = Box::pin(waiter.acquire("p").into_future());
        // Poll once so the request is sent, then wait until the daemon has queued it.
        assert!(futures::poll!(acquire.as_mut()).is_pending());
        wait_until(&holder, "queued", |st| pool(st, "p").queued == 1).await;
        // Free the slot and cancel at once: the grant and the cancel cross on the wire. Vary the
        // gap between them so some rounds lose the race each way.
        drop(lease);
        if round % 2 == 1 {
            tokio::time::sleep(Duration::from_micros(200 * round)).await;
        }
        drop(acquire);
        wait_until(&holder, "the raced slot comes back", |st| idle(st, "p")).await;
    }
}

#[tokio::test]
async fn dropping_an_unpolled_acquire_sends_nothing() {
    let d = Daemon::start(&one_pool("p", 1, "")).await;
    let c = d.connect().await;
    drop(c.acquire("p").into_future());
    let st = c.status(None).await.unwrap();
    assert!(idle(&st, "p"));
    let lease = within("acquire", c.acquire("p")).await.unwrap();
    drop(lease);
}
