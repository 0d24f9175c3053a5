//! slotd: a gRPC daemon that leases scarce LLM-provider capacity to many agent processes.
//!
//! [`serve`] runs the daemon on a listener until a shutdown future resolves. The scheduling rules
//! live in [`scheduler`] (synchronous, no I/O); [`driver`] owns it; [`grpc`] is the thin wire layer.

pub mod config;
pub mod driver;
pub mod grpc;
pub mod scheduler;
pub mod slotctl;

use std::{
    future::Future,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use slotd_proto::v1::slotd_server::SlotdServer;
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
    time::Instant,
};
use tonic_health::ServingStatus;
use tracing::{info, warn};

use crate::{
    config::Config,
    driver::Driver,
    grpc::service::SlotdService,
    scheduler::{Scheduler, SchedulerConfig},
};

/// Why the daemon could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The configuration was refused.
    #[error("invalid configuration: {0}")]
    Config(#[from] scheduler::Error),
    /// Reflection could not be built from the descriptor set.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The transport failed.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves until `shutdown` resolves, then shuts down gracefully: health turns NOT_SERVING, grants stop,
/// waiters are rejected with UNAVAILABLE and every stream ends. Connections still open after
/// `limits.drain_timeout` are abandoned.
///
/// # Cancel safety
/// Dropping the future stops serving abruptly (connections are dropped, leases forgotten); resolve
/// `shutdown` for a graceful stop.
pub async fn serve(
    cfg: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    serve_with_reload(cfg, listener, shutdown, None).await
}

/// [`serve`], also applying each configuration received on `reloads` (its pools, at once).
///
/// # Cancel safety
/// As for [`serve`].
pub async fn serve_with_reload(
    cfg: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    reloads: Option<mpsc::Receiver<Config>>,
) -> Result<(), ServeError> {
    // Fencing tokens start at the wall clock in microseconds, so they keep increasing across restarts
    // (a pool would need more than a million grants per second to catch up with the clock).
    let first_token = SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_micros() as u64);
    let sched_cfg = SchedulerConfig {
        aging_step: cfg.scheduler.aging_step,
        learning_period: cfg.scheduler.learning_period,
        max_per_session: cfg.scheduler.max_per_stream,
        first_token,
        seed: None,
    };
    let sched = Scheduler::new(sched_cfg, cfg.pools.clone(), Instant::now())?;
    let (driver, handle) = Driver::new(sched);
    tokio::spawn(driver.run());

    if let Some(mut reloads) = reloads {
        let handle = handle.clone();
        tokio::spawn(async move {
            while let Some(new) = reloads.recv().await {
                match handle.set_pools(new.pools).await {
                    Ok(()) => info!("configuration reloaded"),
                    Err(e) => {
                        warn!(error = %e, "configuration reload refused; keeping the old pools")
                    }
                }
            }
        });
    }

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<SlotdServer<SlotdService>>().await;
    health.set_service_status("", ServingStatus::Serving).await;

    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(slotd_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let max_msg = cfg.limits.max_message_bytes;
    let slotd = SlotdServer::new(SlotdService::new(
        handle.clone(),
        cfg.limits.stream_buffer,
        cfg.limits.max_resume_grace,
    ))
    .max_decoding_message_size(max_msg);

    let drain = cfg.limits.drain_timeout;
    let (signalled, drain_started) = oneshot::channel::<()>();
    let graceful = async move {
        shutdown.await;
        info!("shutting down: health NOT_SERVING, grants stopped, streams told");
        health.set_not_serving::<SlotdServer<SlotdService>>().await;
        health.set_service_status("", ServingStatus::NotServing).await;
        handle.shutdown().await;
        let _ = signalled.send(());
    };
    // tonic waits for every connection to close; one that never does (a health `Watch`, a client
    // ignoring GOAWAY) must not hold the daemon forever.
    let drain_deadline = async move {
        if drain_started.await.is_err() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(drain).await;
    };

    let server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(slotd)
        // `serve_with_incoming*` ignores the builder's `tcp_nodelay`: set it on each accepted socket, or
        // Nagle holds back the second of two small writes (Released then Granted) for a delayed ACK.
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            graceful,
        );
    tokio::select! {
        res = server => res?,
        () = drain_deadline => {
            warn!(?drain, "connections still open after limits.drain_timeout; stopping anyway");
        }
    }
    Ok(())
}
