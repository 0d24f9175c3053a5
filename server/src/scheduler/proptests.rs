//! Property tests: random operation sequences over a small pool tree, run through the shared model
//! (`model.rs`, which the fuzz targets use too) and checked after every step; see `model.rs` for the
//! list of checks. This file holds the proptest strategies (`Op::Shutdown` is left to the fuzz
//! targets: it would end most sequences early).
//!
//! A second property checks that aging lets a low priority through a stream of high ones.

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;
use tokio::time::Instant;

use super::{
    model::{Case, Op},
    *,
};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn overflow() -> impl Strategy<Value = Overflow> {
    prop_oneof![Just(Overflow::Reject), Just(Overflow::ShedOldest), Just(Overflow::Block)]
}

fn op() -> impl Strategy<Value = Op> {
    let s = 0..8usize;
    prop_oneof![
        1 => Just(Op::Open),
        1 => (s.clone(), any::<bool>()).prop_map(|(s, grace)| Op::Close { s, grace }),
        8 => (
            s.clone(),
            0..4usize,
            0..10u8,
            0..6u8,
            prop_oneof![Just(None), Just(Some(0)), (1..1500u64).prop_map(Some)],
            0..4u8,
            prop::bool::weighted(0.1),
        )
            .prop_map(|(s, pool, priority, ttl, max_wait, back, dup)| Op::Request {
                s,
                pool,
                priority,
                ttl,
                max_wait,
                back,
                dup
            }),
        2 => (s.clone(), 0..8usize).prop_map(|(s, which)| Op::Cancel { s, which }),
        2 => (s.clone(), prop::option::of(0..8usize)).prop_map(|(s, which)| Op::Heartbeat { s, which }),
        5 => (s.clone(), 0..8usize, 0..8u8, prop::option::of(0..800u64))
            .prop_map(|(s, which, outcome, retry)| Op::Release { s, which, outcome, retry }),
        1 => (s.clone(), 0..8usize, prop::bool::weighted(0.8), prop::bool::weighted(0.3))
            .prop_map(|(s, which, good_token, forged)| Op::Move { s, which, good_token, forged }),
        1 => (s.clone(), 0..4usize, 1..4u128, prop_oneof![1..60u64, Just(SchedulerConfig::MAX_RESUME_TOKEN), Just(u64::MAX)], prop::bool::weighted(0.4))
            .prop_map(|(s, pool, id, token, forged)| Op::Recreate { s, pool, id, token, forged }),
        1 => (0..4usize, prop::option::of(0..800u64)).prop_map(|(pool, retry)| Op::RateLimit { pool, retry }),
        1 => ([1..5u32, 1..4u32, 1..4u32, 1..3u32], [1..4u32, 1..4u32, 1..4u32, 1..4u32], prop::bool::weighted(0.2))
            .prop_map(|(limits, depth, remove_b)| Op::SetPools { limits, depth, remove_b }),
        3 => Just(Op::Tick),
        1 => (0..4usize, 0..800u64).prop_map(|(pool, dur)| Op::PausePool { pool, dur }),
        1 => (0..4usize).prop_map(|pool| Op::ResumePool { pool }),
        1 => (0..8usize).prop_map(|which| Op::Revoke { which }),
        1 => any::<bool>().prop_map(Op::Drain),
        1 => prop::option::of(0..400u64).prop_map(|ms| Op::Fence { ms }),
        1 => prop_oneof![Just(1u64), 1..1_000_000u64].prop_map(|bump| Op::BeginTerm { bump }),
        1 => (
            prop::option::of([0..4u8, 0..4u8, 0..4u8, 0..4u8]),
            prop::option::of((0..4usize, 1..800u64)),
            prop::option::of((0..4usize, 1..800u64)),
        )
            .prop_map(|(held, pause, hold)| Op::TakeOver { held, pause, hold }),
        2 => (s.clone(), 0..4usize, 0..9u8, 0..model::EXTREMES.len())
            .prop_map(|(s, pool, target, value)| Op::Extreme { s, pool, target, value }),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        [1..5u32, 1..4u32, 1..4u32, 1..3u32],
        [1..4u32, 1..4u32, 1..4u32, 1..4u32],
        [overflow(), overflow(), overflow(), overflow()],
        [any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()],
        any::<bool>(),
        prop::bool::weighted(0.25),
        prop::collection::vec((prop_oneof![3 => Just(0u64), 2 => 1..400u64], op()), 1..60),
    )
        .prop_map(|(limits, depth, overflow, cooldown, adaptive, learning, ops)| Case {
            limits,
            depth,
            overflow,
            cooldown,
            adaptive,
            learning,
            ops,
        })
}

