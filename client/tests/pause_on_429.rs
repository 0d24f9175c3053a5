//! The tower layer: a lease per HTTP request, held until the body ends, and provider 429s / 529s
//! reported so that every client of the pool pauses.

use std::{
    convert::Infallible,
    time::{Duration, Instant, SystemTime},
};

use http::{Request, Response};
use http_body_util::{BodyExt, StreamBody};
use slotd_client::LeaseLayer;
use slotd_test_support::{
    Daemon,
    client::{idle, one_pool, pool, wait_until},
    within,
};
use tower::{Layer, ServiceExt, service_fn};

fn request() -> Request<String> {
    Request::post("http://llm.invalid/v1/messages").body(String::new()).unwrap()
}

#[tokio::test]
async fn a_429_through_the_layer_pauses_other_clients() {
    // Not adaptive: the 429 pauses the pool but keeps its limit, so the free slot is granted after.
    let d = Daemon::start(&one_pool("llm", 2, "adaptive = false")).await;
    let agent = d.connect().await;
    let other = d.connect().await;
    // The other client holds a slot on the pool, so the daemon pushes the pause to it.
    let held = within("acquire", other.acquire("llm")).await.unwrap();
    let mut pauses = other.pauses();

    let provider = service_fn(|_req: Request<String>| async {
        Ok::<_, Infallible>(
            Response::builder()
                .status(429)
                .header("retry-after-ms", "400")
                .body(r#"{"error":"rate limited"}"#.to_owned())
                .unwrap(),
        )
    });
    let svc = LeaseLayer::new(agent.clone(), "llm").layer(provider);
    let resp = within("call", svc.oneshot(request())).await.unwrap();
    assert_eq!(resp.status(), 429);
    let limited_at = Instant::now();
    drop(resp); // the body goes, the lease goes, with outcome rate-limited

    let paused = within("pause pushed", pauses.wait_for(|m| m.contains_key("llm"))).await.unwrap().clone();
    let until = paused["llm"].until;
    assert!(until > SystemTime::now(), "{paused:?}");
    let st = wait_until(&other, "the pool is paused", |st| pool(st, "llm").paused_until.is_some()).await;
    assert_eq!(pool(&st, "llm").in_flight, 1);

    // A free slot exists, but the pause holds every acquire back until it ends.
    let mut next = Box::pin(std::future::IntoFuture::into_future(other.acquire("llm")));
    tokio::select! {
        _ = &mut next => panic!("granted during the pause"),
        _ = tokio::time::sleep(Duration::from_millis(150)) => {}
    }
    let second = within("granted after the pause", next).await.unwrap();
    assert!(
        limited_at.elapsed() >= Duration::from_millis(300),
        "granted only {:?} after the 429",
        limited_at.elapsed()
    );
    within("resumed pushed", pauses.wait_for(|m| !m.contains_key("llm"))).await.unwrap();
    drop((held, second));
    wait_until(&other, "idle", |st| idle(st, "llm")).await;
}

#[tokio::test]
async fn a_529_overload_pauses_by_its_retry_after_date() {
    let d = Daemon::start(&one_pool("llm", 2, "")).await;
    let agent = d.connect().await;
    let provider = service_fn(|_req: Request<String>| async {
        let at = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(20));
        Ok::<_, Infallible>(
            Response::builder()
                .status(529)
                .header("retry-after", at)
                .body(r#"{"type":"error","error":{"type":"overloaded_error"}}"#.to_owned())
                .unwrap(),
        )
    });
    let svc = LeaseLayer::new(agent.clone(), "llm").layer(provider);
    let resp = within("call", svc.oneshot(request())).await.unwrap();
    assert_eq!(resp.status(), 529);
    drop(resp);
    let st = wait_until(&agent, "paused", |st| pool(st, "llm").paused_until.is_some()).await;
    let until = SystemTime::try_from(pool(&st, "llm").paused_until.unwrap()).unwrap();
    let left = until.duration_since(SystemTime::now()).unwrap();
    assert!(left > Duration::from_secs(15), "paused for {left:?}");
    assert_eq!(pool(&st, "llm").in_flight, 0);
}

#[tokio::test]
async fn a_server_error_does_not_pause() {
    let d = Daemon::start(&one_pool("llm", 1, "")).await;
    let agent = d.connect().await;
    let provider = service_fn(|_req: Request<String>| async {
        Ok::<_, Infallible>(Response::builder().status(502).body(String::new()).unwrap())
    });
    let svc = LeaseLayer::new(agent.clone(), "llm").layer(provider);
    let resp = within("call", svc.oneshot(request())).await.unwrap();
    drop(resp);
    let st = wait_until(&agent, "released", |st| idle(st, "llm")).await;
    assert!(pool(&st, "llm").paused_until.is_none());
}

#[tokio::test]
async fn the_lease_is_held_until_the_body_ends() {
    let d = Daemon::start(&one_pool("llm", 1, "")).await;
    let agent = d.connect().await;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let body = StreamBody::new(tokio_stream::wrappers::UnboundedReceiverStream::new(rx));
    // The layer clones its inner service, so the one body sits behind a shared slot.
    let body = std::sync::Arc::new(std::sync::Mutex::new(Some(body)));
    let provider = service_fn(move |_req: Request<String>| {
        let body = body.lock().unwrap().take().expect("one call");
        async move { Ok::<_, Infallible>(Response::new(body)) }
    });
    // The pool is picked per request by a closure.
    let svc = LeaseLayer::with_selector(agent.clone(), |req: &Request<String>| {
        req.uri().host().map(|_| "llm".to_owned())
    })
    .layer(provider);
    let resp = within("call", svc.oneshot(request())).await.unwrap();
    assert!(resp.body().lease().is_some());
    let st = agent.status(None).await.unwrap();
    assert_eq!(pool(&st, "llm").in_flight, 1, "held while the body streams");
    tx.send(Ok::<_, Infallible>(http_body::Frame::data(&b"data: hi\n\n"[..]))).unwrap();
    drop(tx);
    let collected = within("body", resp.into_body().collect()).await.unwrap();
    assert_eq!(&collected.to_bytes()[..], b"data: hi\n\n");
    wait_until(&agent, "released at the end of the body", |st| idle(st, "llm")).await;
}
