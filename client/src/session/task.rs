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
use crate::{AuthChannel, Error, Lease, Outcome, command::Command, lease::Shared};
/// How long opening the stream may take before it counts as a failed attempt.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// After the last handle is gone, how long to wait for outstanding releases to be acknowledged.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Reconnect delays: exponential from `initial` to `max`, each with full jitter.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Backoff {
    pub(crate) initial: Duration,
    pub(crate) max: Duration,
}

/// Everything the task needs from the builder.
#[derive(Debug, Clone)]
pub(crate) struct SessionConfig {
    /// The token rides in the channel's interceptor.
    pub(crate) grpc: SlotdClient<AuthChannel>,
    pub(crate) resume_grace: Option<Duration>,
    pub(crate) heartbeat_interval: Option<Duration>,
    pub(crate) backoff: Backoff,
}

enum Exit {
    /// The stream broke: reconnect.
    Disconnected,
    /// Every handle is gone and nothing is left to flush.
    Done,
}

pub(crate) struct Session {
    cfg: SessionConfig,
    cmd_rx: mpsc::UnboundedReceiver<Command<Lease>>,
    /// Weak, so that the task alone does not keep the command channel open.
    cmd_tx: mpsc::WeakUnboundedSender<Command<Lease>>,
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
            acquirers: HashMap::new(),
            releases: HashMap::new(),
            next_ticket: 0,
            shared: HashMap::new(),
            pauses,
            out: None,
        }
    }

    /// Runs until every handle is gone: connect, serve the stream, and reconnect when it breaks.
    ///
    /// # Cancel safety
    /// Meant to be spawned and run to the end. Dropping it drops every waiting acquire and release
    /// (they answer [`Error::SessionClosed`]); the daemon reclaims what the stream held.
    pub(crate) async fn run(mut self) {
        let mut backoff = self.cfg.backoff.initial;
        loop {
            match tokio::time::timeout(OPEN_TIMEOUT, self.open()).await {
                Ok(Ok(inbound)) => {
                    backoff = self.cfg.backoff.initial;
                    let (leases, pending) = self.machine.counts();
                    tracing::debug!(leases, pending, "slotd stream open");
                    self.feed(Input::Connected);
                    match self.serve(inbound).await {
                        Exit::Done => return,
                        Exit::Disconnected => {
                            self.out = None;
                            self.feed(Input::Disconnected);
                        }
                    }
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "slotd stream failed to open"),
                Err(_) => tracing::debug!("slotd stream open timed out"),
            }
            if self.machine.is_closed() {
                // Nobody is left to use a reconnect; the daemon reclaims what the old stream held.
                return;
            }
            // Full jitter: spread reconnecting clients over the whole window.
            let delay = rand::rng().random_range(Duration::ZERO..=backoff);
            backoff = (backoff * 2).min(self.cfg.backoff.max);
            tracing::debug!(?delay, "slotd reconnecting");
            let wake = Instant::now() + delay;
            while !self.machine.is_closed() {
                tokio::select! {
                    cmd = self.cmd_rx.recv() => self.on_command_or_close(cmd),
                    _ = sleep_until(wake) => break,
                }
            }
            if self.machine.is_closed() {
                return;
            }
        }
    }

    /// Opens a stream; on success, its sender becomes the current one.
    ///
    /// # Cancel safety
    /// Cancel safe: the stream only becomes current once this returns.
    async fn open(&mut self) -> Result<Streaming<ServerMessage>, Error> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut req = tonic::Request::new(UnboundedReceiverStream::new(rx));
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
    ///
    /// # Cancel safety
    /// Not cancel safe: the caller must feed [`Input::Disconnected`] if it drops this.
    async fn serve(&mut self, mut inbound: Streaming<ServerMessage>) -> Exit {
        let mut flush_deadline: Option<Instant> = None;
        loop {
            if self.machine.is_closed() {
                if self.machine.is_finished() {
                    return Exit::Done;
                }
                flush_deadline.get_or_insert_with(|| Instant::now() + FLUSH_TIMEOUT);
            }
            let heartbeat = self.machine.next_heartbeat();
            let closed = self.machine.is_closed();
            tokio::select! {
                cmd = self.cmd_rx.recv(), if !closed => self.on_command_or_close(cmd),
                msg = inbound.message() => match msg {
                    Ok(Some(msg)) => {
                        if let Some(msg) = wire::decode(msg, Now::current().wall) {
                            self.feed(Input::Message(msg));
                        }
                    }
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
                    self.feed(Input::HeartbeatDue);
                }
                _ = sleep_until(flush_deadline.unwrap_or_else(Instant::now)), if flush_deadline.is_some() => {
                    return Exit::Done;
                }
            }
        }
    }

    fn on_command_or_close(&mut self, cmd: Option<Command<Lease>>) {
        match cmd {
            Some(Command::Acquire { request_id, spec, reply }) => {
                self.acquirers.insert(request_id.clone(), reply);
                self.feed(Input::Acquire { request_id, spec });
            }
            Some(Command::Cancel { request_id }) => {
                self.acquirers.remove(&request_id);
                self.feed(Input::Cancel { request_id });
            }
            Some(Command::Release { lease_id, outcome, reply }) => {
                let ticket = reply.map(|reply| {
                    self.next_ticket += 1;
                    self.releases.insert(self.next_ticket, reply);
                    self.next_ticket
                });
                self.feed(Input::Release { lease_id, outcome, ticket });
            }
            None => self.feed(Input::Close),
        }
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
                    self.feed(Input::Release { lease_id, outcome: Outcome::Cancelled, ticket: None });
                    return;
                };
                let shared =
                    Shared::new(lease.lease_id, lease.pool, lease.fencing_token, lease.ttl, lease.expires_at);
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
