//! The session's state machine: requests, leases and pauses as plain state, with no I/O and no clock.
//!
//! [`Machine::handle`] takes one [`Input`] (a handle's command, a daemon message, the stream opening or
//! breaking, the heartbeat timer, the last handle going away) and the current [`Now`], and returns a
//! [`Step`]: the messages to send on the stream and the [`Notify`]s to deliver to handles. The
//! connection task ([`super::task`]) carries them out; tests read them.
//!
//! # Invariants
//! 1. The tables are the truth. After a reconnect the stream is rebuilt from them (resume every lease,
//!    then re-send every queued request), so a message lost with the old stream never matters.
//! 2. Nothing is sent while disconnected; whatever needed sending is rebuilt on [`Input::Connected`].
//! 3. Every release that carries a [`Ticket`] is answered exactly once, with [`Notify::ReleaseDone`],
//!    unless the session ends first.
//! 4. Every lease that leaves the table is announced with [`Notify::LeaseEnded`] (after
//!    [`Notify::LeaseLost`] when it was lost), so the task can drop what it keeps for it.
//! 5. After [`Input::Close`] nothing new starts: queued requests are withdrawn, every lease still held
//!    is released, and [`Machine::is_finished`] turns true once the daemon has answered each of those
//!    releases and cancels.

use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, SystemTime},
};

use tokio::time::Instant;

use crate::{Error, Lost, Outcome, Report, command::RequestSpec};

/// Heartbeats are never sent more often than this, whatever the TTL.
const MIN_HEARTBEAT: Duration = Duration::from_millis(5);

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

/// Names one release that someone waits on; the task maps it back to the waiter.
pub(crate) type Ticket = u64;

/// The two clocks the machine needs: monotonic for timers, wall for what the daemon speaks in.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Now {
    pub(crate) mono: Instant,
    pub(crate) wall: SystemTime,
}

impl Now {
    /// Reads both clocks (tokio's, so paused time works).
    pub(crate) fn current() -> Self {
        Now { mono: Instant::now(), wall: SystemTime::now() }
    }
}

/// A message for the daemon, before wire encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ToDaemon {
    /// Queue a request. `max_wait` is what is left of the caller's after the time already waited.
    Request { request_id: String, spec: RequestSpec, max_wait: Option<Duration> },
    /// Withdraw a queued request.
    Cancel { request_id: String },
    /// Renew every lease this stream holds.
    Heartbeat,
    /// Give a lease back.
    Release { lease_id: String, report: Report },
    /// Re-attach a lease held on an earlier stream.
    Resume {
        lease_id: String,
        fencing_token: u64,
        pool: String,
        priority: Option<u32>,
        ttl: Duration,
        holder: String,
        credential: Credential,
    },
}

/// A lease's resume credential, from its grant: a secret, so `Debug` does not show it.
#[derive(Clone, PartialEq, Eq, Default)]
pub(crate) struct Credential(pub(crate) String);

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credential(<redacted>)")
    }
}

/// A granted lease, as the daemon described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LeaseInfo {
    pub(crate) lease_id: String,
    pub(crate) pool: String,
    pub(crate) fencing_token: u64,
    pub(crate) ttl: Duration,
    pub(crate) expires_at: SystemTime,
    /// Granted as a circuit breaker's half-open probe.
    pub(crate) probe: bool,
    /// Presented, with the holder name the lease was asked with, to resume it on a new stream.
    pub(crate) credential: Credential,
}

/// Why the daemon ended a lease, as far as the client cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expiry {
    /// No heartbeat within the TTL (or a reason this client does not know).
    Ttl,
    /// An operator revoked it, or its pool was removed.
    Revoked,
    /// The daemon is shutting down; a restart may let the lease be resumed.
    Shutdown,
    /// Another stream resumed it with its credential.
    ResumedElsewhere,
}

