//! Conversions between wire messages (`slotd_proto::v1`) and scheduler types, including clocks.
//!
//! The scheduler counts in monotonic [`Instant`]s; the wire speaks wall-clock timestamps. Outgoing
//! timestamps are computed from one anchor pair (`Instant`, `SystemTime`) taken once, at the first
//! conversion (the daemon's start): so equal instants always give equal timestamps and a later
//! instant never gives an earlier one, as the proto promises for `paused_until`. (A fresh pair per
//! conversion moved with every wall-clock read: two answers for one pause differed by nanoseconds, in
//! either direction.) The price is that a wall-clock step after startup is not followed; the
//! timestamps keep the daemon's own monotonic time.

use std::{
    sync::{Arc, OnceLock},
    time::{Duration, SystemTime},
};

use prost_types::Timestamp;
use slotd_proto::v1 as pb;
use tokio::time::Instant;

use crate::{
    driver::{Published, StreamOp},
    grpc::status::code,
    scheduler::{
        BreakerState, BreakerView, Error, Event, ExpiryReason, Fact, FencingToken, ForceBreaker, HealthPatch,
        Lease, LeaseEnd, LeaseId, LimitKind, NewRequest, Outcome, Overflow, PoolChange, PoolId, PoolPatch,
        PoolSnapshot, Priority, ProviderLimit, Report, RequestId, ResumeCredential, ResumeRequest,
        SchedulerConfig, Snapshot, Usage, WhenOpen,
        budget::{BudgetFact, BudgetKind, BudgetPatch, BudgetSnapshot, TokenEstimate},
        pool::Closed,
    },
};

/// The longest holder name accepted, in bytes.
pub const MAX_HOLDER_LEN: usize = 256;
/// The most lease ids one heartbeat may list.
pub const MAX_HEARTBEAT_IDS: usize = 4096;

/// Largest `seconds` of a well-formed `google.protobuf.Duration` (about 10,000 years, as the type's
/// documentation says). Each field has a much smaller maximum of its own, checked where it is used.
pub const MAX_DURATION_SECONDS: i64 = 315_576_000_000;
/// Earliest `seconds` of a well-formed `google.protobuf.Timestamp` (0001-01-01T00:00:00Z).
pub const MIN_TIMESTAMP_SECONDS: i64 = -62_135_596_800;
/// Latest `seconds` of a well-formed `google.protobuf.Timestamp` (9999-12-31T23:59:59Z).
pub const MAX_TIMESTAMP_SECONDS: i64 = 253_402_300_799;
const NANOS_PER_SECOND: i32 = 1_000_000_000;

/// A wire duration as a `Duration`. Only well-formed, non-negative ones are accepted: `nanos` in
/// `0..1e9` (no normalizing of `nanos = 2e9` into seconds), `seconds` in `0..=MAX_DURATION_SECONDS`.
pub fn duration(field: &str, d: Option<prost_types::Duration>) -> Result<Option<Duration>, Error> {
    d.map(|d| {
        let refuse = |why: &str| {
            Error::InvalidArgument(format!("{field}: {why} (seconds = {}, nanos = {})", d.seconds, d.nanos))
        };
        if d.nanos <= -NANOS_PER_SECOND || d.nanos >= NANOS_PER_SECOND {
            return Err(refuse("not a normalized duration: nanos must be within ±999,999,999"));
        }
        if d.seconds < 0 || d.nanos < 0 {
            return Err(refuse("negative duration"));
        }
        if d.seconds > MAX_DURATION_SECONDS {
            return Err(refuse("duration out of range"));
        }
        // Both are non-negative and in range (checked above).
        Ok(Duration::new(d.seconds.unsigned_abs(), d.nanos.unsigned_abs()))
    })
    .transpose()
}

/// A `Duration` on the wire (saturating at [`MAX_DURATION_SECONDS`]).
pub fn pb_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(d)
        .ok()
        .filter(|p| p.seconds <= MAX_DURATION_SECONDS)
        .unwrap_or(prost_types::Duration { seconds: MAX_DURATION_SECONDS, nanos: 0 })
}

/// The one (`Instant`, `SystemTime`) pair every outgoing timestamp is computed from.
static CLOCK_ANCHOR: OnceLock<(Instant, SystemTime)> = OnceLock::new();

/// Takes the clock anchor now, if no conversion took it yet. The daemon calls it when it starts, so
/// that timestamps follow the wall clock as it was then.
pub fn init_clock_anchor() {
    clock_anchor();
}

fn clock_anchor() -> (Instant, SystemTime) {
    *CLOCK_ANCHOR.get_or_init(|| (Instant::now(), SystemTime::now()))
}

/// An `Instant` as a wall-clock timestamp: monotone in `at` (see the module docs). Never panics.
pub fn timestamp(at: Instant) -> Timestamp {
    let (anchor_i, anchor_s) = clock_anchor();
    let wall = if at >= anchor_i {
        anchor_s.checked_add(at - anchor_i)
    } else {
        anchor_s.checked_sub(anchor_i - at)
    };
    // Only an instant centuries away could miss; there is no such instant in a running daemon.
    Timestamp::from(wall.unwrap_or(anchor_s))
}

