//! The leader's runtime state in etcd: pauses, adaptive headroom, breakers and per-pool held counts.
//!
//! # What and where
//! One JSON document per election, under [`runtime_key`] (`/slotd/{election}/runtime`), holding for
//! every pool what [`crate::scheduler::Scheduler::runtime_state`] returns: the pause (end and
//! reason), the learned effective limit and its next recovery step, the breaker (open until, forced
//! open, half-open; the open count `k`), when each rate budget is full again, the holds on its own
//! leases (end and kind), the ends of its release cooldowns and the held count (leases on the pool
//! and its descendants).
//!
//! # Writes
//! A new leader writes it once before it serves ([`publish_now`]), then at most every [`PUBLISH_INTERVAL`], and only when it changed since the
//! last successful write: a new pause or a breaker opening goes out at the next tick. Each write is
//! an etcd transaction guarded by the term's epoch ([`put_guarded`]: the leader key must still
//! exist with the term's create revision), so a deposed leader's write fails, and the publisher
//! then deposes its member.
//!
//! # Times
//! Instants do not cross processes: the document stores wall-clock times (unix milliseconds),
//! converted at both ends with one [`Clock`] (an `Instant` and the wall clock read together). A
//! time already past when read back is dropped (a pause that ended); a time too far ahead is cut
//! to the documented maximum of its kind.
//!
//! # Reads
//! A new leader reads it once, before it starts its term ([`read`]). No document means that no
//! leader has served in this election (each writes one before it serves): nothing to learn. An
//! oversized, unparsable or out-of-range document is logged and ignored: every pool then learns for
//! the whole period.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::Durable;
use crate::{
    driver::DriverHandle,
    scheduler::{
        BreakerConfig, BreakerRuntime, BudgetKind, HealthConfig, HoldKind, PoolConfig, PoolId, PoolRuntime,
        RuntimeState, SchedulerConfig, time,
    },
};

/// Shortest time between two writes of the runtime state.
pub const PUBLISH_INTERVAL: Duration = Duration::from_millis(250);
/// Largest runtime document read back, in bytes (etcd's default request limit is 1.5 MiB).
pub const MAX_RUNTIME_BYTES: usize = 1024 * 1024;
/// Most pools in a runtime document read back.
pub const MAX_RUNTIME_POOLS: usize = 10_000;
/// Longest pause reason kept, in bytes (longer ones are cut).
pub const MAX_REASON_BYTES: usize = 256;
/// Largest breaker open count accepted (the open timeout `open_base·2^k` saturates far below).
pub const MAX_OPENS: u32 = 64;
/// The document's format version.
pub const FORMAT_VERSION: u32 = 1;

/// The etcd key of the runtime state of `election`.
pub fn runtime_key(election: &str) -> String {
    format!("/slotd/{election}/runtime")
}

/// An instant and the wall clock read together: the one `now` of a conversion.
#[derive(Copy, Clone, Debug)]
pub struct Clock {
    /// The instant.
    pub at: Instant,
    /// The wall clock at that instant, in unix milliseconds.
    pub unix_ms: u64,
}

impl Clock {
    /// Reads both clocks now.
    pub fn now() -> Self {
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Self { at: Instant::now(), unix_ms }
    }

    /// `t` in unix milliseconds, rounded up (a pause never ends earlier for the conversion).
    fn to_unix(self, t: Instant) -> u64 {
        let ahead = t.saturating_duration_since(self.at);
        let ms = ahead.as_millis() + u128::from(!ahead.subsec_nanos().is_multiple_of(1_000_000));
        self.unix_ms.saturating_add(u64::try_from(ms).unwrap_or(u64::MAX))
    }

    /// A unix time as an instant: `None` when it is not after now; at most `max` ahead.
    fn to_instant(self, unix_ms: u64, max: Duration) -> Option<Instant> {
        let ahead = unix_ms.checked_sub(self.unix_ms).filter(|d| *d > 0)?;
        Some(crate::scheduler::time::after(self.at, Duration::from_millis(ahead).min(max)))
    }
}

/// The stored document.
#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    version: u32,
    /// The epoch of the term that wrote it.
    epoch: u64,
    /// When it was written (unix ms).
    written_unix_ms: u64,
    pools: BTreeMap<String, StoredPool>,
}

