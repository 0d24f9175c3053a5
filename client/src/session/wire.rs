//! Wire encoding: the state machine's messages to and from the generated protobuf types.

use std::time::{Duration, SystemTime};

use slotd_proto::v1::{self as pb, client_message, server_message};

use super::machine::{Credential, Expiry, FromDaemon, LeaseInfo, ToDaemon};
use crate::{Outcome, ProviderLimit, Report};

/// The TTL assumed when a grant names none (the daemon always sends one).
const FALLBACK_TTL: Duration = Duration::from_secs(30);

/// Encodes one message for the stream.
pub(crate) fn encode(msg: ToDaemon) -> pb::ClientMessage {
    let msg = match msg {
        ToDaemon::Request { request_id, spec, max_wait } => client_message::Msg::Request(pb::LeaseRequest {
            request_id,
            pool: spec.pool,
            priority: spec.priority,
            started_at: Some(prost_types::Timestamp::from(spec.started_at)),
            ttl: spec.ttl.and_then(duration),
            max_wait: max_wait.and_then(duration),
            holder: spec.holder,
            estimate: spec.tokens.map(|(input_tokens, max_output_tokens)| pb::TokenEstimate {
                input_tokens,
                max_output_tokens,
            }),
            any_pools: spec.any_pools,
        }),
        ToDaemon::Cancel { request_id } => client_message::Msg::Cancel(pb::CancelRequest { request_id }),
        ToDaemon::Heartbeat => client_message::Msg::Heartbeat(pb::Heartbeat { lease_ids: Vec::new() }),
        ToDaemon::Release { lease_id, report } => client_message::Msg::Release(release(lease_id, report)),
        ToDaemon::Resume { lease_id, fencing_token, pool, priority, ttl, holder, credential } => {
            client_message::Msg::Resume(pb::ResumeLease {
                lease_id,
                fencing_token,
                pool,
                priority,
                ttl: duration(ttl),
                holder,
                credential: credential.0,
            })
        }
    };
    pb::ClientMessage { msg: Some(msg) }
}

/// Decodes one message from the stream; `None` for an empty one. `now` fills in times the daemon
/// gave relative to now (or left out).
pub(crate) fn decode(msg: pb::ServerMessage, now: SystemTime) -> Option<FromDaemon> {
    use server_message::Msg;
    Some(match msg.msg? {
        Msg::Queued(q) => FromDaemon::Queued { request_id: q.request_id, position: q.position },
        Msg::Granted(g) => {
            let ttl = g.ttl.and_then(|d| Duration::try_from(d).ok()).unwrap_or(FALLBACK_TTL);
            let expires_at = timestamp(g.expires_at).unwrap_or_else(|| now + ttl);
            FromDaemon::Granted {
                request_id: g.request_id,
                lease: LeaseInfo {
                    lease_id: g.lease_id,
                    pool: g.pool,
                    fencing_token: g.fencing_token,
                    ttl,
                    expires_at,
                    credential: Credential(g.resume_credential),
                    probe: g.probe,
                },
            }
        }
        Msg::Rejected(r) => FromDaemon::Rejected {
            request_id: r.request_id,
            code: tonic::Code::from_i32(r.code),
            message: r.message,
            retry_after: r.retry_after.and_then(|d| Duration::try_from(d).ok()),
        },
        Msg::Paused(p) => {
            let until = timestamp(p.until)
                .or_else(|| p.remaining.and_then(|d| Duration::try_from(d).ok()).map(|d| now + d))
                .unwrap_or(now);
            FromDaemon::Paused { pool: p.pool, until, reason: p.reason }
        }
        Msg::Resumed(r) => FromDaemon::Resumed { pool: r.pool },
        Msg::Expired(e) => {
            let reason = match pb::ExpiryReason::try_from(e.reason).unwrap_or_default() {
                pb::ExpiryReason::Shutdown => Expiry::Shutdown,
                pb::ExpiryReason::Revoked | pb::ExpiryReason::PoolRemoved => Expiry::Revoked,
                pb::ExpiryReason::ResumedElsewhere => Expiry::ResumedElsewhere,
                pb::ExpiryReason::Ttl | pb::ExpiryReason::Unspecified => Expiry::Ttl,
            };
            FromDaemon::Expired { lease_id: e.lease_id, reason, message: e.message }
        }
        Msg::Released(r) => FromDaemon::Released { lease_id: r.lease_id },
        Msg::LeaseError(e) => FromDaemon::LeaseError {
            lease_id: e.lease_id,
            code: tonic::Code::from_i32(e.code),
            message: e.message,
        },
        Msg::LeaseResumed(r) => {
            FromDaemon::LeaseResumed { lease_id: r.lease_id, expires_at: timestamp(r.expires_at) }
        }
        Msg::Cancelled(c) => FromDaemon::Cancelled { request_id: c.request_id },
        Msg::HeartbeatAck(_) => FromDaemon::HeartbeatAck,
        // Breaker transitions are for observers (Status, Watch); a waiter just keeps waiting.
        Msg::Breaker(_) => return None,
    })
}

