//! Bearer tokens: a missing token is UNAUTHENTICATED, a wrong one (the agent's token on the admin
//! service included) PERMISSION_DENIED, and a refused call changes nothing. Health and reflection stay
//! open. Without tokens the daemon will not listen beyond loopback unless told to.

use slotd::{ServeError, config::Config, grpc::auth::Token};
use slotd_proto::v1::{self as pb, admin_client::AdminClient, slotd_client::SlotdClient};
use slotd_test_support::{Daemon, TIMEOUT};
use tonic::{Code, Request, transport::Channel};

const AGENT: &str = "agent-s3cret";
const ADMIN: &str = "admin-s3cret";

/// Serves `cfg` on `bind` with both tokens set (unless it has its own).
async fn secured(bind: &str, mut cfg: Config) -> Daemon {
    cfg.agent_token.get_or_insert_with(|| Token::new(AGENT).unwrap());
    cfg.admin_token.get_or_insert_with(|| Token::new(ADMIN).unwrap());
    Daemon::serve(cfg, bind).await
}

fn with_token<T>(msg: T, token: Option<&str>) -> Request<T> {
    let mut r = Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

fn config() -> Config {
    Config::from_toml_str("[pools.p]\nmax_concurrent = 2\nadaptive = false").unwrap()
}

async fn status(c: &mut SlotdClient<Channel>) -> pb::PoolStatus {
    let s =
        c.status(with_token(pb::StatusRequest::default(), Some(AGENT))).await.expect("Status").into_inner();
    s.pools.into_iter().find(|p| p.name == "p").expect("pool p")
}

#[tokio::test]
async fn agent_service_refuses_missing_and_wrong_tokens_and_changes_nothing() {
    let d = secured("127.0.0.1:0", config()).await;
    let mut c = SlotdClient::new(d.channel().await);
    let report = || pb::ReportRateLimitRequest {
        pool: "p".into(),
        retry_after: Some(slotd_test_support::ms(60_000)),
        reason: "x".into(),
        ..Default::default()
    };

    let e = c.status(with_token(pb::StatusRequest::default(), None)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("Bearer"), "{e:?}");
    let e = c.report_rate_limit(with_token(report(), None)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = c.report_rate_limit(with_token(report(), Some("wrong"))).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // The admin token is not an agent token.
    let e = c.report_rate_limit(with_token(report(), Some(ADMIN))).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let mut raw = Request::new(report());
    raw.metadata_mut().insert("authorization", AGENT.parse().unwrap());
    assert_eq!(c.report_rate_limit(raw).await.unwrap_err().code(), Code::Unauthenticated);
    // Acquire is refused before any stream is opened.
    let (_tx, rx) = tokio::sync::mpsc::channel::<pb::ClientMessage>(1);
    let e = c.acquire(with_token(tokio_stream::wrappers::ReceiverStream::new(rx), Some("wrong"))).await;
    assert_eq!(e.unwrap_err().code(), Code::PermissionDenied);

    // Nothing changed: not paused, nothing held.
    let p = status(&mut c).await;
    assert!(p.paused_until.is_none(), "{p:?}");
    assert_eq!((p.in_flight, p.queued, p.effective_limit), (0, 0, 2));

    // The agent token works, through slotd-client too.
    c.report_rate_limit(with_token(report(), Some(AGENT))).await.expect("with the agent token");
    assert!(status(&mut c).await.paused_until.is_some());
    d.stop().await;
}

#[tokio::test]
async fn the_client_crate_sends_its_bearer_token() {
    let d = secured("127.0.0.1:0", config()).await;
    let url = format!("http://{}", d.addr);
    let client = slotd_client::Client::builder().bearer_token(AGENT).connect(&url).await.expect("connect");
    let lease = tokio::time::timeout(TIMEOUT, client.acquire("p")).await.expect("in time").expect("grant");
    assert_eq!(client.status(Some("p")).await.expect("status").pools[0].in_flight, 1);
    lease.release(slotd_client::Outcome::Ok).await.expect("release");

    let anonymous = slotd_client::Client::connect(&url).await.expect("connect");
    let e = anonymous.status(Some("p")).await.unwrap_err();
    assert!(format!("{e:?}").contains("Unauthenticated"), "{e:?}");
    d.stop().await;
}

#[tokio::test]
async fn admin_service_wants_the_admin_token() {
    let d = secured("127.0.0.1:0", config()).await;
    let ch = d.channel().await;
    let mut admin = AdminClient::new(ch.clone());
    let mut agent = SlotdClient::new(ch);
    let pause = || pb::PausePoolRequest {
        pool: "p".into(),
        duration: Some(slotd_test_support::ms(60_000)),
        reason: "maintenance".into(),
    };

    let e = admin.pause_pool(with_token(pause(), None)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = admin.pause_pool(with_token(pause(), Some(AGENT))).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let upsert = pb::UpsertPoolRequest {
        pool: Some(pb::PoolSpec { name: "new".into(), max_concurrent: Some(1), ..Default::default() }),
    };
    let e = admin.upsert_pool(with_token(upsert.clone(), Some("nope"))).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // Nothing changed.
    assert!(status(&mut agent).await.paused_until.is_none());
    let all = agent.status(with_token(pb::StatusRequest::default(), Some(AGENT))).await.unwrap().into_inner();
    assert_eq!(all.pools.len(), 1, "{all:?}");

    admin.pause_pool(with_token(pause(), Some(ADMIN))).await.expect("with the admin token");
    assert!(status(&mut agent).await.paused_until.is_some());
    d.stop().await;
}

#[tokio::test]
async fn health_and_reflection_stay_open() {
    let d = secured("127.0.0.1:0", config()).await;
    let ch = d.channel().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    let r = health
        .check(tonic_health::pb::HealthCheckRequest { service: "slotd.v1.Slotd".into() })
        .await
        .expect("health needs no token")
        .into_inner();
    assert_eq!(r.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);

    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest,
    };
    let mut refl = ServerReflectionClient::new(ch);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = refl
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .expect("reflection needs no token")
        .into_inner();
    assert!(stream.message().await.expect("a reflection answer").is_some());
    d.stop().await;
}

#[tokio::test]
async fn no_tokens_means_loopback_only_unless_allowed() {
    let open = || Config::from_toml_str("[pools.p]\nmax_concurrent = 1").unwrap();

    let err = Daemon::serve(open(), "0.0.0.0:0").await.join().await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ServeError::Insecure(_)), "{err:?}");
    assert!(msg.contains("allow_insecure_remote") && msg.contains("agent or admin"), "{msg}");

    // One token is not enough: the other service would still be open to anyone.
    let mut half = open();
    half.agent_token = Some(Token::new(AGENT).unwrap());
    let err = Daemon::serve(half, "0.0.0.0:0").await.join().await.unwrap_err();
    assert!(err.to_string().contains("no admin token"), "{err}");

    // Told otherwise, or with both tokens, it serves.
    let mut allowed = open();
    allowed.allow_insecure_remote = true;
    let d = Daemon::serve(allowed, "0.0.0.0:0").await;
    let mut c = SlotdClient::new(d.channel().await);
    let s = c.status(pb::StatusRequest::default()).await.expect("open service, no token needed");
    assert_eq!(s.into_inner().pools.len(), 1);
    d.stop().await;
    let d = secured("0.0.0.0:0", open()).await;
    d.stop().await;

    // Loopback without tokens is fine.
    let d = Daemon::serve(open(), "127.0.0.1:0").await;
    d.stop().await;
    let cfg = Config::from_toml_str("allow_insecure_remote = true\n[pools.p]\nmax_concurrent = 1").unwrap();
    assert!(cfg.allow_insecure_remote);
}