proptest! {
    // 256 cases by default (about a second in debug); set PROPTEST_CASES for a longer search.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(256),
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_operations_keep_every_invariant(case in case()) {
        model::run(&case);
    }

    /// Rate budgets: see [`run_budgets`].
    #[test]
    fn budgets_keep_debt_cap_order_and_leak_nothing(
        pools in budget_tree(),
        ops in prop::collection::vec((prop_oneof![2 => Just(0u64), 3 => 1..300u64], budget_op()), 1..80),
    ) {
        run_budgets(pools, ops);
    }

    /// Under a steady stream of priority-9 arrivals that keeps the queue from ever draining, a
    /// priority-0 waiter is granted once the newcomers' turns start more than 9 aging steps after
    /// its own, and no such newcomer goes before it.
    #[test]
    fn aging_prevents_starvation(
        step_ms in 5..50u64,
        every_ms in 2..20u64,
        hold_ms in 1..20u64,
        low_after_ms in 0..100u64,
    ) {
        let t0 = Instant::now();
        let step = ms(step_ms);
        let cfg = SchedulerConfig { aging_step: step, seed: Some(3), ..Default::default() };
        let pools = BTreeMap::from([(PoolId::new("p"), PoolConfig::with_limit(1))]);
        let mut s = Scheduler::new(cfg, pools, t0).unwrap();
        let x = s.open_session();
        let high = |id: u64| NewRequest {
            priority: Priority::MAX,
            ..NewRequest::new(RequestId::parse(&format!("h{id}")).unwrap(), PoolId::new("p"))
        };
        // Arrival times of the high-priority requests, by id.
        let mut arrived = HashMap::new();
        let mut held: Option<(LeaseId, Instant)> = None;
        let mut low_at = None;
        let mut next_high = 0u64;
        let mut t = t0;
        // Everything that may go first, each held for `hold_ms` (+1 ms of this loop's granularity).
        let ahead = (low_after_ms + 9 * step_ms) / every_ms + 3;
        let horizon = t0 + ms(low_after_ms) + step * 9 + ms(ahead * (hold_ms + 1));
        let mut done = false;
        while !done && t <= horizon {
            let mut events = Vec::new();
            if ((t - t0).as_millis() as u64).is_multiple_of(every_ms) {
                next_high += 1;
                arrived.insert(format!("h{next_high}"), t);
                events.extend(s.request(t, x, high(next_high)).events);
            }
            if low_at.is_none() && t >= t0 + ms(low_after_ms) {
                low_at = Some(t);
                let low = NewRequest {
                    priority: Priority::MIN,
                    ..NewRequest::new(RequestId::parse("low").unwrap(), PoolId::new("p"))
                };
                events.extend(s.request(t, x, low).events);
            }
            if let Some((l, since)) = held && t >= since + ms(hold_ms) {
                events.extend(s.release(t, x, l, Outcome::Ok).events);
                held = None;
            }
            for (_, e) in events {
                if let Event::Granted { request_id, lease_id, .. } = e {
                    held = Some((lease_id, t));
                    if request_id.as_str() == "low" {
                        done = true;
                    } else if let Some(low) = low_at {
                        // Only newcomers whose turn started within 9 steps of low's may go first.
                        let at = arrived[request_id.as_str()];
                        prop_assert!(at < low + step * 9, "{request_id} overtook low");
                    }
                }
            }
            s.check_invariants(t);
            t += ms(1);
        }
        prop_assert!(done, "low priority starved until {:?}", t - t0);
    }
}

