//! The bodies of slotd's fuzz targets, in a library so that a plain stable `cargo test` can run them
//! over seeded random inputs as well (cargo-fuzz itself needs nightly). See docs/TESTING.md.
//!
//! - [`scheduler_ops`]: the input is decoded (with `arbitrary`) into a pool tree and a sequence of
//!   core operations and time advances, applied to a [`Scheduler`].
//! - [`client_message`]: the input is split into length-prefixed chunks, each decoded as a
//!   `slotd.v1.ClientMessage` with prost, converted with [`stream_op`] like the daemon does, and the
//!   valid ones applied to a [`Scheduler`].
//!
//! Neither may panic, and after every step the [`Checker`] re-derives the core's invariants from its
//! public API (`snapshot()` and the counters; `check_invariants` is test-only):
//! - accounting: every pool's `in_flight` is the number of leases on it and its descendants;
//! - limit: an operation never takes a pool above its limit (only a lowered limit leaves it above);
//! - fixpoint: a pool with waiters is closed (learning, draining, paused, or full on some level);
//! - timers: no lease is still listed at or after its expiry;
//! - fencing: a grant's token is above every token its pool has seen;
//! - and at the end, once every stream closed and time ran past every timer, nothing is left.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use arbitrary::{Arbitrary, Unstructured};
use prost::Message;
use slotd::{
    driver::StreamOp,
    grpc::convert::stream_op,
    scheduler::{
        Decisions, Event, FencingToken, LeaseId, NewRequest, Outcome, Overflow, PoolConfig, PoolId, Priority,
        RequestId, ResumeRequest, Scheduler, SchedulerConfig, SessionId, Snapshot,
    },
};
use slotd_proto::v1 as pb;
use tokio::time::Instant;

const POOLS: [&str; 4] = ["g", "a", "b", "a1"];
const PARENTS: [Option<&str>; 4] = [None, Some("g"), Some("g"), Some("a")];
/// Past every timer the operations can set (TTLs, waits, pauses, cooldowns, learning).
const FAR: Duration = Duration::from_secs(3 * 24 * 3600);

/// The pool tree and scheduler settings, from the input.
#[derive(Debug, Arbitrary)]
struct Setup {
    limits: [u8; 4],
    depth: [u8; 4],
    overflow: [u8; 4],
    cooldown: [u8; 4],
    adaptive: bool,
    learning: bool,
}

