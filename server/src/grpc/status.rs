//! The one place that maps a [`scheduler::Error`](crate::scheduler::Error) to a gRPC code and status.

use tonic::{Code, Status};

use crate::scheduler::{Error, IdError};

/// The gRPC code for an error.
///
/// | error | code |
/// |---|---|
/// | bad input (ids, priority, ttl, durations, empty message) | INVALID_ARGUMENT |
/// | duplicate request_id | ALREADY_EXISTS |
/// | queue full, shed, over a per-stream bound, resume over limit | RESOURCE_EXHAUSTED |
/// | unknown pool, lease or request | NOT_FOUND |
/// | lease of another stream, already ended, token/pool mismatch, pool with children | FAILED_PRECONDITION |
/// | resume without the lease's valid resume credential | PERMISSION_DENIED |
/// | shutting down; a fail-fast circuit breaker is open (with retry-after) | UNAVAILABLE |
/// | waited past max_wait | DEADLINE_EXCEEDED |
/// | pool removed while waiting | ABORTED |
pub fn code(e: &Error) -> Code {
    match e {
        Error::InvalidArgument(_) | Error::PriorityOutOfRange { .. } | Error::InvalidTtl { .. } => {
            Code::InvalidArgument
        }
        Error::DuplicateRequest(_) => Code::AlreadyExists,
        Error::QueueFull { .. } | Error::Shed(_) | Error::LimitExceeded(_) | Error::ResumeOverLimit(_) => {
            Code::ResourceExhausted
        }
        Error::UnknownPool(_) | Error::UnknownLease(_) | Error::UnknownRequest(_) => Code::NotFound,
        Error::NotYourLease(_)
        | Error::LeaseEnded { .. }
        | Error::LeaseMismatch(..)
        | Error::PoolHasChildren { .. } => Code::FailedPrecondition,
        Error::BadCredential(_) => Code::PermissionDenied,
        Error::ShuttingDown | Error::BreakerOpen { .. } => Code::Unavailable,
        Error::WaitTimeout { .. } => Code::DeadlineExceeded,
        Error::PoolRemoved(_) => Code::Aborted,
    }
}

/// A `Status` for an error, with its retry hint in the `retry-after-ms` trailer when there is one.
pub fn to_status(e: &Error) -> Status {
    let mut status = Status::new(code(e), e.to_string());
    if let Some(d) = e.retry_after()
        && let Ok(v) = d.as_millis().to_string().parse()
    {
        status.metadata_mut().insert("retry-after-ms", v);
    }
    status
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        to_status(&e)
    }
}

impl From<IdError> for Status {
    fn from(e: IdError) -> Self {
        to_status(&e.into())
    }
}

/// A pool change that was applied but could not be written to the state file: INTERNAL, saying so,
/// because the change is live now but will not survive a restart.
pub fn persist_failed(e: &crate::state::StateError) -> Status {
    Status::internal(format!("the change is applied but was not persisted: {e}"))
}

/// A pool change applied on a leader that could not store it in etcd under its epoch (high
/// availability): UNAVAILABLE, since this member may have been deposed; retry on the leader.
pub fn not_stored(what: &str) -> Status {
    Status::unavailable(format!("the change is applied here but was not stored in etcd: {what}"))
}

/// A failure inside the daemon that no input explains.
pub fn internal(what: &str) -> Status {
    Status::internal(what.to_owned())
}

/// A Drain that gave up waiting: DEADLINE_EXCEEDED. Granting stays stopped until Undrain.
pub fn drain_timeout(leases: usize) -> Status {
    Status::deadline_exceeded(format!(
        "drain timeout: {leases} leases still held; granting stays stopped until Undrain"
    ))
}