/// A message from the daemon, after wire decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FromDaemon {
    Queued { request_id: String, position: u32 },
    Granted { request_id: String, lease: LeaseInfo },
    Rejected { request_id: String, code: tonic::Code, message: String, retry_after: Option<Duration> },
    Paused { pool: String, until: SystemTime, reason: String },
    Resumed { pool: String },
    Expired { lease_id: String, reason: Expiry, message: String },
    Released { lease_id: String },
    LeaseError { lease_id: String, code: tonic::Code, message: String },
    LeaseResumed { lease_id: String, expires_at: Option<SystemTime> },
    Cancelled { request_id: String },
    HeartbeatAck,
}

/// One event for the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Input {
    /// A handle asks for a slot.
    Acquire { request_id: String, spec: RequestSpec },
    /// The acquire future was dropped before its answer.
    Cancel { request_id: String },
    /// A handle gives a lease back; with a ticket when someone waits for the answer.
    Release { lease_id: String, report: Report, ticket: Option<Ticket> },
    /// The daemon said something.
    Message(FromDaemon),
    /// A new stream is open.
    Connected,
    /// The stream broke (or never opened).
    Disconnected,
    /// The heartbeat timer fired.
    HeartbeatDue,
    /// The client is closing ([`Client::close`](crate::Client::close), or every handle is gone):
    /// withdraw queued requests, release every lease still held, and start nothing new.
    Close,
}

/// Something to deliver to handles.
#[derive(Debug, Clone)]
pub(crate) enum Notify {
    /// Answer acquire `request_id` with this lease.
    Granted { request_id: String, lease: LeaseInfo },
    /// Answer acquire `request_id` with this error.
    Refused { request_id: String, error: Error },
    /// Answer the release that carried `ticket`.
    ReleaseDone { ticket: Ticket, result: Result<(), Error> },
    /// The lease's expiry moved.
    Renewed { lease_id: String, expires_at: SystemTime },
    /// The lease is lost: its holder must stop using the slot.
    LeaseLost { lease_id: String, why: Lost },
    /// The lease left the table.
    LeaseEnded { lease_id: String },
    /// The pause map changed; here is the whole of it.
    Pauses(Pauses),
}

/// What one input produced.
#[derive(Debug, Default)]
pub(crate) struct Step {
    /// Messages for the current stream, in order (empty while disconnected).
    pub(crate) send: Vec<ToDaemon>,
    /// Deliveries to handles, in order.
    pub(crate) notify: Vec<Notify>,
}

#[derive(Debug)]
struct Pending {
    spec: RequestSpec,
    /// When the acquire was made, to shorten `max_wait` when re-sending.
    created: Instant,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Held on the current stream.
    Held,
    /// Resume sent (or to be sent once connected); not yet confirmed.
    Resuming,
    /// Release sent on the current stream.
    Releasing { report: Report, ticket: Option<Ticket> },
    /// The holder released it while it still needed a resume: resume, then release.
    ResumingThenReleasing { report: Report, ticket: Option<Ticket> },
}

#[derive(Debug)]
struct Held {
    lease: LeaseInfo,
    priority: Option<u32>,
    holder: String,
    state: State,
}

/// The session's state; see the module docs.
#[derive(Debug)]
pub(crate) struct Machine {
    /// A fixed heartbeat interval, or `None` for a third of the shortest TTL held.
    heartbeat_interval: Option<Duration>,
    connected: bool,
    pending: HashMap<String, Pending>,
    /// Requests cancelled on the current stream whose answer has not come yet, with their holder
    /// name: a grant for one of them is released at once (resumed first if the stream breaks, which
    /// takes the holder name the credential covers).
    cancelling: HashMap<String, String>,
    leases: HashMap<String, Held>,
    pauses: Pauses,
    next_heartbeat: Option<Instant>,
    /// Send times of heartbeats not yet acknowledged (to move `expires_at` on each ack).
    heartbeats_sent: VecDeque<SystemTime>,
    /// The client is closing (see [`Input::Close`]).
    closed: bool,
    step: Step,
}

