//! The connection task: owns the `Acquire` stream, reconnects with backoff, runs the heartbeat timer,
//! and feeds the [`Machine`] with what arrives from handles and from the daemon.
//!
//! Handles ([`Client`](crate::Client), acquire futures, [`Lease`]s) talk to the task only through an
//! unbounded command channel, so nothing outside the task ever awaits the network to give a slot back.
//! The task keeps what the machine must not: the reply channels of waiting acquires and releases, and
//! the shared cell behind each lease guard.

use std::{collections::HashMap, sync::Arc, time::Duration};

use rand::Rng;
use slotd_proto::{
    RESUME_GRACE_HEADER,
    v1::{ClientMessage, ServerMessage, slotd_client::SlotdClient},
};
use tokio::{
    sync::{mpsc, oneshot, watch},
    time::{Instant, sleep_until},
};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Streaming, metadata::AsciiMetadataValue};

use super::{
    machine::{Input, Machine, Notify, Now, Pauses, Ticket},
    wire,
};
use crate::{
    AuthChannel, Error, Lease, Lost, Outcome,
    command::Command,
    lease::Shared,
    members::{ELECTION_RETRY_MAX, Members, Retry},
};

/// How long opening the stream may take before it counts as a failed attempt.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// Reconnect delays: exponential from `initial` to `max`, each with full jitter.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Backoff {
    pub(crate) initial: Duration,
    pub(crate) max: Duration,
}

/// Everything the task needs from the builder.
#[derive(Debug, Clone)]
pub(crate) struct SessionConfig {
    /// The daemon (or, with high availability, the members) to open streams on; the token rides in
    /// the channels' interceptor.
    pub(crate) members: Members,
    pub(crate) resume_grace: Option<Duration>,
    pub(crate) heartbeat_interval: Option<Duration>,
    pub(crate) backoff: Backoff,
    /// After the last handle is gone, how long to wait for outstanding releases to be acknowledged.
    pub(crate) close_timeout: Duration,
}

enum Exit {
    /// The stream broke: reconnect.
    Disconnected,
    /// The session is closing and nothing is left to flush (or its deadline passed).
    Done,
}

pub(crate) struct Session {
    cfg: SessionConfig,
    cmd_rx: mpsc::UnboundedReceiver<Command<Lease>>,
    /// Weak, so that the task alone does not keep the command channel open.
    cmd_tx: mpsc::WeakUnboundedSender<Command<Lease>>,
    /// Every sender is gone: nothing more can arrive on `cmd_rx`.
    handles_gone: bool,
    machine: Machine,
    /// Acquires waiting for their answer, by request id.
    acquirers: HashMap<String, oneshot::Sender<Result<Lease, Error>>>,
    /// Releases waiting for their answer.
    releases: HashMap<Ticket, oneshot::Sender<Result<(), Error>>>,
    next_ticket: Ticket,
    /// The cell behind each lease the machine holds.
    shared: HashMap<String, Arc<Shared>>,
    pauses: watch::Sender<Pauses>,
    /// The current stream's sender; `None` while disconnected.
    out: Option<mpsc::UnboundedSender<ClientMessage>>,
    /// Once closing: when to stop waiting for the daemon's answers.
    close_deadline: Option<Instant>,
    /// `close()` calls waiting for the flush to end.
    closers: Vec<oneshot::Sender<Result<(), Error>>>,
}

impl Session {
    pub(crate) fn new(
        cfg: SessionConfig,
        cmd_rx: mpsc::UnboundedReceiver<Command<Lease>>,
        cmd_tx: mpsc::WeakUnboundedSender<Command<Lease>>,
        pauses: watch::Sender<Pauses>,
    ) -> Self {
        Session {
            machine: Machine::new(cfg.heartbeat_interval),
            cfg,
            cmd_rx,
            cmd_tx,
            handles_gone: false,
            acquirers: HashMap::new(),
            releases: HashMap::new(),
            next_ticket: 0,
            shared: HashMap::new(),
            pauses,
            out: None,
            close_deadline: None,
            closers: Vec::new(),
        }
    }

    /// Runs until the session closes (an explicit close, or every handle gone) and its releases are
    /// flushed: connect, serve the stream, and reconnect when it breaks.
    ///
    /// # Cancel safety
    /// Meant to be spawned and run to the end. Dropping it drops every waiting acquire, release and
    /// close (they answer [`Error::SessionClosed`]); the daemon reclaims what the stream held.
    pub(crate) async fn run(mut self) {
        let mut backoff = self.cfg.backoff.initial;
        let mut wake = None;
        while let Some(inbound) = self.connect(&mut wake, &mut backoff).await {
            backoff = self.cfg.backoff.initial;
            let (leases, pending) = self.machine.counts();
            tracing::debug!(leases, pending, "slotd stream open");
            self.feed(Input::Connected);
            match self.serve(inbound).await {
                Exit::Done => break,
                Exit::Disconnected => {
                    self.out = None;
                    self.feed(Input::Disconnected);
                    // The first attempt after a working stream goes at once.
                    wake = None;
                }
            }
        }
        self.finish();
    }

