//! The session task: owns a client's one Acquire stream, its requests and leases, and reconnects.
//!
//! Handles ([`Client`](crate::Client), acquire futures, [`Lease`]s) talk to the task only through an
//! unbounded command channel, so nothing outside the task ever awaits the network to give a slot back.
//! The task's tables (`pending`, `leases`) are the truth: after a reconnect the stream is rebuilt from
//! them (resume every lease, re-send every queued request), so a message lost with the old stream
//! never matters.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::Arc,
    time::{Duration, SystemTime},
};

use rand::Rng;
use slotd_proto::v1::{
    self as pb, ClientMessage, ServerMessage, client_message, server_message, slotd_client::SlotdClient,
};
use tokio::{
    sync::{mpsc, oneshot, watch},
    time::{Instant, sleep_until},
};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Streaming, metadata::AsciiMetadataValue, transport::Channel};

use crate::{Error, Lease, Lost, Outcome, lease::Shared};

/// What an acquire asks for; kept until granted so it can be re-sent after a reconnect.
#[derive(Debug, Clone)]
pub(crate) struct RequestSpec {
    pub(crate) pool: String,
    pub(crate) priority: Option<u32>,
    pub(crate) started_at: SystemTime,
    pub(crate) ttl: Option<Duration>,
    pub(crate) max_wait: Option<Duration>,
    pub(crate) holder: String,
}

/// A message from a handle to the session task.
#[derive(Debug)]
pub(crate) enum Command {
    /// Queue a request; the answer is a lease or the rejection.
    Acquire { request_id: String, spec: RequestSpec, reply: oneshot::Sender<Result<Lease, Error>> },
    /// The acquire future was dropped before its answer.
    Cancel { request_id: String },
    /// Give a lease back.
    Release { lease_id: String, outcome: Outcome, reply: Option<oneshot::Sender<Result<(), Error>>> },
}

/// A pool's pause, as pushed by the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PauseInfo {
    /// When the pause ends.
    pub until: SystemTime,
    /// Why, for example "rate limited (429) reported by release of lease ...".
    pub reason: String,
}

/// The pause state of every pool this client waits on or holds, by pool name.
pub type Pauses = HashMap<String, PauseInfo>;

/// Reconnect delays: exponential from `initial` to `max`, each with full jitter.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Backoff {
    pub(crate) initial: Duration,
    pub(crate) max: Duration,
}

/// Everything the task needs from the builder.
#[derive(Debug, Clone)]
pub(crate) struct SessionConfig {
    pub(crate) grpc: SlotdClient<Channel>,
    pub(crate) auth: Option<AsciiMetadataValue>,
    pub(crate) resume_grace: Option<Duration>,
    pub(crate) heartbeat_interval: Option<Duration>,
    pub(crate) backoff: Backoff,
}

/// Header that asks the daemon to keep this stream's leases for a while after it closes.
pub(crate) use slotd_proto::RESUME_GRACE_HEADER;
/// How long opening the stream may take before it counts as a failed attempt.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// After the last handle is gone, how long to wait for outstanding releases to be acknowledged.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// Heartbeats are never sent more often than this, whatever the TTL.
const MIN_HEARTBEAT: Duration = Duration::from_millis(5);

#[derive(Debug)]
struct Pending {
    spec: RequestSpec,
    reply: oneshot::Sender<Result<Lease, Error>>,
    /// When the acquire was made, to shorten `max_wait` when re-sending.
    created: Instant,
}

#[derive(Debug)]
enum State {
    /// Held on the current stream.
    Held,
    /// Resume sent (or to be sent once connected); not yet confirmed.
    Resuming,
    /// Release sent on the current stream.
    Releasing { outcome: Outcome, reply: Option<oneshot::Sender<Result<(), Error>>> },
    /// The holder released it while it still needed a resume: resume, then release.
    ResumingThenReleasing { outcome: Outcome, reply: Option<oneshot::Sender<Result<(), Error>>> },
}

