//! The bodies of slotd's fuzz targets, in a library so that a plain stable `cargo test` can run them
//! over seeded random inputs as well (cargo-fuzz itself needs nightly). See docs/TESTING.md.
//!
//! Both use the scheduler's operation model, `slotd::scheduler::model` (the `testing` feature), the
//! same one the property tests use:
//! - [`scheduler_ops`]: the input is decoded (with `arbitrary`) into a [`Case`]: a pool tree and a
//!   sequence of core operations and time advances, which [`model::run`] applies to a `Scheduler`,
//!   checking the model and the [`Invariants`] after every step.
//! - [`client_message`]: the input is split into length-prefixed chunks, each decoded as a
//!   `slotd.v1.ClientMessage` with prost, converted with [`stream_op`] like the daemon does, and the
//!   valid ones applied to a [`Scheduler`]; the [`Invariants`] are checked after every message.
//!
//! Both reach extreme durations (0, 1 ns, beyond every bound, `Duration::MAX`; on the wire also
//! negative, non-normalized and out-of-range ones, and malformed timestamps) through [`Op::Extreme`]
//! and the random messages. Neither may panic.

use std::{collections::BTreeMap, time::Duration};

use arbitrary::{Result, Unstructured};
use prost::Message;
use slotd::{
    driver::StreamOp,
    grpc::convert::stream_op,
    scheduler::{
        Overflow, PoolConfig, PoolId, Scheduler, SchedulerConfig,
        model::{self, Case, Invariants, Op},
    },
};
use slotd_proto::v1 as pb;
use tokio::time::Instant;

/// Most operations one input runs.
const MAX_OPS: usize = 512;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Decodes a [`Case`] with values in the ranges the property tests draw from.
fn case(u: &mut Unstructured) -> Result<Case> {
    let mut limits = [0; 4];
    let mut depth = [0; 4];
    let mut overflow = [Overflow::Reject; 4];
    let mut cooldown = [false; 4];
    for i in 0..4 {
        limits[i] = u.int_in_range(1..=[4, 3, 3, 2][i])?;
        depth[i] = u.int_in_range(1..=3)?;
        overflow[i] = *u.choose(&[Overflow::Reject, Overflow::ShedOldest, Overflow::Block])?;
        cooldown[i] = u.arbitrary()?;
    }
    let (adaptive, learning) = (u.arbitrary()?, u.ratio(1u8, 4)?);
    let mut ops = Vec::new();
    while !u.is_empty() && ops.len() < MAX_OPS {
        let dt = if u.ratio(3u8, 5)? { 0 } else { u.int_in_range(1..=1999)? };
        ops.push((dt, op(u)?));
    }
    Ok(Case { limits, depth, overflow, cooldown, adaptive, learning, ops })
}

/// Decodes one [`Op`].
fn op(u: &mut Unstructured) -> Result<Op> {
    let s = usize::from(u.int_in_range(0..=7u8)?);
    let which = usize::from(u.int_in_range(0..=7u8)?);
    let pool = usize::from(u.int_in_range(0..=3u8)?);
    let retry = |u: &mut Unstructured| -> Result<Option<u64>> {
        Ok(if u.arbitrary()? { Some(u.int_in_range(0..=799)?) } else { None })
    };
    Ok(match u.int_in_range(0..=19u8)? {
        0 => Op::Open,
        1 => Op::Close { s, grace: u.arbitrary()? },
        2..=5 => Op::Request {
            s,
            pool,
            priority: u.int_in_range(0..=9)?,
            ttl: u.int_in_range(0..=5)?,
            max_wait: match u.int_in_range(0..=2u8)? {
                0 => None,
                1 => Some(0),
                _ => Some(u.int_in_range(1..=1499)?),
            },
            back: u.int_in_range(0..=3)?,
            dup: u.ratio(1u8, 10)?,
        },
        6 => Op::Cancel { s, which },
        7 => Op::Heartbeat { s, which: u.arbitrary::<bool>()?.then_some(which) },
        8 | 9 => Op::Release { s, which, outcome: u.int_in_range(0..=7)?, retry: retry(u)? },
        10 => Op::Move { s, which, good_token: u.ratio(4u8, 5)?, forged: u.ratio(1u8, 3)? },
        11 => Op::Recreate {
            s,
            pool,
            id: u.int_in_range(1..=3)?,
            // Small tokens, and ones near the top of the range (a counter that must not overflow).
            token: if u.arbitrary()? { u.int_in_range(1..=59)? } else { u64::MAX - u.int_in_range(0..=3)? },
            forged: u.ratio(1u8, 3)?,
        },
        12 => Op::RateLimit { pool, retry: retry(u)? },
        13 => Op::SetPools {
            limits: [
                u.int_in_range(1..=4)?,
                u.int_in_range(1..=3)?,
                u.int_in_range(1..=3)?,
                u.int_in_range(1..=2)?,
            ],
            depth: [
                u.int_in_range(1..=3)?,
                u.int_in_range(1..=3)?,
                u.int_in_range(1..=3)?,
                u.int_in_range(1..=3)?,
            ],
            remove_b: u.ratio(1u8, 5)?,
        },
        14 => match u.int_in_range(0..=3u8)? {
            0 => Op::PausePool { pool, dur: u.int_in_range(0..=799)? },
            1 => Op::ResumePool { pool },
            2 => Op::Revoke { which },
            _ => Op::Shutdown,
        },
        15 => match u.int_in_range(0..=3u8)? {
            0 => Op::Fence { ms: if u.arbitrary()? { Some(u.int_in_range(0..=399)?) } else { None } },
            1 => Op::BeginTerm { bump: u.int_in_range(1..=1_000_000)? },
            2 => Op::TakeOver {
                held: if u.arbitrary()? {
                    Some([u.int_in_range(0..=3)?, u.int_in_range(0..=3)?, u.int_in_range(0..=3)?, u.int_in_range(0..=3)?])
                } else {
                    None
                },
                pause: if u.arbitrary()? { Some((pool, u.int_in_range(1..=799)?)) } else { None },
                hold: if u.arbitrary()? { Some((which, u.int_in_range(1..=799)?)) } else { None },
            },
            _ => Op::Drain(u.arbitrary()?),
        },
        16 | 17 => Op::Extreme {
            s,
            pool,
            target: u.int_in_range(0..=8)?,
            value: u.int_in_range(0..=model::EXTREMES.len() - 1)?,
        },
        _ => Op::Tick,
    })
}

