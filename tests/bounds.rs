//! Bounded resources, each over-limit case with a clear RESOURCE_EXHAUSTED error: message size,
//! Acquire streams per connection and in all, requests plus leases per stream, and pools.

use slotd_proto::v1::{self as pb, slotd_client::SlotdClient};
use slotd_test_support::{Daemon, bounded};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Streaming};

/// Opens an Acquire stream on `client`'s connection; keeps its sender alive in the return value.
async fn open(
    client: &mut SlotdClient<tonic::transport::Channel>,
) -> Result<(mpsc::Sender<pb::ClientMessage>, Streaming<pb::ServerMessage>), tonic::Status> {
    let (tx, rx) = mpsc::channel(4);
    let at = std::panic::Location::caller();
    let resp = bounded(at, "Acquire", client.acquire(Request::new(ReceiverStream::new(rx)))).await?;
    Ok((tx, resp.into_inner()))
}

#[tokio::test]
async fn an_oversized_message_ends_the_stream_with_resource_exhausted() {
    let d = Daemon::start("[limits]\nmax_message_bytes = 1024\n[pools.p]\nmax_concurrent = 1").await;
    let mut a = d.agent("a").await;
    let mut r = a.req("big", "p");
    r.holder = "x".repeat(2000);
    a.request(r).await;
    let s = a.expect_end().await.expect("an error status");
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(s.message().contains("too large"), "{s:?}");
    // Regression: the stream's refusal did not name the setting, the unary one did.
    assert!(s.message().contains("(limits.max_message_bytes)"), "names the setting: {s:?}");

    // A unary call over the limit is refused too, and the daemon is unharmed.
    let mut c = d.client();
    let e = c.status(pb::StatusRequest { pool: "p".repeat(2000) }).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    d.assert_idle().await;
    d.stop().await;
}

#[tokio::test]
async fn streams_per_connection_are_bounded() {
    let d = Daemon::start("[limits]\nmax_streams_per_connection = 2\n[pools.p]\nmax_concurrent = 1").await;
    let mut one = SlotdClient::new(d.channel().await);
    let first = open(&mut one).await.expect("first stream");
    let _second = open(&mut one).await.expect("second stream");
    let e = open(&mut one).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("limits.max_streams_per_connection"), "{e:?}");
    // Unary calls still fit on the connection, and another connection has its own budget.
    one.status(pb::StatusRequest::default()).await.expect("Status beside the streams");
    let mut two = SlotdClient::new(d.channel().await);
    let _other = open(&mut two).await.expect("a stream on another connection");
    // Ending a stream gives its place back.
    drop(first);
    let mut again = None;
    for _ in 0..200 {
        if let Ok(s) = open(&mut one).await {
            again = Some(s);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert!(again.is_some(), "the closed stream's place was not given back");
    d.stop().await;
}

#[tokio::test]
async fn streams_in_all_are_bounded() {
    let d = Daemon::start("[limits]\nmax_streams = 2\n[pools.p]\nmax_concurrent = 1").await;
    let _a = d.agent("a").await;
    let _b = d.agent("b").await;
    let e = d.try_agent("c", None).await.err().expect("the third stream is refused");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("limits.max_streams"), "{e:?}");
    drop(_a);
    let mut ok = false;
    for _ in 0..200 {
        if d.try_agent("c", None).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert!(ok, "the closed stream's place was not given back");
    d.stop().await;
}

#[tokio::test]
async fn requests_and_leases_per_stream_are_bounded() {
    let d = Daemon::start("[scheduler]\nmax_per_stream = 2\n[pools.p]\nmax_concurrent = 1").await;
    let mut a = d.agent("a").await;
    a.acquire("r1", "p").await;
    a.request(a.req("r2", "p")).await;
    a.expect_queued("r2").await;
    a.request(a.req("r3", "p")).await;
    let r = a.expect_rejected("r3", Code::ResourceExhausted).await;
    assert!(r.message.contains("max_per_stream"), "{r:?}");
    let p = d.pool("p").await;
    assert_eq!((p.in_flight, p.queued), (1, 1));
    d.stop().await;
}

#[tokio::test]
async fn pools_are_bounded_in_the_config_and_through_admin() {
    let e = slotd::config::Config::from_toml_str(
        "[limits]\nmax_pools = 1\n[pools.a]\nmax_concurrent = 1\n[pools.b]\nmax_concurrent = 1",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("limits.max_pools"), "{e}");

    let d = Daemon::start("[limits]\nmax_pools = 1\n[pools.a]\nmax_concurrent = 1").await;
    let mut admin = d.admin().await;
    let upsert = pb::UpsertPoolRequest {
        pool: Some(pb::PoolSpec { name: "b".into(), max_concurrent: Some(1), ..Default::default() }),
    };
    let e = admin.upsert_pool(upsert).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("max_pools"), "{e:?}");
    assert_eq!(d.status().await.pools.len(), 1);
    d.stop().await;
}

#[test]
fn defaults_are_documented_constants() {
    use slotd::config::{Config, Limits};
    let l = Config::embedded().limits;
    assert_eq!(l.max_streams, Limits::DEFAULT_MAX_STREAMS);
    assert_eq!(l.max_streams_per_connection, Limits::DEFAULT_MAX_STREAMS_PER_CONNECTION);
    assert_eq!(l.max_message_bytes, Limits::DEFAULT_MAX_MESSAGE_BYTES);
    assert_eq!(l.max_pools, Limits::DEFAULT_MAX_POOLS);
}