impl Machine {
    pub(crate) fn new(heartbeat_interval: Option<Duration>) -> Self {
        Machine {
            heartbeat_interval,
            connected: false,
            pending: HashMap::new(),
            cancelling: HashMap::new(),
            leases: HashMap::new(),
            pauses: Pauses::new(),
            next_heartbeat: None,
            heartbeats_sent: VecDeque::new(),
            closed: false,
            step: Step::default(),
        }
    }

    /// Applies one input.
    pub(crate) fn handle(&mut self, now: Now, input: Input) -> Step {
        match input {
            Input::Acquire { request_id, spec } => self.acquire(now, request_id, spec),
            Input::Cancel { request_id } => self.cancel(request_id),
            Input::Release { lease_id, report, ticket } => self.release(lease_id, report, ticket),
            Input::Message(msg) => self.on_message(now, msg),
            Input::Connected => self.on_connected(now),
            Input::Disconnected => self.on_disconnected(),
            Input::HeartbeatDue => self.heartbeat(now),
            Input::Close => self.close(),
        }
        std::mem::take(&mut self.step)
    }

    /// When the heartbeat timer should next fire, if at all.
    pub(crate) fn next_heartbeat(&self) -> Option<Instant> {
        self.next_heartbeat
    }

    /// The client is closing: no new request or lease will start.
    #[cfg(test)]
    pub(crate) fn is_closed(&self) -> bool {
        self.closed
    }

    /// The client is closing and the daemon has answered every release and cancel: nothing is left
    /// to do.
    pub(crate) fn is_finished(&self) -> bool {
        self.closed && self.leases.is_empty() && self.cancelling.is_empty()
    }

    /// Releases the daemon has not acknowledged yet (after a close, every lease left in the table).
    pub(crate) fn unacknowledged(&self) -> usize {
        self.leases.len()
    }

    /// How many leases and queued requests the session has (for logs).
    pub(crate) fn counts(&self) -> (usize, usize) {
        (self.leases.len(), self.pending.len())
    }

    fn send(&mut self, msg: ToDaemon) {
        if self.connected {
            self.step.send.push(msg);
        }
    }

    fn notify(&mut self, n: Notify) {
        self.step.notify.push(n);
    }

    fn answer(&mut self, ticket: Option<Ticket>, result: Result<(), Error>) {
        if let Some(ticket) = ticket {
            self.notify(Notify::ReleaseDone { ticket, result });
        }
    }

    fn acquire(&mut self, now: Now, request_id: String, spec: RequestSpec) {
        if self.closed {
            self.notify(Notify::Refused { request_id, error: Error::SessionClosed });
            return;
        }
        self.send(ToDaemon::Request {
            request_id: request_id.clone(),
            spec: spec.clone(),
            max_wait: spec.max_wait,
        });
        self.pending.insert(request_id, Pending { spec, created: now.mono });
    }

    fn cancel(&mut self, request_id: String) {
        if let Some(p) = self.pending.remove(&request_id)
            && self.connected
        {
            self.send(ToDaemon::Cancel { request_id: request_id.clone() });
            self.cancelling.insert(request_id, p.spec.holder);
        }
        // Not pending: it was granted already and its lease (dropped with the future's channel)
        // releases itself; or we are disconnected and the daemon forgot it.
    }

    fn release(&mut self, lease_id: String, report: Report, ticket: Option<Ticket>) {
        let connected = self.connected;
        let Some(held) = self.leases.get_mut(&lease_id) else {
            self.answer(
                ticket,
                Err(Error::Lease {
                    lease_id,
                    code: tonic::Code::FailedPrecondition,
                    message: "lease already ended".into(),
                }),
            );
            return;
        };
        let send_now = match held.state {
            State::Held => {
                held.state = State::Releasing { report: report.clone(), ticket };
                connected
            }
            State::Resuming => {
                // The resume (already sent, or sent on reconnect) goes first; the release follows it.
                held.state = State::ResumingThenReleasing { report: report.clone(), ticket };
                connected
            }
            State::Releasing { .. } | State::ResumingThenReleasing { .. } => {
                self.answer(
                    ticket,
                    Err(Error::Lease {
                        lease_id: lease_id.clone(),
                        code: tonic::Code::FailedPrecondition,
                        message: "lease is already being released".into(),
                    }),
                );
                false
            }
        };
        if send_now {
            self.send(ToDaemon::Release { lease_id, report });
        }
    }