    /// True when a closing session has nothing left to do, or no time left to do it in.
    fn done(&self) -> bool {
        self.machine.is_finished() || self.close_deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// Opens a stream, after waiting until `wake` and retrying with backoff, while serving commands
    /// (they only change the machine's tables while disconnected). `None` when the session is done.
    ///
    /// # Cancel safety
    /// Cancel safe: the stream only becomes current once this returns.
    async fn connect(
        &mut self,
        wake: &mut Option<Instant>,
        backoff: &mut Duration,
    ) -> Option<Streaming<ServerMessage>> {
        loop {
            if self.done() {
                return None;
            }
            // Owns what it needs, so commands can be served while it runs.
            let attempt = {
                let (grpc, grace, wake) = (self.cfg.members.current(), self.cfg.resume_grace, *wake);
                async move {
                    if let Some(wake) = wake {
                        sleep_until(wake).await;
                    }
                    tokio::time::timeout(OPEN_TIMEOUT, open(grpc, grace)).await
                }
            };
            tokio::pin!(attempt);
            let failed = loop {
                let deadline = self.close_deadline;
                let reading = !self.handles_gone;
                tokio::select! {
                    opened = &mut attempt => match opened {
                        Ok(Ok((tx, inbound))) => {
                            self.out = Some(tx);
                            return Some(inbound);
                        }
                        Ok(Err(e)) => {
                            let status = match &e {
                                Error::Rpc(status) => Some(status),
                                _ => None,
                            };
                            match self.cfg.members.failed(status) {
                                // A standby named the leader: go there at once.
                                Retry::Now => {
                                    *wake = None;
                                    break (Retry::Now, String::new());
                                }
                                retry => break (retry, format!("slotd stream failed to open: {e}")),
                            }
                        }
                        Err(_) => {
                            let retry = self.cfg.members.failed(None);
                            break (retry, "slotd stream open timed out".to_owned());
                        }
                    },
                    cmd = self.cmd_rx.recv(), if reading => {
                        self.on_command(cmd);
                        if self.done() {
                            return None;
                        }
                    }
                    _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => return None,
                }
            };
            let (retry, failed) = failed;
            if retry == Retry::Now {
                continue;
            }
            tracing::debug!("{failed}");
            // During a failover, look for the new leader often enough to re-present the leases soon
            // after it is elected.
            let cap = match retry {
                Retry::Soon => self.cfg.backoff.max.min(ELECTION_RETRY_MAX),
                _ => self.cfg.backoff.max,
            };
            *backoff = (*backoff).min(cap);
            // Full jitter: spread reconnecting clients over the whole window.
            let delay = rand::rng().random_range(Duration::ZERO..=*backoff);
            *backoff = (*backoff * 2).min(cap);
            tracing::debug!(?delay, "slotd reconnecting");
            *wake = Some(Instant::now() + delay);
        }
    }

    /// The session is over: answer every `close()` with what was flushed, and tell every lease still
    /// held that nobody renews it any more.
    fn finish(&mut self) {
        let unacknowledged = self.machine.unacknowledged();
        if unacknowledged > 0 {
            tracing::warn!(
                unacknowledged,
                "slotd client closed before the daemon acknowledged every release"
            );
        }
        // Closes that arrived after the last read get the same answer; anything else left in the
        // channel is dropped, and its sender sees the session closed.
        self.cmd_rx.close();
        while let Ok(cmd) = self.cmd_rx.try_recv() {
            if let Command::Close { reply, .. } = cmd {
                self.closers.push(reply);
            }
        }
        for reply in self.closers.drain(..) {
            let _ = reply.send(if unacknowledged == 0 {
                Ok(())
            } else {
                Err(Error::Unacknowledged { releases: unacknowledged })
            });
        }
        for shared in self.shared.values() {
            shared.mark_lost(Lost::SessionClosed);
        }
    }

    /// Serves one open stream until it breaks, or the session is closing and has flushed everything.
    ///
    /// # Cancel safety
    /// Not cancel safe: the caller must feed [`Input::Disconnected`] if it drops this.
    async fn serve(&mut self, mut inbound: Streaming<ServerMessage>) -> Exit {
        loop {
            if self.machine.is_finished() {
                return Exit::Done;
            }
            let heartbeat = self.machine.next_heartbeat();
            let deadline = self.close_deadline;
            let reading = !self.handles_gone;
            tokio::select! {
                cmd = self.cmd_rx.recv(), if reading => self.on_command(cmd),
                msg = inbound.message() => match msg {
                    Ok(Some(msg)) => {
                        if let Some(msg) = wire::decode(msg, Now::current().wall) {
                            self.feed(Input::Message(msg));
                        }
                    }
                    Ok(None) => {
                        tracing::debug!("slotd stream ended by the daemon");
                        self.cfg.members.failed(None);
                        return Exit::Disconnected;
                    }
                    Err(status) => {
                        tracing::debug!(%status, "slotd stream broke");
                        self.cfg.members.failed(Some(&status));
                        return Exit::Disconnected;
                    }
                },
                _ = sleep_until(heartbeat.unwrap_or_else(Instant::now)), if heartbeat.is_some() => {
                    self.feed(Input::HeartbeatDue);
                }
                _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    return Exit::Done;
                }
            }
        }
    }

