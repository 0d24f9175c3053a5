//! Rate budgets over loopback: 16 agents with random estimates and usage against request, input and
//! output limits of a fake provider that counts per window; the gate a `Queued` names; over-burst
//! estimates refused; Status showing levels, counters and the provider's word (`ReportUsage`).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use rand::{Rng, SeedableRng, rngs::StdRng};
use slotd_client::{LimitKind, ProviderLimit, Usage};
use slotd_proto::v1 as pb;
use slotd_test_support::{Daemon, pool_in};
use tokio::time::Instant;
use tonic::Code;

/// The fake provider's window: one second stands in for a minute.
const WINDOW: Duration = Duration::from_secs(1);
/// The provider's limits per window: requests, input tokens, output tokens.
const LIMITS: [u64; 3] = [40, 8000, 8000];
/// How long the agents run.
const RUN: Duration = Duration::from_secs(3);

/// The daemon's budgets: refill and burst of 45% of each provider limit, so that burst plus one
/// window of refill (what a token bucket can let through in any window) stays below the limit with
/// room for loopback jitter between the daemon's grant and the provider's count.
fn config() -> String {
    let [r, i, o] = LIMITS.map(|l| l * 45 / 100);
    format!(
        "[pools.llm]\nmax_concurrent = 12\n\n[pools.llm.budget]\nwindow = \"1s\"\n\
         requests_per_minute = {r}\ninput_tokens_per_minute = {i}\noutput_tokens_per_minute = {o}\n\
         default_input_tokens = 200\ndefault_output_tokens = 200\n"
    )
}

/// A provider that counts requests, input and output tokens per fixed window since its start.
#[derive(Default)]
struct FakeProvider {
    windows: BTreeMap<u64, [u64; 3]>,
}

impl FakeProvider {
    /// One call: counted at its start, with the output it will produce (at most `max_tokens`).
    fn call(&mut self, since_start: Duration, input: u64, output: u64) {
        let w = (since_start.as_nanos() / WINDOW.as_nanos()) as u64;
        let c = self.windows.entry(w).or_default();
        c[0] += 1;
        c[1] += input;
        c[2] += output;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_agents_never_exceed_the_providers_per_window_counts() {
    let daemon = Daemon::start(&config()).await;
    let provider = Arc::new(Mutex::new(FakeProvider::default()));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for agent in 0..16u64 {
        let client = daemon.connect().await;
        let provider = provider.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(agent);
            let mut calls = 0u64;
            while start.elapsed() < RUN {
                let input = rng.random_range(50..300);
                let max_output = rng.random_range(50..400);
                let lease =
                    client.acquire("llm").tokens(input, max_output).max_wait(Duration::from_secs(2)).await;
                let lease = match lease {
                    Ok(l) => l,
                    // A wait that ran into the end of the run.
                    Err(_) if start.elapsed() >= RUN => break,
                    Err(e) => panic!("agent {agent}: acquire: {e}"),
                };
                // Input is known before the call; output is at most max_tokens.
                let output = rng.random_range(0..=max_output);
                provider.lock().unwrap().call(start.elapsed(), input, output);
                tokio::time::sleep(Duration::from_millis(rng.random_range(1..10))).await;
                lease
                    .settle(Usage { input_tokens: input, output_tokens: output, ..Default::default() })
                    .await
                    .unwrap_or_else(|e| panic!("agent {agent}: settle: {e}"));
                calls += 1;
            }
            client.close().await.unwrap();
            calls
        }));
    }
    let mut calls = 0;
    for t in tasks {
        calls += t.await.unwrap();
    }
    let elapsed = start.elapsed();
    let windows = provider.lock().unwrap().windows.clone();
    for (w, counts) in &windows {
        for (k, (used, limit)) in counts.iter().zip(LIMITS).enumerate() {
            assert!(
                *used <= limit,
                "window {w}: {} used {used} of the provider's {limit}",
                ["requests", "input", "output"][k]
            );
        }
    }
    // Use as a share of what the daemon's budgets allowed over the run: one burst plus refill.
    let total = windows.values().fold([0u64; 3], |a, c| [a[0] + c[0], a[1] + c[1], a[2] + c[2]]);
    let allowed = LIMITS.map(|l| {
        let rate = (l * 45 / 100) as f64;
        rate + rate * elapsed.as_secs_f64() / WINDOW.as_secs_f64()
    });
    let share: Vec<f64> = total.iter().zip(allowed).map(|(u, a)| *u as f64 / a).collect();
    eprintln!(
        "rate budgets: {calls} calls in {elapsed:?}; use as a share of the budget: requests {:.0}%, \
         input {:.0}%, output {:.0}%; per window {windows:?}",
        share[0] * 100.0,
        share[1] * 100.0,
        share[2] * 100.0
    );
    assert_eq!(calls, total[0]);
    // The budgets bound: some budget ran close to full (16 agents want far more than it allows).
    assert!(share.iter().any(|s| *s > 0.5), "no budget was used: {share:?}");

    // Status counts every reservation and settlement.
    let st = daemon.agent("observer").await.status().await;
    let b = pool_in(&st, "llm").budget.expect("budget in Status");
    let c = b.counters.expect("counters");
    assert_eq!((c.reserved_requests, c.settled_with_usage), (calls, calls));
    assert_eq!(c.settled_input_tokens, total[1]);
    assert_eq!(c.settled_output_tokens, total[2]);
    assert_eq!(c.estimate_error_input_tokens, 0, "input was estimated exactly");
    assert_eq!(b.reservations, 0);
}

