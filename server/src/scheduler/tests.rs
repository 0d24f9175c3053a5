//! Scheduler unit tests with explicit instants.
//!
//! Every test builds its own [`Scheduler`] at `t0 = Instant::now()` and moves time by passing later
//! instants; nothing sleeps and nothing needs a runtime. The helpers below are shared by the files
//! of this directory, which are split by concern.

mod acquire_any;
mod admin;
mod admission;
mod bad_input;
mod breaker;
mod budget;
mod extreme_durations;
mod health;
mod lease_lifecycle;
mod limits;
mod order;
mod pause_on_429;
mod reconfigure;
mod resume;
mod takeover;
mod term;

use std::{collections::BTreeMap, time::Duration};

use tokio::time::Instant;

use super::*;

pub(super) fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

pub(super) fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

pub(super) fn pid(name: &str) -> PoolId {
    PoolId::parse(name).expect("test pool names are valid")
}

/// A top-level pool with this limit; everything else default.
pub(super) fn limit(n: u32) -> PoolConfig {
    PoolConfig::with_limit(n)
}

/// A child pool of `parent` with this limit.
pub(super) fn child(parent: &str, n: u32) -> PoolConfig {
    PoolConfig { parent: Some(pid(parent)), ..PoolConfig::with_limit(n) }
}

pub(super) fn cfg() -> SchedulerConfig {
    SchedulerConfig { seed: Some(1), ..Default::default() }
}

pub(super) fn pools(list: &[(&str, PoolConfig)]) -> BTreeMap<PoolId, PoolConfig> {
    list.iter().map(|(n, c)| (pid(n), c.clone())).collect()
}

#[track_caller]
pub(super) fn sched(list: &[(&str, PoolConfig)], t0: Instant) -> Scheduler {
    sched_with(cfg(), list, t0)
}

#[track_caller]
pub(super) fn sched_with(cfg: SchedulerConfig, list: &[(&str, PoolConfig)], t0: Instant) -> Scheduler {
    Scheduler::new(cfg, pools(list), t0).expect("valid pools")
}

/// A request with default priority, TTL and wait.
pub(super) fn req(id: &str, pool: &str) -> NewRequest {
    NewRequest::new(RequestId::parse(id).expect("valid id"), pid(pool))
}

/// A request with this priority.
pub(super) fn req_p(id: &str, pool: &str, priority: u32) -> NewRequest {
    NewRequest { priority: Priority::try_from(priority).expect("valid priority"), ..req(id, pool) }
}

/// The lease granted to `session` for `request_id` in these decisions.
#[track_caller]
pub(super) fn granted(d: &Decisions, session: SessionId, request_id: &str) -> LeaseId {
    d.events
        .iter()
        .find_map(|(s, e)| match e {
            Event::Granted { request_id: r, lease_id, .. } if *s == session && r.as_str() == request_id => {
                Some(*lease_id)
            }
            _ => None,
        })
        .unwrap_or_else(|| panic!("no grant of {request_id:?} to {session:?} in {:#?}", d.events))
}

/// The fencing token of the grant of `request_id`.
#[track_caller]
pub(super) fn token_of(d: &Decisions, request_id: &str) -> u64 {
    d.events
        .iter()
        .find_map(|(_, e)| match e {
            Event::Granted { request_id: r, token, .. } if r.as_str() == request_id => Some(token.0),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no grant of {request_id:?} in {:#?}", d.events))
}

/// `(session, request_id)` of every grant, in order.
pub(super) fn grants(d: &Decisions) -> Vec<(SessionId, String)> {
    d.events
        .iter()
        .filter_map(|(s, e)| match e {
            Event::Granted { request_id, .. } => Some((*s, request_id.to_string())),
            _ => None,
        })
        .collect()
}

/// The events of one session, in order.
pub(super) fn events_of(d: &Decisions, session: SessionId) -> Vec<Event> {
    ungated(&d.events).into_iter().filter(|(s, _)| *s == session).map(|(_, e)| e).collect()
}

/// The events with the gate of every `Queued` left out: most tests are about order and positions;
/// the gate a `Queued` names is checked by the budget tests.
pub(super) fn ungated(events: &[(SessionId, Event)]) -> Vec<(SessionId, Event)> {
    let mut events = events.to_vec();
    for (_, e) in &mut events {
        if let Event::Queued { gate, .. } = e {
            *gate = None;
        }
    }
    events
}

/// Asserts the decisions are exactly one event for `session`.
#[track_caller]
pub(super) fn assert_only(d: &Decisions, session: SessionId, want: Event) {
    assert_eq!(ungated(&d.events), vec![(session, want)]);
}

/// A request queued behind a pause: `Queued`, then `Paused` for the paused level.
#[track_caller]
pub(super) fn assert_queued_in_pause(
    d: &Decisions,
    session: SessionId,
    want: Event,
    pool: &str,
    until: Instant,
) {
    assert_eq!(d.events.len(), 2, "{:#?}", d.events);
    assert_eq!(ungated(&d.events)[0], (session, want));
    assert!(
        matches!(&d.events[1], (s, Event::Paused { pool: p, until: u, .. }) if *s == session && *p == pid(pool) && *u == until),
        "{:#?}",
        d.events[1]
    );
}

/// `Queued` for a request that entered the queue proper.
pub(super) fn queued(request_id: &str, position: u32) -> Event {
    Event::Queued { request_id: RequestId::parse(request_id).unwrap(), position, blocked: false, gate: None }
}

pub(super) fn rejected(request_id: &str, error: Error) -> Event {
    Event::Rejected { request_id: request_id.to_owned(), error }
}

pub(super) fn lease_error(lease: LeaseId, error: Error) -> Event {
    Event::LeaseError { lease_id: lease.to_string(), error }
}

#[track_caller]
pub(super) fn pool_snap(s: &Scheduler, pool: &str) -> PoolSnapshot {
    let snap = s.snapshot(Some(&pid(pool))).expect("pool exists");
    snap.pools.into_iter().next().expect("one pool")
}

/// `(in_flight, queued)` of a pool.
#[track_caller]
pub(super) fn load(s: &Scheduler, pool: &str) -> (u32, u32) {
    let p = pool_snap(s, pool);
    (p.in_flight, p.queued)
}

/// Everything observable about the state, for "changed nothing" checks.
pub(super) fn fingerprint(s: &Scheduler) -> String {
    format!(
        "{:?} leases={} waiters={} sessions={} next={:?}",
        s.snapshot(None).expect("whole snapshot"),
        s.lease_count(),
        s.waiter_count(),
        s.session_count(),
        s.next_deadline(),
    )
}

/// Asserts no pool is above its effective limit (no limit was lowered in the calling test).
#[track_caller]
pub(super) fn assert_within_limits(s: &Scheduler) {
    for p in s.snapshot(None).unwrap().pools {
        assert!(
            p.in_flight <= p.effective_limit,
            "pool {} has {} in flight over its limit {}",
            p.id,
            p.in_flight,
            p.effective_limit
        );
    }
}
