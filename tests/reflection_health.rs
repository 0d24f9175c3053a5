//! Operations over loopback: gRPC health (overall and per service), reflection v1 and v1alpha, and
//! graceful shutdown (health NOT_SERVING, waiters rejected UNAVAILABLE, streams ended, serve returns).

use std::{panic::Location, time::Duration};

use prost::Message;
use slotd_test_support::{Daemon, bounded};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const SINGLE: &str = r#"
[pools.p]
max_concurrent = 1
"#;

const SERVICE: &str = "slotd.v1.Slotd";

#[tokio::test]
async fn health_is_serving_overall_and_for_the_service() {
    let d = Daemon::start(SINGLE).await;
    let mut h = HealthClient::new(d.channel().await);
    for service in ["", SERVICE] {
        let r = h
            .check(HealthCheckRequest { service: service.into() })
            .await
            .unwrap_or_else(|s| panic!("check {service:?}: {s}"))
            .into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "{service:?}");
    }
    let unknown = h.check(HealthCheckRequest { service: "no.such.Service".into() }).await;
    assert_eq!(unknown.expect_err("unknown service").code(), Code::NotFound);
    d.stop().await;
}

/// Reflection v1 and v1alpha share their message shapes; this drives either through closures.
macro_rules! reflection_checks {
    ($name:ident, $pb:path) => {
        #[tokio::test]
        async fn $name() {
            use $pb::{
                ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
                server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
            };
            let at = Location::caller();
            let d = Daemon::start(SINGLE).await;
            let mut client = ServerReflectionClient::new(d.channel().await);
            let (tx, rx) = mpsc::channel(4);
            let mut responses =
                bounded(at, "reflection", client.server_reflection_info(ReceiverStream::new(rx)))
                    .await
                    .expect("reflection stream")
                    .into_inner();
            let mut ask = async |req: MessageRequest| -> MessageResponse {
                tx.send(ServerReflectionRequest { host: String::new(), message_request: Some(req) })
                    .await
                    .expect("send");
                bounded(at, "a reflection answer", responses.message())
                    .await
                    .expect("reflection answer")
                    .expect("stream open")
                    .message_response
                    .expect("a response")
            };

            // `grpcurl list`
            let MessageResponse::ListServicesResponse(list) =
                ask(MessageRequest::ListServices(String::new())).await
            else {
                panic!("expected a service list");
            };
            let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
            for want in [SERVICE, "grpc.health.v1.Health"] {
                assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
            }
            // Either version lists every service, both reflection versions included.
            for want in [
                "slotd.v1.Admin",
                "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection",
            ] {
                assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
            }

            // `grpcurl describe slotd.v1.Slotd`
            let MessageResponse::FileDescriptorResponse(files) =
                ask(MessageRequest::FileContainingSymbol(SERVICE.into())).await
            else {
                panic!("expected file descriptors");
            };
            let files: Vec<prost_types::FileDescriptorProto> = files
                .file_descriptor_proto
                .iter()
                .map(|b| prost_types::FileDescriptorProto::decode(b.as_slice()).expect("descriptor"))
                .collect();
            let slotd = files.iter().find(|f| f.package() == "slotd.v1").expect("slotd.v1 file");
            let svc = slotd.service.iter().find(|s| s.name() == "Slotd").expect("service Slotd");
            let methods: Vec<&str> = svc.method.iter().map(|m| m.name()).collect();
            assert_eq!(methods, ["Acquire", "ReportRateLimit", "Status", "ReportUsage"]);
            let acquire = &svc.method[0];
            assert!(acquire.client_streaming() && acquire.server_streaming());
            // Its imports (well-known types) are resolvable too.
            let MessageResponse::FileDescriptorResponse(_) =
                ask(MessageRequest::FileByFilename("google/protobuf/duration.proto".into())).await
            else {
                panic!("expected google/protobuf/duration.proto");
            };
            drop(tx);
            drop(responses);
            d.stop().await;
        }
    };
}

reflection_checks!(reflection_v1_lists_and_describes_the_service, tonic_reflection::pb::v1);
reflection_checks!(reflection_v1alpha_lists_and_describes_the_service, tonic_reflection::pb::v1alpha);

async fn next_health(
    at: &Location<'_>,
    w: &mut Streaming<tonic_health::pb::HealthCheckResponse>,
) -> Option<i32> {
    match bounded(at, "a health update", w.message()).await {
        Ok(Some(r)) => Some(r.status),
        Ok(None) | Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graceful_shutdown_turns_health_off_rejects_waiters_and_ends_streams() {
    let at = Location::caller();
    let mut d = Daemon::start(SINGLE).await;
    let addr = d.addr;
    let mut holder = d.agent("holder").await;
    let mut waiter = d.agent("waiter").await;
    let _g = holder.acquire("h", "p").await;
    waiter.request(waiter.req("w", "p")).await;
    waiter.expect_queued("w").await;

    let mut health = HealthClient::new(d.channel().await);
    let mut watches = Vec::new();
    for service in ["", SERVICE] {
        let mut w =
            health.watch(HealthCheckRequest { service: service.into() }).await.expect("watch").into_inner();
        assert_eq!(next_health(at, &mut w).await, Some(ServingStatus::Serving as i32));
        watches.push(w);
    }

    d.begin_shutdown();
    // Health turns NOT_SERVING before the connections close, so open watchers see it.
    for w in &mut watches {
        assert_eq!(next_health(at, w).await, Some(ServingStatus::NotServing as i32));
    }
    // The waiter is rejected with UNAVAILABLE, then every stream ends with UNAVAILABLE.
    waiter.expect_rejected("w", Code::Unavailable).await;
    let end = waiter.expect_end().await.expect("an error status");
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
    let end = holder.expect_end().await.expect("an error status");
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");

    // Health watch streams never end on their own; a watcher that goes away lets the server finish.
    drop(watches);
    drop(health);
    // The agents keep their request streams open (as a hung or careless client would): the daemon
    // stops anyway, because it stops reading a stream once it has ended it.
    d.join().await.expect("serve returns Ok");
    assert!(
        tokio::time::timeout(
            Duration::from_secs(1),
            slotd_proto::v1::slotd_client::SlotdClient::connect(format!("http://{addr}"))
        )
        .await
        .map_or(true, |r| r.is_err()),
        "the daemon still accepts connections after shutdown"
    );
    drop((holder, waiter));
}

#[tokio::test]
async fn a_connection_that_never_closes_holds_shutdown_only_for_the_drain_timeout() {
    let at = Location::caller();
    let mut d = Daemon::start(
        r#"
        [limits]
        drain_timeout = "200ms"
        [pools.p]
        max_concurrent = 1
        "#,
    )
    .await;
    // A health watcher never ends its stream by itself.
    let mut health = HealthClient::new(d.channel().await);
    let mut w =
        health.watch(HealthCheckRequest { service: String::new() }).await.expect("watch").into_inner();
    assert_eq!(next_health(at, &mut w).await, Some(ServingStatus::Serving as i32));
    let t0 = std::time::Instant::now();
    d.begin_shutdown();
    assert_eq!(next_health(at, &mut w).await, Some(ServingStatus::NotServing as i32));
    d.join().await.expect("serve returns Ok");
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(200) && took < Duration::from_secs(2), "stopped after {took:?}");
    drop((w, health));
}
