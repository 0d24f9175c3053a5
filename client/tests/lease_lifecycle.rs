//! A lease's life: granted, renewed by heartbeats, released by drop, by `release`, by `run` (even on
//! panic or error), and lost when the daemon reclaims it.

use std::time::Duration;

use slotd_client::{Client, Error, Lost, Outcome};
use slotd_test_support::{
    Daemon,
    client::{idle, one_pool, pool, wait_until},
    within,
};

#[tokio::test]
async fn drop_releases() {
    let d = Daemon::start(&one_pool("p", 1, "")).await;
    let c = d.connect().await;
    let lease = within("acquire", c.acquire("p").holder("dropper")).await.unwrap();
    assert_eq!(lease.pool(), "p");
    assert_eq!(lease.lease_id().len(), 32);
    let st = c.status(None).await.unwrap();
    assert_eq!(pool(&st, "p").in_flight, 1);
    assert_eq!(st.leases[0].holder, "dropper");
    assert_eq!(st.leases[0].fencing_token, lease.fencing_token());
    drop(lease);
    wait_until(&c, "the dropped lease is released", |st| idle(st, "p")).await;
}

#[tokio::test]
async fn explicit_release_is_acknowledged() {
    let d = Daemon::start(&one_pool("p", 1, "")).await;
    let c = d.connect().await;
    let lease = within("acquire", c.acquire("p")).await.unwrap();
    within("release", lease.release(Outcome::Ok)).await.unwrap();
    // Acknowledged means applied: Status shows it at once.
    assert!(idle(&c.status(None).await.unwrap(), "p"));
    let lease = within("acquire", c.acquire("p")).await.unwrap();
    within("failed", lease.failed()).await.unwrap();
    assert!(idle(&c.status(None).await.unwrap(), "p"));
}

#[tokio::test]
async fn run_releases_on_ok_error_and_panic() {
    let d = Daemon::start(&one_pool("p", 1, "")).await;
    let c = d.connect().await;

    let token = within("run ok", c.run("p", |lease| async move { Ok::<_, Error>(lease.fencing_token()) }))
        .await
        .unwrap();
    assert!(token > 0);
    wait_until(&c, "released after ok", |st| idle(st, "p")).await;

    #[derive(Debug)]
    struct Oops;
    impl From<Error> for Oops {
        fn from(_: Error) -> Self {
            Oops
        }
    }
    let r: Result<(), Oops> = within("run err", c.run("p", |_| async { Err(Oops) })).await;
    assert!(r.is_err());
    wait_until(&c, "released after error", |st| idle(st, "p")).await;

    let c2 = c.clone();
    let task = tokio::spawn(async move {
        c2.run("p", |_| async {
            if true {
                panic!("agent bug");
            }
            Ok::<(), Error>(())
        })
        .await
    });
    let err = within("panicking task", task).await.unwrap_err();
    assert!(err.is_panic(), "the panic propagates");
    wait_until(&c, "released after panic", |st| idle(st, "p")).await;
}

#[tokio::test]
async fn heartbeats_keep_a_short_lease_alive() {
    let d = Daemon::start(&one_pool("p", 1, "")).await;
    let c = d.connect().await;
    // 250 ms leaves heartbeats (every ~83 ms) room on a loaded 2-core CI machine; a 90 ms TTL flaked.
    let lease = within("acquire", c.acquire("p").ttl(Duration::from_millis(250))).await.unwrap();
    let first_expiry = lease.expires_at();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(!lease.is_lost());
    assert!(lease.expires_at() > first_expiry, "heartbeat acks move expires_at");
    let st = c.status(None).await.unwrap();
    assert_eq!(st.leases.len(), 1, "still held after four TTLs");
    drop(lease);
    wait_until(&c, "released", |st| idle(st, "p")).await;
}

#[tokio::test]
async fn lost_fires_when_the_daemon_expires_the_lease() {
    let d = Daemon::start(&one_pool("p", 1, "")).await;
    // Heartbeats far slower than the TTL: the daemon reclaims the lease.
    let c = Client::builder().heartbeat_interval(Duration::from_secs(60)).connect(d.url()).await.unwrap();
    let lease = within("acquire", c.acquire("p").ttl(Duration::from_millis(50))).await.unwrap();
    let lost = within("lost", lease.lost()).await;
    assert!(matches!(lost, Lost::Expired(_)), "{lost:?}");
    assert!(lease.is_lost());
    let err = lease.release(Outcome::Ok).await.unwrap_err();
    assert!(matches!(err, Error::Lost { .. }), "{err}");
    wait_until(&c, "slot reclaimed", |st| idle(st, "p")).await;
}

#[tokio::test]
async fn rejections_carry_the_grpc_code() {
    let d = Daemon::start(&one_pool("p", 1, "")).await;
    let c = d.connect().await;
    let err = within("unknown pool", c.acquire("nope")).await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::NotFound), "{err}");
    let _held = within("acquire", c.acquire("p")).await.unwrap();
    let err = within("max_wait", c.acquire("p").max_wait(Duration::from_millis(30))).await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::DeadlineExceeded), "{err}");
}