/// One core operation. Small numbers pick sessions, pools and leases by index.
#[derive(Debug, Arbitrary)]
enum Op {
    Advance(u16),
    Open,
    Close { s: u8, grace: bool },
    Request { s: u8, pool: u8, priority: u8, ttl: u8, max_wait: Option<u16>, back: u16, id: u8 },
    Cancel { s: u8, id: u8 },
    Heartbeat { s: u8, lease: Option<u8> },
    Release { s: u8, lease: u8, outcome: u8, retry: Option<u16> },
    Resume { s: u8, lease: u8, good_token: bool },
    Recreate { s: u8, pool: u8, id: u128, token: u64 },
    RateLimit { pool: u8, retry: Option<u16> },
    SetPools { limits: [u8; 4], remove_b: bool },
    Shutdown,
    Tick,
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn pool_set(setup: &Setup, limits: [u8; 4], without_b: bool) -> BTreeMap<PoolId, PoolConfig> {
    let mut pools = BTreeMap::new();
    for i in 0..POOLS.len() {
        if without_b && POOLS[i] == "b" {
            continue;
        }
        let pc = PoolConfig {
            max_concurrent: 1 + u32::from(limits[i] % 4),
            parent: PARENTS[i].map(PoolId::new),
            max_queue_depth: 1 + u32::from(setup.depth[i] % 4),
            on_overflow: [Overflow::Reject, Overflow::ShedOldest, Overflow::Block]
                [usize::from(setup.overflow[i] % 3)],
            cooldown: ms(u64::from(setup.cooldown[i] % 4) * 20),
            default_ttl: ms(1000),
            max_ttl: ms(3000),
            max_wait: None,
            default_retry_after: ms(300),
            adaptive: setup.adaptive,
            headroom_recovery: ms(500),
        };
        pools.insert(PoolId::new(POOLS[i]), pc);
    }
    pools
}

/// Re-derives the core's invariants after every step, from its public API only.
#[derive(Default)]
struct Checker {
    /// Each pool's `in_flight` after the previous step.
    in_flight: HashMap<PoolId, u32>,
    /// The highest fencing token each pool has handed out or re-created.
    tokens: HashMap<PoolId, u64>,
}

impl Checker {
    fn events(&mut self, d: &Decisions, known: &mut Vec<(SessionId, LeaseId, PoolId, FencingToken)>) {
        for (session, e) in &d.events {
            match e {
                Event::Granted { lease_id, pool, token, .. } => {
                    let floor = self.tokens.entry(pool.clone()).or_insert(0);
                    assert!(token.0 > *floor, "grant token {token} not above {floor} on {pool}");
                    *floor = (*floor).max(token.0);
                    known.push((*session, *lease_id, pool.clone(), *token));
                }
                Event::LeaseResumed { lease_id, .. } => {
                    // A moved lease now belongs to this stream.
                    if let Some(k) = known.iter_mut().find(|k| k.1 == *lease_id) {
                        k.0 = *session;
                    }
                }
                Event::Released { lease_id, .. } | Event::Expired { lease_id, .. } => {
                    known.retain(|k| k.1 != *lease_id);
                }
                _ => {}
            }
        }
    }

