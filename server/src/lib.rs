//! slotd: a gRPC daemon that leases scarce LLM-provider capacity to many agent processes.
//!
//! [`serve`] runs the daemon on a listener until a shutdown future resolves. The scheduling rules
//! live in [`scheduler`] (synchronous, no I/O); [`driver`] owns it; [`grpc`] is the thin wire layer.

pub mod config;
pub mod driver;
pub mod grpc;
pub mod ha;
pub mod key_file;
pub mod metrics;
pub mod net;
pub mod pool_store;
pub mod restart;
pub mod scheduler;
pub mod state;
pub mod token;

use std::{
    future::Future,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use slotd_proto::v1::{admin_server::AdminServer, slotd_server::SlotdServer};
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
    time::Instant,
};
use tonic::{
    service::interceptor::InterceptedService,
    transport::{Identity, ServerTlsConfig},
};
use tonic_health::{ServingStatus, server::HealthReporter};
use tracing::{error, info, warn};

use crate::{
    config::Config,
    driver::Driver,
    grpc::{
        admin::AdminService,
        auth::RequireToken,
        limits::{OversizeAsExhausted, StreamLimits},
        service::SlotdService,
    },
    metrics::Metrics,
    pool_store::PoolStore,
    scheduler::{LeaseKey, Scheduler, SchedulerConfig},
    state::StateFile,
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
    /// The state file could not be read.
    #[error("{0}")]
    State(#[from] state::StateError),
    /// The key of resume credentials could not be read or created.
    #[error("{0}")]
    Key(#[from] key_file::KeyFileError),
    /// The transport failed.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// A service without a token would be reachable beyond loopback.
    #[error("{0}")]
    Insecure(String),
    /// The TLS certificate or key could not be loaded.
    #[error("tls: {0}")]
    Tls(String),
    /// The task that owns the scheduler ended (a panic, or a return) while the daemon was serving.
    /// Nothing can be granted any more: health was turned NOT_SERVING and serving stopped, so that a
    /// supervisor restarts the process.
    #[error("the scheduler task stopped unexpectedly: {0}")]
    DriverStopped(String),
    /// High availability: this member was deposed as leader (it ended every stream), or cannot lead.
    /// It exits so that its supervisor starts it again, as a standby.
    #[error("{0}")]
    Ha(#[from] ha::HaError),
    /// A listener could not be bound or inspected.
    #[error("{what}: {source}")]
    Listen {
        /// Which listener.
        what: String,
        /// Why.
        source: std::io::Error,
    },
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

/// [`serve`], also applying each configuration received on `reloads` (its pools, at once). With
/// `metrics_listen` configured, binds it and serves Prometheus metrics there.
///
/// # Cancel safety
/// As for [`serve`].
pub async fn serve_with_reload(
    cfg: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    reloads: Option<mpsc::Receiver<Config>>,
) -> Result<(), ServeError> {
    let metrics = match cfg.metrics_listen {
        Some(addr) => Some(TcpListener::bind(addr).await.map_err(|source| ServeError::Listen {
            what: format!("cannot listen for metrics on {addr}"),
            source,
        })?),
        None => None,
    };
    serve_with_metrics(cfg, listener, metrics, shutdown, reloads).await
}

/// [`serve_with_reload`] with the metrics listener (if any) already bound, for example to port 0;
/// `cfg.metrics_listen` is ignored.
///
/// # Cancel safety
/// As for [`serve`].
pub async fn serve_with_metrics(
    cfg: Config,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    reloads: Option<mpsc::Receiver<Config>>,
) -> Result<(), ServeError> {
    let local = listener
        .local_addr()
        .map_err(|source| ServeError::Listen { what: "cannot read the listen address".into(), source })?;
    check_exposure(&cfg, local)?;
    let conn_limits = net::ConnectionLimits {
        max_connections: cfg.limits.max_connections,
        handshake_timeout: cfg.limits.handshake_timeout,
        goaway_on_refusal: cfg.tls_cert.is_none(),
    };
    let tls = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(cert), Some(key)) => {
            Some(tls_config(cert, key)?.timeout(net::tls_handshake_timeout(&conn_limits)))
        }
        _ => None,
    };
    // Fencing tokens start at the wall clock in microseconds, so they keep increasing across restarts
    // (a pool would need more than a million grants per second to catch up with the clock).
    // With high availability, each term sets its own first token from its epoch instead (see `ha`).
    let first_token = match cfg.ha {
        Some(_) => 1,
        None => SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_micros() as u64),
    };
    if let Some(dir) = &cfg.state_dir {
        key_file::ensure_state_dir(dir)?;
    }
    // Read before the restart marker is written: a daemon that cannot trust its key never starts.
    let lease_key = match cfg.key_path() {
        Some(path) => key_file::load_or_create(&path)?,
        None => LeaseKey::random(),
    };
    // With a state file, the pools operators last set (through Admin) replace the config file's; the
    // config stays the seed until the first change (see `state`).
    let state_file = cfg.state_file.clone().map(|p| Arc::new(StateFile::new(p)));
    if let Some(sf) = &state_file {
        for stale in state::remove_stale_temp_files(sf.path()) {
            info!(path = %stale.display(), "removed a state-file temp file left by an interrupted write");
        }
    }
    let (pools, source) = match state_file.as_deref().map(|s| state::load(s.path())).transpose()?.flatten() {
        Some(saved) => (saved, PoolSource::StateFile),
        None => (cfg.pools.clone(), PoolSource::Config),
    };
    let listed: Vec<String> = pools.iter().map(|(k, v)| format!("{k}={}", v.max_concurrent)).collect();
    match source {
        PoolSource::StateFile => {
            let path = cfg.state_file.as_deref().map(|p| p.display().to_string()).unwrap_or_default();
            info!(source = "state_file", %path, pools = %listed.join(","), "serving the state file's pools (the config file's are only its seed)");
        }
        PoolSource::Config => {
            info!(source = "config", pools = %listed.join(","), "serving the config file's pools")
        }
    }
    // The learning period covers the longest TTL that may still be live, among the pools actually
    // served (see `restart`).
    // With `[ha]` the election's runtime state in etcd decides each term's learning instead: a
    // member's own restart says nothing about what the cluster's leader granted meanwhile.
    let configured = if cfg.ha.is_some() { Duration::ZERO } else { cfg.scheduler.learning_period };
    let marker_path = cfg.restart_marker.clone().filter(|_| cfg.ha.is_none());
    let startup = marker_path.map(|m| restart::RestartMarker::open(m, configured, &pools));
    let learning_period = match &startup {
        Some(s) if s.restarted => {
            warn!(
                path = %s.marker.path().display(),
                learning_secs = s.learning_period.as_secs_f64(),
                "previous run ended with leases possibly held: granting only resumes during the learning period"
            );
            s.learning_period
        }
        _ => configured,
    };
    let marker = startup.map(|s| s.marker);
    let sched_cfg = SchedulerConfig {
        aging_step: cfg.scheduler.aging_step,
        learning_period,
        max_per_session: cfg.scheduler.max_per_stream,
        first_token,
        seed: None,
        lease_key,
    };
    grpc::convert::init_clock_anchor();
    // A new leader learns for the longest TTL a lease of the previous leader may still have.
    let ha_learning =
        pools.values().map(|p| p.max_ttl).max().unwrap_or_default().max(cfg.scheduler.learning_period);
    let mut sched = Scheduler::new(sched_cfg, pools, Instant::now())?;
    if cfg.ha.is_some() {
        // A standby grants nothing; winning the election sets the first deadline.
        let now = Instant::now();
        let _ = sched.set_grant_deadline(now, Some(now));
    }
    let (driver, handle) = Driver::new(sched);
    let metrics = metrics_listener.map(|l| (l, Metrics::new()));
    let conn_counts = Arc::new(net::ConnectionCounts::default());
    if let Some((_, m)) = &metrics
        && let Err(e) = conn_counts.register(m.registry())
    {
        warn!(error = %e, "cannot register the connection metrics");
    }
    let driver = match &metrics {
        Some((_, m)) => driver.with_observer(metrics::Recorder::new(m.clone())),
        None => driver,
    };
    let driver = match &marker {
        Some(m) => {
            let (observer, writer) = m.recorder();
            tokio::spawn(writer);
            driver.with_observer(observer)
        }
        None => driver,
    };
    let driver_task = tokio::spawn(driver.run());
    let metrics_registry = metrics.as_ref().map(|(_, m)| m.registry().clone());
    // Aborted when serving ends (below): a scrape during shutdown has nothing useful to say.
    let metrics_task = metrics.map(|(l, m)| {
        if let Ok(addr) = l.local_addr() {
            info!(%addr, "serving Prometheus metrics on /metrics");
        }
        tokio::spawn(metrics::serve_metrics(l, m, handle.clone(), std::future::pending()))
    });

    if let Some(mut reloads) = reloads {
        let store = PoolStore::new(handle.clone(), state_file.clone());
        tokio::spawn(async move {
            while let Some(new) = reloads.recv().await {
                match store.reload(new.pools).await {
                    Ok(()) => info!("configuration reloaded"),
                    Err(e) => {
                        warn!(error = %e, "configuration reload refused; keeping the old pools")
                    }
                }
            }
        });
    }

    let (health, health_service) = tonic_health::server::health_reporter();
    let driver_died = driver_stopped(driver_task, health.clone());
    if cfg.ha.is_none() {
        health.set_serving::<SlotdServer<SlotdService>>().await;
        health.set_serving::<AdminServer<AdminService>>().await;
    }
    health.set_service_status("", ServingStatus::Serving).await;
    let durable = cfg.ha.as_ref().map(|_| ha::Durable::default());
    let durable_for_resign = durable.clone();
    let ha_registry = metrics_registry;
    let (role, ha_task) = match cfg.ha.clone() {
        Some(ha_cfg) => {
            let advertise = match &ha_cfg.advertise {
                Some(a) => a.clone(),
                None if local.ip().is_unspecified() => {
                    return Err(ServeError::Ha(ha::HaError::Fatal(format!(
                        "listening on {local}: set ha.advertise to the address clients reach this member at"
                    ))));
                }
                None => format!("http://{local}"),
            };
            let (tx, rx) = tokio::sync::watch::channel(ha::RoleState::standby());
            info!(election = %ha_cfg.election, %advertise, "high availability: standing by for the election");
            let member = ha::Member {
                cfg: ha_cfg,
                advertise,
                handle: handle.clone(),
                role: tx,
                health: health.clone(),
                learning: ha_learning,
                durable: durable.clone().unwrap_or_default(),
            };
            let reader = ha::RoleReader::new(rx);
            if let Some(r) = &ha_registry
                && let Err(e) = reader.register_metrics(r)
            {
                warn!(error = %e, "cannot register the high-availability metrics");
            }
            (Some(reader), Some(tokio::spawn(ha::run(member))))
        }
        None => (None, None),
    };
    // Deposed (or unable to lead): shut down gracefully, so that every stream's UNAVAILABLE reaches
    // its client, then fail `serve` so that the process exits.
    let deposed = Arc::new(std::sync::Mutex::new(None::<ha::HaError>));
    let ha_ended = {
        let deposed = deposed.clone();
        async move {
            let e = match ha_task {
                Some(t) => match t.await {
                    Ok(e) => e,
                    Err(e) => ha::HaError::Fatal(format!("the election task failed: {e}")),
                },
                None => std::future::pending().await,
            };
            if let Ok(mut d) = deposed.lock() {
                *d = Some(e);
            }
        }
    };

    // Both reflection versions list both reflection services: by default each lists only its own, so
    // `grpcurl list` (which asks v1alpha) did not show v1.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .include_reflection_service(false)
            .register_encoded_file_descriptor_set(slotd_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let max_msg = cfg.limits.max_message_bytes;
    let stream_limits = StreamLimits::new(cfg.limits.max_streams, cfg.limits.max_streams_per_connection);
    let slotd = SlotdServer::new(
        SlotdService::new(handle.clone(), cfg.limits.stream_buffer, cfg.limits.max_resume_grace)
            .with_stream_limits(stream_limits)
            .with_role(role.clone()),
    )
    .max_decoding_message_size(max_msg);
    // Each service checks its own token before any handler runs; health and reflection stay open. An
    // oversized message is RESOURCE_EXHAUSTED (tonic says OUT_OF_RANGE), as for every bound.
    let slotd = OversizeAsExhausted::new(InterceptedService::new(
        slotd,
        RequireToken::agent(cfg.agent_token.clone()).with_role(role.clone()),
    ));
    let admin = AdminServer::new(
        AdminService::new(handle.clone(), state_file, cfg.limits.max_pools).with_durable(durable),
    )
    .max_decoding_message_size(max_msg);
    let admin = OversizeAsExhausted::new(InterceptedService::new(
        admin,
        RequireToken::admin(cfg.admin_token.clone()).with_role(role),
    ));

    let resign = durable_for_resign;
    let drain = cfg.limits.drain_timeout;
    let (signalled, drain_started) = oneshot::channel::<()>();
    let graceful = async move {
        tokio::select! {
            () = shutdown => {}
            () = ha_ended => {}
        }
        notify_systemd(ServiceState::Stopping);
        info!("shutting down: health NOT_SERVING, grants stopped, streams told");
        health.set_not_serving::<SlotdServer<SlotdService>>().await;
        health.set_not_serving::<AdminServer<AdminService>>().await;
        health.set_service_status("", ServingStatus::NotServing).await;
        let held = handle.shutdown().await;
        // Granting has stopped: hand the leadership over now rather than after the lease TTL.
        if let Some(d) = &resign {
            // Boxed: its etcd calls would otherwise grow `serve`'s own future (run on the caller's stack).
            Box::pin(d.resign(&handle)).await;
        }
        match &marker {
            // Nothing was held: the next start need not wait for anyone to resume.
            Some(m) if held == 0 => m.remove(),
            Some(m) => {
                m.flush();
                info!(leases = held, "stopping with leases held: the next start runs a learning period")
            }
            None => {}
        }
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

    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).map_err(|e| ServeError::Tls(e.to_string()))?;
    }
    // Streams beyond max_streams_per_connection are refused by `StreamLimits` with a clear error; the
    // HTTP/2 limit sits a little higher so unary calls still fit beside them.
    let h2_streams = u32::try_from(cfg.limits.max_streams_per_connection)
        .unwrap_or(u32::MAX)
        .saturating_add(config::Limits::UNARY_STREAM_HEADROOM);
    let server = builder
        .max_concurrent_streams(h2_streams)
        // Pings find peers that vanished without a FIN (a dead host, a dropped NAT mapping).
        .http2_keepalive_interval(Some(net::KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(net::KEEPALIVE_TIMEOUT))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(slotd)
        .add_service(admin)
        // Our own accept loop: connection bound, handshake deadline, accept backoff, TCP_NODELAY
        // (see `net`).
        .serve_with_incoming_shutdown(net::incoming(listener, conn_limits, conn_counts), graceful);
    // The listener is bound (connections queue in its backlog until the first poll below), the pools
    // are loaded and the driver runs: ready.
    notify_systemd(ServiceState::Ready);
    let res = tokio::select! {
        res = server => res.map_err(ServeError::from),
        () = drain_deadline => {
            warn!(?drain, "connections still open after limits.drain_timeout; stopping anyway");
            Ok(())
        }
        // Without the driver every call would fail with "shutting down" while health said SERVING:
        // stop instead, so the process exits non-zero and its supervisor restarts it.
        e = driver_died => Err(e),
    };
    // Deposed: every stream was ended; exit so the supervisor starts a fresh standby.
    let res = match deposed.lock().ok().and_then(|mut d| d.take()) {
        Some(e) => res.and(Err(ServeError::Ha(e))),
        None => res,
    };
    if let Some(t) = metrics_task {
        t.abort();
    }
    res
}

/// What the service manager is told.
#[derive(Copy, Clone, Debug)]
enum ServiceState {
    /// Serving (systemd `READY=1`).
    Ready,
    /// Shutting down (systemd `STOPPING=1`).
    Stopping,
}

/// Tells systemd (`Type=notify`) about a state change; does nothing when `$NOTIFY_SOCKET` is unset,
/// that is, when not started by systemd as a notify service.
fn notify_systemd(state: ServiceState) {
    #[cfg(unix)]
    {
        let msg = match state {
            ServiceState::Ready => sd_notify::NotifyState::Ready,
            ServiceState::Stopping => sd_notify::NotifyState::Stopping,
        };
        if let Err(e) = sd_notify::notify(&[msg]) {
            warn!(?state, error = %e, "cannot notify the service manager ($NOTIFY_SOCKET)");
        }
    }
    #[cfg(not(unix))]
    let _ = state;
}

/// Where the pools served at startup came from.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum PoolSource {
    /// The state file (Admin changes, persisted).
    StateFile,
    /// The config file (or the embedded default).
    Config,
}

/// Waits for the driver's timer task to end, which only happens unexpectedly while serving (every gRPC
/// service holds a handle; it panics once a scheduler operation panicked under the lock): logs why,
/// turns health NOT_SERVING and returns the error `serve` reports.
///
/// # Cancel safety
/// Cancel safe: dropping it stops watching; the timer task is not affected.
async fn driver_stopped(task: tokio::task::JoinHandle<()>, health: HealthReporter) -> ServeError {
    let why = match task.await {
        Ok(()) => "it returned".to_owned(),
        Err(e) => match e.try_into_panic() {
            Ok(payload) => {
                let msg = payload
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(no message)".to_owned());
                format!("it panicked: {msg}")
            }
            Err(e) => format!("it was cancelled: {e}"),
        },
    };
    error!(reason = %why, "the scheduler task stopped; health NOT_SERVING, exiting so a supervisor restarts slotd");
    health.set_not_serving::<SlotdServer<SlotdService>>().await;
    health.set_not_serving::<AdminServer<AdminService>>().await;
    health.set_service_status("", ServingStatus::NotServing).await;
    ServeError::DriverStopped(why)
}

/// Refuses to serve beyond loopback while a service has no token, unless `allow_insecure_remote`.
fn check_exposure(cfg: &Config, addr: SocketAddr) -> Result<(), ServeError> {
    if addr.ip().is_loopback() || cfg.allow_insecure_remote {
        return Ok(());
    }
    let open: Vec<&str> = [("agent", &cfg.agent_token), ("admin", &cfg.admin_token)]
        .into_iter()
        .filter(|(_, t)| t.is_none())
        .map(|(name, _)| name)
        .collect();
    if open.is_empty() {
        return Ok(());
    }
    Err(ServeError::Insecure(format!(
        "refusing to listen on {addr}: no {} token is configured, so anyone who can reach it could use it; \
         set agent_token_file/admin_token_file (or $SLOTD_AGENT_TOKEN/$SLOTD_ADMIN_TOKEN), listen on \
         loopback, or pass --allow-insecure-remote (allow_insecure_remote = true)",
        open.join(" or ")
    )))
}

/// Reads the PEM certificate chain and key.
fn tls_config(cert: &std::path::Path, key: &std::path::Path) -> Result<ServerTlsConfig, ServeError> {
    let read = |what: &str, p: &std::path::Path| {
        std::fs::read(p).map_err(|e| ServeError::Tls(format!("cannot read {what} {}: {e}", p.display())))
    };
    let identity = Identity::from_pem(read("tls_cert", cert)?, read("tls_key", key)?);
    Ok(ServerTlsConfig::new().identity(identity))
}

#[cfg(test)]
mod tests {
    use tonic_health::{
        pb::{HealthCheckRequest, health_check_response::ServingStatus as Wire, health_server::Health},
        server::HealthService,
    };

    use super::*;

    async fn status(health: &HealthReporter, service: &str) -> i32 {
        let svc = HealthService::from_health_reporter(health.clone());
        let req = tonic::Request::new(HealthCheckRequest { service: service.into() });
        svc.check(req).await.expect("a known service").into_inner().status
    }

    /// A panicking (or returning) driver task turns health NOT_SERVING and becomes `serve`'s error,
    /// which `main` turns into a non-zero exit.
    #[tokio::test]
    async fn a_driver_that_stops_turns_health_not_serving_and_fails_serve() {
        for panics in [true, false] {
            let health = HealthReporter::new();
            health.set_serving::<SlotdServer<SlotdService>>().await;
            health.set_service_status("", ServingStatus::Serving).await;
            assert_eq!(status(&health, "").await, Wire::Serving as i32);
            let task = tokio::spawn(async move {
                if panics {
                    panic!("injected driver fault");
                }
            });
            let err = driver_stopped(task, health.clone()).await;
            let msg = err.to_string();
            assert!(matches!(err, ServeError::DriverStopped(_)), "{msg}");
            if panics {
                assert!(msg.contains("panicked: injected driver fault"), "{msg}");
            } else {
                assert!(msg.contains("returned"), "{msg}");
            }
            for service in ["", "slotd.v1.Slotd", "slotd.v1.Admin"] {
                assert_eq!(status(&health, service).await, Wire::NotServing as i32, "{service:?}");
            }
        }
    }
}
