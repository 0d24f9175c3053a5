//! The client's error types: what went wrong (with the daemon's gRPC code and retry hint), and why a lease was lost.

use std::time::Duration;

/// Everything a [`Client`](crate::Client) call can fail with.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The daemon refused the request or it gave up waiting (`Rejected`).
    ///
    /// `code` is the gRPC status code the daemon chose, for example `ResourceExhausted` for a full
    /// queue or `DeadlineExceeded` when `max_wait` ran out.
    #[error("request rejected ({code:?}): {message}")]
    Rejected {
        /// The gRPC status code describing why.
        code: tonic::Code,
        /// The daemon's lowercase reason.
        message: String,
        /// Trying again sooner than this is pointless (for example: the pool is paused).
        retry_after: Option<Duration>,
    },
    /// A release (or other lease-addressed message) named a lease the daemon could not act on
    /// (`LeaseError`), for example because it had already expired.
    #[error("lease {lease_id} ({code:?}): {message}")]
    Lease {
        /// The lease.
        lease_id: String,
        /// The gRPC status code describing why.
        code: tonic::Code,
        /// The daemon's lowercase reason.
        message: String,
    },
    /// The lease ended before it was released: see [`Lost`].
    #[error("lease {lease_id} was lost: {reason}")]
    Lost {
        /// The lease.
        lease_id: String,
        /// Why it ended.
        reason: Lost,
    },
    /// Could not reach the daemon, or a unary call failed.
    #[error("rpc failed: {0}")]
    Rpc(#[from] tonic::Status),
    /// The endpoint could not be parsed or connected to.
    #[error("transport: {0}")]
    Transport(String),
    /// A client setting was unusable (for example an auth token that is not valid metadata).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The background session task is gone: the client was closed, or the runtime is shutting down.
    #[error("client session closed")]
    SessionClosed,
    /// [`Client::close`](crate::Client::close) gave up before the daemon acknowledged every release
    /// (the daemon was unreachable, or slower than the close timeout). Those slots come back when
    /// their resume grace or TTL runs out.
    #[error("client closed with {releases} release(s) not acknowledged by the daemon")]
    Unacknowledged {
        /// How many releases were never acknowledged.
        releases: usize,
    },
}

/// Why a lease ended without being released by its holder. Whoever holds it must stop using the slot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Lost {
    /// The daemon reclaimed it: no heartbeat arrived within its TTL.
    #[error("expired: {0}")]
    Expired(String),
    /// An operator revoked it, or its pool was removed.
    #[error("revoked: {0}")]
    Revoked(String),
    /// After a reconnect the daemon refused to re-attach it (the grace or learning period was over,
    /// or taking it back would have exceeded the limit).
    #[error("resume failed: {0}")]
    ResumeFailed(String),
    /// Another stream resumed it with its resume credential (which only this client was given): the
    /// lease lives on there.
    #[error("resumed elsewhere: {0}")]
    ResumedElsewhere(String),
    /// The client's session task ended, so nobody renews the lease any more.
    #[error("client session closed")]
    SessionClosed,
}

impl Error {
    /// The gRPC code of a rejection or lease error, if this is one.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Error::Rejected { code, .. } | Error::Lease { code, .. } => Some(*code),
            Error::Rpc(status) => Some(status.code()),
            _ => None,
        }
    }

    /// The daemon's retry hint, if it gave one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Rejected { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// True when the daemon said `NOT_FOUND` (for example an unknown pool).
    pub fn is_not_found(&self) -> bool {
        self.code() == Some(tonic::Code::NotFound)
    }
}

impl From<tonic::transport::Error> for Error {
    fn from(e: tonic::transport::Error) -> Self {
        Error::Transport(e.to_string())
    }
}