/// An outcome as the wire's class and Retry-After.
pub(crate) fn outcome(outcome: Outcome) -> (pb::Outcome, Option<Duration>) {
    match outcome {
        Outcome::Ok => (pb::Outcome::Ok, None),
        Outcome::Error => (pb::Outcome::Error, None),
        Outcome::Cancelled => (pb::Outcome::Cancelled, None),
        Outcome::RateLimited { retry_after } => (pb::Outcome::RateLimited, retry_after),
        Outcome::Overloaded { retry_after } => (pb::Outcome::Overloaded, retry_after),
        Outcome::QuotaExhausted { retry_after } => (pb::Outcome::QuotaExhausted, retry_after),
    }
}

/// The wire form of a release.
pub(crate) fn release(lease_id: String, report: Report) -> pb::ReleaseLease {
    let (outcome, retry_after) = outcome(report.outcome);
    let usage = report.usage.map(|u| pb::Usage {
        input_tokens: u.input_tokens,
        output_tokens: u.output_tokens,
        cache_read_tokens: u.cache_read_tokens,
        cache_creation_tokens: u.cache_creation_tokens,
    });
    let provider_limits = report
        .limits
        .into_iter()
        .take(ProviderLimit::MAX_PER_REPORT)
        .map(|l| pb::ProviderLimit {
            kind: pb::LimitKind::from(l.kind) as i32,
            limit: l.limit,
            remaining: l.remaining.min(l.limit),
            reset_in: duration(l.reset_in.min(ProviderLimit::MAX_RESET_IN)),
        })
        .collect();
    pb::ReleaseLease {
        lease_id,
        outcome: outcome as i32,
        retry_after: retry_after.and_then(duration),
        usage,
        provider_limits,
    }
}

fn duration(d: Duration) -> Option<prost_types::Duration> {
    prost_types::Duration::try_from(d).ok()
}