/// A wall-clock timestamp as an `Instant` (clamped to now for future ones). Only well-formed ones are
/// accepted: `nanos` in `0..1e9`, `seconds` from year 1 to year 9999.
pub fn instant(field: &str, ts: Timestamp) -> Result<Instant, Error> {
    let refuse = |why: &str| {
        Error::InvalidArgument(format!("{field}: {why} (seconds = {}, nanos = {})", ts.seconds, ts.nanos))
    };
    if !(0..NANOS_PER_SECOND).contains(&ts.nanos) {
        return Err(refuse("not a normalized timestamp: nanos must be in 0..1,000,000,000"));
    }
    if !(MIN_TIMESTAMP_SECONDS..=MAX_TIMESTAMP_SECONDS).contains(&ts.seconds) {
        return Err(refuse("timestamp out of range (years 1 to 9999)"));
    }
    let wall = SystemTime::try_from(ts).map_err(|_| refuse("timestamp out of range"))?;
    let (now_i, now_s) = (Instant::now(), SystemTime::now());
    let ago = now_s.duration_since(wall).unwrap_or(Duration::ZERO);
    // Anything older than the scheduler's clamp is equivalent; clamping here avoids Instant underflow.
    Ok(now_i.checked_sub(ago.min(SchedulerConfig::MAX_TURN_AGE)).unwrap_or(now_i))
}

fn priority(p: Option<u32>) -> Result<Priority, Error> {
    Ok(p.map_or(Ok(Priority::DEFAULT), Priority::try_from)?)
}

fn holder(h: String) -> Result<Arc<str>, Error> {
    if h.len() > MAX_HOLDER_LEN {
        return Err(Error::InvalidArgument(format!(
            "holder is {} bytes, more than {MAX_HOLDER_LEN}",
            h.len()
        )));
    }
    Ok(Arc::from(h))
}

fn truncated(s: &str) -> String {
    crate::scheduler::ids::truncate(s, 128).to_owned()
}

/// Converts one client message into a stream operation. Invalid input becomes
/// [`StreamOp::Invalid`] carrying the event that answers it.
///
/// Ids are echoed exactly as sent, never cut: a client can only match an answer to its message by
/// the id, and an id is bounded by the message size (`limits.max_message_bytes`) already. An over-long
/// request id is refused with INVALID_ARGUMENT, in a `Rejected` that carries it whole.
pub fn stream_op(msg: pb::ClientMessage) -> StreamOp {
    use pb::client_message::Msg;
    match msg.msg {
        None => StreamOp::Invalid(Event::Rejected {
            request_id: String::new(),
            error: Error::InvalidArgument(
                "client message has no body: set one of request, cancel, heartbeat, release, resume".into(),
            ),
        }),
        Some(Msg::Request(r)) => {
            let rid = r.request_id.clone();
            request(r).map_or_else(
                |error| StreamOp::Invalid(Event::Rejected { request_id: rid, error }),
                StreamOp::Request,
            )
        }
        Some(Msg::Cancel(c)) => match RequestId::parse(&c.request_id) {
            Ok(_) => StreamOp::Cancel(c.request_id),
            Err(e) => StreamOp::Invalid(Event::Rejected { request_id: c.request_id, error: e.into() }),
        },
        Some(Msg::Heartbeat(h)) => {
            if h.lease_ids.len() > MAX_HEARTBEAT_IDS {
                return StreamOp::Invalid(Event::LeaseError {
                    lease_id: String::new(),
                    error: Error::InvalidArgument(format!(
                        "heartbeat lists more than {MAX_HEARTBEAT_IDS} leases"
                    )),
                });
            }
            match h.lease_ids.iter().map(|s| s.parse()).collect::<Result<Vec<LeaseId>, _>>() {
                Ok(ids) => StreamOp::Heartbeat(ids),
                Err(e) => StreamOp::Invalid(Event::LeaseError { lease_id: String::new(), error: e.into() }),
            }
        }
        Some(Msg::Release(r)) => {
            let lid = r.lease_id.clone();
            release(r).map_or_else(
                |error| StreamOp::Invalid(Event::LeaseError { lease_id: lid, error }),
                |(id, o)| StreamOp::Release(id, o),
            )
        }
        Some(Msg::Resume(r)) => {
            let lid = r.lease_id.clone();
            resume(r).map_or_else(
                |error| StreamOp::Invalid(Event::LeaseError { lease_id: lid, error }),
                StreamOp::Resume,
            )
        }
    }
}

fn request(r: pb::LeaseRequest) -> Result<NewRequest, Error> {
    Ok(NewRequest {
        request_id: RequestId::parse(&r.request_id)?,
        pool: PoolId::parse(&r.pool)?,
        priority: priority(r.priority)?,
        started_at: r.started_at.map(|t| instant("started_at", t)).transpose()?,
        ttl: duration("ttl", r.ttl)?,
        max_wait: duration("max_wait", r.max_wait)?,
        holder: holder(r.holder)?,
        estimate: r.estimate.map(token_estimate).transpose()?,
        any_of: any_pools(r.any_pools)?,
    })
}