#[tokio::test]
async fn queued_names_the_budget_and_when_it_refills() {
    let toml = "[pools.p]\nmax_concurrent = 5\n\n[pools.p.budget]\nrequests_per_minute = 60\n\
                requests_burst = 1\ninput_tokens_per_minute = 1000\ndefault_input_tokens = 10\n";
    let daemon = Daemon::start(toml).await;
    let mut a = daemon.agent("a").await;
    a.acquire("r1", "p").await;
    a.request(a.req("r2", "p")).await;
    let q = a.expect_queued("r2").await;
    assert_eq!(q.gate, pb::Gate::RequestsBudget as i32, "{q:?}");
    assert_eq!(q.gate_pool, "p");
    let until = q.gate_until.expect("a budget gate says until when");
    let wait = slotd_test_support::system_time(&until)
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    assert!(wait <= Duration::from_secs(1), "one request refills in a second: {wait:?}");
    // Status names the same gate for the pool.
    let st = a.status().await;
    let p = pool_in(&st, "p");
    assert_eq!((p.gate, p.gate_pool.as_str()), (pb::Gate::RequestsBudget as i32, "p"));
    let levels = &p.budget.as_ref().unwrap().levels;
    assert_eq!(levels[0].kind, pb::BudgetKind::Requests as i32);
    assert_eq!((levels[0].refill, levels[0].burst, levels[0].level), (60, 1, 0));

    // An estimate above the input burst is refused at once.
    let mut big = a.req("big", "p");
    big.estimate = Some(pb::TokenEstimate { input_tokens: 1001, max_output_tokens: 0 });
    a.request(big).await;
    let r = a.expect_rejected("big", Code::InvalidArgument).await;
    assert!(r.message.contains("burst 1000"), "{r:?}");
}

#[tokio::test]
async fn report_usage_charges_the_budget_and_the_providers_word_is_shown() {
    let toml = "[pools.p]\nmax_concurrent = 5\n\n[pools.p.budget]\ninput_tokens_per_minute = 1000\n\
                output_tokens_per_minute = 1000\ndefault_input_tokens = 10\ndefault_output_tokens = 10\n";
    let daemon = Daemon::start(toml).await;
    let client = daemon.connect().await;
    let limits = vec![ProviderLimit {
        kind: LimitKind::InputTokens,
        limit: 800,
        remaining: 100,
        reset_in: Duration::from_secs(30),
    }];
    let usage = Usage { input_tokens: 50, output_tokens: 300, ..Default::default() };
    let b = client.report_usage("p", Some(usage), limits).await.unwrap().expect("budgets");
    let level = |k: pb::BudgetKind| *b.levels.iter().find(|l| l.kind == k as i32).unwrap();
    // Input: clamped to the provider's remaining 100 (it had 950), burst to its limit 800.
    let input = level(pb::BudgetKind::InputTokens);
    assert!(input.level <= 100 && input.burst == 800, "{input:?}");
    let output = level(pb::BudgetKind::OutputTokens);
    assert!(output.level >= 700 && output.level < 1000, "{output:?}");
    assert_eq!(b.provider.len(), 1);
    assert!(b.provider[0].age.is_some());
    let err = client.report_usage("nope", None, Vec::new()).await.unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
    client.close().await.unwrap();
}

