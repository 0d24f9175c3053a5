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