/// One pool in the document; absent fields are their defaults.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
struct StoredPool {
    #[serde(skip_serializing_if = "Option::is_none")]
    paused_until_unix_ms: Option<u64>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pause_reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    effective: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    recover_at_unix_ms: Option<u64>,
    breaker: StoredBreaker,
    /// The open breaker's end; absent on an open breaker: forced open.
    #[serde(skip_serializing_if = "Option::is_none")]
    breaker_until_unix_ms: Option<u64>,
    breaker_opens: u32,
    /// When each rate budget not full is full again (unix ms), by budget label (`requests`,
    /// `input_tokens`, `output_tokens`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    budget_full_at_unix_ms: BTreeMap<String, u64>,
    /// Holds on the pool's own leases that had not ended.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    holds: Vec<StoredHold>,
    /// Ends of the release cooldowns still running.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    cooling_until_unix_ms: Vec<u64>,
    /// Absent: the publisher was learning without a count (its successor learns fully).
    #[serde(skip_serializing_if = "Option::is_none")]
    held: Option<u32>,
}

/// One hold: when it ends and which it is ([`HoldKind::label`]).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredHold {
    until_unix_ms: u64,
    kind: String,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum StoredBreaker {
    #[default]
    Closed,
    Open,
    HalfOpen,
}

/// The document for `state`, written by the term `epoch`, with times converted by `clock`.
pub fn encode(state: &RuntimeState, epoch: u64, clock: Clock) -> Result<String, String> {
    let pools = state
        .pools
        .iter()
        .map(|(id, p)| {
            let (breaker, breaker_until_unix_ms) = match p.breaker {
                BreakerRuntime::Closed => (StoredBreaker::Closed, None),
                BreakerRuntime::Open { until } => (StoredBreaker::Open, until.map(|u| clock.to_unix(u))),
                BreakerRuntime::HalfOpen => (StoredBreaker::HalfOpen, None),
            };
            let stored = StoredPool {
                paused_until_unix_ms: p.paused_until.map(|u| clock.to_unix(u)),
                pause_reason: p.pause_reason.to_string(),
                effective: p.effective,
                recover_at_unix_ms: p.recover_at.map(|u| clock.to_unix(u)),
                breaker,
                breaker_until_unix_ms,
                breaker_opens: p.opens,
                budget_full_at_unix_ms: BudgetKind::ALL
                    .iter()
                    .filter_map(|k| Some((k.label().to_owned(), clock.to_unix(p.budget_full_at[k.index()]?))))
                    .collect(),
                holds: p
                    .holds
                    .iter()
                    .map(|(t, k)| StoredHold { until_unix_ms: clock.to_unix(*t), kind: k.label().to_owned() })
                    .collect(),
                cooling_until_unix_ms: p.cooling.iter().map(|t| clock.to_unix(*t)).collect(),
                held: p.held,
            };
            (id.to_string(), stored)
        })
        .collect();
    let doc = Stored { version: FORMAT_VERSION, epoch, written_unix_ms: clock.unix_ms, pools };
    serde_json::to_string(&doc).map_err(|e| format!("encoding the runtime state: {e}"))
}