/// A request's token estimate from the wire; each count is bounded by [`Usage::MAX_TOKENS`].
pub fn token_estimate(e: pb::TokenEstimate) -> Result<TokenEstimate, Error> {
    for (field, n) in [("input_tokens", e.input_tokens), ("max_output_tokens", e.max_output_tokens)] {
        if n > Usage::MAX_TOKENS {
            return Err(Error::InvalidArgument(format!(
                "estimate.{field} is {n}; at most {} tokens are accepted",
                Usage::MAX_TOKENS
            )));
        }
    }
    Ok(TokenEstimate { input_tokens: e.input_tokens, max_output_tokens: e.max_output_tokens })
}

/// A list of provider limits from the wire: at most [`ProviderLimit::MAX_PER_REPORT`], unknown kinds
/// skipped.
pub fn provider_limits(limits: Vec<pb::ProviderLimit>) -> Result<Vec<ProviderLimit>, Error> {
    if limits.len() > ProviderLimit::MAX_PER_REPORT {
        return Err(Error::InvalidArgument(format!(
            "provider_limits has {} entries; at most {} are accepted",
            limits.len(),
            ProviderLimit::MAX_PER_REPORT
        )));
    }
    limits.into_iter().filter_map(|l| provider_limit(l).transpose()).collect()
}

/// The further pools of an `acquire_any` request (bounded before parsing).
fn any_pools(pools: Vec<String>) -> Result<Vec<PoolId>, Error> {
    if pools.len() >= NewRequest::MAX_ANY_POOLS {
        return Err(Error::InvalidArgument(format!(
            "any_pools has {} entries; at most {} are accepted",
            pools.len(),
            NewRequest::MAX_ANY_POOLS - 1
        )));
    }
    pools.iter().map(|p| PoolId::parse(p).map_err(Error::from)).collect()
}

/// What an operator forces a breaker to.
pub fn breaker_force(code: i32) -> Result<ForceBreaker, Error> {
    match pb::BreakerForce::try_from(code) {
        Ok(pb::BreakerForce::Open) => Ok(ForceBreaker::Open),
        Ok(pb::BreakerForce::Closed) => Ok(ForceBreaker::Closed),
        _ => {
            Err(Error::InvalidArgument(format!("to {code}: want BREAKER_FORCE_OPEN or BREAKER_FORCE_CLOSED")))
        }
    }
}

/// A breaker as it goes on the wire.
pub fn breaker_status(view: BreakerView, enabled: bool) -> pb::BreakerStatus {
    let (state, open_until, probe) = match view.state {
        BreakerState::Closed => (pb::BreakerState::Closed, None, None),
        BreakerState::Open { until } => (pb::BreakerState::Open, until, None),
        BreakerState::HalfOpen { probe } => (pb::BreakerState::HalfOpen, None, probe),
    };
    pb::BreakerStatus {
        state: state as i32,
        open_until: open_until.map(timestamp),
        probe_lease_id: probe.map(|l| l.to_string()).unwrap_or_default(),
        epoch: view.epoch,
        opens: view.opens,
        failures: view.failures,
        outcomes: view.outcomes,
        forced: view.forced,
        enabled,
    }
}

fn release(r: pb::ReleaseLease) -> Result<(LeaseId, Report), Error> {
    let id = r.lease_id.parse()?;
    let outcome = outcome(r.outcome, r.retry_after)?;
    let usage = r.usage.map(usage).transpose()?;
    let limits = provider_limits(r.provider_limits)?;
    Ok((id, Report { outcome, usage, limits }))
}

/// An outcome class from the wire, with the Retry-After of the classes that pause.
pub fn outcome(code: i32, retry_after: Option<prost_types::Duration>) -> Result<Outcome, Error> {
    Ok(match pb::Outcome::try_from(code) {
        Ok(pb::Outcome::Unspecified | pb::Outcome::Ok) => Outcome::Ok,
        Ok(pb::Outcome::Error) => Outcome::Error,
        Ok(pb::Outcome::Cancelled) => Outcome::Cancelled,
        Ok(pb::Outcome::RateLimited) => Outcome::RateLimited(duration("retry_after", retry_after)?),
        Ok(pb::Outcome::Overloaded) => Outcome::Overloaded(duration("retry_after", retry_after)?),
        Ok(pb::Outcome::QuotaExhausted) => Outcome::QuotaExhausted(duration("retry_after", retry_after)?),
        Err(_) => return Err(Error::InvalidArgument(format!("unknown outcome {code}"))),
    })
}