    /// Withdraws every queued request and releases every lease still held (as cancelled: its holder
    /// never said how the call went). Closing twice changes nothing more.
    fn close(&mut self) {
        self.closed = true;
        let mut pending: Vec<(String, String)> =
            self.pending.drain().map(|(id, p)| (id, p.spec.holder)).collect();
        pending.sort();
        for (request_id, holder) in pending {
            if self.connected {
                self.send(ToDaemon::Cancel { request_id: request_id.clone() });
                // The holder names the lease if the cancel crossed its grant (see `granted`).
                self.cancelling.insert(request_id.clone(), holder);
            }
            self.notify(Notify::Refused { request_id, error: Error::SessionClosed });
        }
        let mut held: Vec<String> = self
            .leases
            .iter()
            .filter(|(_, h)| matches!(h.state, State::Held | State::Resuming))
            .map(|(id, _)| id.clone())
            .collect();
        held.sort();
        for lease_id in held {
            // Its guard, if someone still has it, must stop using the slot.
            self.lose(&lease_id, Lost::SessionClosed);
            self.release(lease_id, Report::from(Outcome::Cancelled), None);
        }
    }

    fn on_message(&mut self, now: Now, msg: FromDaemon) {
        match msg {
            FromDaemon::Queued { request_id, position } => {
                tracing::trace!(request_id, position, "queued");
            }
            FromDaemon::Granted { request_id, lease } => self.on_granted(now, request_id, lease),
            FromDaemon::Rejected { request_id, code, message, retry_after } => {
                self.on_rejected(request_id, code, message, retry_after)
            }
            FromDaemon::Paused { pool, until, reason } => {
                self.pauses.retain(|_, p| p.until > now.wall);
                self.pauses.insert(pool, PauseInfo { until, reason });
                self.notify(Notify::Pauses(self.pauses.clone()));
            }
            FromDaemon::Resumed { pool } => {
                if self.pauses.remove(&pool).is_some() {
                    self.notify(Notify::Pauses(self.pauses.clone()));
                }
            }
            FromDaemon::Expired { lease_id, reason, message } => {
                self.on_expired(now, lease_id, reason, message)
            }
            FromDaemon::Released { lease_id } => {
                if let Some(held) = self.leases.remove(&lease_id) {
                    if let State::Releasing { ticket, .. } | State::ResumingThenReleasing { ticket, .. } =
                        held.state
                    {
                        self.answer(ticket, Ok(()));
                    }
                    self.notify(Notify::LeaseEnded { lease_id });
                }
                self.reschedule_heartbeat(now);
            }
            FromDaemon::LeaseError { lease_id, code, message } => {
                self.on_lease_error(now, lease_id, code, message)
            }
            FromDaemon::LeaseResumed { lease_id, expires_at } => {
                if let Some(held) = self.leases.get_mut(&lease_id) {
                    held.state = match std::mem::replace(&mut held.state, State::Held) {
                        State::Resuming => State::Held,
                        State::ResumingThenReleasing { report, ticket } => {
                            State::Releasing { report, ticket }
                        }
                        other => other,
                    };
                    if let Some(t) = expires_at {
                        held.lease.expires_at = t;
                        self.notify(Notify::Renewed { lease_id, expires_at: t });
                    }
                }
            }
            FromDaemon::Cancelled { request_id } => {
                self.cancelling.remove(&request_id);
            }
            FromDaemon::HeartbeatAck => {
                if let Some(sent) = self.heartbeats_sent.pop_front() {
                    let mut renewed = Vec::new();
                    for (lease_id, held) in &mut self.leases {
                        if held.state == State::Held {
                            held.lease.expires_at = sent + held.lease.ttl;
                            renewed.push(Notify::Renewed {
                                lease_id: lease_id.clone(),
                                expires_at: held.lease.expires_at,
                            });
                        }
                    }
                    self.step.notify.extend(renewed);
                }
            }
        }
    }