/// The `scheduler_ops` target: never panics, and the model and every invariant hold after every
/// step.
pub fn scheduler_ops(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(case) = case(&mut u) else { return };
    model::run(&case);
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
    let mut invariants = Invariants::default();
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
        invariants.grants(&d);
        invariants.check(&s, now);
    }
    invariants.close_all(&mut s, &[session], now);
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
                started_at: rng.random_bool(0.3).then(|| timestamp(rng)),
                ..Default::default()
            })),
            2 => Some(Msg::Cancel(pb::CancelRequest { request_id: format!("r{}", rng.random_range(0..4)) })),
            3 => Some(Msg::Heartbeat(pb::Heartbeat { lease_ids: vec![lease_id(rng)] })),
            4 => Some(Msg::Release(pb::ReleaseLease {
                lease_id: lease_id(rng),
                outcome: rng.random_range(0..9),
                retry_after: rng.random_bool(0.5).then(|| prost_types_duration(rng)),
                usage: rng.random_bool(0.3).then(|| pb::Usage {
                    input_tokens: [0, 1, 1 << 40, u64::MAX][rng.random_range(0..4)],
                    output_tokens: rng.random_range(0..100_000),
                    ..Default::default()
                }),
                provider_limits: (0..rng.random_range(0..10))
                    .map(|_| pb::ProviderLimit {
                        kind: rng.random_range(0..6),
                        limit: rng.random_range(0..1000),
                        remaining: rng.random_range(0..1200),
                        reset_in: rng.random_bool(0.7).then(|| prost_types_duration(rng)),
                    })
                    .collect(),
            })),
            _ => Some(Msg::Resume(pb::ResumeLease {
                lease_id: lease_id(rng),
                fencing_token: [0, 1, u64::MAX - 1, u64::MAX][rng.random_range(0..4)],
                pool: ["p", "c"][rng.random_range(0..2)].into(),
                ttl: rng.random_bool(0.5).then(|| prost_types_duration(rng)),
                ..Default::default()
            })),
        };
        pb::ClientMessage { msg }
    }

    /// Mostly small durations, sometimes an extreme one: negative, non-normalized or huge.
    fn prost_types_duration(rng: &mut StdRng) -> prost_types::Duration {
        let (seconds, nanos) = match rng.random_range(0..4) {
            0 => (
                [0, 1, -1, i64::MAX, i64::MIN, 315_576_000_000, 315_576_000_001][rng.random_range(0..7)],
                [0, 1, -1, 999_999_999, 1_000_000_000, 2_000_000_000, i32::MAX, i32::MIN]
                    [rng.random_range(0..8)],
            ),
            _ => (rng.random_range(-2..5), rng.random_range(-5..1_000_000_000)),
        };
        prost_types::Duration { seconds, nanos }
    }

    /// A turn start: recent, or an extreme one (malformed, or at either end of the valid range).
    fn timestamp(rng: &mut StdRng) -> prost_types::Timestamp {
        let recent =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        let seconds = [recent, recent - 7200, 0, -62_135_596_800, 253_402_300_799, i64::MAX, i64::MIN]
            [rng.random_range(0..7)];
        let nanos = [0, 999_999_999, -1, 1_000_000_000, i32::MAX][rng.random_range(0..5)];
        prost_types::Timestamp { seconds, nanos }
    }
}