/// Token usage from the wire; each count is bounded by [`Usage::MAX_TOKENS`].
pub fn usage(u: pb::Usage) -> Result<Usage, Error> {
    let check = |field: &str, n: u64| {
        if n > Usage::MAX_TOKENS {
            return Err(Error::InvalidArgument(format!(
                "usage.{field} is {n}; at most {} tokens are accepted",
                Usage::MAX_TOKENS
            )));
        }
        Ok(n)
    };
    Ok(Usage {
        input_tokens: check("input_tokens", u.input_tokens)?,
        output_tokens: check("output_tokens", u.output_tokens)?,
        cache_read_tokens: check("cache_read_tokens", u.cache_read_tokens)?,
        cache_creation_tokens: check("cache_creation_tokens", u.cache_creation_tokens)?,
    })
}

/// One provider limit from the wire; an entry of unknown kind is skipped (`None`), as newer clients
/// may send kinds this daemon does not know.
pub fn provider_limit(l: pb::ProviderLimit) -> Result<Option<ProviderLimit>, Error> {
    let kind = match pb::LimitKind::try_from(l.kind) {
        Ok(pb::LimitKind::Requests) => LimitKind::Requests,
        Ok(pb::LimitKind::Tokens) => LimitKind::Tokens,
        Ok(pb::LimitKind::InputTokens) => LimitKind::InputTokens,
        Ok(pb::LimitKind::OutputTokens) => LimitKind::OutputTokens,
        Ok(pb::LimitKind::Unspecified) | Err(_) => return Ok(None),
    };
    if l.remaining > l.limit {
        return Err(Error::InvalidArgument(format!(
            "provider limit {kind:?}: remaining {} exceeds limit {}",
            l.remaining, l.limit
        )));
    }
    let reset_in = duration("provider_limits.reset_in", l.reset_in)?.unwrap_or_default();
    if reset_in > ProviderLimit::MAX_RESET_IN {
        return Err(Error::InvalidArgument(format!(
            "provider limit {kind:?}: reset_in {reset_in:?} exceeds {:?}",
            ProviderLimit::MAX_RESET_IN
        )));
    }
    Ok(Some(ProviderLimit { kind, limit: l.limit, remaining: l.remaining, reset_in }))
}

fn resume(r: pb::ResumeLease) -> Result<ResumeRequest, Error> {
    Ok(ResumeRequest {
        lease_id: r.lease_id.parse()?,
        token: FencingToken(r.fencing_token),
        pool: PoolId::parse(&r.pool)?,
        priority: priority(r.priority)?,
        ttl: duration("ttl", r.ttl)?,
        holder: holder(r.holder)?,
        credential: ResumeCredential::new(r.credential),
    })
}

/// A scheduler event as a server message.
pub fn server_message(event: Event) -> pb::ServerMessage {
    use pb::server_message::Msg;
    let msg = match event {
        Event::Queued { request_id, position, blocked, gate: closed } => {
            let (gate, gate_until, gate_pool) = closed.as_ref().map(gate).unwrap_or_default();
            Msg::Queued(pb::Queued {
                request_id: request_id.to_string(),
                position,
                blocked,
                gate: gate as i32,
                gate_until: gate_until.map(timestamp),
                gate_pool,
            })
        }
        Event::Granted { request_id, lease_id, pool, token, ttl, expires_at, credential, probe, .. } => {
            Msg::Granted(pb::Granted {
                request_id: request_id.to_string(),
                lease_id: lease_id.to_string(),
                fencing_token: token.0,
                ttl: Some(pb_duration(ttl)),
                expires_at: Some(timestamp(expires_at)),
                pool: pool.to_string(),
                // The one place a credential leaves the daemon: to its grantee.
                resume_credential: credential.expose().to_owned(),
                probe,
            })
        }
        Event::Rejected { request_id, error } => Msg::Rejected(pb::Rejected {
            request_id,
            code: code(&error) as i32,
            message: error.to_string(),
            retry_after: error.retry_after().map(pb_duration),
        }),
        Event::Paused { pool, until, reason } => Msg::Paused(pb::Paused {
            pool: pool.to_string(),
            until: Some(timestamp(until)),
            reason: reason.to_string(),
            remaining: Some(pb_duration(until.saturating_duration_since(Instant::now()))),
        }),
        Event::Resumed { pool } => Msg::Resumed(pb::Resumed { pool: pool.to_string() }),
        Event::Breaker { pool, view, reason } => Msg::Breaker(pb::BreakerChanged {
            pool: pool.to_string(),
            // Sessions learn the state; whether the breaker is enabled is Status's business.
            status: Some(breaker_status(view, true)),
            reason: reason.to_string(),
        }),
        Event::Expired { lease_id, reason, .. } => {
            let (reason, message) = match reason {
                ExpiryReason::Ttl => {
                    (pb::ExpiryReason::Ttl, "no heartbeat within the ttl; the slot was reclaimed")
                }
                ExpiryReason::Revoked => (pb::ExpiryReason::Revoked, "revoked by an operator"),
                ExpiryReason::PoolRemoved => (pb::ExpiryReason::PoolRemoved, "the pool was removed"),
            };
            Msg::Expired(pb::Expired {
                lease_id: lease_id.to_string(),
                reason: reason as i32,
                message: message.into(),
            })
        }
        Event::ResumedElsewhere { lease_id, .. } => Msg::Expired(pb::Expired {
            lease_id: lease_id.to_string(),
            reason: pb::ExpiryReason::ResumedElsewhere as i32,
            message: "another stream resumed this lease with its credential; stop using the slot".into(),
        }),
        Event::Released { lease_id, .. } => Msg::Released(pb::Released { lease_id: lease_id.to_string() }),
        Event::LeaseError { lease_id, error } => Msg::LeaseError(pb::LeaseError {
            lease_id,
            code: code(&error) as i32,
            message: error.to_string(),
        }),
        Event::LeaseResumed { lease_id, token, expires_at } => Msg::LeaseResumed(pb::LeaseResumed {
            lease_id: lease_id.to_string(),
            fencing_token: token.0,
            expires_at: Some(timestamp(expires_at)),
        }),
        Event::Cancelled { request_id } => {
            Msg::Cancelled(pb::Cancelled { request_id: request_id.to_string() })
        }
        Event::HeartbeatAck { renewed } => Msg::HeartbeatAck(pb::HeartbeatAck { renewed }),
    };
    pb::ServerMessage { msg: Some(msg) }
}