    fn check(&mut self, s: &Scheduler, now: Instant) {
        let snap: Snapshot = s.snapshot(None).expect("snapshot of every pool");
        let by_id: HashMap<&PoolId, _> = snap.pools.iter().map(|p| (&p.id, p)).collect();
        let chain = |pool: &PoolId| {
            let mut chain = vec![pool.clone()];
            while let Some(parent) = by_id[chain.last().expect("non-empty")].config.parent.clone() {
                chain.push(parent);
            }
            chain
        };
        let mut counted: HashMap<PoolId, u32> = HashMap::new();
        for l in &snap.leases {
            assert!(
                l.expires_at > now,
                "lease {} still listed {:?} after its expiry",
                l.id,
                now - l.expires_at
            );
            for p in chain(&l.pool) {
                *counted.entry(p).or_default() += 1;
            }
            let seen = self.tokens.entry(l.pool.clone()).or_insert(0);
            *seen = (*seen).max(l.token.0);
        }
        // Granted leases never share a token with any other lease of their pool. (Leases re-created by
        // resumes carry whatever token the client claims: the daemon cannot check a token from before
        // its restart, so two bogus resumes may claim the same one.)
        for l in snap.leases.iter().filter(|l| l.request_id.is_some()) {
            let same = snap.leases.iter().filter(|o| o.pool == l.pool && o.token == l.token).count();
            assert_eq!(same, 1, "token {} of granted lease {} is held twice on {}", l.token, l.id, l.pool);
        }
        let mut queued = 0;
        for p in &snap.pools {
            let held = counted.get(&p.id).copied().unwrap_or(0);
            assert_eq!(p.in_flight, held, "in_flight of {} is not its leases' count", p.id);
            let before = self.in_flight.get(&p.id).copied().unwrap_or(0);
            assert!(
                p.in_flight <= p.config.max_concurrent.max(before),
                "pool {} went from {before} to {} in flight, limit {}",
                p.id,
                p.in_flight,
                p.config.max_concurrent
            );
            assert!(p.effective_limit <= p.config.max_concurrent && p.effective_limit >= 1);
            if p.queued > 0 && !snap.learning && !snap.shutting_down {
                let closed = chain(&p.id).iter().any(|level| {
                    let l = by_id[level];
                    l.paused_until.is_some_and(|u| u > now) || l.in_flight + l.cooling >= l.effective_limit
                });
                assert!(closed, "pool {} could grant but has {} waiters", p.id, p.queued);
            }
            queued += p.queued as usize;
        }
        assert_eq!(queued, s.waiter_count(), "queued waiters vs waiter_count");
        assert_eq!(snap.leases.len(), s.lease_count(), "listed leases vs lease_count");
        self.in_flight = snap.pools.iter().map(|p| (p.id.clone(), p.in_flight)).collect();
    }
}

/// Closes every stream, runs time past every timer, and checks nothing is left.
fn drain(s: &mut Scheduler, sessions: &[SessionId], mut now: Instant, checker: &mut Checker) {
    for &id in sessions {
        s.close_session(now, id, Duration::ZERO);
        checker.check(s, now);
    }
    now += FAR;
    s.tick(now);
    checker.check(s, now);
    assert_eq!(s.lease_count(), 0, "leases left after every stream closed");
    assert_eq!(s.waiter_count(), 0, "waiters left after every stream closed");
    assert_eq!(s.session_count(), 0);
    let snap = s.snapshot(None).expect("snapshot");
    for p in &snap.pools {
        assert_eq!((p.in_flight, p.queued), (0, 0), "pool {} not empty at the end", p.id);
    }
}

/// The `scheduler_ops` target: never panics, and every invariant holds after every step.
pub fn scheduler_ops(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(setup) = Setup::arbitrary(&mut u) else { return };
    let t0 = Instant::now();
    let cfg = SchedulerConfig {
        aging_step: ms(100),
        learning_period: if setup.learning { ms(500) } else { Duration::ZERO },
        max_per_session: 8,
        first_token: 1,
        seed: Some(7),
    };
    let mut s = Scheduler::new(cfg, pool_set(&setup, setup.limits, false), t0).expect("valid pool tree");
    let mut now = t0;
    let mut sessions: Vec<SessionId> = Vec::new();
    let mut known: Vec<(SessionId, LeaseId, PoolId, FencingToken)> = Vec::new();
    let mut checker = Checker::default();
    let pick = |v: usize, i: u8| usize::from(i) % v.max(1);
    let mut steps = 0;
    while !u.is_empty() && steps < 512 {
        steps += 1;
        let Ok(op) = Op::arbitrary(&mut u) else { break };
        let session = |i: u8| sessions.get(pick(sessions.len(), i)).copied().unwrap_or(SessionId(999));
        let d = match op {
            Op::Advance(n) => {
                now += ms(u64::from(n % 2000));
                s.tick(now)
            }
            Op::Open => {
                sessions.push(s.open_session());
                Decisions::default()
            }
            Op::Close { s: i, grace } => {
                if sessions.is_empty() {
                    continue;
                }
                let id = sessions.remove(pick(sessions.len(), i));
                s.close_session(now, id, if grace { ms(400) } else { Duration::ZERO })
            }
            Op::Request { s: i, pool, priority, ttl, max_wait, back, id } => {
                let req = NewRequest {
                    request_id: RequestId::parse(&format!("r{}", id % 16)).expect("valid id"),
                    pool: PoolId::new(POOLS[usize::from(pool) % POOLS.len()]),
                    priority: Priority::try_from(u32::from(priority % 10)).expect("0..=9"),
                    started_at: now.checked_sub(ms(u64::from(back % 3000))),
                    ttl: (ttl % 6 != 0).then(|| ms(u64::from(ttl % 6) * 700)),
                    max_wait: max_wait.map(|w| ms(u64::from(w % 1500))),
                    holder: Arc::from("fuzz"),
                };
                s.request(now, session(i), req)
            }
            Op::Cancel { s: i, id } => s.cancel(now, session(i), &format!("r{}", id % 16)),
            Op::Heartbeat { s: i, lease } => {
                let ids: Vec<LeaseId> =
                    lease.and_then(|l| known.get(pick(known.len(), l))).map(|k| k.1).into_iter().collect();
                s.heartbeat(now, session(i), &ids)
            }
            Op::Release { s: i, lease, outcome, retry } => {
                let Some(k) = known.get(pick(known.len(), lease)).cloned() else { continue };
                let outcome = match outcome % 4 {
                    0 => Outcome::Ok,
                    1 => Outcome::Error,
                    2 => Outcome::Cancelled,
                    _ => Outcome::RateLimited(retry.map(|r| ms(u64::from(r % 800)))),
                };
                // Mostly from its own stream; sometimes from another (must be refused).
                let from = if i % 4 == 0 { session(i) } else { k.0 };
                s.release(now, from, k.1, outcome)
            }
            Op::Resume { s: i, lease, good_token } => {
                let Some(k) = known.get(pick(known.len(), lease)).cloned() else { continue };
                let token = if good_token { k.3 } else { FencingToken(k.3.0.wrapping_add(1)) };
                let req = ResumeRequest {
                    lease_id: k.1,
                    token,
                    pool: k.2.clone(),
                    priority: Priority::DEFAULT,
                    ttl: None,
                    holder: Arc::from("fuzz"),
                };
                s.resume(now, session(i), req)
            }
            Op::Recreate { s: i, pool, id, token } => {
                let pool = PoolId::new(POOLS[usize::from(pool) % POOLS.len()]);
                let req = ResumeRequest {
                    lease_id: LeaseId(id),
                    token: FencingToken(token),
                    pool: pool.clone(),
                    priority: Priority::DEFAULT,
                    ttl: None,
                    holder: Arc::from("fuzz"),
                };
                let d = s.resume(now, session(i), req);
                for (sess, e) in &d.events {
                    if let Event::LeaseResumed { lease_id, token, .. } = e
                        && !known.iter().any(|k| k.1 == *lease_id)
                    {
                        known.push((*sess, *lease_id, pool.clone(), *token));
                    }
                }
                d
            }
            Op::RateLimit { pool, retry } => {
                let pool = PoolId::new(POOLS[usize::from(pool) % POOLS.len()]);
                match s.report_rate_limit(now, &pool, retry.map(|r| ms(u64::from(r % 800))), "fuzz") {
                    Ok((_, d)) => d,
                    Err(_) => Decisions::default(),
                }
            }
            Op::SetPools { limits, remove_b } => {
                s.set_pools(now, pool_set(&setup, limits, remove_b)).expect("a valid tree is accepted")
            }
            Op::Shutdown => s.shutdown(now),
            Op::Tick => s.tick(now),
        };
        checker.events(&d, &mut known);
        checker.check(&s, now);
    }
    drain(&mut s, &sessions, now, &mut checker);
}

/// The `client_message` target: length-prefixed chunks of the input, each decoded as a
/// `ClientMessage`, converted like the daemon does and applied on one stream. Never panics, and the
/// invariants hold after every message.
pub fn client_message(data: &[u8]) {
    let t0 = Instant::now();
    let pools = BTreeMap::from([
        (PoolId::new("p"), PoolConfig { max_concurrent: 2, max_queue_depth: 2, ..PoolConfig::default() }),
        (
            PoolId::new("c"),
            PoolConfig { max_concurrent: 1, parent: Some(PoolId::new("p")), ..PoolConfig::default() },
        ),
    ]);
    let cfg = SchedulerConfig { seed: Some(1), learning_period: ms(50), ..SchedulerConfig::default() };
    let mut s = Scheduler::new(cfg, pools, t0).expect("valid pools");
    let session = s.open_session();
    let mut checker = Checker::default();
    let mut known = Vec::new();
    let mut now = t0;
    let mut rest = data;
    let mut steps = 0;
    while let Some((&len, tail)) = rest.split_first() {
        steps += 1;
        if steps > 256 {
            break;
        }
        let n = usize::from(len).min(tail.len());
        let (chunk, tail) = tail.split_at(n);
        rest = tail;
        now += ms(u64::from(len % 16) * 10);
        let Ok(msg) = pb::ClientMessage::decode(chunk) else {
            continue;
        };
        let d = match stream_op(msg) {
            StreamOp::Request(r) => s.request(now, session, r),
            StreamOp::Cancel(id) => s.cancel(now, session, &id),
            StreamOp::Heartbeat(ids) => s.heartbeat(now, session, &ids),
            StreamOp::Release(id, outcome) => s.release(now, session, id, outcome),
            StreamOp::Resume(r) => s.resume(now, session, r),
            StreamOp::Invalid(_) => continue,
        };
        checker.events(&d, &mut known);
        checker.check(&s, now);
    }
    drain(&mut s, &[session], now, &mut checker);
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng, rngs::StdRng};