/// Reads a document back, with times converted by `clock`: the epoch that wrote it and the state.
/// Anything out of range is an error (the caller ignores the document); times too far ahead are cut.
pub fn decode(text: &str, clock: Clock) -> Result<(u64, RuntimeState), String> {
    if text.len() > MAX_RUNTIME_BYTES {
        return Err(format!("{} bytes, above the maximum {MAX_RUNTIME_BYTES}", text.len()));
    }
    let doc: Stored = serde_json::from_str(text).map_err(|e| format!("not a runtime document: {e}"))?;
    if doc.version != FORMAT_VERSION {
        return Err(format!("format version {} (this slotd reads {FORMAT_VERSION})", doc.version));
    }
    if doc.pools.len() > MAX_RUNTIME_POOLS {
        return Err(format!("{} pools, above the maximum {MAX_RUNTIME_POOLS}", doc.pools.len()));
    }
    let mut pools = BTreeMap::new();
    for (name, p) in doc.pools {
        let id = PoolId::parse(&name).map_err(|e| e.to_string())?;
        let max = PoolConfig::MAX_CONCURRENT_LIMIT;
        if p.held.is_some_and(|h| h > max) {
            return Err(format!("pool {id}: held count above {max}"));
        }
        if p.effective.is_some_and(|e| e == 0 || e > max) {
            return Err(format!("pool {id}: effective limit out of range 1..={max}"));
        }
        if p.breaker_opens > MAX_OPENS {
            return Err(format!("pool {id}: breaker open count above {MAX_OPENS}"));
        }
        let paused_until =
            p.paused_until_unix_ms.and_then(|t| clock.to_instant(t, SchedulerConfig::MAX_PAUSE));
        let mut reason = p.pause_reason;
        if reason.len() > MAX_REASON_BYTES {
            let mut end = MAX_REASON_BYTES;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason.truncate(end);
        }
        let breaker = match (p.breaker, p.breaker_until_unix_ms) {
            (StoredBreaker::Closed, _) => BreakerRuntime::Closed,
            (StoredBreaker::Open, None) => BreakerRuntime::Open { until: None },
            // An open timeout that ran out while nobody led: the breaker is half-open by now.
            (StoredBreaker::Open, Some(t)) => match clock.to_instant(t, BreakerConfig::MAX_DURATION) {
                Some(u) => BreakerRuntime::Open { until: Some(u) },
                None => BreakerRuntime::HalfOpen,
            },
            (StoredBreaker::HalfOpen, _) => BreakerRuntime::HalfOpen,
        };
        let mut budget_full_at = [None; 3];
        for (label, t) in p.budget_full_at_unix_ms {
            let kind = BudgetKind::ALL
                .into_iter()
                .find(|k| k.label() == label)
                .ok_or_else(|| format!("pool {id}: no budget named {label:?}"))?;
            // A budget full again by now is full: nothing to carry over.
            budget_full_at[kind.index()] = clock.to_instant(t, time::FAR_FUTURE);
        }
        if p.holds.len() > max as usize || p.cooling_until_unix_ms.len() > max as usize {
            return Err(format!("pool {id}: more than {max} holds or cooling slots"));
        }
        // Cooldowns ended by now are dropped; one too far ahead is cut to the longest cooldown.
        let cooling = p
            .cooling_until_unix_ms
            .iter()
            .filter_map(|t| clock.to_instant(*t, PoolConfig::MAX_COOLDOWN))
            .collect();
        // Holds ended by now are dropped; one too far ahead is cut to the longest hold.
        let mut holds = Vec::new();
        for h in &p.holds {
            let kind = HoldKind::ALL
                .into_iter()
                .find(|k| k.label() == h.kind)
                .ok_or_else(|| format!("pool {id}: no hold kind named {:?}", h.kind))?;
            if let Some(until) = clock.to_instant(h.until_unix_ms, HealthConfig::MAX_HOLD) {
                holds.push((until, kind));
            }
        }
        let rt = PoolRuntime {
            paused_until,
            pause_reason: if paused_until.is_some() { Arc::from(reason) } else { Arc::from("") },
            effective: p.effective,
            recover_at: p
                .recover_at_unix_ms
                .map(|t| clock.to_instant(t, PoolConfig::MAX_HEADROOM_RECOVERY).unwrap_or(clock.at)),
            breaker,
            opens: p.breaker_opens,
            budget_full_at,
            holds,
            cooling,
            held: p.held,
        };
        pools.insert(id, rt);
    }
    Ok((doc.epoch, RuntimeState { pools }))
}

/// Why a guarded write failed.
#[derive(Debug, thiserror::Error)]
pub enum PutError {
    /// The term is over: the leader key is gone or belongs to a later term.
    #[error("epoch {0} is over: this member was deposed")]
    Deposed(i64),
    /// etcd did not answer (in time).
    #[error("{0}")]
    Unreachable(String),
    /// This member's term was closed (it resigned or was deposed): nothing is written any more.
    #[error("this member is not the leader")]
    Closed,
}