#[derive(Debug)]
struct Held {
    shared: Arc<Shared>,
    priority: Option<u32>,
    holder: String,
    state: State,
}

enum Exit {
    /// The stream broke: reconnect.
    Disconnected,
    /// Every handle is gone and nothing is left to flush.
    Done,
}

pub(crate) struct Session {
    cfg: SessionConfig,
    cmd_rx: mpsc::UnboundedReceiver<Command>,
    /// Weak, so that the task alone does not keep the command channel open.
    cmd_tx: mpsc::WeakUnboundedSender<Command>,
    pending: HashMap<String, Pending>,
    /// Requests cancelled on the current stream whose answer has not come yet: a grant for one of
    /// them is released at once.
    cancelling: HashSet<String>,
    leases: HashMap<String, Held>,
    pauses: watch::Sender<Pauses>,
    /// The current stream's sender; `None` while disconnected.
    out: Option<mpsc::UnboundedSender<ClientMessage>>,
    next_heartbeat: Option<Instant>,
    /// Send times of heartbeats not yet acknowledged (to move `expires_at` on each ack).
    heartbeats_sent: VecDeque<SystemTime>,
    /// Every handle is gone.
    closed: bool,
}

impl Session {
    pub(crate) fn new(
        cfg: SessionConfig,
        cmd_rx: mpsc::UnboundedReceiver<Command>,
        cmd_tx: mpsc::WeakUnboundedSender<Command>,
        pauses: watch::Sender<Pauses>,
    ) -> Self {
        Session {
            cfg,
            cmd_rx,
            cmd_tx,
            pending: HashMap::new(),
            cancelling: HashSet::new(),
            leases: HashMap::new(),
            pauses,
            out: None,
            next_heartbeat: None,
            heartbeats_sent: VecDeque::new(),
            closed: false,
        }
    }

    /// Runs until every handle is gone: connect, serve the stream, and reconnect when it breaks.
    pub(crate) async fn run(mut self) {
        let mut backoff = self.cfg.backoff.initial;
        loop {
            match tokio::time::timeout(OPEN_TIMEOUT, self.open()).await {
                Ok(Ok(inbound)) => {
                    backoff = self.cfg.backoff.initial;
                    tracing::debug!(
                        leases = self.leases.len(),
                        pending = self.pending.len(),
                        "slotd stream open"
                    );
                    self.resync();
                    match self.serve(inbound).await {
                        Exit::Done => return,
                        Exit::Disconnected => self.on_disconnect(),
                    }
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "slotd stream failed to open"),
                Err(_) => tracing::debug!("slotd stream open timed out"),
            }
            if self.closed {
                // Nobody is left to use a reconnect; the daemon reclaims what the old stream held.
                return;
            }
            // Full jitter: spread reconnecting clients over the whole window.
            let delay = rand::rng().random_range(Duration::ZERO..=backoff);
            backoff = (backoff * 2).min(self.cfg.backoff.max);
            tracing::debug!(?delay, "slotd reconnecting");
            let wake = Instant::now() + delay;
            while !self.closed {
                tokio::select! {
                    cmd = self.cmd_rx.recv() => self.on_command_or_close(cmd),
                    _ = sleep_until(wake) => break,
                }
            }
            if self.closed {
                return;
            }
        }
    }

