//! Bad input through a real gRPC client: each class gets the right code, nothing changes, no slot
//! leaks, and the daemon keeps serving.

use std::time::Duration;

use slotd_proto::v1::{self as pb, client_message::Msg as Up, server_message::Msg as Down};
use slotd_test_support::{Daemon, ms, pool_in, resume_of};
use tonic::Code;

const POOLS: &str = r#"
[pools.p]
max_concurrent = 1
max_ttl = "10s"
default_ttl = "5s"
"#;

/// A well-formed lease id that was never granted.
const NEVER: &str = "0123456789abcdef0123456789abcdef";

#[tokio::test]
async fn bad_requests_are_rejected_with_the_right_code_and_change_nothing() {
    let d = Daemon::start(POOLS).await;
    let mut x = d.agent("x").await;

    x.request(x.req("unknown", "nope")).await;
    x.expect_rejected("unknown", Code::NotFound).await;
    x.request(x.req("badname", "bad name!")).await;
    x.expect_rejected("badname", Code::InvalidArgument).await;
    x.request(pb::LeaseRequest { priority: Some(10), ..x.req("prio", "p") }).await;
    x.expect_rejected("prio", Code::InvalidArgument).await;
    x.request(pb::LeaseRequest { ttl: Some(ms(0)), ..x.req("ttl0", "p") }).await;
    x.expect_rejected("ttl0", Code::InvalidArgument).await;
    x.request(pb::LeaseRequest { ttl: Some(ms(10_001)), ..x.req("ttlmax", "p") }).await;
    x.expect_rejected("ttlmax", Code::InvalidArgument).await;
    let negative = prost_types::Duration { seconds: -1, nanos: 0 };
    x.request(pb::LeaseRequest { ttl: Some(negative), ..x.req("negttl", "p") }).await;
    x.expect_rejected("negttl", Code::InvalidArgument).await;
    x.request(pb::LeaseRequest { max_wait: Some(negative), ..x.req("negwait", "p") }).await;
    x.expect_rejected("negwait", Code::InvalidArgument).await;
    x.request(x.req("", "p")).await;
    x.expect_rejected("", Code::InvalidArgument).await;
    x.request(pb::LeaseRequest { holder: "h".repeat(300), ..x.req("longholder", "p") }).await;
    x.expect_rejected("longholder", Code::InvalidArgument).await;
    // A message with no body.
    x.send_raw(None).await;
    x.expect_rejected("", Code::InvalidArgument).await;
    x.send(Up::Request(pb::LeaseRequest::default())).await;
    x.expect_rejected("", Code::InvalidArgument).await;
    d.assert_idle().await;

    // The stream and the daemon still serve, at the maximum TTL too.
    let g = x.acquire_with(pb::LeaseRequest { ttl: Some(ms(10_000)), ..x.req("ok", "p") }).await;
    x.release_ok(&g.lease_id).await;
    d.assert_idle().await;
    d.stop().await;
}

#[tokio::test]
async fn duplicate_request_id_is_already_exists_and_keeps_the_first() {
    let d = Daemon::start(POOLS).await;
    let mut h = d.agent("holder").await;
    let mut x = d.agent("x").await;
    let g = h.acquire("h", "p").await;
    x.request(x.req("dup", "p")).await;
    x.expect_queued("dup").await;
    x.request(pb::LeaseRequest { priority: Some(9), ..x.req("dup", "p") }).await;
    x.expect_rejected("dup", Code::AlreadyExists).await;
    assert_eq!(d.pool("p").await.queued, 1);
    // Another stream may use the same id: ids are per stream.
    let mut y = d.agent("y").await;
    y.request(y.req("dup", "p")).await;
    y.expect_queued("dup").await;
    y.cancel("dup").await;
    y.expect_cancelled("dup").await;

    h.release_ok(&g.lease_id).await;
    let gx = x.expect_granted("dup").await;
    // Once granted, cancelling the request does nothing (the proto's promise): the lease stays.
    x.cancel("dup").await;
    x.expect_silence(Duration::from_millis(20)).await;
    assert_eq!(d.pool("p").await.in_flight, 1);
    x.release_ok(&gx.lease_id).await;
    d.assert_idle().await;
    d.stop().await;
}

