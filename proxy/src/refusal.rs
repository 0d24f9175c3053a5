//! Local refusals: answers the proxy gives itself, shaped like the provider's errors (so SDKs retry
//! them as usual) and marked with `x-slotd-reason` (so they can be told apart from the provider's).

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use serde_json::json;

use crate::{config::Dialect, headers::REASON};

/// Why the proxy answered by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// slotd's queue for the pool is full.
    QueueFull,
    /// The request waited `max_wait` without a slot.
    MaxWait,
    /// The pool is paused and the request would not wait (`max_wait` of zero).
    Paused,
    /// slotd is unreachable and the route fails closed.
    DaemonDown,
    /// slotd does not know the pool.
    UnknownPool,
    /// slotd refused the request for another reason.
    Rejected,
    /// An `x-slotd-*` header is invalid or not allowed.
    BadHeader,
    /// No route matches the path.
    NoRoute,
    /// The route chooses pools per credential and this one has none.
    UnknownCredential,
    /// The request body is larger than `max_body_bytes`.
    BodyTooLarge,
    /// The upstream could not be reached or failed before answering.
    UpstreamError,
    /// The pool's circuit breaker is open and the pool fails fast (`when_open = "fail_fast"`).
    BreakerOpen,
    /// The proxy is shutting down.
    ShuttingDown,
    /// The lease was lost before the answer came, on a `strict` route.
    LeaseLost,
}

impl Reason {
    /// Every reason, for metric labels.
    pub const ALL: [Reason; 14] = [
        Reason::QueueFull,
        Reason::MaxWait,
        Reason::Paused,
        Reason::DaemonDown,
        Reason::UnknownPool,
        Reason::Rejected,
        Reason::BadHeader,
        Reason::NoRoute,
        Reason::UnknownCredential,
        Reason::BodyTooLarge,
        Reason::UpstreamError,
        Reason::BreakerOpen,
        Reason::ShuttingDown,
        Reason::LeaseLost,
    ];

    /// The `x-slotd-reason` value and metric label.
    pub fn label(self) -> &'static str {
        match self {
            Reason::QueueFull => "queue_full",
            Reason::MaxWait => "max_wait",
            Reason::Paused => "paused",
            Reason::DaemonDown => "daemon_down",
            Reason::UnknownPool => "unknown_pool",
            Reason::Rejected => "rejected",
            Reason::BadHeader => "bad_header",
            Reason::NoRoute => "no_route",
            Reason::UnknownCredential => "unknown_credential",
            Reason::BodyTooLarge => "body_too_large",
            Reason::UpstreamError => "upstream_error",
            Reason::BreakerOpen => "breaker_open",
            Reason::ShuttingDown => "shutting_down",
            Reason::LeaseLost => "lease_lost",
        }
    }

    /// The HTTP status of the refusal.
    pub fn status(self) -> StatusCode {
        match self {
            Reason::QueueFull | Reason::MaxWait | Reason::Paused => StatusCode::TOO_MANY_REQUESTS,
            Reason::DaemonDown
            | Reason::BreakerOpen
            | Reason::UnknownPool
            | Reason::Rejected
            | Reason::ShuttingDown
            | Reason::LeaseLost => StatusCode::SERVICE_UNAVAILABLE,
            Reason::BadHeader => StatusCode::BAD_REQUEST,
            Reason::NoRoute => StatusCode::NOT_FOUND,
            Reason::UnknownCredential => StatusCode::FORBIDDEN,
            Reason::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Reason::UpstreamError => StatusCode::BAD_GATEWAY,
        }
    }

    fn retryable(self) -> bool {
        matches!(
            self,
            Reason::QueueFull
                | Reason::MaxWait
                | Reason::Paused
                | Reason::DaemonDown
                | Reason::BreakerOpen
                | Reason::ShuttingDown
        )
    }
}

/// A local refusal ready to be rendered.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// Why.
    pub reason: Reason,
    /// A human message (never a credential or a body).
    pub message: String,
    /// When to retry, for 429/503.
    pub retry_after: Option<Duration>,
}

/// The `retry-after` sent on a retryable refusal without a hint from slotd.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

impl Refusal {
    /// A refusal.
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        Refusal { reason, message: message.into(), retry_after: None }
    }

    /// With a retry hint.
    pub fn retry_after(mut self, d: Option<Duration>) -> Self {
        self.retry_after = d;
        self
    }

    /// The response, with the error body of `dialect`.
    pub fn render(&self, dialect: Dialect) -> Response<Bytes> {
        let status = self.reason.status();
        let message = format!("slotd-proxy: {}", self.message);
        let body = match dialect {
            Dialect::Anthropic => json!({
                "type": "error",
                "error": { "type": anthropic_type(status), "message": message },
            }),
            Dialect::Openai => json!({
                "error": {
                    "message": message,
                    "type": openai_type(status),
                    "param": null,
                    "code": format!("slotd_{}", self.reason.label()),
                },
            }),
        };
        let mut resp = Response::new(Bytes::from(body.to_string()));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(REASON, HeaderValue::from_static(self.reason.label()));
        if self.reason.retryable() {
            let after = self.retry_after.unwrap_or(DEFAULT_RETRY_AFTER);
            // Whole seconds, rounded up: `Retry-After` has no fractions, and 0 would invite a hot loop.
            let secs = after.as_secs().saturating_add(u64::from(after.subsec_nanos() > 0)).max(1);
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
            h.insert(
                "retry-after-ms",
                HeaderValue::from(u64::try_from(after.as_millis()).unwrap_or(u64::MAX)),
            );
        }
        resp
    }
}

fn anthropic_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        429 => "rate_limit_error",
        503 => "overloaded_error",
        400 | 413 => "invalid_request_error",
        403 => "permission_error",
        404 => "not_found_error",
        _ => "api_error",
    }
}

fn openai_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        429 => "rate_limit_exceeded",
        400 | 413 => "invalid_request_error",
        403 => "permission_denied",
        404 => "not_found",
        _ => "server_error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let r = Refusal::new(Reason::QueueFull, "queue full on pool a")
            .retry_after(Some(Duration::from_millis(1500)));
        let a = r.render(Dialect::Anthropic);
        assert_eq!(a.status(), 429);
        assert_eq!(a.headers()["x-slotd-reason"], "queue_full");
        assert_eq!(a.headers()["retry-after"], "2");
        let v: serde_json::Value = serde_json::from_slice(a.body()).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "rate_limit_error");
        let o = r.render(Dialect::Openai);
        let v: serde_json::Value = serde_json::from_slice(o.body()).unwrap();
        assert_eq!(v["error"]["code"], "slotd_queue_full");
        let b = Refusal::new(Reason::BadHeader, "x").render(Dialect::Openai);
        assert_eq!(b.status(), 400);
        assert!(b.headers().get("retry-after").is_none());
    }
}