/// Writes `value` under `key` in a transaction that succeeds only while `leader_key` exists with
/// create revision `epoch` (the term's epoch).
///
/// # Cancel safety
/// Dropping it may or may not have written the value.
pub async fn put_guarded(
    client: &Client,
    leader_key: &[u8],
    epoch: i64,
    key: &str,
    value: String,
    timeout: Duration,
) -> Result<(), PutError> {
    let txn = Txn::new()
        .when([Compare::create_revision(leader_key.to_vec(), CompareOp::Equal, epoch)])
        .and_then([TxnOp::put(key, value, None)]);
    let resp = tokio::time::timeout(timeout, client.clone().txn(txn))
        .await
        .map_err(|_| PutError::Unreachable("etcd did not answer in time".into()))?
        .map_err(|e| PutError::Unreachable(e.to_string()))?;
    if !resp.succeeded() {
        return Err(PutError::Deposed(epoch));
    }
    Ok(())
}

/// What a new leader finds under the runtime key.
#[derive(Debug)]
pub enum Found {
    /// No document: no leader has served in this election (each writes one before it serves), so
    /// there is nothing to learn.
    Absent,
    /// A document that cannot be used (logged): every pool learns for the whole period.
    Unreadable,
    /// The previous leader's state.
    State(RuntimeState),
}

/// Reads the runtime state of `election`; `Err` when etcd does not answer.
///
/// # Cancel safety
/// Cancel safe: it only reads.
pub async fn read(client: &Client, election: &str, timeout: Duration) -> Result<Found, String> {
    let resp = tokio::time::timeout(timeout, client.clone().get(runtime_key(election), None))
        .await
        .map_err(|_| "etcd did not answer in time".to_owned())?
        .map_err(|e| e.to_string())?;
    let Some(kv) = resp.kvs().first() else {
        return Ok(Found::Absent);
    };
    let decoded = kv.value_str().map_err(|e| e.to_string()).and_then(|t| decode(t, Clock::now()));
    match decoded {
        Ok((epoch, state)) => {
            debug!(epoch, pools = state.pools.len(), "read the previous leader's runtime state");
            Ok(Found::State(state))
        }
        Err(e) => {
            warn!(error = %e, "the runtime state stored in etcd is unreadable; ignoring it (full learning period)");
            Ok(Found::Unreadable)
        }
    }
}

/// Writes the runtime state once, now: a new term does so before it serves, so that a document
/// missing from etcd means that no leader has served in this election (nothing to learn).
///
/// # Cancel safety
/// Dropping it may or may not have written the document.
pub async fn publish_now(
    handle: &DriverHandle,
    durable: &Durable,
    epoch: u64,
) -> Result<RuntimeState, PutError> {
    let (_, state) = handle.runtime_state().await.map_err(|e| PutError::Unreachable(e.to_string()))?;
    let text = encode(&state, epoch, Clock::now()).map_err(PutError::Unreachable)?;
    durable.save_runtime(text).await?;
    Ok(state)
}

