//! The commands that handles (clients, acquire futures, leases) send to the session task.
//!
//! This module names neither the [`Lease`](crate::Lease) guard nor the session: the guard holds a
//! sender of [`Command`]s and the session receives them, so both import this module and it imports
//! neither back. That is why [`Command`] is generic over what an acquire is answered with.

use std::time::{Duration, SystemTime};

use tokio::{sync::oneshot, time::Instant};

use crate::{Error, Report};

/// What an acquire asks for; kept until granted so it can be re-sent after a reconnect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RequestSpec {
    pub(crate) pool: String,
    pub(crate) priority: Option<u32>,
    pub(crate) started_at: SystemTime,
    pub(crate) ttl: Option<Duration>,
    pub(crate) max_wait: Option<Duration>,
    pub(crate) holder: String,
    /// The call's token estimate for the daemon's rate budgets: input tokens, max output tokens.
    pub(crate) tokens: Option<(u64, u64)>,
}

/// A message from a handle to the session task. `L` is the lease guard an acquire is answered with.
#[derive(Debug)]
pub(crate) enum Command<L> {
    /// Queue a request; the answer is a lease or the rejection.
    Acquire { request_id: String, spec: RequestSpec, reply: oneshot::Sender<Result<L, Error>> },
    /// The acquire future was dropped before its answer.
    Cancel { request_id: String },
    /// Give a lease back.
    Release { lease_id: String, report: Report, reply: Option<oneshot::Sender<Result<(), Error>>> },
    /// Close the session: flush every release, answer once the daemon acknowledged them all or at
    /// `deadline`, whichever comes first.
    Close { deadline: Instant, reply: oneshot::Sender<Result<(), Error>> },
}