    fn on_granted(&mut self, now: Now, request_id: String, lease: LeaseInfo) {
        let lease_id = lease.lease_id.clone();
        match self.pending.remove(&request_id) {
            Some(p) => {
                self.leases.insert(
                    lease_id,
                    Held {
                        lease: lease.clone(),
                        priority: p.spec.priority,
                        holder: p.spec.holder,
                        state: State::Held,
                    },
                );
                self.notify(Notify::Granted { request_id, lease });
            }
            None => {
                // Granted while (or after) its acquire was cancelled: the slot goes straight back.
                let holder = self.cancelling.remove(&request_id).unwrap_or_default();
                tracing::debug!(request_id, lease_id, "releasing a grant nobody waits for");
                self.leases.insert(
                    lease_id.clone(),
                    Held {
                        lease,
                        priority: None,
                        holder,
                        state: State::Releasing { report: Outcome::Cancelled.into(), ticket: None },
                    },
                );
                self.send(ToDaemon::Release { lease_id, report: Outcome::Cancelled.into() });
            }
        }
        self.reschedule_heartbeat(now);
    }

    fn on_rejected(
        &mut self,
        request_id: String,
        code: tonic::Code,
        message: String,
        retry_after: Option<Duration>,
    ) {
        if self.cancelling.remove(&request_id).is_some() {
            return;
        }
        if code == tonic::Code::Unavailable && retry_after.is_none() && self.pending.contains_key(&request_id)
        {
            // The daemon is shutting down: keep waiting and re-send on the next stream. (An open
            // circuit breaker failing fast is UNAVAILABLE too, but always says when to retry: that
            // refusal is the caller's.)
            return;
        }
        if self.pending.remove(&request_id).is_some() {
            let error = Error::Rejected { code, message, retry_after };
            self.notify(Notify::Refused { request_id, error });
        }
    }

    fn on_expired(&mut self, now: Now, lease_id: String, reason: Expiry, message: String) {
        if reason == Expiry::Shutdown {
            // The daemon is going away; the lease may come back through a resume once it restarts.
            return;
        }
        let Some(held) = self.leases.remove(&lease_id) else {
            return;
        };
        let lost = match reason {
            Expiry::Revoked => Lost::Revoked(message),
            Expiry::ResumedElsewhere => Lost::ResumedElsewhere(message),
            Expiry::Ttl | Expiry::Shutdown => Lost::Expired(message),
        };
        self.lose(&lease_id, lost.clone());
        if let State::Releasing { ticket, .. } | State::ResumingThenReleasing { ticket, .. } = held.state {
            self.answer(ticket, Err(Error::Lost { lease_id: lease_id.clone(), reason: lost }));
        }
        self.notify(Notify::LeaseEnded { lease_id });
        self.reschedule_heartbeat(now);
    }

    fn on_lease_error(&mut self, now: Now, lease_id: String, code: tonic::Code, message: String) {
        let Some(held) = self.leases.get(&lease_id) else {
            return;
        };
        match held.state {
            State::Held => {
                // Only a targeted heartbeat could cause this; the client sends none.
                tracing::warn!(lease_id, message, "unexpected lease error");
            }
            State::Resuming => {
                self.leases.remove(&lease_id);
                self.lose(&lease_id, Lost::ResumeFailed(message));
                self.notify(Notify::LeaseEnded { lease_id });
            }
            State::ResumingThenReleasing { ticket, .. } => {
                // The release queued behind this resume fails too; the slot is gone either way.
                self.leases.remove(&lease_id);
                let lost = Lost::ResumeFailed(message);
                self.lose(&lease_id, lost.clone());
                self.answer(ticket, Err(Error::Lost { lease_id: lease_id.clone(), reason: lost }));
                self.notify(Notify::LeaseEnded { lease_id });
            }
            State::Releasing { ticket, .. } => {
                self.leases.remove(&lease_id);
                self.lose(&lease_id, Lost::Expired(message.clone()));
                self.answer(ticket, Err(Error::Lease { lease_id: lease_id.clone(), code, message }));
                self.notify(Notify::LeaseEnded { lease_id });
            }
        }
        self.reschedule_heartbeat(now);
    }