// ------------------------------------------------------------------------------------------------
// Rate budgets
// ------------------------------------------------------------------------------------------------

/// One step of the budget property test.
#[derive(Clone, Debug)]
enum BudgetOp {
    Request {
        s: usize,
        pool: usize,
        estimate: Option<(u64, u64)>,
    },
    Release {
        which: usize,
        usage: Option<(u64, u64)>,
    },
    Provider {
        pool: usize,
        kind: u8,
        limit: u64,
        remaining: u64,
    },
    Close {
        s: usize,
    },
    Tick,
    /// A takeover's stored budget: one budget of one pool is full again `ahead_ms` from now.
    Adopt {
        pool: usize,
        kind: usize,
        ahead_ms: u64,
    },
}

fn budget_op() -> impl Strategy<Value = BudgetOp> {
    let tokens = (0..400u64, 0..400u64);
    prop_oneof![
        6 => (0..3usize, 0..4usize, prop::option::weighted(0.8, tokens.clone()))
            .prop_map(|(s, pool, estimate)| BudgetOp::Request { s, pool, estimate }),
        4 => (0..8usize, prop::option::weighted(0.7, (0..900u64, 0..900u64)))
            .prop_map(|(which, usage)| BudgetOp::Release { which, usage }),
        1 => (0..4usize, 0..4u8, 1..400u64, 0..400u64).prop_map(|(pool, kind, limit, remaining)| {
            BudgetOp::Provider { pool, kind, limit, remaining: remaining.min(limit) }
        }),
        1 => (0..3usize).prop_map(|s| BudgetOp::Close { s }),
        2 => Just(BudgetOp::Tick),
        1 => (0..4usize, 0..3usize, prop_oneof![4 => 0..5_000u64, 1 => Just(u64::MAX)])
            .prop_map(|(pool, kind, ahead_ms)| BudgetOp::Adopt { pool, kind, ahead_ms }),
    ]
}

/// A pool tree `g` over `a` and `b`, `a1` under `a`, with budgets on `g`, `a` and `a1`.
fn budget_tree() -> impl Strategy<Value = BTreeMap<PoolId, PoolConfig>> {
    let bucket = |lo: u64, hi: u64| (lo..hi, lo..hi);
    (bucket(1, 12), bucket(100, 600), bucket(100, 600), bucket(100, 900), any::<bool>(), 1..5u32).prop_map(
        |(rq, inp, outp, a_in, shadow, limit)| {
            let g = BudgetConfig {
                requests_per_minute: Some(rq.0),
                requests_burst: Some(rq.1),
                input_tokens_per_minute: Some(inp.0),
                input_tokens_burst: Some(inp.1.max(100)),
                output_tokens_per_minute: Some(outp.0),
                output_tokens_burst: Some(outp.1.max(100)),
                window: Duration::from_secs(1),
                default_input_tokens: 50,
                default_output_tokens: 50,
                shadow: false,
            };
            let a = BudgetConfig {
                input_tokens_per_minute: Some(a_in.0),
                input_tokens_burst: Some(a_in.1),
                window: Duration::from_millis(500),
                default_input_tokens: 50,
                shadow,
                ..BudgetConfig::default()
            };
            let a1 = BudgetConfig {
                requests_per_minute: Some(2),
                window: Duration::from_secs(1),
                ..BudgetConfig::default()
            };
            let pool = |parent: Option<&str>, budget| PoolConfig {
                parent: parent.map(PoolId::new),
                budget,
                default_ttl: ms(400),
                ..PoolConfig::with_limit(limit + 2)
            };
            BTreeMap::from([
                (PoolId::new("g"), pool(None, g)),
                (PoolId::new("a"), pool(Some("g"), a)),
                (PoolId::new("b"), pool(Some("g"), BudgetConfig::default())),
                (PoolId::new("a1"), pool(Some("a"), a1)),
            ])
        },
    )
}