/// A scheduler snapshot as a `StatusResponse`.
pub fn status_response(s: Snapshot) -> pb::StatusResponse {
    let now = Instant::now();
    pb::StatusResponse {
        pools: s.pools.into_iter().map(pool_status).collect(),
        leases: s
            .leases
            .into_iter()
            .map(|l| pb::LeaseStatus {
                lease_id: l.id.to_string(),
                pool: l.pool.to_string(),
                holder: l.holder.to_string(),
                priority: u32::from(l.priority.get()),
                age: Some(pb_duration(now.saturating_duration_since(l.granted_at))),
                expires_in: Some(pb_duration(l.expires_at.saturating_duration_since(now))),
                fencing_token: l.token.0,
            })
            .collect(),
        learning: s.learning,
        shutting_down: s.shutting_down,
    }
}

/// One pool's state on the wire.
pub fn pool_status(p: PoolSnapshot) -> pb::PoolStatus {
    let gate_of = p.gate.as_ref().map(gate).unwrap_or_default();
    pb::PoolStatus {
        name: p.id.to_string(),
        parent: p.config.parent.map(|p| p.to_string()).unwrap_or_default(),
        limit: p.config.max_concurrent,
        effective_limit: p.effective_limit,
        in_flight: p.in_flight,
        queued: p.queued,
        paused_until: p.paused_until.map(timestamp),
        pause_reason: p.pause_reason.to_string(),
        cooling: p.cooling,
        next_fencing_token: p.next_token,
        max_agent_retry_after: Some(pb_duration(p.config.max_agent_retry_after)),
        blocked_by: p.blocked_by.map(|b| pb::PauseInherited {
            pool: b.pool.to_string(),
            until: Some(timestamp(b.until)),
            reason: b.reason.to_string(),
        }),
        held: p.held,
        held_until: p.held_until.map(timestamp),
        breaker: Some(breaker_status(p.breaker, p.config.health.breaker.enabled)),
        budget: p.budget.map(budget_status),
        gate: gate_of.0 as i32,
        gate_until: gate_of.1.map(timestamp),
        gate_pool: gate_of.2,
        learning_until: p.learning.map(|l| timestamp(l.until)),
        learning_expected: p.learning.and_then(|l| l.expected),
        learning_back: p.learning.map_or(0, |l| l.back),
    }
}

/// A closed gate on the wire: which gate, until when (when known), on which pool of the chain.
pub fn gate(c: &Closed) -> (pb::Gate, Option<Instant>, String) {
    match c {
        Closed::Full(p) => (pb::Gate::Slots, None, p.to_string()),
        Closed::Cooling(p, at) => (pb::Gate::Cooldown, Some(*at), p.to_string()),
        // A failure hold, cancel cooldown or phantom hold keeps the slot: a cooldown by another cause.
        Closed::Held(p) => (pb::Gate::Cooldown, None, p.to_string()),
        Closed::Breaker(p, until) => (pb::Gate::Breaker, *until, p.to_string()),
        Closed::Paused(p, at) => (pb::Gate::Pause, Some(*at), p.to_string()),
        Closed::Learning => (pb::Gate::Learning, None, String::new()),
        Closed::Draining => (pb::Gate::Draining, None, String::new()),
        // A leader past its grant deadline is about to be deposed: like a drain, nothing new is
        // granted here (the wire has no gate of its own for it).
        Closed::Fenced => (pb::Gate::Draining, None, String::new()),
        Closed::Budget { pool, kind, until } => {
            let g = match kind {
                BudgetKind::Requests => pb::Gate::RequestsBudget,
                BudgetKind::InputTokens => pb::Gate::InputTokensBudget,
                BudgetKind::OutputTokens => pb::Gate::OutputTokensBudget,
            };
            (g, Some(*until), pool.to_string())
        }
    }
}

fn budget_kind(k: BudgetKind) -> pb::BudgetKind {
    match k {
        BudgetKind::Requests => pb::BudgetKind::Requests,
        BudgetKind::InputTokens => pb::BudgetKind::InputTokens,
        BudgetKind::OutputTokens => pb::BudgetKind::OutputTokens,
    }
}