#[tokio::test]
async fn shadow_mode_grants_and_shows_what_would_have_waited_in_watch_status_and_metrics() {
    let toml = "[pools.p]\nmax_concurrent = 5\n\n[pools.p.budget]\nrequests_per_minute = 60\n\
                requests_burst = 1\nshadow = true\n";
    let (daemon, metrics) = Daemon::start_with_metrics(toml).await;
    let mut admin = daemon.admin().await;
    let mut watch = admin
        .watch(pb::WatchRequest { pool: "p".into(), snapshot_interval: None })
        .await
        .unwrap()
        .into_inner();
    let mut a = daemon.agent("a").await;
    a.acquire("r1", "p").await;
    // Over the budget, granted anyway.
    a.acquire("r2", "p").await;
    let change = loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), watch.message())
            .await
            .expect("a Watch event in time")
            .unwrap()
            .expect("Watch open");
        if let Some(pb::watch_event::Event::Budget(c)) = ev.event {
            break c;
        }
    };
    assert_eq!(change.pool, "p");
    assert!(change.detail.contains("shadow") && change.detail.contains("requests"), "{change:?}");
    let would_wait = change.would_wait.expect("how long it would have waited");
    assert!(would_wait.seconds <= 1 && (would_wait.seconds > 0 || would_wait.nanos > 0), "{would_wait:?}");

    let st = a.status().await;
    let b = pool_in(&st, "p").budget.expect("budget");
    let c = b.counters.unwrap();
    assert!(b.shadow);
    assert_eq!((c.shadow_waits, b.reservations), (1, 2));
    assert_eq!(b.levels[0].level, -1, "tracked as usual: two taken from a burst of one");

    let body = slotd_test_support::scrape(metrics).await;
    for want in [
        "slotd_budget_shadow_waits_total{budget=\"requests\",pool=\"p\"} 1",
        "slotd_budget_reserved_total{budget=\"requests\",pool=\"p\"} 2",
        "slotd_budget_reserved{budget=\"requests\",pool=\"p\"} 2",
        "slotd_budget_refill_per_window{budget=\"requests\",pool=\"p\"} 60",
    ] {
        assert!(body.contains(want), "missing {want} in\n{body}");
    }
}

#[tokio::test]
async fn upsert_pool_sets_changes_and_removes_budgets() {
    let daemon = Daemon::start("[pools.p]\nmax_concurrent = 2\n").await;
    let mut admin = daemon.admin().await;
    let upsert = |spec: pb::PoolSpec| pb::UpsertPoolRequest { pool: Some(spec) };
    let spec = pb::PoolSpec {
        name: "p".into(),
        requests_per_minute: Some(120),
        requests_burst: Some(3),
        budget_window: Some(slotd_test_support::ms(500)),
        ..Default::default()
    };
    let p = admin.upsert_pool(upsert(spec)).await.unwrap().into_inner().pool.unwrap();
    let b = p.budget.expect("a budget now");
    assert_eq!((b.levels[0].refill, b.levels[0].burst, b.levels[0].level), (120, 3, 3));
    assert_eq!(b.window, Some(slotd_test_support::ms(500)));
    // A burst above the bound is refused and changes nothing.
    let bad = pb::PoolSpec { name: "p".into(), requests_burst: Some(1 << 41), ..Default::default() };
    let err = admin.upsert_pool(upsert(bad)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // Zero removes the budget.
    let off = pb::PoolSpec { name: "p".into(), requests_per_minute: Some(0), ..Default::default() };
    let p = admin.upsert_pool(upsert(off)).await.unwrap().into_inner().pool.unwrap();
    assert!(p.budget.is_none(), "{p:?}");
}