#[tokio::test]
async fn lease_messages_out_of_place_get_lease_errors_and_change_nothing() {
    let d = Daemon::start(POOLS).await;
    let mut owner = d.agent("owner").await;
    let mut other = d.agent("other").await;
    let g = owner.acquire("r", "p").await;

    // Release of another stream's lease.
    other.release(&g.lease_id).await;
    other.expect_lease_error(&g.lease_id, Code::FailedPrecondition).await;
    // Heartbeat of another stream's lease.
    other.heartbeat(&[&g.lease_id]).await;
    other.expect_lease_error(&g.lease_id, Code::FailedPrecondition).await;
    other.expect_heartbeat_ack(0).await;
    // Resume with the wrong fencing token: its credential does not match.
    let mut wrong_token = resume_of(&g, "owner");
    wrong_token.fencing_token += 1;
    other.resume(wrong_token).await;
    other.expect_lease_error(&g.lease_id, Code::PermissionDenied).await;
    // Release of a lease that was never granted.
    other.release(NEVER).await;
    other.expect_lease_error(NEVER, Code::NotFound).await;
    // Malformed lease ids.
    other.release("not-a-lease").await;
    other.expect_lease_error("not-a-lease", Code::InvalidArgument).await;
    other.release("").await;
    other.expect_lease_error("", Code::InvalidArgument).await;
    other.heartbeat(&["xyz"]).await;
    assert!(matches!(other.next().await, Down::LeaseError(e) if e.code == Code::InvalidArgument as i32));
    // An unknown outcome does not release.
    owner
        .send(Up::Release(pb::ReleaseLease {
            lease_id: g.lease_id.clone(),
            outcome: 99,
            ..Default::default()
        }))
        .await;
    owner.expect_lease_error(&g.lease_id, Code::InvalidArgument).await;
    // Usage beyond any context window does not release.
    owner
        .send(Up::Release(pb::ReleaseLease {
            lease_id: g.lease_id.clone(),
            usage: Some(pb::Usage { output_tokens: u64::MAX, ..Default::default() }),
            ..Default::default()
        }))
        .await;
    owner.expect_lease_error(&g.lease_id, Code::InvalidArgument).await;
    // Provider limits: more than eight entries, remaining above the limit, a reset beyond a day.
    let limit = |remaining: u64, reset_secs: i64| pb::ProviderLimit {
        kind: pb::LimitKind::Requests as i32,
        limit: 50,
        remaining,
        reset_in: Some(prost_types::Duration { seconds: reset_secs, nanos: 0 }),
    };
    for provider_limits in [vec![limit(1, 1); 9], vec![limit(51, 1)], vec![limit(1, 86_401)]] {
        owner
            .send(Up::Release(pb::ReleaseLease {
                lease_id: g.lease_id.clone(),
                provider_limits,
                ..Default::default()
            }))
            .await;
        owner.expect_lease_error(&g.lease_id, Code::InvalidArgument).await;
    }
    // A negative retry_after does not release or pause.
    owner
        .send(Up::Release(pb::ReleaseLease {
            lease_id: g.lease_id.clone(),
            outcome: pb::Outcome::RateLimited as i32,
            retry_after: Some(prost_types::Duration { seconds: -5, nanos: 0 }),
            ..Default::default()
        }))
        .await;
    owner.expect_lease_error(&g.lease_id, Code::InvalidArgument).await;
    // Cancel of a request that was never made.
    other.cancel("ghost").await;
    other.expect_rejected("ghost", Code::NotFound).await;

    // Nothing changed: the owner still holds the one lease, unpaused, with its token.
    let s = d.status().await;
    let p = pool_in(&s, "p");
    assert_eq!((p.in_flight, p.effective_limit), (1, 1));
    assert!(p.paused_until.is_none());
    assert_eq!(s.leases.len(), 1);
    assert_eq!(
        (s.leases[0].lease_id.as_str(), s.leases[0].fencing_token),
        (g.lease_id.as_str(), g.fencing_token)
    );
    owner.heartbeat(&[]).await;
    owner.expect_heartbeat_ack(1).await;
    owner.release_ok(&g.lease_id).await;

    // A second release of the same lease is a clear error.
    owner.release(&g.lease_id).await;
    owner.expect_lease_error(&g.lease_id, Code::FailedPrecondition).await;
    let g2 = other.acquire("after", "p").await;
    other.release_ok(&g2.lease_id).await;
    d.assert_idle().await;
    d.stop().await;
}