    use super::*;

    /// Random bytes: a stand-in for the fuzzer on stable (`FUZZ_CASES` for more).
    fn inputs(seed: u64) -> impl Iterator<Item = Vec<u8>> {
        let cases = std::env::var("FUZZ_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(400);
        let mut rng = StdRng::seed_from_u64(seed);
        (0..cases).map(move |_| {
            let len = rng.random_range(0..2048);
            (0..len).map(|_| rng.random()).collect()
        })
    }

    #[test]
    fn scheduler_ops_on_random_inputs() {
        for data in inputs(1) {
            scheduler_ops(&data);
        }
    }

    #[test]
    fn client_message_on_random_inputs() {
        for data in inputs(2) {
            client_message(&data);
        }
    }

    /// Random bytes rarely decode into a useful message; valid encodings of random messages do.
    #[test]
    fn client_message_on_encoded_messages() {
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..300 {
            let mut data = Vec::new();
            for _ in 0..rng.random_range(1..20) {
                let msg = random_message(&mut rng);
                let bytes = msg.encode_to_vec();
                if bytes.len() > 255 {
                    continue;
                }
                data.push(bytes.len() as u8);
                data.extend(bytes);
            }
            client_message(&data);
        }
    }

    fn random_message(rng: &mut StdRng) -> pb::ClientMessage {
        use pb::client_message::Msg;
        let lease_id = |rng: &mut StdRng| format!("{:032x}", rng.random_range(0..4u128));
        let msg = match rng.random_range(0..6) {
            0 => None,
            1 => Some(Msg::Request(pb::LeaseRequest {
                request_id: format!("r{}", rng.random_range(0..4)),
                pool: ["p", "c", "x", ""][rng.random_range(0..4)].into(),
                priority: rng.random_bool(0.5).then(|| rng.random_range(0..12)),
                ttl: rng.random_bool(0.5).then(|| prost_types_duration(rng)),
                max_wait: rng.random_bool(0.3).then(|| prost_types_duration(rng)),
                ..Default::default()
            })),
            2 => Some(Msg::Cancel(pb::CancelRequest { request_id: format!("r{}", rng.random_range(0..4)) })),
            3 => Some(Msg::Heartbeat(pb::Heartbeat { lease_ids: vec![lease_id(rng)] })),
            4 => Some(Msg::Release(pb::ReleaseLease {
                lease_id: lease_id(rng),
                outcome: rng.random_range(0..6),
                retry_after: rng.random_bool(0.5).then(|| prost_types_duration(rng)),
            })),
            _ => Some(Msg::Resume(pb::ResumeLease {
                lease_id: lease_id(rng),
                fencing_token: [0, 1, u64::MAX - 1, u64::MAX][rng.random_range(0..4)],
                pool: ["p", "c"][rng.random_range(0..2)].into(),
                ..Default::default()
            })),
        };
        pb::ClientMessage { msg }
    }

    fn prost_types_duration(rng: &mut StdRng) -> prost_types::Duration {
        prost_types::Duration { seconds: rng.random_range(-2..5), nanos: rng.random_range(-5..1_000_000_000) }
    }
}