/// A pool's budgets on the wire.
pub fn budget_status(b: BudgetSnapshot) -> pb::BudgetStatus {
    let now = Instant::now();
    let c = b.counters;
    pb::BudgetStatus {
        window: Some(pb_duration(b.window)),
        shadow: b.shadow,
        reservations: b.reservations,
        levels: b
            .levels
            .into_iter()
            .map(|l| pb::BudgetLevelStatus {
                kind: budget_kind(l.kind) as i32,
                refill: l.rate,
                burst: l.burst,
                level: l.level,
                debt: l.debt,
                reserved: l.reserved,
                full_at: l.full_at.map(timestamp),
            })
            .collect(),
        provider: b
            .provider
            .into_iter()
            .map(|v| pb::BudgetProviderView {
                limit: Some(pb::ProviderLimit {
                    kind: pb::LimitKind::from(v.limit.kind) as i32,
                    limit: v.limit.limit,
                    remaining: v.limit.remaining,
                    reset_in: Some(pb_duration(v.limit.reset_in)),
                }),
                age: Some(pb_duration(now.saturating_duration_since(v.seen_at))),
            })
            .collect(),
        counters: Some(pb::BudgetCounters {
            reserved_requests: c.reserved[0],
            reserved_input_tokens: c.reserved[1],
            reserved_output_tokens: c.reserved[2],
            settled_requests: c.settled[0],
            settled_input_tokens: c.settled[1],
            settled_output_tokens: c.settled[2],
            estimate_error_input_tokens: c.estimate_error[0],
            estimate_error_output_tokens: c.estimate_error[1],
            settled_with_usage: c.settled_with_usage,
            shadow_waits: c.shadow_waits,
            shadow_wait: Some(pb_duration(c.shadow_wait)),
        }),
    }
}

/// An `UpsertPool` spec as a pool name and the settings it changes. Range checks (for example
/// max_concurrent in 1..=10000) are the scheduler's, so reloads and upserts share them.
pub fn pool_patch(spec: pb::PoolSpec) -> Result<(PoolId, PoolPatch), Error> {
    let id = PoolId::parse(&spec.name)?;
    let parent = match spec.parent.as_deref() {
        None => None,
        Some("") => Some(None),
        Some(p) => Some(Some(PoolId::parse(p)?)),
    };
    let on_overflow = match spec.on_overflow.as_deref() {
        None => None,
        Some("reject") => Some(Overflow::Reject),
        Some("shed_oldest") => Some(Overflow::ShedOldest),
        Some("block") => Some(Overflow::Block),
        Some(other) => {
            return Err(Error::InvalidArgument(format!(
                "on_overflow {:?}: want \"reject\", \"shed_oldest\" or \"block\"",
                truncated(other)
            )));
        }
    };
    Ok((
        id,
        PoolPatch {
            max_concurrent: spec.max_concurrent,
            parent,
            max_queue_depth: spec.max_queue_depth,
            on_overflow,
            cooldown: duration("cooldown", spec.cooldown)?,
            default_ttl: duration("default_ttl", spec.default_ttl)?,
            max_ttl: duration("max_ttl", spec.max_ttl)?,
            // Zero clears the wait limit (wait forever), as documented on the field.
            max_wait: duration("max_wait", spec.max_wait)?.map(|d| (!d.is_zero()).then_some(d)),
            default_retry_after: duration("default_retry_after", spec.default_retry_after)?,
            adaptive: spec.adaptive,
            headroom_recovery: duration("headroom_recovery", spec.headroom_recovery)?,
            max_agent_retry_after: duration("max_agent_retry_after", spec.max_agent_retry_after)?,
            budget: BudgetPatch {
                // Zero clears: no budget, or a burst equal to the per-minute figure.
                requests_per_minute: spec.requests_per_minute.map(nonzero),
                requests_burst: spec.requests_burst.map(nonzero),
                input_tokens_per_minute: spec.input_tokens_per_minute.map(nonzero),
                input_tokens_burst: spec.input_tokens_burst.map(nonzero),
                output_tokens_per_minute: spec.output_tokens_per_minute.map(nonzero),
                output_tokens_burst: spec.output_tokens_burst.map(nonzero),
                window: duration("budget_window", spec.budget_window)?,
                default_input_tokens: spec.default_input_tokens,
                default_output_tokens: spec.default_output_tokens,
                shadow: spec.budget_shadow,
            },
            health: HealthPatch {
                failure_hold: duration("failure_hold", spec.failure_hold)?,
                cancel_cooldown: duration("cancel_cooldown", spec.cancel_cooldown)?,
                phantom_hold: duration("phantom_hold", spec.phantom_hold)?,
                phantom_hold_max: duration("phantom_hold_max", spec.phantom_hold_max)?,
                breaker_enabled: spec.breaker_enabled,
                breaker_failures: spec.breaker_failures,
                breaker_window: duration("breaker_window", spec.breaker_window)?,
                breaker_failure_percent: spec
                    .breaker_failure_percent
                    .map(|p| {
                        u8::try_from(p).ok().filter(|p| *p <= 100).ok_or_else(|| {
                            Error::InvalidArgument(format!(
                                "breaker_failure_percent {p} out of range 0..=100"
                            ))
                        })
                    })
                    .transpose()?,
                breaker_min_outcomes: spec.breaker_min_outcomes,
                breaker_open_base: duration("breaker_open_base", spec.breaker_open_base)?,
                breaker_open_max: duration("breaker_open_max", spec.breaker_open_max)?,
                breaker_when_open: match spec.breaker_when_open.as_deref() {
                    None => None,
                    Some("wait") => Some(WhenOpen::Wait),
                    Some("fail_fast") => Some(WhenOpen::FailFast),
                    Some(other) => {
                        return Err(Error::InvalidArgument(format!(
                            "breaker_when_open {:?}: want \"wait\" or \"fail_fast\"",
                            truncated(other)
                        )));
                    }
                },
            },
        },
    ))
}