    async fn open(&mut self) -> Result<Streaming<ServerMessage>, Error> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut req = tonic::Request::new(UnboundedReceiverStream::new(rx));
        if let Some(auth) = &self.cfg.auth {
            req.metadata_mut().insert("authorization", auth.clone());
        }
        if let Some(grace) = self.cfg.resume_grace {
            let v = humantime::format_duration(grace).to_string();
            if let Ok(v) = AsciiMetadataValue::try_from(v) {
                req.metadata_mut().insert(RESUME_GRACE_HEADER, v);
            }
        }
        let inbound = self.cfg.grpc.clone().acquire(req).await?.into_inner();
        self.out = Some(tx);
        Ok(inbound)
    }

    /// Serves one open stream until it breaks or every handle is gone.
    async fn serve(&mut self, mut inbound: Streaming<ServerMessage>) -> Exit {
        let mut flush_deadline: Option<Instant> = None;
        loop {
            if self.closed {
                if !self.releasing() {
                    return Exit::Done;
                }
                flush_deadline.get_or_insert_with(|| Instant::now() + FLUSH_TIMEOUT);
            }
            let heartbeat = self.next_heartbeat;
            tokio::select! {
                cmd = self.cmd_rx.recv(), if !self.closed => self.on_command_or_close(cmd),
                msg = inbound.message() => match msg {
                    Ok(Some(msg)) => self.on_message(msg),
                    Ok(None) => {
                        tracing::debug!("slotd stream ended by the daemon");
                        return Exit::Disconnected;
                    }
                    Err(status) => {
                        tracing::debug!(%status, "slotd stream broke");
                        return Exit::Disconnected;
                    }
                },
                _ = sleep_until(heartbeat.unwrap_or_else(Instant::now)), if heartbeat.is_some() => {
                    self.heartbeat();
                }
                _ = sleep_until(flush_deadline.unwrap_or_else(Instant::now)), if flush_deadline.is_some() => {
                    return Exit::Done;
                }
            }
        }
    }

    fn releasing(&self) -> bool {
        self.leases
            .values()
            .any(|h| matches!(h.state, State::Releasing { .. } | State::ResumingThenReleasing { .. }))
    }

    fn send(&self, msg: client_message::Msg) {
        if let Some(out) = &self.out {
            // A failed send means the stream is closing; resync rebuilds everything from the tables.
            let _ = out.send(ClientMessage { msg: Some(msg) });
        }
    }

    fn on_command_or_close(&mut self, cmd: Option<Command>) {
        match cmd {
            Some(cmd) => self.on_command(cmd),
            None => self.closed = true,
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Acquire { request_id, spec, reply } => {
                let created = Instant::now();
                self.send(request_msg(&request_id, &spec, None));
                self.pending.insert(request_id, Pending { spec, reply, created });
            }
            Command::Cancel { request_id } => {
                if self.pending.remove(&request_id).is_some() && self.out.is_some() {
                    self.send(client_message::Msg::Cancel(pb::CancelRequest {
                        request_id: request_id.clone(),
                    }));
                    self.cancelling.insert(request_id);
                }
                // Not pending: it was granted already and its lease (dropped with the future's
                // channel) releases itself; or we are disconnected and the daemon forgot it.
            }
            Command::Release { lease_id, outcome, reply } => self.release(lease_id, outcome, reply),
        }
    }

    fn release(
        &mut self,
        lease_id: String,
        outcome: Outcome,
        reply: Option<oneshot::Sender<Result<(), Error>>>,
    ) {
        let connected = self.out.is_some();
        let Some(held) = self.leases.get_mut(&lease_id) else {
            if let Some(reply) = reply {
                let _ = reply.send(Err(Error::Lease {
                    lease_id,
                    code: tonic::Code::FailedPrecondition,
                    message: "lease already ended".into(),
                }));
            }
            return;
        };
        let send_now = match std::mem::replace(&mut held.state, State::Held) {
            State::Held => {
                held.state = State::Releasing { outcome, reply };
                connected
            }
            State::Resuming => {
                // The resume (already sent, or sent on reconnect) goes first; the release follows it.
                held.state = State::ResumingThenReleasing { outcome, reply };
                connected
            }
            other @ (State::Releasing { .. } | State::ResumingThenReleasing { .. }) => {
                held.state = other;
                if let Some(reply) = reply {
                    let _ = reply.send(Err(Error::Lease {
                        lease_id: lease_id.clone(),
                        code: tonic::Code::FailedPrecondition,
                        message: "lease is already being released".into(),
                    }));
                }
                false
            }
        };
        if send_now {
            self.send(release_msg(&lease_id, outcome));
        }
    }

    fn on_message(&mut self, msg: ServerMessage) {
        use server_message::Msg;
        let Some(msg) = msg.msg else { return };
        match msg {
            Msg::Queued(q) => {
                tracing::trace!(request_id = q.request_id, position = q.position, "queued");
            }
            Msg::Granted(g) => self.on_granted(g),
            Msg::Rejected(r) => self.on_rejected(r),
            Msg::Paused(p) => {
                let until = p
                    .until
                    .and_then(|t| SystemTime::try_from(t).ok())
                    .or_else(|| {
                        p.remaining.and_then(|d| Duration::try_from(d).ok()).map(|d| SystemTime::now() + d)
                    })
                    .unwrap_or_else(SystemTime::now);
                self.pauses.send_modify(|m| {
                    let now = SystemTime::now();
                    m.retain(|_, p| p.until > now);
                    m.insert(p.pool, PauseInfo { until, reason: p.reason });
                });
            }
            Msg::Resumed(r) => {
                self.pauses.send_if_modified(|m| m.remove(&r.pool).is_some());
            }
            Msg::Expired(e) => self.on_expired(e),
            Msg::Released(r) => {
                if let Some(Held {
                    state:
                        State::Releasing { reply: Some(reply), .. }
                        | State::ResumingThenReleasing { reply: Some(reply), .. },
                    ..
                }) = self.leases.remove(&r.lease_id)
                {
                    let _ = reply.send(Ok(()));
                }
                self.reschedule_heartbeat();
            }
            Msg::LeaseError(e) => self.on_lease_error(e),
            Msg::LeaseResumed(r) => {
                if let Some(held) = self.leases.get_mut(&r.lease_id) {
                    if let Some(t) = r.expires_at.and_then(|t| SystemTime::try_from(t).ok()) {
                        held.shared.set_expires_at(t);
                    }
                    held.state = match std::mem::replace(&mut held.state, State::Held) {
                        State::Resuming => State::Held,
                        State::ResumingThenReleasing { outcome, reply } => {
                            State::Releasing { outcome, reply }
                        }
                        other => other,
                    };
                }
            }
            Msg::Cancelled(c) => {
                self.cancelling.remove(&c.request_id);
            }
            Msg::HeartbeatAck(_) => {
                if let Some(sent) = self.heartbeats_sent.pop_front() {
                    for held in self.leases.values() {
                        if matches!(held.state, State::Held) {
                            held.shared.set_expires_at(sent + held.shared.ttl);
                        }
                    }
                }
            }
        }
    }

    fn on_granted(&mut self, g: pb::Granted) {
        let ttl = g.ttl.and_then(|d| Duration::try_from(d).ok()).unwrap_or(Duration::from_secs(30));
        let expires_at = g
            .expires_at
            .and_then(|t| SystemTime::try_from(t).ok())
            .unwrap_or_else(|| SystemTime::now() + ttl);
        let shared = Shared::new(g.lease_id.clone(), g.pool.clone(), g.fencing_token, ttl, expires_at);
        let pending = self.pending.remove(&g.request_id);
        let owner = pending.as_ref().and_then(|_| self.cmd_tx.upgrade());
        let (priority, holder) =
            pending.as_ref().map(|p| (p.spec.priority, p.spec.holder.clone())).unwrap_or_default();
        match (pending, owner) {
            (Some(p), Some(tx)) => {
                self.leases.insert(
                    g.lease_id.clone(),
                    Held { shared: shared.clone(), priority, holder, state: State::Held },
                );
                // If the acquire future is gone, the lease comes back here and its drop releases it.
                let _ = p.reply.send(Ok(Lease::new(shared, tx)));
            }
            _ => {
                // Granted while (or after) its acquire was cancelled: the slot goes straight back.
                self.cancelling.remove(&g.request_id);
                tracing::debug!(
                    request_id = g.request_id,
                    lease_id = g.lease_id,
                    "releasing a grant nobody waits for"
                );
                self.leases.insert(
                    g.lease_id.clone(),
                    Held {
                        shared,
                        priority,
                        holder,
                        state: State::Releasing { outcome: Outcome::Cancelled, reply: None },
                    },
                );
                self.send(release_msg(&g.lease_id, Outcome::Cancelled));
            }
        }
        self.reschedule_heartbeat();
    }

    fn on_rejected(&mut self, r: pb::Rejected) {
        if self.cancelling.remove(&r.request_id) {
            return;
        }
        let code = tonic::Code::from_i32(r.code);
        if code == tonic::Code::Unavailable && self.pending.contains_key(&r.request_id) {
            // The daemon is shutting down: keep waiting and re-send on the next stream.
            return;
        }
        if let Some(p) = self.pending.remove(&r.request_id) {
            let _ = p.reply.send(Err(Error::Rejected {
                code,
                message: r.message,
                retry_after: r.retry_after.and_then(|d| Duration::try_from(d).ok()),
            }));
        }
    }

    fn on_expired(&mut self, e: pb::Expired) {
        let reason = pb::ExpiryReason::try_from(e.reason).unwrap_or_default();
        if reason == pb::ExpiryReason::Shutdown {
            // The daemon is going away; the lease may come back through a resume once it restarts.
            return;
        }
        let Some(held) = self.leases.remove(&e.lease_id) else {
            return;
        };
        let lost = match reason {
            pb::ExpiryReason::Revoked | pb::ExpiryReason::PoolRemoved => Lost::Revoked(e.message),
            _ => Lost::Expired(e.message),
        };
        held.shared.mark_lost(lost.clone());
        if let State::Releasing { reply: Some(reply), .. }
        | State::ResumingThenReleasing { reply: Some(reply), .. } = held.state
        {
            let _ = reply.send(Err(Error::Lost { lease_id: e.lease_id, reason: lost }));
        }
        self.reschedule_heartbeat();
    }

    fn on_lease_error(&mut self, e: pb::LeaseError) {
        let code = tonic::Code::from_i32(e.code);
        let Some(held) = self.leases.get_mut(&e.lease_id) else {
            return;
        };
        match std::mem::replace(&mut held.state, State::Held) {
            State::Held => {
                // Only a targeted heartbeat could cause this; the client sends none.
                tracing::warn!(lease_id = e.lease_id, message = e.message, "unexpected lease error");
            }
            State::Resuming => {
                let held = self.leases.remove(&e.lease_id).expect("looked up above");
                held.shared.mark_lost(Lost::ResumeFailed(e.message));
            }
            State::ResumingThenReleasing { reply, .. } => {
                // The release queued behind this resume fails too; the slot is gone either way.
                let held = self.leases.remove(&e.lease_id).expect("looked up above");
                let lost = Lost::ResumeFailed(e.message);
                held.shared.mark_lost(lost.clone());
                if let Some(reply) = reply {
                    let _ = reply.send(Err(Error::Lost { lease_id: e.lease_id, reason: lost }));
                }
            }
            State::Releasing { reply, .. } => {
                let held = self.leases.remove(&e.lease_id).expect("looked up above");
                held.shared.mark_lost(Lost::Expired(e.message.clone()));
                if let Some(reply) = reply {
                    let _ = reply.send(Err(Error::Lease { lease_id: e.lease_id, code, message: e.message }));
                }
            }
        }
        self.reschedule_heartbeat();
    }

    fn heartbeat_interval(&self) -> Option<Duration> {
        let min_ttl = self.leases.values().map(|h| h.shared.ttl).min()?;
        Some(self.cfg.heartbeat_interval.unwrap_or(min_ttl / 3).max(MIN_HEARTBEAT))
    }

    /// Makes sure the next heartbeat comes within a third of the shortest TTL held.
    fn reschedule_heartbeat(&mut self) {
        match self.heartbeat_interval() {
            None => self.next_heartbeat = None,
            Some(every) => {
                let due = Instant::now() + every;
                self.next_heartbeat = Some(self.next_heartbeat.map_or(due, |n| n.min(due)));
            }
        }
    }

    fn heartbeat(&mut self) {
        self.next_heartbeat = None;
        if self.out.is_none() || self.leases.is_empty() {
            return;
        }
        self.heartbeats_sent.push_back(SystemTime::now());
        self.send(client_message::Msg::Heartbeat(pb::Heartbeat { lease_ids: Vec::new() }));
        self.reschedule_heartbeat();
    }

    /// The stream broke: every lease needs a resume, and the daemon forgot our queued requests.
    fn on_disconnect(&mut self) {
        self.out = None;
        self.cancelling.clear();
        self.heartbeats_sent.clear();
        self.next_heartbeat = None;
        for held in self.leases.values_mut() {
            held.state = match std::mem::replace(&mut held.state, State::Held) {
                State::Held | State::Resuming => State::Resuming,
                State::Releasing { outcome, reply } | State::ResumingThenReleasing { outcome, reply } => {
                    State::ResumingThenReleasing { outcome, reply }
                }
            };
        }
    }

    /// A new stream is open: resume every lease first, then re-send every queued request.
    fn resync(&mut self) {
        for (lease_id, held) in &self.leases {
            let resume = client_message::Msg::Resume(pb::ResumeLease {
                lease_id: lease_id.clone(),
                fencing_token: held.shared.fencing_token,
                pool: held.shared.pool.clone(),
                priority: held.priority,
                ttl: prost_types::Duration::try_from(held.shared.ttl).ok(),
                holder: held.holder.clone(),
            });
            match &held.state {
                State::Resuming => self.send(resume),
                State::ResumingThenReleasing { outcome, .. } => {
                    self.send(resume);
                    self.send(release_msg(lease_id, *outcome));
                }
                State::Held | State::Releasing { .. } => {}
            }
        }
        // Oldest first; the daemon orders by `started_at` anyway, which the requests keep.
        let mut pending: Vec<_> = self.pending.iter().collect();
        pending.sort_by_key(|(_, p)| p.created);
        for (request_id, p) in pending {
            let waited = p.created.elapsed();
            self.send(request_msg(request_id, &p.spec, Some(waited)));
        }
        self.reschedule_heartbeat();
    }
}