    fn lose(&mut self, lease_id: &str, why: Lost) {
        self.notify(Notify::LeaseLost { lease_id: lease_id.to_owned(), why });
    }

    fn heartbeat_every(&self) -> Option<Duration> {
        let min_ttl = self.leases.values().map(|h| h.lease.ttl).min()?;
        Some(self.heartbeat_interval.unwrap_or(min_ttl / 3).max(MIN_HEARTBEAT))
    }

    /// Makes sure the next heartbeat comes within a third of the shortest TTL held.
    fn reschedule_heartbeat(&mut self, now: Now) {
        match self.heartbeat_every() {
            None => self.next_heartbeat = None,
            Some(every) => {
                let due = now.mono + every;
                self.next_heartbeat = Some(self.next_heartbeat.map_or(due, |n| n.min(due)));
            }
        }
    }

    fn heartbeat(&mut self, now: Now) {
        self.next_heartbeat = None;
        if !self.connected || self.leases.is_empty() {
            return;
        }
        self.heartbeats_sent.push_back(now.wall);
        self.send(ToDaemon::Heartbeat);
        self.reschedule_heartbeat(now);
    }

    /// The stream broke: every lease needs a resume, and the daemon forgot our queued requests.
    fn on_disconnected(&mut self) {
        self.connected = false;
        self.cancelling.clear();
        self.heartbeats_sent.clear();
        self.next_heartbeat = None;
        for held in self.leases.values_mut() {
            held.state = match std::mem::replace(&mut held.state, State::Resuming) {
                State::Held | State::Resuming => State::Resuming,
                State::Releasing { report, ticket } | State::ResumingThenReleasing { report, ticket } => {
                    State::ResumingThenReleasing { report, ticket }
                }
            };
        }
    }

    /// A new stream is open: resume every lease first, then re-send every queued request.
    fn on_connected(&mut self, now: Now) {
        self.connected = true;
        let mut msgs = Vec::new();
        for (lease_id, held) in &self.leases {
            let resume = ToDaemon::Resume {
                lease_id: lease_id.clone(),
                fencing_token: held.lease.fencing_token,
                pool: held.lease.pool.clone(),
                priority: held.priority,
                ttl: held.lease.ttl,
                holder: held.holder.clone(),
                credential: held.lease.credential.clone(),
            };
            match &held.state {
                State::Resuming => msgs.push(resume),
                State::ResumingThenReleasing { report, .. } => {
                    msgs.push(resume);
                    msgs.push(ToDaemon::Release { lease_id: lease_id.clone(), report: report.clone() });
                }
                State::Held | State::Releasing { .. } => {}
            }
        }
        // Oldest first; the daemon orders by `started_at` anyway, which the requests keep.
        let mut pending: Vec<_> = self.pending.iter().collect();
        pending.sort_by_key(|(_, p)| p.created);
        for (request_id, p) in pending {
            let waited = now.mono.saturating_duration_since(p.created);
            msgs.push(ToDaemon::Request {
                request_id: request_id.clone(),
                spec: p.spec.clone(),
                max_wait: p.spec.max_wait.map(|w| w.saturating_sub(waited)),
            });
        }
        for msg in msgs {
            self.send(msg);
        }
        self.reschedule_heartbeat(now);
    }
}