fn nonzero(n: u64) -> Option<u64> {
    (n != 0).then_some(n)
}

/// A published fact as a Watch message (`None` for a fact Watch does not show).
pub fn watch_event(p: Published) -> Option<pb::WatchEvent> {
    use pb::watch_event::Event as E;
    let lease = |l: &Lease, detail: String| pb::LeaseChange {
        pool: l.pool.to_string(),
        lease_id: l.id.to_string(),
        holder: l.holder.to_string(),
        detail,
        probe: false,
    };
    let status = p.status;
    let pool = |p: &PoolId, detail: String| pb::PoolChange {
        pool: p.to_string(),
        detail,
        status: status.clone().map(pool_status),
    };
    let event = match p.fact {
        Fact::Granted { lease: l, probe, .. } => {
            let detail = if probe { "breaker probe, fencing token" } else { "fencing token" };
            E::Granted(pb::LeaseChange { probe, ..lease(&l, format!("{detail} {}", l.token.0)) })
        }
        Fact::Held { pool: id, lease_id, kind, until } => {
            let secs = until.saturating_duration_since(Instant::now()).as_secs_f64();
            E::Held(pool(&id, format!("{} after lease {lease_id} ({secs:.1}s)", kind.label())))
        }
        Fact::HoldEnded { pool: id, kind } => E::Held(pool(&id, format!("{} ended", kind.label()))),
        Fact::Breaker { pool: id, view, reason } => {
            let state = match view.state {
                BreakerState::Open { until: Some(u) } => {
                    format!("open ({:.1}s)", u.saturating_duration_since(Instant::now()).as_secs_f64())
                }
                other => other.label().to_owned(),
            };
            E::Breaker(pool(&id, format!("breaker {state}, epoch {}: {reason}", view.epoch)))
        }
        Fact::Ended { lease: l, end } => {
            let detail = lease_end_detail(end).to_owned();
            match end {
                LeaseEnd::Expired(_) => E::Expired(lease(&l, detail)),
                LeaseEnd::Released(_) | LeaseEnd::StreamClosed => E::Released(lease(&l, detail)),
            }
        }
        Fact::Paused { pool: id, until, reason, .. } => {
            let secs = until.saturating_duration_since(Instant::now()).as_secs_f64();
            E::Paused(pool(&id, format!("{reason} ({secs:.1}s left)")))
        }
        Fact::Resumed { pool: id } => E::Resumed(pool(&id, "pause ended".into())),
        Fact::Effective { pool: id, limit } => {
            E::LimitChanged(pool(&id, format!("effective limit now {limit} (adaptive headroom)")))
        }
        Fact::PoolChanged { pool: id, change, reload } => {
            E::LimitChanged(pool(&id, pool_change_detail(change, reload).into()))
        }
        Fact::Rejected { error, .. } => E::Rejected(pb::PoolChange {
            pool: error.pool().map(|p| p.to_string()).unwrap_or_default(),
            detail: error.to_string(),
            status: None,
        }),
        Fact::Budget { pool: id, fact } => {
            let (detail, would_wait) = match fact {
                BudgetFact::ShadowWait { kind, level, would_wait } => (
                    format!(
                        "shadow: {} budget of pool {level} would have held a grant for {:.3}s",
                        kind.label(),
                        would_wait.as_secs_f64()
                    ),
                    Some(pb_duration(would_wait)),
                ),
                BudgetFact::ProviderWord { limits } => {
                    let said: Vec<String> =
                        limits.iter().map(|l| format!("{:?} {}/{}", l.kind, l.remaining, l.limit)).collect();
                    (format!("provider limits applied: {}", said.join(", ")), None)
                }
                BudgetFact::Charged { cost } => (
                    format!(
                        "usage reported outside a lease: {} input, {} output tokens",
                        cost.0[1], cost.0[2]
                    ),
                    None,
                ),
                // Reservations and settlements ride on each lease's grant and end.
                BudgetFact::Reserved { .. } | BudgetFact::Settled { .. } => return None,
            };
            E::Budget(pb::BudgetChange { pool: id.to_string(), detail, would_wait })
        }
        Fact::LeaseRefused { .. } => return None,
    };
    Some(pb::WatchEvent { at: Some(timestamp(p.at)), event: Some(event) })
}

