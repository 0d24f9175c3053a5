//! 429 pauses over loopback: pushed to waiters and holders on other connections, nothing granted
//! while paused, Resumed at the end; ReportRateLimit; a pause never shortens; adaptive headroom.

use std::time::{Duration, Instant};

use slotd_proto::v1 as pb;
use slotd_test_support::{Daemon, diff_ms, ms, pool_in, system_time};
use tonic::Code;

const THREE: &str = r#"
[pools.p]
max_concurrent = 3
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rate_limited_release_pauses_the_pool_for_waiters_and_holders() {
    let d = Daemon::start(THREE).await;
    let mut a = d.agent("a").await;
    let mut b = d.agent("b").await;
    let mut c = d.agent("c").await;
    let mut w = d.agent("waiter").await;
    let ga = a.acquire("ra", "p").await;
    let gb = b.acquire("rb", "p").await;
    let gc = c.acquire("rc", "p").await;
    w.request(w.req("rw", "p")).await;
    w.expect_queued("rw").await;

    let t0 = Instant::now();
    a.release_with(&ga.lease_id, pb::Outcome::RateLimited, Some(Duration::from_millis(300))).await;
    a.expect_released(&ga.lease_id).await;
    // Pushed to the other holders and to the waiter, each on its own connection.
    let pb_ = b.expect_paused("p").await;
    let pc = c.expect_paused("p").await;
    let pw = w.expect_paused("p").await;
    let until = pw.until.expect("until");
    for p in [&pb_, &pc] {
        assert!(diff_ms(p.until.as_ref().unwrap(), &until).abs() <= 2, "{p:?} vs {pw:?}");
    }
    assert!(pw.reason.contains("429"), "{pw:?}");
    let remaining = pw.remaining.expect("remaining");
    assert!(remaining.seconds == 0 && remaining.nanos > 0 && remaining.nanos <= 300_000_000, "{remaining:?}");

    // Status shows the pause and the adaptive headroom: 3 -> 2.
    let p = d.pool("p").await;
    assert!(p.paused_until.is_some(), "{p:?}");
    assert_eq!((p.limit, p.effective_limit, p.in_flight), (3, 2, 2));

    // A slot frees up during the pause: it is still not granted.
    c.release_ok(&gc.lease_id).await;
    w.expect_silence(Duration::from_millis(100)).await;
    assert!(t0.elapsed() < Duration::from_millis(300), "the test machine is too slow to observe the pause");
    assert_eq!(d.pool("p").await.in_flight, 1);

    // The pause ends: Resumed to the remaining holder and to the waiter, then the grant.
    w.expect_resumed("p").await;
    let gw = w.expect_granted("rw").await;
    assert!(t0.elapsed() >= Duration::from_millis(300), "granted after {:?}", t0.elapsed());
    assert!(system_time(gw.expires_at.as_ref().unwrap()) > system_time(&until));
    b.expect_resumed("p").await;
    // `a` held nothing any more and `c` released during the pause: neither hears about its end.
    a.expect_silence(Duration::from_millis(20)).await;
    c.expect_silence(Duration::from_millis(1)).await;
    assert!(d.pool("p").await.paused_until.is_none());

    b.release_ok(&gb.lease_id).await;
    w.release_ok(&gw.lease_id).await;
    d.assert_idle().await;
    d.stop().await;
}