fn request_msg(request_id: &str, spec: &RequestSpec, waited: Option<Duration>) -> client_message::Msg {
    let max_wait = spec.max_wait.map(|w| w.saturating_sub(waited.unwrap_or_default()));
    client_message::Msg::Request(pb::LeaseRequest {
        request_id: request_id.to_owned(),
        pool: spec.pool.clone(),
        priority: spec.priority,
        started_at: Some(prost_types::Timestamp::from(spec.started_at)),
        ttl: spec.ttl.and_then(|d| prost_types::Duration::try_from(d).ok()),
        max_wait: max_wait.and_then(|d| prost_types::Duration::try_from(d).ok()),
        holder: spec.holder.clone(),
    })
}

fn release_msg(lease_id: &str, outcome: Outcome) -> client_message::Msg {
    let (outcome, retry_after) = match outcome {
        Outcome::Ok => (pb::Outcome::Ok, None),
        Outcome::Error => (pb::Outcome::Error, None),
        Outcome::Cancelled => (pb::Outcome::Cancelled, None),
        Outcome::RateLimited { retry_after } => (pb::Outcome::RateLimited, retry_after),
    };
    client_message::Msg::Release(pb::ReleaseLease {
        lease_id: lease_id.to_owned(),
        outcome: outcome as i32,
        retry_after: retry_after.and_then(|d| prost_types::Duration::try_from(d).ok()),
    })
}