#[tokio::test]
async fn an_oversized_message_ends_that_stream_only_and_releases_its_leases() {
    let d = Daemon::start(
        r#"
        [limits]
        max_message_bytes = 4096
        [pools.p]
        max_concurrent = 1
        "#,
    )
    .await;
    let mut big = d.agent("big").await;
    let mut w = d.agent("waiter").await;
    let g = big.acquire("r", "p").await;
    w.request(w.req("w", "p")).await;
    w.expect_queued("w").await;

    big.request(pb::LeaseRequest { holder: "x".repeat(100 * 1024), ..big.req("huge", "p") }).await;
    let status = big.expect_end().await.expect("the stream ends with an error");
    // The decoder refuses it (OUT_OF_RANGE inside tonic); the daemon reports it as over a limit.
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    // Its lease went with it; others are served.
    let gw = w.expect_granted("w").await;
    assert_ne!(gw.lease_id, g.lease_id);
    w.release_ok(&gw.lease_id).await;
    let mut again = d.agent("again").await;
    let g3 = again.acquire("r", "p").await;
    again.release_ok(&g3.lease_id).await;
    d.assert_idle().await;
    d.stop().await;
}

#[tokio::test]
async fn unary_calls_and_metadata_validate_their_input() {
    let d = Daemon::start(POOLS).await;
    let mut c = d.client();
    let report = |pool: &str, retry: Option<prost_types::Duration>| pb::ReportRateLimitRequest {
        pool: pool.into(),
        retry_after: retry,
        reason: String::new(),
    };
    let code = |r: Result<tonic::Response<pb::ReportRateLimitResponse>, tonic::Status>| {
        r.expect_err("should be refused").code()
    };
    assert_eq!(code(c.report_rate_limit(report("bad name", None)).await), Code::InvalidArgument);
    assert_eq!(code(c.report_rate_limit(report("", None)).await), Code::InvalidArgument);
    assert_eq!(code(c.report_rate_limit(report("nope", None)).await), Code::NotFound);
    let negative = prost_types::Duration { seconds: -1, nanos: 0 };
    assert_eq!(code(c.report_rate_limit(report("p", Some(negative))).await), Code::InvalidArgument);
    let st = c.status(pb::StatusRequest { pool: "nope".into() }).await.expect_err("unknown pool");
    assert_eq!(st.code(), Code::NotFound);
    let st = c.status(pb::StatusRequest { pool: "bad name".into() }).await.expect_err("bad pool");
    assert_eq!(st.code(), Code::InvalidArgument);
    // None of it paused anything.
    assert!(d.pool("p").await.paused_until.is_none());

    // A malformed resume grace refuses the stream up front.
    let err = match d.try_agent("x", Some("soon")).await {
        Ok(_) => panic!("a malformed resume grace was accepted"),
        Err(s) => s,
    };
    assert_eq!(err.code(), Code::InvalidArgument);

    // Still serving.
    let mut x = d.agent("x").await;
    let g = x.acquire("r", "p").await;
    x.release_ok(&g.lease_id).await;
    x.expect_silence(Duration::from_millis(10)).await;
    d.assert_idle().await;
    d.stop().await;
}

/// Found by the `client_message` fuzz target: a resume during the learning period that re-created a
/// lease with a fencing token near `u64::MAX` left the pool's token counter no room, so the next grant
/// overflowed it (a panic in the driver task in debug builds, a wrapped token in release builds). A
/// resume now needs a credential the daemon issued, so a made-up token never reaches the counter
/// (tests/trust.rs covers forged resumes in full).
#[tokio::test]
async fn a_resume_with_an_out_of_range_fencing_token_is_refused_during_learning() {
    let d = Daemon::start(&format!("[scheduler]\nlearning_period = \"5s\"\n{POOLS}")).await;
    let mut x = d.agent("x").await;
    let next = d.pool("p").await.next_fencing_token;
    for token in [u64::MAX, u64::MAX - 1, u64::MAX / 2 + 1, 41] {
        x.resume(pb::ResumeLease {
            lease_id: NEVER.into(),
            fencing_token: token,
            pool: "p".into(),
            ..Default::default()
        })
        .await;
        x.expect_lease_error(NEVER, Code::PermissionDenied).await;
    }
    assert_eq!(d.pool("p").await.next_fencing_token, next);
    d.assert_idle().await;
    d.stop().await;
}
