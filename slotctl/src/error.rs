//! [`CtlError`]: what `slotctl` prints on failure, one line with the gRPC code when there is one.

use std::fmt;

use tonic::Code;

/// A failed `slotctl` command: printed as `slotctl: <message> (<CODE>)`, exit code 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtlError {
    /// What went wrong, lowercase, one line.
    pub message: String,
    /// The gRPC code, when the daemon (or the transport) gave one.
    pub code: Option<Code>,
}

impl CtlError {
    /// An error without a gRPC code.
    pub fn new(message: impl Into<String>) -> Self {
        CtlError { message: message.into(), code: None }
    }

    /// An error with a gRPC code.
    pub fn with_code(message: impl Into<String>, code: Code) -> Self {
        CtlError { message: message.into(), code: Some(code) }
    }
}

impl fmt::Display for CtlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keep it to one line whatever the daemon said.
        let message = self.message.replace('\n', " ");
        match self.code {
            Some(code) => write!(f, "{message} ({})", code_name(code)),
            None => f.write_str(&message),
        }
    }
}

impl std::error::Error for CtlError {}

impl From<tonic::Status> for CtlError {
    fn from(s: tonic::Status) -> Self {
        let message = if s.message().is_empty() {
            match std::error::Error::source(&s) {
                Some(src) => chain(src),
                None => "request failed".to_owned(),
            }
        } else {
            s.message().to_owned()
        };
        CtlError::with_code(message, s.code())
    }
}

impl From<slotd_client::Error> for CtlError {
    fn from(e: slotd_client::Error) -> Self {
        match e {
            slotd_client::Error::Rpc(s) => s.into(),
            slotd_client::Error::Rejected { code, message, .. }
            | slotd_client::Error::Lease { code, message, .. } => CtlError::with_code(message, code),
            other => CtlError::new(other.to_string()),
        }
    }
}

/// An error and its sources, joined with ": ".
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(src) = next {
        let s = src.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        next = src.source();
    }
    out
}

/// The canonical upper-case name of a gRPC code, as in the gRPC spec (`NOT_FOUND`).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_with_the_code() {
        let e = CtlError::from(tonic::Status::not_found("unknown pool x"));
        assert_eq!(e.to_string(), "unknown pool x (NOT_FOUND)");
        assert_eq!(CtlError::new("a\nb").to_string(), "a b");
    }
}
