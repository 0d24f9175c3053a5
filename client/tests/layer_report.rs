//! The tower layer's release report, through the real daemon: the outcome class of each provider
//! answer (429, 529, 503, 402, `insufficient_quota`, 5xx, a cut stream, a body error) as the daemon
//! counted it, and the usage and rate-limit headers read from a streamed answer.

use std::{convert::Infallible, time::Duration};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use slotd_client::LeaseLayer;
use slotd_test_support::{Daemon, client::one_pool, scrape, within};
use tower::{Layer, ServiceExt, service_fn};

fn request() -> Request<String> {
    Request::post("http://llm.invalid/v1/messages").body(String::new()).unwrap()
}

/// The daemon's count of releases on pool `llm` with this outcome label.
async fn released(metrics: std::net::SocketAddr, outcome: &str) -> u64 {
    let want = format!("slotd_leases_released_total{{outcome=\"{outcome}\",pool=\"llm\"}} ");
    let text = scrape(metrics).await;
    text.lines().find_map(|l| l.strip_prefix(&want)).map_or(0, |n| n.trim().parse().unwrap())
}

/// Waits until the daemon counted `n` releases with this outcome (case `case` of the test).
async fn wait_released(metrics: std::net::SocketAddr, label: &str, n: u64, case: usize) {
    let seen = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let got = released(metrics, label).await;
            if got >= n {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert_eq!(seen, Ok(n), "case {case}: releases counted as {label}");
}

#[track_caller]
fn answer(status: u16, headers: &[(&str, &str)], body: &str) -> Response<Full<Bytes>> {
    let mut b = Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::from(body.to_owned()))).unwrap()
}

#[tokio::test]
async fn each_provider_answer_is_released_with_its_class() {
    // Pauses are capped at zero so that the 429/529/402 answers do not hold the next call back.
    let (d, metrics) =
        Daemon::start_with_metrics(&one_pool("llm", 4, "adaptive = false\nmax_agent_retry_after = \"0s\""))
            .await;
    let client = d.connect().await;
    let cases: [(&str, Response<Full<Bytes>>, bool); 8] = [
        ("ok", answer(200, &[], "{}"), true),
        ("ok", answer(400, &[], r#"{"error":{"type":"invalid_request_error"}}"#), true),
        (
            "rate_limited",
            answer(429, &[("retry-after", "1")], r#"{"error":{"type":"rate_limit_error"}}"#),
            false,
        ),
        ("overloaded", answer(529, &[], r#"{"type":"error","error":{"type":"overloaded_error"}}"#), true),
        ("overloaded", answer(503, &[], "unavailable"), false),
        ("quota_exhausted", answer(402, &[], "{}"), false),
        (
            "quota_exhausted",
            answer(429, &[], r#"{"error":{"type":"insufficient_quota","code":"insufficient_quota"}}"#),
            true,
        ),
        ("error", answer(500, &[], "boom"), true),
    ];
    for (i, (label, resp, read_body)) in cases.into_iter().enumerate() {
        let before = released(metrics, label).await;
        let resp = std::sync::Arc::new(std::sync::Mutex::new(Some(resp)));
        let provider = service_fn(move |_req: Request<String>| {
            let r = resp.lock().unwrap().take().unwrap();
            async move { Ok::<_, Infallible>(r) }
        });
        let svc = LeaseLayer::new(client.clone(), "llm").layer(provider);
        let resp = within("call", svc.oneshot(request())).await.unwrap();
        if read_body {
            // Reading the body lets the layer see the error type; an unread error body still counts
            // by its status.
            resp.into_body().collect().await.unwrap();
        } else {
            drop(resp);
        }
        wait_released(metrics, label, before + 1, i).await;
    }
}

#[tokio::test]
async fn a_cut_stream_is_cancelled_and_a_failed_body_is_an_error() {
    let (d, metrics) = Daemon::start_with_metrics(&one_pool("llm", 2, "")).await;
    let client = d.connect().await;
    let stream = |fail: bool| {
        let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = if fail {
            vec![Ok(Frame::data(Bytes::from_static(b"data: {}\n\n"))), Err(std::io::Error::other("reset"))]
        } else {
            vec![Ok(Frame::data(Bytes::from_static(b"data: {}\n\n")))]
        };
        // A stream that never ends by itself unless it fails: pending after its frames.
        let s = futures::stream::iter(frames).chain(futures::stream::pending());
        Response::builder().header("content-type", "text/event-stream").body(StreamBody::new(s)).unwrap()
    };
    use futures::StreamExt;
    for (fail, label) in [(false, "cancelled"), (true, "error")] {
        let resp = std::sync::Arc::new(std::sync::Mutex::new(Some(stream(fail))));
        let provider = service_fn(move |_req: Request<String>| {
            let r = resp.lock().unwrap().take().unwrap();
            async move { Ok::<_, Infallible>(r) }
        });
        let svc = LeaseLayer::new(client.clone(), "llm").layer(provider);
        let mut body = within("call", svc.oneshot(request())).await.unwrap().into_body();
        let first = within("first frame", body.frame()).await.unwrap().unwrap();
        assert!(first.is_data());
        assert!(body.lease().is_some(), "the lease is held while the stream runs");
        if fail {
            assert!(within("the error", body.frame()).await.unwrap().is_err());
        }
        drop(body);
        wait_released(metrics, label, 1, usize::from(fail)).await;
    }
}
