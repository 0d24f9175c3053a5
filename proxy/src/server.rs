//! The accept loop: a bounded number of client connections (HTTP/1.1 and HTTP/2), each served by the
//! [`Proxy`](crate::proxy::Proxy); graceful shutdown lets in-flight streams finish up to a timeout.

use std::{future::Future, sync::Arc};

use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::{conn::auto, graceful::GracefulShutdown},
};
use tokio::{
    net::TcpListener,
    sync::{Semaphore, watch},
};

use crate::{
    config::{Config, ConfigError},
    daemon,
    fingerprint::Fingerprinter,
    metrics::Metrics,
    proxy::Proxy,
    upstream,
};

/// Why [`serve`] could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The configuration (or a file it names) is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Accepting connections failed.
    #[error("accept: {0}")]
    Io(#[from] std::io::Error),
}

/// Serves `config` on `listener` until `shutdown` resolves, then lets in-flight streams finish for at
/// most `shutdown_timeout` and flushes the last lease releases to the daemon.
///
/// # Cancel safety
/// Dropping the future stops accepting; connections already spawned run on, and their leases are
/// released as their bodies end or are dropped.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    config.validate()?;
    let files = config.load_files()?;
    let metrics = Metrics::new();
    let client = daemon::client(&config, &files).await?;
    let upstream =
        upstream::client(config.upstream_connect_timeout, config.system_roots, files.extra_ca.as_deref())?;
    let fingerprinter = files.fingerprint_key.as_deref().map(Fingerprinter::new);

    // The first probe runs before accepting, so that the first requests already know the daemon's state.
    let probe_pool = config
        .routes
        .values()
        .find_map(|r| r.pool.clone().or_else(|| r.credential_pools.values().next().cloned()))
        .unwrap_or_default();
    let first =
        daemon::probe_once(&client, &probe_pool, config.daemon_probe_interval.max(daemon::MIN_PROBE_TIMEOUT))
            .await;
    if !first {
        tracing::warn!(daemon = %config.daemon, "slotd does not answer yet");
    }
    let (up_tx, up_rx) = watch::channel(first);
    let probe = tokio::spawn(daemon::probe(
        client.clone(),
        probe_pool,
        config.daemon_probe_interval,
        up_tx,
        metrics.clone(),
    ));

    let proxy =
        Arc::new(Proxy::new(&config, client.clone(), upstream, metrics.clone(), up_rx, fingerprinter));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().max_buf_size(config.max_header_bytes).timer(hyper_util::rt::TokioTimer::new());
    builder
        .http2()
        .max_header_list_size(u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX))
        .timer(hyper_util::rt::TokioTimer::new());
    let connections = Arc::new(Semaphore::new(config.max_connections));
    let graceful = GracefulShutdown::new();
    // Set when the shutdown timeout ran out: every connection still open is dropped.
    let (cut_tx, cut_rx) = watch::channel(false);
    tracing::info!(
        listen = %listener.local_addr()?,
        daemon = %config.daemon,
        routes = config.routes.len(),
        "slotd-proxy serving"
    );

    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = connections.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors and the like: back off a little instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let svc = service_fn(move |req| proxy.clone().handle(req));
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), svc).into_owned());
        let metrics = metrics.clone();
        metrics.connections.inc();
        let mut cut = cut_rx.clone();
        tokio::spawn(async move {
            tokio::select! {
                r = conn => if let Err(e) = r {
                    tracing::debug!(peer = %peer, error = %e, "client connection ended with an error");
                },
                // Dropping the connection drops its response bodies: their leases go back as cancelled.
                _ = cut.wait_for(|c| *c) => {}
            }
            metrics.connections.dec();
            drop(permit);
        });
    }

    drop(listener);
    tracing::info!(timeout = ?config.shutdown_timeout, "shutting down: waiting for in-flight streams");
    if tokio::time::timeout(config.shutdown_timeout, graceful.shutdown()).await.is_err() {
        tracing::warn!("shutdown timeout: cutting the streams still running");
        let _ = cut_tx.send(true);
        // The cut connections end at their next poll; wait (bounded) so their releases are queued
        // before the session is closed.
        let all = u32::try_from(config.max_connections).unwrap_or(u32::MAX);
        let _ = tokio::time::timeout(CUT_GRACE, connections.acquire_many(all)).await;
    }
    probe.abort();
    if let Err(e) = client.close().await {
        tracing::warn!(error = %e, "closing the slotd session");
    }
    Ok(())
}

/// How long cut connections get to drop their streams after the shutdown timeout.
pub const CUT_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Pause after a failed accept.
pub const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(50);