/// Publishes the runtime state while this member leads (see the module docs), from `last` (what
/// [`publish_now`] wrote) on; returns why the term is over when a write was refused by the epoch
/// guard.
///
/// # Cancel safety
/// Dropping it stops publishing; a write in flight may or may not land.
pub async fn publish(handle: DriverHandle, durable: Durable, epoch: u64, last: RuntimeState) -> String {
    let mut tick = tokio::time::interval(PUBLISH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = Some(last);
    let mut failing = false;
    loop {
        tick.tick().await;
        let Ok((_, state)) = handle.runtime_state().await else {
            return "the scheduler stopped".into();
        };
        if last.as_ref() == Some(&state) {
            continue;
        }
        let text = match encode(&state, epoch, Clock::now()) {
            Ok(t) => t,
            Err(e) => {
                warn!(error = %e, "cannot encode the runtime state");
                continue;
            }
        };
        match durable.save_runtime(text).await {
            Ok(()) => {
                if failing {
                    warn!("runtime state written to etcd again");
                }
                failing = false;
                last = Some(state);
            }
            Err(e @ PutError::Deposed(_)) => return e.to_string(),
            // Resigning (a graceful stop): the election task ends the term itself.
            Err(PutError::Closed) => {}
            Err(PutError::Unreachable(e)) => {
                if !failing {
                    warn!(error = %e, "cannot write the runtime state to etcd; retrying every tick");
                }
                failing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clock() -> Clock {
        Clock { at: Instant::now(), unix_ms: 1_800_000_000_000 }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_state_survives_the_round_trip_through_wall_clock_time() {
        let c = clock();
        let mut state = RuntimeState::default();
        state.pools.insert(
            PoolId::new("p"),
            PoolRuntime {
                paused_until: Some(c.at + ms(4_000)),
                pause_reason: Arc::from("429 from the provider"),
                effective: Some(2),
                recover_at: Some(c.at + ms(9_000)),
                breaker: BreakerRuntime::Open { until: Some(c.at + ms(5_000)) },
                opens: 3,
                budget_full_at: [Some(c.at + ms(20_000)), None, Some(c.at + ms(1_000))],
                holds: vec![(c.at + ms(500), HoldKind::Cancel), (c.at + ms(3_000), HoldKind::Phantom)],
                cooling: vec![c.at + ms(200), c.at + ms(1_800)],
                held: Some(7),
            },
        );
        state.pools.insert(
            PoolId::new("forced"),
            PoolRuntime { breaker: BreakerRuntime::Open { until: None }, ..PoolRuntime::default() },
        );
        state.pools.insert(PoolId::new("q"), PoolRuntime { held: Some(1), ..PoolRuntime::default() });
        state.pools.insert(PoolId::new("unknown"), PoolRuntime { held: None, ..PoolRuntime::default() });
        let text = encode(&state, 42, c).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["pools"]["p"]["paused_until_unix_ms"], 1_800_000_004_000u64);
        assert_eq!(v["epoch"], 42);
        assert_eq!(
            v["pools"]["p"]["budget_full_at_unix_ms"],
            serde_json::json!({"requests": 1_800_000_020_000u64, "output_tokens": 1_800_000_001_000u64})
        );
        assert!(v["pools"]["q"].get("budget_full_at_unix_ms").is_none(), "full budgets are left out");
        assert_eq!(
            v["pools"]["p"]["holds"],
            serde_json::json!([
                {"until_unix_ms": 1_800_000_000_500u64, "kind": "cancel_cooldown"},
                {"until_unix_ms": 1_800_000_003_000u64, "kind": "phantom_hold"}
            ])
        );
        assert!(v["pools"]["q"].get("holds").is_none(), "no holds, no field");
        assert_eq!(
            v["pools"]["p"]["cooling_until_unix_ms"],
            serde_json::json!([1_800_000_000_200u64, 1_800_000_001_800u64])
        );
        assert!(v["pools"]["q"].get("cooling_until_unix_ms").is_none(), "nothing cooling, no field");

        // Read by another process whose instants have another origin: 1.5 s of wall time later.
        let later = Clock { at: Instant::now() + ms(60_000), unix_ms: c.unix_ms + 1_500 };
        let (epoch, back) = decode(&text, later).unwrap();
        assert_eq!(epoch, 42);
        let p = &back.pools[&PoolId::new("p")];
        assert_eq!(p.paused_until, Some(later.at + ms(2_500)), "same wall-clock end");
        assert_eq!(p.pause_reason.as_ref(), "429 from the provider");
        assert_eq!(p.recover_at, Some(later.at + ms(7_500)));
        assert_eq!(p.breaker, BreakerRuntime::Open { until: Some(later.at + ms(3_500)) });
        assert_eq!((p.effective, p.opens, p.held), (Some(2), 3, Some(7)));
        assert_eq!(p.budget_full_at, [Some(later.at + ms(18_500)), None, None], "output is full by now");
        assert_eq!(p.holds, vec![(later.at + ms(1_500), HoldKind::Phantom)], "the cancel hold ended");
        assert_eq!(p.cooling, vec![later.at + ms(300)], "the first cooldown ended");
        assert_eq!(back.pools[&PoolId::new("forced")].breaker, BreakerRuntime::Open { until: None });
        assert_eq!(back.pools[&PoolId::new("q")], PoolRuntime { held: Some(1), ..PoolRuntime::default() });
        assert_eq!(back.pools[&PoolId::new("unknown")].held, None, "no count stays no count");

        // Read after everything ran out: the pause is gone, the breaker is half-open.
        let much_later = Clock { at: later.at, unix_ms: c.unix_ms + 10_000 };
        let (_, back) = decode(&text, much_later).unwrap();
        let p = &back.pools[&PoolId::new("p")];
        assert_eq!((p.paused_until, p.pause_reason.as_ref()), (None, ""));
        assert_eq!(p.breaker, BreakerRuntime::HalfOpen);
        assert_eq!(p.recover_at, Some(much_later.at), "a recovery step due already");
    }

    #[test]
    fn a_sub_millisecond_end_rounds_up() {
        let c = clock();
        assert_eq!(c.to_unix(c.at + Duration::from_micros(1_500)), c.unix_ms + 2);
        assert_eq!(c.to_unix(c.at), c.unix_ms);
        assert_eq!(c.to_unix(c.at.checked_sub(ms(5)).unwrap()), c.unix_ms, "past instants are now");
    }

    #[test]
    fn bad_documents_are_refused_and_far_times_are_cut() {
        let c = clock();
        let doc =
            |pool: &str| format!(r#"{{"version":1,"epoch":1,"written_unix_ms":0,"pools":{{"p":{pool}}}}}"#);
        for bad in [
            String::new(),
            "{".into(),
            "[]".into(),
            r#"{"version":2,"epoch":1,"written_unix_ms":0,"pools":{}}"#.into(),
            r#"{"version":1,"epoch":1,"written_unix_ms":0,"pools":{"bad name!":{}}}"#.into(),
            doc(r#"{"held":10001}"#),
            doc(r#"{"held":-1}"#),
            doc(r#"{"effective":0}"#),
            doc(r#"{"breaker_opens":65}"#),
            doc(r#"{"breaker":"ajar"}"#),
            doc(r#"{"paused_until_unix_ms":"soon"}"#),
            doc(r#"{"budget_full_at_unix_ms":{"tokens":1}}"#),
            doc(r#"{"budget_full_at_unix_ms":{"requests":-1}}"#),
            doc(r#"{"holds":[{"until_unix_ms":1,"kind":"lunch_break"}]}"#),
            doc(r#"{"holds":[{"until_unix_ms":1}]}"#),
            doc(r#"{"cooling_until_unix_ms":[-5]}"#),
            doc(&format!(r#"{{"cooling_until_unix_ms":[{}]}}"#, vec!["1"; 10_001].join(","))),
            doc(&format!(
                r#"{{"holds":[{}]}}"#,
                vec![r#"{"until_unix_ms":1,"kind":"failure_hold"}"#; 10_001].join(",")
            )),
            format!(r#"{{"pad":"{}"}}"#, "x".repeat(MAX_RUNTIME_BYTES)),
        ] {
            assert!(decode(&bad, c).is_err(), "accepted {}", &bad[..bad.len().min(80)]);
        }
        let (_, s) = decode(
            &doc(&format!(
                r#"{{"paused_until_unix_ms":{},"pause_reason":"{}","breaker":"open","breaker_until_unix_ms":{},"budget_full_at_unix_ms":{{"input_tokens":{}}},"holds":[{{"until_unix_ms":{},"kind":"failure_hold"}}],"cooling_until_unix_ms":[{}]}}"#,
                u64::MAX,
                "é".repeat(MAX_REASON_BYTES),
                u64::MAX,
                u64::MAX,
                u64::MAX,
                u64::MAX
            )),
            c,
        )
        .unwrap();
        let p = &s.pools[&PoolId::new("p")];
        assert_eq!(p.paused_until, Some(c.at + SchedulerConfig::MAX_PAUSE));
        assert!(p.pause_reason.len() <= MAX_REASON_BYTES);
        assert_eq!(p.breaker, BreakerRuntime::Open { until: Some(c.at + BreakerConfig::MAX_DURATION) });
        assert_eq!(p.budget_full_at, [None, Some(c.at + time::FAR_FUTURE), None], "empty: in full debt");
        assert_eq!(
            p.holds,
            vec![(c.at + HealthConfig::MAX_HOLD, HoldKind::Failure)],
            "cut to the longest hold"
        );
        assert_eq!(p.cooling, vec![c.at + PoolConfig::MAX_COOLDOWN], "cut to the longest cooldown");
    }
}
