//! Criterion benches of the provider-health gates: the request and release paths with a circuit breaker
//! and holds configured, a hold ending into a grant, and `acquire_any` over two full pools, at 10, 1k and
//! 100k waiters. Run: `cargo bench -p slotd --bench health`.
//!
//! Each iteration leaves the queues at the size it found them, so every sample sees n waiters.

use std::{collections::BTreeMap, hint::black_box, time::Duration};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use slotd::scheduler::{
    BreakerConfig, Decisions, Event, HealthConfig, LeaseId, NewRequest, Outcome, PoolConfig, PoolId,
    RequestId, Scheduler, SchedulerConfig, SessionId,
};
use tokio::time::Instant;

const SIZES: [usize; 3] = [10, 1_000, 100_000];
const HOLD: Duration = Duration::from_micros(1);

fn granted(d: &Decisions) -> Option<LeaseId> {
    d.events.iter().find_map(|(_, e)| match e {
        Event::Granted { lease_id, .. } => Some(*lease_id),
        _ => None,
    })
}

/// Pools `a` and `b` (limit 1 each, breaker enabled and counting, a 1 µs failure hold), both slots
/// held, and `n` waiters in each queue (`any`: the waiters list both pools).
struct Fixture {
    sched: Scheduler,
    now: Instant,
    holder: SessionId,
    waiter: SessionId,
    lease: LeaseId,
    next: u64,
}

impl Fixture {
    fn new(n: usize, any: bool) -> Self {
        let now = Instant::now();
        let health = HealthConfig {
            failure_hold: HOLD,
            // Enabled and counting, with a window short enough that the bench's failures never trip it.
            breaker: BreakerConfig {
                enabled: true,
                failures: 5,
                window: Duration::from_nanos(500),
                ..BreakerConfig::default()
            },
            ..HealthConfig::default()
        };
        let pc = PoolConfig {
            max_queue_depth: u32::MAX,
            default_ttl: Duration::from_secs(3600),
            max_ttl: Duration::from_secs(3600),
            health,
            ..PoolConfig::with_limit(1)
        };
        let pools = BTreeMap::from([(PoolId::new("a"), pc.clone()), (PoolId::new("b"), pc)]);
        let cfg =
            SchedulerConfig { seed: Some(7), max_per_session: usize::MAX, ..SchedulerConfig::default() };
        let mut sched = Scheduler::new(cfg, pools, now).unwrap();
        let holder = sched.open_session();
        let waiter = sched.open_session();
        let lease = granted(&sched.request(
            now,
            holder,
            NewRequest::new(RequestId::parse("ha").unwrap(), PoolId::new("a")),
        ))
        .unwrap();
        granted(&sched.request(
            now,
            holder,
            NewRequest::new(RequestId::parse("hb").unwrap(), PoolId::new("b")),
        ))
        .unwrap();
        let mut f = Fixture { sched, now, holder, waiter, lease, next: 0 };
        for _ in 0..n {
            f.enqueue(any);
        }
        f
    }

    fn req(&mut self, any: bool) -> NewRequest {
        self.next += 1;
        let mut r = NewRequest::new(RequestId::parse(&format!("r{}", self.next)).unwrap(), PoolId::new("a"));
        if any {
            r.any_of = vec![PoolId::new("b")];
        }
        r
    }

    fn enqueue(&mut self, any: bool) -> Decisions {
        let r = self.req(any);
        self.sched.request(self.now, self.waiter, r)
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("health");
    g.sample_size(30).measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
    g.throughput(Throughput::Elements(1));
    for n in SIZES {
        // Enqueue behind n waiters (breaker and hold gates checked on the way), then cancel.
        let mut f = Fixture::new(n, false);
        g.bench_with_input(BenchmarkId::new("request_cancel", n), &n, |b, _| {
            b.iter(|| {
                f.now += Duration::from_nanos(1);
                let r = f.req(false);
                let id = r.request_id.clone();
                black_box(f.sched.request(f.now, f.waiter, r));
                black_box(f.sched.cancel(f.now, f.waiter, id.as_str()));
            })
        });

        // The same over two pools at once (acquire_any): one place in each queue, both left on cancel.
        let mut f = Fixture::new(n, true);
        g.bench_with_input(BenchmarkId::new("any_request_cancel", n), &n, |b, _| {
            b.iter(|| {
                f.now += Duration::from_nanos(1);
                let r = f.req(true);
                let id = r.request_id.clone();
                black_box(f.sched.request(f.now, f.waiter, r));
                black_box(f.sched.cancel(f.now, f.waiter, id.as_str()));
            })
        });

        // Release ok: the breaker counts it, the head is granted.
        let mut f = Fixture::new(n, false);
        g.bench_with_input(BenchmarkId::new("release_grant", n), &n, |b, _| {
            b.iter(|| {
                f.now += Duration::from_nanos(1);
                let d = f.sched.release(f.now, f.holder, f.lease, Outcome::Ok);
                f.lease = granted(&d).expect("the head is granted");
                f.holder = f.waiter;
                black_box(f.enqueue(false));
            })
        });

        // Release with an error: the slot is held 1 µs; the tick that ends the hold grants the head.
        let mut f = Fixture::new(n, false);
        g.bench_with_input(BenchmarkId::new("release_hold_grant", n), &n, |b, _| {
            b.iter(|| {
                f.now += Duration::from_nanos(1);
                let d = f.sched.release(f.now, f.holder, f.lease, Outcome::Error);
                assert!(granted(&d).is_none(), "the slot is held");
                f.now += HOLD;
                let d = f.sched.tick(f.now);
                f.lease = granted(&d).expect("granted when the hold ends");
                f.holder = f.waiter;
                black_box(f.enqueue(false));
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