#[tokio::test]
async fn report_rate_limit_pauses_and_a_shorter_retry_never_shortens_the_pause() {
    let d = Daemon::start(THREE).await;
    let mut client = d.client();
    let report = |retry: u64| pb::ReportRateLimitRequest {
        pool: "p".into(),
        retry_after: Some(ms(retry)),
        reason: "proxy saw 429".into(),
        ..Default::default()
    };
    let t0 = Instant::now();
    let r1 = client.report_rate_limit(report(500)).await.expect("report").into_inner();
    let u1 = r1.paused_until.expect("paused_until");
    assert_eq!(r1.effective_limit, 2, "adaptive headroom: 3 -> 2");

    // A waiter asks during the pause: the pool is empty, yet it waits.
    let mut w = d.agent("waiter").await;
    w.request(w.req("rw", "p")).await;
    w.expect_queued("rw").await;
    // It arrived during the pause, so it is told about the pause at once.
    w.expect_paused("p").await;

    // A later, shorter retry_after leaves the pause end where it was (and is the same episode).
    let r2 = client.report_rate_limit(report(50)).await.expect("report").into_inner();
    let u2 = r2.paused_until.expect("paused_until");
    assert!(diff_ms(&u2, &u1).abs() <= 1, "pause moved from {u1:?} to {u2:?}");
    assert_eq!(r2.effective_limit, 2, "one episode lowers the limit once");
    // The pause did not move: the waiter hears nothing more.
    w.expect_silence(Duration::from_millis(80)).await;

    // A longer one extends it, and the waiter hears about the new end.
    let r3 = client.report_rate_limit(report(700)).await.expect("report").into_inner();
    let u3 = r3.paused_until.expect("paused_until");
    assert!(diff_ms(&u3, &u1) > 100, "pause not extended: {u1:?} -> {u3:?}");
    let pw = w.expect_paused("p").await;
    assert!(diff_ms(pw.until.as_ref().unwrap(), &u3).abs() <= 1);
    assert!(pw.reason.contains("proxy saw 429"), "{pw:?}");

    let s = d.status().await;
    let p = pool_in(&s, "p");
    assert_eq!((p.limit, p.effective_limit, p.queued), (3, 2, 1));
    assert!(diff_ms(p.paused_until.as_ref().unwrap(), &u3).abs() <= 1);

    w.expect_resumed("p").await;
    let g = w.expect_granted("rw").await;
    assert!(t0.elapsed() >= Duration::from_millis(700), "granted after {:?}", t0.elapsed());
    w.release_ok(&g.lease_id).await;
    d.assert_idle().await;
    d.stop().await;
}

#[tokio::test]
async fn waiting_past_max_wait_during_a_pause_says_how_long_the_pause_lasts() {
    let d = Daemon::start(THREE).await;
    let mut client = d.client();
    client
        .report_rate_limit(pb::ReportRateLimitRequest {
            pool: "p".into(),
            retry_after: Some(ms(400)),
            reason: String::new(),
            ..Default::default()
        })
        .await
        .expect("report");
    let mut w = d.agent("waiter").await;
    w.request(pb::LeaseRequest { max_wait: Some(ms(50)), ..w.req("rw", "p") }).await;
    w.expect_queued("rw").await;
    // It arrived during the pause, so it is told about the pause at once.
    w.expect_paused("p").await;
    let r = w.expect_rejected("rw", Code::DeadlineExceeded).await;
    let retry = r.retry_after.expect("retry_after while paused");
    let retry = Duration::try_from(retry).unwrap();
    assert!(retry > Duration::from_millis(200) && retry < Duration::from_millis(400), "{retry:?}");
    d.assert_idle().await;
    d.stop().await;
}

#[tokio::test]
async fn the_effective_limit_recovers_after_a_quiet_period() {
    let d = Daemon::start(
        r#"
        [pools.p]
        max_concurrent = 3
        headroom_recovery = "150ms"
        "#,
    )
    .await;
    let mut client = d.client();
    let t0 = Instant::now();
    let r = client
        .report_rate_limit(pb::ReportRateLimitRequest {
            pool: "p".into(),
            retry_after: Some(ms(100)),
            reason: String::new(),
            ..Default::default()
        })
        .await
        .expect("report")
        .into_inner();
    assert_eq!(r.effective_limit, 2);
    // One step back after the pause end plus the quiet period.
    d.wait_for("the effective limit to recover", |s| pool_in(s, "p").effective_limit == 3).await;
    assert!(t0.elapsed() >= Duration::from_millis(250), "recovered after {:?}", t0.elapsed());
    d.stop().await;
}

#[tokio::test]
async fn rate_limited_release_without_retry_after_uses_the_pool_default() {
    let d = Daemon::start(
        r#"
        [pools.p]
        max_concurrent = 1
        default_retry_after = "200ms"
        adaptive = false
        "#,
    )
    .await;
    let mut a = d.agent("a").await;
    let mut w = d.agent("waiter").await;
    let g = a.acquire("ra", "p").await;
    w.request(w.req("rw", "p")).await;
    w.expect_queued("rw").await;
    let t0 = Instant::now();
    a.release_with(&g.lease_id, pb::Outcome::RateLimited, None).await;
    a.expect_released(&g.lease_id).await;
    w.expect_paused("p").await;
    // Not adaptive: the limit stays 1.
    assert_eq!(d.pool("p").await.effective_limit, 1);
    w.expect_resumed("p").await;
    let gw = w.expect_granted("rw").await;
    assert!(t0.elapsed() >= Duration::from_millis(200), "granted after {:?}", t0.elapsed());
    w.release_ok(&gw.lease_id).await;
    d.assert_idle().await;
    d.stop().await;
}
