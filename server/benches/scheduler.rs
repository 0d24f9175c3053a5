//! Criterion benches of the scheduler core: request, grant, release, expiry and pause fan-out at
//! 10, 1k and 100k waiters. Run: `cargo bench -p slotd --bench scheduler`.
//!
//! Each iteration leaves the queue at the size it found it, so every sample sees n waiters.

use std::{collections::BTreeMap, hint::black_box, sync::Arc, time::Duration};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use slotd::scheduler::{
    Decisions, Event, LeaseId, NewRequest, Outcome, PoolConfig, PoolId, Priority, RequestId, Scheduler,
    SchedulerConfig, SessionId,
};
use tokio::time::Instant;

const SIZES: [usize; 3] = [10, 1_000, 100_000];

struct Fixture {
    sched: Scheduler,
    now: Instant,
    pool: PoolId,
    holder: SessionId,
    waiter: SessionId,
    lease: LeaseId,
    next: u64,
}

fn granted(d: &Decisions) -> Option<LeaseId> {
    d.events.iter().find_map(|(_, e)| match e {
        Event::Granted { lease_id, .. } => Some(*lease_id),
        _ => None,
    })
}

impl Fixture {
    /// One pool of limit 1, its slot held, and `n` waiters queued (spread over priorities).
    fn new(n: usize, sessions_per_waiter: bool) -> Self {
        let now = Instant::now();
        let pool = PoolId::new("p");
        let cfg =
            SchedulerConfig { seed: Some(7), max_per_session: usize::MAX, ..SchedulerConfig::default() };
        let pools = BTreeMap::from([(
            pool.clone(),
            PoolConfig {
                max_queue_depth: u32::MAX,
                default_ttl: Duration::from_secs(3600),
                max_ttl: Duration::from_secs(3600),
                ..PoolConfig::with_limit(1)
            },
        )]);
        let mut sched = Scheduler::new(cfg, pools, now).unwrap();
        let holder = sched.open_session();
        let waiter = sched.open_session();
        let d = sched.request(now, holder, NewRequest::new(RequestId::parse("h").unwrap(), pool.clone()));
        let lease = granted(&d).unwrap();
        let mut f = Fixture { sched, now, pool, holder, waiter, lease, next: 0 };
        for _ in 0..n {
            let session = if sessions_per_waiter { f.sched.open_session() } else { f.waiter };
            f.enqueue(session);
        }
        f
    }

    fn req(&mut self) -> NewRequest {
        self.next += 1;
        let mut r = NewRequest::new(RequestId::parse(&format!("r{}", self.next)).unwrap(), self.pool.clone());
        r.priority = Priority::try_from((self.next % 10) as u32).unwrap();
        r.holder = Arc::from("bench");
        r
    }

    fn enqueue(&mut self, session: SessionId) -> Decisions {
        let r = self.req();
        self.sched.request(self.now, session, r)
    }

    fn tick(&mut self) {
        self.now += Duration::from_nanos(1);
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("scheduler");
    g.sample_size(30).measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
    g.throughput(Throughput::Elements(1));
    for n in SIZES {
        // Enqueue one request behind n waiters, then cancel it.
        let mut f = Fixture::new(n, false);
        g.bench_with_input(BenchmarkId::new("request_cancel", n), &n, |b, _| {
            b.iter(|| {
                f.tick();
                let r = f.req();
                let id = r.request_id.clone();
                black_box(f.sched.request(f.now, f.waiter, r));
                black_box(f.sched.cancel(f.now, f.waiter, id.as_str()));
            })
        });

        // Release the held slot: the queue head is granted; then the new holder's lease is the one to
        // release next, and a new waiter keeps the queue at n.
        let mut f = Fixture::new(n, false);
        g.bench_with_input(BenchmarkId::new("release_grant", n), &n, |b, _| {
            b.iter(|| {
                f.tick();
                let d = f.sched.release(f.now, f.holder, f.lease, Outcome::Ok);
                f.lease = granted(&d).expect("the head is granted");
                f.holder = f.waiter;
                black_box(f.enqueue(f.waiter));
            })
        });

        // A lease expires (no heartbeat) and the head is granted, found by tick().
        let mut f = Fixture::new(n, false);
        g.bench_with_input(BenchmarkId::new("expire_grant", n), &n, |b, _| {
            b.iter(|| {
                f.now += Duration::from_secs(3601);
                let d = f.sched.tick(f.now);
                assert!(granted(&d).is_some());
                black_box(f.enqueue(f.waiter));
            })
        });
    }
    g.finish();

    // Pause fan-out is linear in the number of sessions told: each gets one Paused event.
    let mut g = c.benchmark_group("pause_fanout");
    g.sample_size(10).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500));
    for n in SIZES {
        let mut f = Fixture::new(n, true);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("report_rate_limit", n), &n, |b, _| {
            b.iter(|| {
                // Each report outlives the previous pause, so every one fans out.
                f.now += Duration::from_millis(1);
                let (_, d) = f
                    .sched
                    .report_rate_limit(f.now, &f.pool, Some(Duration::from_secs(60)), "bench")
                    .unwrap();
                black_box(d);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