/// Runs budget operations and checks after every step: no budget below its debt cap, no reservation
/// outliving its lease, the core's invariants (fixpoint included), and order within each pool; at
/// the end, nothing leaks: no reservation is left and every bucket refills to its burst.
fn run_budgets(pools: BTreeMap<PoolId, PoolConfig>, ops: Vec<(u64, BudgetOp)>) {
    const NAMES: [&str; 4] = ["g", "a", "b", "a1"];
    let t0 = Instant::now();
    let mut s = Scheduler::new(SchedulerConfig { seed: Some(5), ..Default::default() }, pools, t0).unwrap();
    let sessions: Vec<SessionId> = (0..3).map(|_| s.open_session()).collect();
    let mut open = [true; 3];
    let mut now = t0;
    let mut next = 0u64;
    // Waiting requests by pool, in arrival order (same priority, turn start = arrival).
    let mut waiting: HashMap<PoolId, Vec<(SessionId, String)>> = HashMap::new();
    let mut leases: Vec<(SessionId, LeaseId)> = Vec::new();
    for (dt, op) in ops {
        now += ms(dt);
        let d = match op {
            BudgetOp::Request { s: i, pool, estimate } => {
                if !open[i] {
                    continue;
                }
                next += 1;
                let id = format!("r{next}");
                let pool = PoolId::new(NAMES[pool]);
                let req = NewRequest {
                    started_at: Some(now),
                    estimate: estimate.map(|(i, o)| TokenEstimate { input_tokens: i, max_output_tokens: o }),
                    ..NewRequest::new(RequestId::parse(&id).unwrap(), pool.clone())
                };
                let d = s.request(now, sessions[i], req);
                if d.events
                    .iter()
                    .any(|(_, e)| matches!(e, Event::Queued { request_id, .. } if request_id.as_str() == id))
                {
                    waiting.entry(pool).or_default().push((sessions[i], id));
                }
                d
            }
            BudgetOp::Release { which, usage } => {
                if leases.is_empty() {
                    continue;
                }
                let (sess, id) = leases.remove(which % leases.len());
                let usage =
                    usage.map(|(i, o)| Usage { input_tokens: i, output_tokens: o, ..Default::default() });
                s.release(now, sess, id, Report { outcome: Outcome::Ok, usage, limits: Vec::new() })
            }
            BudgetOp::Provider { pool, kind, limit, remaining } => {
                let kind =
                    [LimitKind::Requests, LimitKind::Tokens, LimitKind::InputTokens, LimitKind::OutputTokens]
                        [usize::from(kind) % 4];
                let l = ProviderLimit { kind, limit, remaining, reset_in: ms(500) };
                s.report_usage(now, &PoolId::new(NAMES[pool]), None, &[l]).unwrap().1
            }
            BudgetOp::Close { s: i } => {
                open[i] = false;
                s.close_session(now, sessions[i], Duration::ZERO)
            }
            BudgetOp::Tick => s.tick(now),
            BudgetOp::Adopt { pool, kind, ahead_ms } => {
                let mut full_at = [None; 3];
                full_at[kind] = Some(super::time::after(now, ms(ahead_ms)));
                let rt = PoolRuntime { budget_full_at: full_at, ..PoolRuntime::default() };
                let state = RuntimeState { pools: BTreeMap::from([(PoolId::new(NAMES[pool]), rt)]) };
                s.take_over(now, Some(&state))
            }
        };
        // A closed stream's waiters and leases leave silently.
        for (i, sess) in sessions.iter().enumerate() {
            if !open[i] {
                for q in waiting.values_mut() {
                    q.retain(|(s, _)| s != sess);
                }
                leases.retain(|(s, _)| s != sess);
            }
        }
        for (sess, e) in &d.events {
            match e {
                Event::Granted { request_id, lease_id, pool, .. } => {
                    leases.push((*sess, *lease_id));
                    let q = waiting.entry(pool.clone()).or_default();
                    if let Some(pos) = q.iter().position(|(_, r)| r == request_id.as_str()) {
                        assert_eq!(pos, 0, "{request_id} overtook {:?} on {pool}", &q[..pos]);
                        q.remove(0);
                    }
                }
                Event::Rejected { request_id, .. } => {
                    for q in waiting.values_mut() {
                        q.retain(|(_, r)| r != request_id);
                    }
                }
                Event::Expired { lease_id, .. } => leases.retain(|(_, l)| l != lease_id),
                _ => {}
            }
        }
        s.check_invariants(now);
        s.check_budgets(now);
    }
    for (i, sess) in sessions.iter().enumerate() {
        if open[i] {
            s.close_session(now, *sess, Duration::ZERO);
        }
    }
    s.check_budgets(now);
    now += Duration::from_secs(3600);
    s.tick(now);
    for p in s.snapshot(None).unwrap().pools {
        if let Some(b) = p.budget {
            assert_eq!(b.reservations, 0, "reservations left on {}", p.id);
            for l in b.levels {
                assert_eq!(l.level, l.burst as i64, "{:?} of {} did not refill to its burst", l.kind, p.id);
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Provider health and acquire_any (model::run_health)
// ------------------------------------------------------------------------------------------------

fn health_pool() -> impl Strategy<Value = model::HealthPool> {
    (
        1..4u32,
        prop::bool::weighted(0.7),
        1..4u32,
        20..300u64,
        10..80u64,
        prop::bool::weighted(0.3),
        [
            prop_oneof![Just(0u64), 5..60u64],
            prop_oneof![Just(0u64), 5..40u64],
            prop_oneof![Just(0u64), 5..30u64],
        ],
        any::<bool>(),
    )
        .prop_map(|(limit, breaker, failures, window, open_base, fail_fast, holds, cooldown)| {
            model::HealthPool { limit, breaker, failures, window, open_base, fail_fast, holds, cooldown }
        })
}

fn health_op() -> impl Strategy<Value = model::HealthOp> {
    use model::HealthOp as H;
    let s = 0..6usize;
    prop_oneof![
        1 => Just(H::Open),
        1 => s.clone().prop_map(|s| H::Close { s }),
        8 => (s.clone(), [0..4usize, 0..4usize, 0..4usize], 1..4usize, 0..10u8)
            .prop_map(|(s, pools, n, priority)| H::Request { s, pools, n, priority }),
        7 => (s.clone(), 0..4usize, 0..6u8, prop::option::of(0..100u64))
            .prop_map(|(s, which, outcome, retry)| H::Release { s, which, outcome, retry }),
        2 => (s.clone(), 0..4usize).prop_map(|(s, which)| H::Cancel { s, which }),
        2 => s.clone().prop_map(|s| H::Heartbeat { s }),
        3 => Just(H::Tick),
        1 => (0..4usize, any::<bool>()).prop_map(|(pool, open)| H::Force { pool, open }),
        1 => (0..4usize, any::<bool>()).prop_map(|(pool, overloaded)| H::Report { pool, overloaded }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(256),
        ..ProptestConfig::default()
    })]

    /// At most one probe per breaker episode, the limit with holds, hold accounting, acquire_any's
    /// choice and queue order against single-pool waiters, and nothing left at the end.
    #[test]
    fn health_and_acquire_any_keep_their_invariants(
        pools in [health_pool(), health_pool(), health_pool(), health_pool()],
        ops in prop::collection::vec((prop_oneof![2 => Just(0u64), 3 => 1..120u64], health_op()), 1..80),
    ) {
        model::run_health(&model::HealthCase { pools, ops });
    }
}
