//! Raw generated-client plumbing: connections, Acquire streams and the few messages the bench sends.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt, stream};
use slotd_proto::v1::{
    self as pb, client_message::Msg as Up, server_message::Msg as Down, slotd_client::SlotdClient,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::BoxError;

/// One HTTP/2 connection to the daemon (a new TCP connection per call).
pub async fn connect(endpoint: &str) -> Result<Channel, BoxError> {
    Ok(Endpoint::from_shared(endpoint.to_owned())?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await?)
}

/// One Acquire stream: a daemon session.
pub struct Session {
    /// Messages up.
    pub tx: mpsc::Sender<pb::ClientMessage>,
    /// Messages down.
    pub rx: tonic::Streaming<pb::ServerMessage>,
}

impl Session {
    /// Opens an Acquire stream on `ch`.
    pub async fn open(ch: Channel) -> Result<Self, BoxError> {
        let (tx, up) = mpsc::channel(16);
        let rx = SlotdClient::new(ch).acquire(ReceiverStream::new(up)).await?.into_inner();
        Ok(Self { tx, rx })
    }

    /// Sends one message up.
    pub async fn send(&self, msg: Up) -> Result<(), BoxError> {
        self.tx.send(pb::ClientMessage { msg: Some(msg) }).await.map_err(|_| "acquire stream closed".into())
    }

    /// The next message down; an ended stream is an error.
    pub async fn next(&mut self) -> Result<Down, BoxError> {
        match self.rx.message().await? {
            Some(pb::ServerMessage { msg: Some(m) }) => Ok(m),
            Some(_) => Err("empty server message".into()),
            None => Err("acquire stream ended".into()),
        }
    }

    /// Waits for the answer to request `id`: `Ok(Some(lease))` when granted, `Ok(None)` when queued
    /// (only if `stop_at_queued`). Other sessions' traffic (Released, Paused, ...) is skipped.
    pub async fn answer(&mut self, id: &str, stop_at_queued: bool) -> Result<Option<String>, BoxError> {
        loop {
            match self.next().await? {
                Down::Granted(g) if g.request_id == id => return Ok(Some(g.lease_id)),
                Down::Queued(q) if stop_at_queued && q.request_id == id => return Ok(None),
                Down::Rejected(r) if r.request_id == id => {
                    return Err(format!("request rejected: code {} {}", r.code, r.message).into());
                }
                Down::Expired(e) => {
                    return Err(format!("lease expired during the bench: {}", e.message).into());
                }
                _ => {}
            }
        }
    }

    /// Waits for `Released` of `lease`.
    pub async fn released(&mut self, lease: &str) -> Result<(), BoxError> {
        loop {
            match self.next().await? {
                Down::Released(r) if r.lease_id == lease => return Ok(()),
                Down::LeaseError(e) => return Err(format!("release refused: {}", e.message).into()),
                _ => {}
            }
        }
    }
}

/// A LeaseRequest for `pool`.
pub fn request(id: &str, pool: &str, ttl: Option<Duration>) -> Up {
    Up::Request(pb::LeaseRequest {
        request_id: id.to_owned(),
        pool: pool.to_owned(),
        ttl: ttl.and_then(|d| prost_types::Duration::try_from(d).ok()),
        holder: "slotd-bench".to_owned(),
        ..Default::default()
    })
}

/// A Release with outcome OK.
pub fn release(lease_id: String) -> Up {
    Up::Release(pb::ReleaseLease { lease_id, outcome: pb::Outcome::Ok as i32, ..Default::default() })
}

/// Takes every free slot of `pool` on one session (so that later requests queue), with leases that
/// live `ttl`. Returns the session (keep it open) and how many slots it took.
pub async fn fill_pool(endpoint: &str, pool: &str, ttl: Duration) -> Result<(Session, u32), BoxError> {
    let mut s = Session::open(connect(endpoint).await?).await?;
    for i in 0u32.. {
        let id = format!("fill-{i}");
        s.send(request(&id, pool, Some(ttl))).await?;
        if s.answer(&id, true).await?.is_none() {
            s.send(Up::Cancel(pb::CancelRequest { request_id: id })).await?;
            return Ok((s, i));
        }
    }
    unreachable!()
}

/// Opens `n` sessions, `per_conn` of them per HTTP/2 connection, and has each queue one request on
/// `pool` (returns once every one has seen `Queued`). Connections are opened `parallel` at a time.
pub async fn queued_sessions(
    endpoint: &str,
    pool: &str,
    n: usize,
    per_conn: usize,
    parallel: usize,
) -> Result<Vec<Session>, BoxError> {
    let per_conn = per_conn.max(1);
    let groups: Vec<usize> = (0..n.div_ceil(per_conn)).map(|g| per_conn.min(n - g * per_conn)).collect();
    let sessions: Vec<Vec<Session>> = stream::iter(groups)
        .map(|k| async move {
            let ch = connect(endpoint).await?;
            let mut out = Vec::with_capacity(k);
            for _ in 0..k {
                let mut s = Session::open(ch.clone()).await?;
                s.send(request("w", pool, None)).await?;
                if s.answer("w", true).await?.is_some() {
                    return Err::<_, BoxError>("a waiter was granted: the pool was not full".into());
                }
                out.push(s);
            }
            Ok(out)
        })
        .buffer_unordered(parallel.max(1))
        .try_collect()
        .await?;
    Ok(sessions.into_iter().flatten().collect())
}