    fn on_command(&mut self, cmd: Option<Command<Lease>>) {
        match cmd {
            Some(Command::Acquire { request_id, spec, reply }) => {
                self.acquirers.insert(request_id.clone(), reply);
                self.feed(Input::Acquire { request_id, spec });
            }
            Some(Command::Cancel { request_id }) => {
                self.acquirers.remove(&request_id);
                self.feed(Input::Cancel { request_id });
            }
            Some(Command::Release { lease_id, report, reply }) => {
                let ticket = reply.map(|reply| {
                    self.next_ticket += 1;
                    self.releases.insert(self.next_ticket, reply);
                    self.next_ticket
                });
                self.feed(Input::Release { lease_id, report, ticket });
            }
            Some(Command::Close { deadline, reply }) => {
                self.closers.push(reply);
                self.close_by(deadline);
            }
            None => {
                self.handles_gone = true;
                self.close_by(Instant::now() + self.cfg.close_timeout);
            }
        }
    }

    /// Starts (or joins) the close: the earliest deadline asked for wins.
    fn close_by(&mut self, deadline: Instant) {
        self.close_deadline = Some(self.close_deadline.map_or(deadline, |d| d.min(deadline)));
        self.feed(Input::Close);
    }

    /// Runs one input through the machine and carries out what it decided.
    fn feed(&mut self, input: Input) {
        let step = self.machine.handle(Now::current(), input);
        if let Some(out) = &self.out {
            for msg in step.send {
                // A failed send means the stream is closing; the machine rebuilds it on reconnect.
                let _ = out.send(wire::encode(msg));
            }
        }
        for n in step.notify {
            self.deliver(n);
        }
    }

    fn deliver(&mut self, n: Notify) {
        match n {
            Notify::Granted { request_id, lease } => {
                let reply = self.acquirers.remove(&request_id);
                let owner = reply.as_ref().and_then(|_| self.cmd_tx.upgrade());
                let (Some(reply), Some(tx)) = (reply, owner) else {
                    // Nobody can hold it: the slot goes straight back.
                    let lease_id = lease.lease_id;
                    self.feed(Input::Release { lease_id, report: Outcome::Cancelled.into(), ticket: None });
                    return;
                };
                let shared = Shared::new(
                    lease.lease_id,
                    lease.pool,
                    lease.fencing_token,
                    lease.ttl,
                    lease.expires_at,
                    lease.probe,
                );
                self.shared.insert(shared.lease_id.clone(), shared.clone());
                // If the acquire future is gone, the lease comes back here and its drop releases it.
                let _ = reply.send(Ok(Lease::new(shared, tx)));
            }
            Notify::Refused { request_id, error } => {
                if let Some(reply) = self.acquirers.remove(&request_id) {
                    let _ = reply.send(Err(error));
                }
            }
            Notify::ReleaseDone { ticket, result } => {
                if let Some(reply) = self.releases.remove(&ticket) {
                    let _ = reply.send(result);
                }
            }
            Notify::Renewed { lease_id, expires_at } => {
                if let Some(shared) = self.shared.get(&lease_id) {
                    shared.set_expires_at(expires_at);
                }
            }
            Notify::LeaseLost { lease_id, why } => {
                if let Some(shared) = self.shared.get(&lease_id) {
                    shared.mark_lost(why);
                }
            }
            Notify::LeaseEnded { lease_id } => {
                self.shared.remove(&lease_id);
            }
            Notify::Pauses(pauses) => {
                self.pauses.send_replace(pauses);
            }
        }
    }
}

/// Opens an `Acquire` stream: its sender and the daemon's side.
///
/// # Cancel safety
/// Cancel safe: dropping it drops the half-open stream, which the daemon treats as closed.
async fn open(
    mut grpc: SlotdClient<AuthChannel>,
    resume_grace: Option<Duration>,
) -> Result<(mpsc::UnboundedSender<ClientMessage>, Streaming<ServerMessage>), Error> {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut req = tonic::Request::new(UnboundedReceiverStream::new(rx));
    if let Some(grace) = resume_grace {
        let v = humantime::format_duration(grace).to_string();
        if let Ok(v) = AsciiMetadataValue::try_from(v) {
            req.metadata_mut().insert(RESUME_GRACE_HEADER, v);
        }
    }
    let inbound = grpc.acquire(req).await?.into_inner();
    Ok((tx, inbound))
}
