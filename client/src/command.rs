//! The commands that handles (clients, acquire futures, leases) send to the session task.
//!
//! This module names neither the [`Lease`](crate::Lease) guard nor the session: the guard holds a
//! sender of [`Command`]s and the session receives them, so both import this module and it imports
//! neither back. That is why [`Command`] is generic over what an acquire is answered with.

use std::time::{Duration, SystemTime};

use tokio::{sync::oneshot, time::Instant};

use crate::Error;

/// How the call covered by a lease ended; sent to the daemon with the release.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Outcome {
    /// The provider call succeeded.
    #[default]
    Ok,
    /// The provider call failed for a reason other than rate limiting.
    Error,
    /// The caller gave up before the call ended.
    Cancelled,
    /// The provider answered 429 (this key's rate limit). Pauses the pool for `retry_after`, or for
    /// the pool's `default_retry_after` when `None`.
    RateLimited {
        /// The provider's Retry-After.
        retry_after: Option<Duration>,
    },
    /// The provider is overloaded (Anthropic's 529 `overloaded_error`, a 503): a provider-wide
    /// signal that says nothing about this key's quota.
    Overloaded {
        /// The provider's Retry-After.
        retry_after: Option<Duration>,
    },
    /// The key is out of credit (402, OpenAI's `insufficient_quota`): retrying does not help.
    QuotaExhausted {
        /// The provider's Retry-After, if it gave one.
        retry_after: Option<Duration>,
    },
}

/// What an acquire asks for; kept until granted so it can be re-sent after a reconnect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RequestSpec {
    pub(crate) pool: String,
    /// `acquire_any`: further pools after `pool`, in order of preference.
    pub(crate) any_pools: Vec<String>,
    pub(crate) priority: Option<u32>,
    pub(crate) started_at: SystemTime,
    pub(crate) ttl: Option<Duration>,
    pub(crate) max_wait: Option<Duration>,
    pub(crate) holder: String,
}

/// A message from a handle to the session task. `L` is the lease guard an acquire is answered with.
#[derive(Debug)]
pub(crate) enum Command<L> {
    /// Queue a request; the answer is a lease or the rejection.
    Acquire { request_id: String, spec: RequestSpec, reply: oneshot::Sender<Result<L, Error>> },
    /// The acquire future was dropped before its answer.
    Cancel { request_id: String },
    /// Give a lease back.
    Release { lease_id: String, outcome: Outcome, reply: Option<oneshot::Sender<Result<(), Error>>> },
    /// Close the session: flush every release, answer once the daemon acknowledged them all or at
    /// `deadline`, whichever comes first.
    Close { deadline: Instant, reply: oneshot::Sender<Result<(), Error>> },
}
