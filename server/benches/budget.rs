//! Criterion benches of the grant path with rate budgets: a release that settles usage and grants
//! the queue head, on a three-level tree (`g` > `a` > `a1`) with three budgets on every level, at 10,
//! 1k and 100k waiters; the same tree without budgets for comparison.
//! Run: `cargo bench -p slotd --bench budget`.
//!
//! The budgets are large enough never to block, so every iteration reserves on nine buckets and
//! settles (refunds) on nine: the cost budgets add to a grant, not time spent waiting.

use std::{collections::BTreeMap, hint::black_box, time::Duration};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use slotd::scheduler::{
    BudgetConfig, Decisions, Event, LeaseId, NewRequest, Outcome, PoolConfig, PoolId, Report, RequestId,
    Scheduler, SchedulerConfig, SessionId, TokenEstimate, Usage,
};
use tokio::time::Instant;

const SIZES: [usize; 3] = [10, 1_000, 100_000];

fn granted(d: &Decisions) -> Option<LeaseId> {
    d.events.iter().find_map(|(_, e)| match e {
        Event::Granted { lease_id, .. } => Some(*lease_id),
        _ => None,
    })
}

struct Fixture {
    sched: Scheduler,
    now: Instant,
    holder: SessionId,
    waiter: SessionId,
    lease: LeaseId,
    next: u64,
}

impl Fixture {
    /// `a1` (limit 1) under `a` under `g`, its slot held and `n` waiters queued on it.
    fn new(n: usize, budgets: bool) -> Self {
        let now = Instant::now();
        let budget = if budgets {
            BudgetConfig {
                requests_per_minute: Some(1 << 40),
                input_tokens_per_minute: Some(1 << 40),
                output_tokens_per_minute: Some(1 << 40),
                ..BudgetConfig::default()
            }
        } else {
            BudgetConfig::default()
        };
        let pool = |parent: Option<&str>, limit| PoolConfig {
            parent: parent.map(PoolId::new),
            max_queue_depth: u32::MAX,
            default_ttl: Duration::from_secs(3600),
            max_ttl: Duration::from_secs(3600),
            budget: budget.clone(),
            ..PoolConfig::with_limit(limit)
        };
        let pools = BTreeMap::from([
            (PoolId::new("g"), pool(None, 10)),
            (PoolId::new("a"), pool(Some("g"), 5)),
            (PoolId::new("a1"), pool(Some("a"), 1)),
        ]);
        let cfg =
            SchedulerConfig { seed: Some(7), max_per_session: usize::MAX, ..SchedulerConfig::default() };
        let mut sched = Scheduler::new(cfg, pools, now).unwrap();
        let holder = sched.open_session();
        let waiter = sched.open_session();
        let mut f = Fixture { sched, now, holder, waiter, lease: LeaseId(0), next: 0 };
        let d = f.enqueue(holder);
        f.lease = granted(&d).unwrap();
        for _ in 0..n {
            f.enqueue(f.waiter);
        }
        f
    }

    fn enqueue(&mut self, session: SessionId) -> Decisions {
        self.next += 1;
        let req = NewRequest {
            estimate: Some(TokenEstimate { input_tokens: 2_000, max_output_tokens: 1_000 }),
            ..NewRequest::new(RequestId::parse(&format!("r{}", self.next)).unwrap(), PoolId::new("a1"))
        };
        self.sched.request(self.now, session, req)
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("budget");
    g.sample_size(30).measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
    g.throughput(Throughput::Elements(1));
    for (name, budgets) in [("release_settle_grant_3x3", true), ("release_grant_no_budget", false)] {
        for n in SIZES {
            let mut f = Fixture::new(n, budgets);
            g.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                b.iter(|| {
                    f.now += Duration::from_nanos(1);
                    let usage = Usage { input_tokens: 2_000, output_tokens: 300, ..Default::default() };
                    let report = Report { outcome: Outcome::Ok, usage: Some(usage), limits: Vec::new() };
                    let d = f.sched.release(f.now, f.holder, f.lease, report);
                    f.lease = granted(&d).expect("the head is granted");
                    f.holder = f.waiter;
                    black_box(f.enqueue(f.waiter));
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
