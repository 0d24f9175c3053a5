//! The connection to slotd: one `slotd-client` session for every route, and a probe that tells the
//! routes whether the daemon answers (for `on_daemon_down`).

use std::time::Duration;

use slotd_client::{Client, Error};
use tokio::sync::watch;

use crate::config::{Config, ConfigError, Files};

/// First reconnect delay of the session to the daemon.
pub const RECONNECT_INITIAL: Duration = Duration::from_millis(50);
/// Longest reconnect delay: a daemon that comes back is used again within about this long.
pub const RECONNECT_MAX: Duration = Duration::from_secs(1);

/// A client whose connections are made lazily: the proxy starts (and fails open or closed) while the
/// daemon is down. With several daemon addresses (the members of a highly available deployment) the
/// session follows the leader: a standby's `slotd-leader` redirect is followed at once, a member
/// that is down is skipped, and after a failover the leases of requests in flight are re-presented
/// to the new leader, so their streams keep their slots.
///
/// # Cancel safety
/// Cancel safe: nothing is started until it returns.
pub async fn client(cfg: &Config, files: &Files) -> Result<Client, ConfigError> {
    let mut builder =
        Client::builder().holder(cfg.holder.clone()).reconnect_backoff(RECONNECT_INITIAL, RECONNECT_MAX);
    if let Some(ca) = &files.daemon_ca {
        builder = builder.tls(ca.clone());
    }
    if let Some(t) = &files.token {
        builder = builder.bearer_token(t.clone());
    }
    builder.connect_any(cfg.daemon.0.clone()).await.map_err(|e| ConfigError::Invalid(format!("daemon: {e}")))
}

/// True when an answer (or its absence) means the daemon is unreachable. A standby's refusal never
/// gets here on its own: the client follows it to the leader and answers with the leader's reply, so
/// "a standby answered, the leader is elsewhere" counts as reachable once the leader answers.
pub fn is_down(e: &Error) -> bool {
    match e {
        Error::Transport(_) | Error::SessionClosed => true,
        // An answer with retry info (a circuit breaker open with `when_open = "fail_fast"`) comes
        // from a live daemon, whatever its code.
        Error::Rejected { retry_after: Some(_), .. } => false,
        // A transport failure, or a daemon that is shutting down.
        _ => {
            matches!(e.code(), Some(tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled))
        }
    }
}

/// The least time one probe may take: a loaded daemon (or a first connection) is not "down" because
/// it answered in more than a short probe interval.
pub const MIN_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// One probe: true when the daemon answers (any answer but a transport failure), within `timeout`.
///
/// # Cancel safety
/// Cancel safe: a read-only call.
pub async fn probe_once(client: &Client, pool: &str, timeout: Duration) -> bool {
    match tokio::time::timeout(timeout, client.status(Some(pool))).await {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => !is_down(&e),
        Err(_) => false,
    }
}

/// Probes the daemon every `every` (each probe bounded by `every`, at least [`MIN_PROBE_TIMEOUT`])
/// and publishes whether it answers; the first probe is `first`'s result, already taken.
///
/// # Cancel safety
/// Cancel safe: dropping it stops probing; the last published state stays.
pub async fn probe(
    client: Client,
    pool: String,
    every: Duration,
    up: watch::Sender<bool>,
    metrics: crate::metrics::Metrics,
) {
    let timeout = every.max(MIN_PROBE_TIMEOUT);
    let mut last = *up.borrow();
    metrics.daemon_up.set(i64::from(last));
    loop {
        tokio::time::sleep(every).await;
        let ok = probe_once(&client, &pool, timeout).await;
        if last != ok {
            if ok {
                tracing::info!("slotd answers again");
            } else {
                tracing::warn!("slotd does not answer");
            }
            last = ok;
        }
        metrics.daemon_up.set(i64::from(ok));
        up.send_if_modified(|v| std::mem::replace(v, ok) != ok);
        if up.is_closed() {
            return;
        }
    }
}