/// The Watch detail of a lease's end: the outcome its holder reported, or why it expired.
fn lease_end_detail(end: LeaseEnd) -> &'static str {
    match end {
        LeaseEnd::StreamClosed => "stream closed",
        LeaseEnd::Released(outcome) => outcome.label(),
        LeaseEnd::Expired(ExpiryReason::Ttl) => "ttl",
        LeaseEnd::Expired(ExpiryReason::Revoked) => "revoked",
        LeaseEnd::Expired(ExpiryReason::PoolRemoved) => "pool_removed",
    }
}

/// The Watch detail of a pool change.
fn pool_change_detail(change: PoolChange, reload: bool) -> &'static str {
    match (change, reload) {
        (PoolChange::Created, false) => "created",
        (PoolChange::Changed, false) => "changed",
        (PoolChange::Removed, false) => "removed",
        (PoolChange::Created, true) => "created by a configuration reload",
        (PoolChange::Changed, true) => "changed by a configuration reload",
        (PoolChange::Removed, true) => "removed by a configuration reload",
    }
}

/// A snapshot as a Watch message.
pub fn watch_snapshot(s: Snapshot) -> pb::WatchEvent {
    pb::WatchEvent {
        at: Some(timestamp(Instant::now())),
        event: Some(pb::watch_event::Event::Snapshot(status_response(s))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pb(seconds: i64, nanos: i32) -> Option<prost_types::Duration> {
        Some(prost_types::Duration { seconds, nanos })
    }

    #[test]
    fn well_formed_durations_convert_exactly() {
        assert_eq!(duration("d", None).unwrap(), None);
        assert_eq!(duration("d", pb(0, 0)).unwrap(), Some(Duration::ZERO));
        assert_eq!(duration("d", pb(0, 1)).unwrap(), Some(Duration::from_nanos(1)));
        assert_eq!(duration("d", pb(1, 999_999_999)).unwrap(), Some(Duration::new(1, 999_999_999)));
        let max = Duration::new(MAX_DURATION_SECONDS as u64, 999_999_999);
        assert_eq!(duration("d", pb(MAX_DURATION_SECONDS, 999_999_999)).unwrap(), Some(max));
    }

    /// Negative, non-normalized and out-of-range durations are refused, never normalized or wrapped.
    #[test]
    fn malformed_durations_are_refused_naming_the_field() {
        let cases = [
            (pb(-1, 0), "negative"),
            (pb(0, -1), "negative"),
            (pb(-1, -999_999_999), "negative"),
            (pb(i64::MIN, 0), "negative"),
            (pb(0, 1_000_000_000), "normalized"),
            (pb(0, 2_000_000_000), "normalized"),
            (pb(1, i32::MAX), "normalized"),
            (pb(0, i32::MIN), "normalized"),
            (pb(MAX_DURATION_SECONDS + 1, 0), "out of range"),
            (pb(i64::MAX, 0), "out of range"),
            (pb(i64::MAX, 999_999_999), "out of range"),
        ];
        for (d, want) in cases {
            let err = duration("cooldown", d).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, Error::InvalidArgument(_)), "{d:?}: {msg}");
            assert!(msg.starts_with("cooldown: ") && msg.contains(want), "{d:?}: {msg}");
        }
    }

    #[test]
    fn wire_durations_saturate_on_the_way_out() {
        assert_eq!(pb_duration(Duration::MAX).seconds, MAX_DURATION_SECONDS);
        assert_eq!(
            pb_duration(Duration::from_millis(1500)),
            prost_types::Duration { seconds: 1, nanos: 500_000_000 }
        );
    }

    #[test]
    fn timestamps_are_checked_and_clamped() {
        let ts = |seconds, nanos| Timestamp { seconds, nanos };
        for (bad, want) in [
            (ts(0, -1), "normalized"),
            (ts(0, 1_000_000_000), "normalized"),
            (ts(1_700_000_000, i32::MAX), "normalized"),
            (ts(i64::MAX, 0), "out of range"),
            (ts(i64::MIN, 0), "out of range"),
            (ts(MAX_TIMESTAMP_SECONDS + 1, 0), "out of range"),
            (ts(MIN_TIMESTAMP_SECONDS - 1, 0), "out of range"),
        ] {
            let msg = instant("started_at", bad).unwrap_err().to_string();
            assert!(msg.starts_with("started_at: ") && msg.contains(want), "{bad:?}: {msg}");
        }
        // The extremes of the valid range clamp to [now - 2h, now] without overflowing.
        for ok in [ts(MIN_TIMESTAMP_SECONDS, 0), ts(0, 0), ts(MAX_TIMESTAMP_SECONDS, 999_999_999)] {
            let at = instant("started_at", ok).unwrap();
            assert!(at <= Instant::now(), "{ok:?}");
        }
    }
}