fn timestamp(t: Option<prost_types::Timestamp>) -> Option<SystemTime> {
    t.and_then(|t| SystemTime::try_from(t).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LimitKind;
    use crate::command::RequestSpec;

    #[test]
    fn a_rate_limited_release_carries_its_retry_after() {
        let msg = encode(ToDaemon::Release {
            lease_id: "l1".into(),
            report: Outcome::RateLimited { retry_after: Some(Duration::from_secs(7)) }.into(),
        });
        let Some(client_message::Msg::Release(r)) = msg.msg else { panic!("not a release: {msg:?}") };
        assert_eq!(r.outcome, pb::Outcome::RateLimited as i32);
        assert_eq!(r.retry_after, Some(prost_types::Duration { seconds: 7, nanos: 0 }));
        assert_eq!((r.usage, r.provider_limits.len()), (None, 0));
    }

    #[test]
    fn a_release_carries_usage_and_at_most_eight_capped_limits() {
        let limit = ProviderLimit {
            kind: LimitKind::OutputTokens,
            limit: 10,
            remaining: 99,
            reset_in: Duration::from_secs(7 * 24 * 3600),
        };
        let report = Report {
            outcome: Outcome::Overloaded { retry_after: None },
            usage: Some(crate::Usage {
                input_tokens: 3,
                output_tokens: 4,
                cache_read_tokens: 5,
                cache_creation_tokens: 6,
            }),
            limits: vec![limit; 12],
        };
        let msg = encode(ToDaemon::Release { lease_id: "l1".into(), report });
        let Some(client_message::Msg::Release(r)) = msg.msg else { panic!("not a release: {msg:?}") };
        assert_eq!(r.outcome, pb::Outcome::Overloaded as i32);
        assert_eq!(
            r.usage,
            Some(pb::Usage {
                input_tokens: 3,
                output_tokens: 4,
                cache_read_tokens: 5,
                cache_creation_tokens: 6
            })
        );
        assert_eq!(r.provider_limits.len(), ProviderLimit::MAX_PER_REPORT);
        let l = &r.provider_limits[0];
        assert_eq!((l.kind, l.limit, l.remaining), (pb::LimitKind::OutputTokens as i32, 10, 10));
        assert_eq!(l.reset_in, Some(prost_types::Duration { seconds: 24 * 3600, nanos: 0 }));
    }

    #[test]
    fn a_request_sends_what_is_left_of_max_wait() {
        let spec = RequestSpec {
            pool: "p".into(),
            any_pools: Vec::new(),
            priority: Some(3),
            started_at: SystemTime::UNIX_EPOCH,
            ttl: None,
            max_wait: Some(Duration::from_secs(10)),
            holder: "h".into(),
            tokens: None,
        };
        let msg = encode(ToDaemon::Request {
            request_id: "r1".into(),
            spec,
            max_wait: Some(Duration::from_secs(4)),
        });
        let Some(client_message::Msg::Request(r)) = msg.msg else { panic!("not a request: {msg:?}") };
        assert_eq!(r.max_wait, Some(prost_types::Duration { seconds: 4, nanos: 0 }));
        assert_eq!(r.ttl, None);
        assert_eq!(r.priority, Some(3));
    }

    #[test]
    fn a_pause_without_until_ends_after_remaining() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let msg = pb::ServerMessage {
            msg: Some(server_message::Msg::Paused(pb::Paused {
                pool: "p".into(),
                until: None,
                reason: "429".into(),
                remaining: Some(prost_types::Duration { seconds: 5, nanos: 0 }),
            })),
        };
        let until = now + Duration::from_secs(5);
        assert_eq!(
            decode(msg, now),
            Some(FromDaemon::Paused { pool: "p".into(), until, reason: "429".into() })
        );
    }

    #[test]
    fn the_credential_goes_from_the_grant_to_the_resume() {
        let msg = pb::ServerMessage {
            msg: Some(server_message::Msg::Granted(pb::Granted {
                request_id: "r1".into(),
                lease_id: "l1".into(),
                fencing_token: 9,
                pool: "p".into(),
                resume_credential: "c0ffee".into(),
                ..Default::default()
            })),
        };
        let Some(FromDaemon::Granted { lease, .. }) = decode(msg, SystemTime::UNIX_EPOCH) else {
            panic!("not a grant")
        };
        assert_eq!(lease.credential, Credential("c0ffee".into()));
        assert!(!format!("{lease:?}").contains("c0ffee"), "Debug shows the credential");
        let msg = encode(ToDaemon::Resume {
            lease_id: lease.lease_id,
            fencing_token: lease.fencing_token,
            pool: lease.pool,
            priority: None,
            ttl: Duration::from_secs(1),
            holder: "h".into(),
            credential: lease.credential,
        });
        let Some(client_message::Msg::Resume(r)) = msg.msg else { panic!("not a resume: {msg:?}") };
        assert_eq!((r.credential.as_str(), r.holder.as_str()), ("c0ffee", "h"));
    }

    #[test]
    fn pool_removal_counts_as_a_revocation() {
        let msg = pb::ServerMessage {
            msg: Some(server_message::Msg::Expired(pb::Expired {
                lease_id: "l1".into(),
                reason: pb::ExpiryReason::PoolRemoved as i32,
                message: "gone".into(),
            })),
        };
        assert_eq!(
            decode(msg, SystemTime::UNIX_EPOCH),
            Some(FromDaemon::Expired {
                lease_id: "l1".into(),
                reason: Expiry::Revoked,
                message: "gone".into()
            })
        );
    }
}
