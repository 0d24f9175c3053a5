//! Rate budgets with explicit instants: refill, burst, the tree taking budget atomically, refunds,
//! debt, expiry charged in full, over-burst estimates refused, exact wake-ups, order, gates in
//! `Queued`, the provider's word and shadow mode.

use super::*;

/// A pool with room for many leases and one request per second (burst `burst`).
fn rpm(burst: u64) -> PoolConfig {
    PoolConfig {
        budget: BudgetConfig {
            requests_per_minute: Some(60),
            requests_burst: Some(burst),
            ..Default::default()
        },
        ..limit(100)
    }
}

/// A pool with input and output budgets of 100 tokens per second, burst 1000 each.
fn tpm() -> PoolConfig {
    PoolConfig {
        budget: BudgetConfig {
            input_tokens_per_minute: Some(6000),
            input_tokens_burst: Some(1000),
            output_tokens_per_minute: Some(6000),
            output_tokens_burst: Some(1000),
            default_input_tokens: 100,
            default_output_tokens: 100,
            ..Default::default()
        },
        ..limit(100)
    }
}

fn est(id: &str, pool: &str, input: u64, output: u64) -> NewRequest {
    NewRequest {
        estimate: Some(TokenEstimate { input_tokens: input, max_output_tokens: output }),
        ..req(id, pool)
    }
}

/// The level of one budget of `pool` now (as of the scheduler's last operation).
#[track_caller]
fn level(s: &Scheduler, pool: &str, kind: BudgetKind) -> i64 {
    let snap = s.snapshot(Some(&pid(pool))).unwrap();
    let b = snap.pools[0].budget.as_ref().expect("pool has budgets");
    b.levels.iter().find(|l| l.kind == kind).expect("budget configured").level
}

/// The gate a `Queued` for `request_id` names.
#[track_caller]
fn queued_gate(d: &Decisions, request_id: &str) -> Option<Closed> {
    d.events
        .iter()
        .find_map(|(_, e)| match e {
            Event::Queued { request_id: r, gate, .. } if r.as_str() == request_id => Some(gate.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no Queued for {request_id} in {:#?}", d.events))
}

fn usage(input: u64, output: u64) -> Report {
    Report {
        outcome: Outcome::Ok,
        usage: Some(Usage { input_tokens: input, output_tokens: output, ..Default::default() }),
        limits: Vec::new(),
    }
}

#[test]
fn burst_then_refill_wakes_exactly_when_a_request_is_earned() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", rpm(2))], t0);
    let x = s.open_session();
    granted(&s.request(t0, x, req("a", "p")), x, "a");
    granted(&s.request(t0, x, req("b", "p")), x, "b");
    let d = s.request(t0, x, req("c", "p"));
    let until = t0 + secs(1);
    assert_eq!(
        queued_gate(&d, "c"),
        Some(Closed::Budget { pool: pid("p"), kind: BudgetKind::Requests, until })
    );
    // The driver sleeps until exactly then: nothing else is due.
    assert_eq!(s.next_deadline(), Some(until));
    assert!(grants(&s.tick(until - Duration::from_nanos(1))).is_empty());
    assert_eq!(grants(&s.tick(until)), vec![(x, "c".to_owned())]);
    assert_eq!(level(&s, "p", BudgetKind::Requests), 0);
    // Refill stops at the burst.
    let d = s.request(t0 + secs(100), x, req("d", "p"));
    granted(&d, x, "d");
    assert_eq!(level(&s, "p", BudgetKind::Requests), 1);
    s.check_invariants(t0 + secs(100));
    s.check_budgets(t0 + secs(100));
}

#[test]
fn a_grant_takes_every_level_at_once_and_holds_none_while_waiting() {
    let t0 = Instant::now();
    let g = PoolConfig {
        budget: BudgetConfig {
            input_tokens_per_minute: Some(60_000),
            input_tokens_burst: Some(1000),
            ..Default::default()
        },
        ..limit(100)
    };
    let a = PoolConfig {
        parent: Some(pid("g")),
        budget: BudgetConfig {
            input_tokens_per_minute: Some(60_000),
            input_tokens_burst: Some(5000),
            ..Default::default()
        },
        ..limit(100)
    };
    let mut s = sched(&[("g", g), ("a", a)], t0);
    let x = s.open_session();
    granted(&s.request(t0, x, est("r1", "a", 800, 0)), x, "r1");
    assert_eq!(
        (level(&s, "g", BudgetKind::InputTokens), level(&s, "a", BudgetKind::InputTokens)),
        (200, 4200)
    );
    // The second needs 800: the root has 200, the leaf plenty. It waits on the root, and the leaf's
    // budget is not touched meanwhile.
    let d = s.request(t0, x, est("r2", "a", 800, 0));
    // 600 missing at 1000 per second: 0.6 s.
    let until = t0 + ms(600);
    assert_eq!(
        queued_gate(&d, "r2"),
        Some(Closed::Budget { pool: pid("g"), kind: BudgetKind::InputTokens, until })
    );
    assert_eq!(level(&s, "a", BudgetKind::InputTokens), 4200);
    assert_eq!(s.next_deadline(), Some(until));
    let d = s.tick(until);
    granted(&d, x, "r2");
    assert_eq!(level(&s, "g", BudgetKind::InputTokens), 0);
    // The leaf refilled 600 meanwhile (capped at its burst), then paid 800.
    assert_eq!(level(&s, "a", BudgetKind::InputTokens), 4200 + 600 - 800);
    s.check_invariants(until);
}

#[test]
fn usage_below_the_estimate_is_refunded_and_above_it_is_debt() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", tpm())], t0);
    let x = s.open_session();
    let a = granted(&s.request(t0, x, est("a", "p", 500, 1000)), x, "a");
    assert_eq!(level(&s, "p", BudgetKind::OutputTokens), 0);
    // Used 300 of 1000 output: 700 come back; input used exactly its estimate.
    s.release(t0, x, a, usage(500, 300));
    assert_eq!(level(&s, "p", BudgetKind::OutputTokens), 700);
    assert_eq!(level(&s, "p", BudgetKind::InputTokens), 500);

    // Reserved 100 input, used 900: 800 more charged, down to 500 - 100 - 800 = -400 (debt).
    let b = granted(&s.request(t0, x, est("b", "p", 100, 100)), x, "b");
    s.release(t0, x, b, usage(900, 100));
    assert_eq!(level(&s, "p", BudgetKind::InputTokens), -400);
    let snap = s.snapshot(Some(&pid("p"))).unwrap();
    let input = &snap.pools[0].budget.as_ref().unwrap().levels[0];
    assert_eq!((input.kind, input.debt), (BudgetKind::InputTokens, 400));
    // The debt delays the next grant until refill has paid it back and earned the estimate:
    // 400 + 100 at 100 per second = 5 s.
    let d = s.request(t0, x, est("c", "p", 100, 100));
    let until = t0 + secs(5);
    assert_eq!(
        queued_gate(&d, "c"),
        Some(Closed::Budget { pool: pid("p"), kind: BudgetKind::InputTokens, until })
    );
    assert_eq!(s.next_deadline(), Some(until));
    assert!(grants(&s.tick(until - ms(1))).is_empty());
    granted(&s.tick(until), x, "c");
    // Counters: reserved, settled, estimate error (|500-500| + |900-100| input, |300-1000| + 0 output).
    let c = s.snapshot(Some(&pid("p"))).unwrap().pools[0].budget.as_ref().unwrap().counters;
    assert_eq!(c.reserved, [3, 700, 1200]);
    assert_eq!(c.settled, [2, 1400, 400]);
    assert_eq!(c.estimate_error, [800, 700]);
    assert_eq!(c.settled_with_usage, 2);
    s.check_budgets(until);
}

#[test]
fn debt_is_capped_at_the_burst() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", tpm())], t0);
    let x = s.open_session();
    let a = granted(&s.request(t0, x, est("a", "p", 100, 100)), x, "a");
    s.release(t0, x, a, usage(Usage::MAX_TOKENS, 0));
    assert_eq!(level(&s, "p", BudgetKind::InputTokens), -1000);
    s.check_budgets(t0);
}

#[test]
fn a_lease_that_expires_or_loses_its_stream_is_charged_its_whole_estimate() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", tpm())], t0);
    let x = s.open_session();
    let y = s.open_session();
    let d = s.request(t0, x, NewRequest { ttl: Some(secs(1)), ..est("a", "p", 400, 300) });
    granted(&d, x, "a");
    granted(&s.request(t0, y, est("b", "p", 200, 200)), y, "b");
    // At 1 s the lease expires; 100 tokens refilled per budget meanwhile, no refund.
    let d = s.tick(t0 + secs(1));
    assert!(matches!(d.events[..], [(_, Event::Expired { .. })]), "{:#?}", d.events);
    assert_eq!(level(&s, "p", BudgetKind::InputTokens), 1000 - 600 + 100);
    s.close_session(t0 + secs(1), y, Duration::ZERO);
    assert_eq!(level(&s, "p", BudgetKind::OutputTokens), 1000 - 500 + 100);
    let c = s.snapshot(Some(&pid("p"))).unwrap().pools[0].budget.as_ref().unwrap().counters;
    assert_eq!(c.settled, c.reserved);
    assert_eq!(s.snapshot(Some(&pid("p"))).unwrap().pools[0].budget.as_ref().unwrap().reservations, 0);
    s.check_budgets(t0 + secs(1));
}

#[test]
fn an_estimate_above_any_levels_burst_is_refused_not_queued() {
    let t0 = Instant::now();
    let mut s = sched(&[("g", tpm()), ("a", child("g", 10))], t0);
    let x = s.open_session();
    let d = s.request(t0, x, est("big", "a", 1001, 10));
    assert!(
        matches!(&d.events[..], [(_, Event::Rejected { error: Error::InvalidArgument(m), .. })] if m.contains("burst 1000") && m.contains("input_tokens")),
        "{:#?}",
        d.events
    );
    assert_eq!(s.waiter_count(), 0);
    // The child without budgets uses the root's default estimate.
    granted(&s.request(t0, x, req("dflt", "a")), x, "dflt");
    assert_eq!(level(&s, "g", BudgetKind::OutputTokens), 1000 - 100);
    // Exactly the burst is accepted: it waits for a full bucket.
    let d = s.request(t0, x, est("full", "a", 1000, 10));
    assert!(queued_gate(&d, "full").is_some());
    granted(&s.tick(t0 + secs(1)), x, "full");
}

#[test]
fn a_small_later_request_never_overtakes_a_budget_blocked_head() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", tpm())], t0);
    let x = s.open_session();
    granted(&s.request(t0, x, est("a", "p", 900, 10)), x, "a");
    // 900 input needed, 100 left: the head waits 8 s.
    let d = s.request(t0, x, est("big", "p", 900, 10));
    assert!(queued_gate(&d, "big").is_some());
    // 50 would fit now, but it queues behind the head, and says what holds the queue.
    let d = s.request(t0, x, est("small", "p", 50, 10));
    assert_eq!(
        queued_gate(&d, "small"),
        Some(Closed::Budget { pool: pid("p"), kind: BudgetKind::InputTokens, until: t0 + secs(8) })
    );
    assert!(grants(&s.tick(t0 + secs(4))).is_empty());
    let d = s.tick(t0 + secs(8));
    assert_eq!(grants(&d), vec![(x, "big".to_owned())]);
    // Then the small one, once its 50 are earned: half a second later.
    assert_eq!(s.next_deadline(), Some(t0 + secs(8) + ms(500)));
    assert_eq!(grants(&s.tick(t0 + secs(8) + ms(500))), vec![(x, "small".to_owned())]);
    s.check_invariants(t0 + secs(9));
}

#[test]
fn queued_names_every_gate() {
    let t0 = Instant::now();
    let cool = PoolConfig { cooldown: secs(2), ..limit(1) };
    let mut s = sched(&[("slots", limit(1)), ("cool", cool), ("paused", limit(1))], t0);
    let x = s.open_session();
    granted(&s.request(t0, x, req("h", "slots")), x, "h");
    assert_eq!(queued_gate(&s.request(t0, x, req("w", "slots")), "w"), Some(Closed::Full(pid("slots"))));
    let c = granted(&s.request(t0, x, req("c", "cool")), x, "c");
    s.release(t0, x, c, Outcome::Ok);
    assert_eq!(
        queued_gate(&s.request(t0, x, req("wc", "cool")), "wc"),
        Some(Closed::Cooling(pid("cool"), t0 + secs(2)))
    );
    s.pause_pool(t0, &pid("paused"), secs(3), "maintenance").unwrap();
    assert_eq!(
        queued_gate(&s.request(t0, x, req("wp", "paused")), "wp"),
        Some(Closed::Paused(pid("paused"), t0 + secs(3)))
    );
    s.set_draining(t0, true);
    assert_eq!(queued_gate(&s.request(t0, x, req("wd", "slots")), "wd"), Some(Closed::Draining));
    let snap = s.snapshot(Some(&pid("cool"))).unwrap();
    assert_eq!(snap.pools[0].gate, Some(Closed::Draining));

    let learning = SchedulerConfig { learning_period: secs(1), ..cfg() };
    let mut s = sched_with(learning, &[("p", limit(1))], t0);
    let x = s.open_session();
    assert_eq!(queued_gate(&s.request(t0, x, req("l", "p")), "l"), Some(Closed::Learning));
}

#[test]
fn the_providers_word_clamps_the_budget_and_is_shown_with_its_time() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", tpm())], t0);
    let x = s.open_session();
    let a = granted(&s.request(t0, x, est("a", "p", 100, 100)), x, "a");
    let said = |kind, limit, remaining| ProviderLimit { kind, limit, remaining, reset_in: secs(30) };
    let report = Report {
        outcome: Outcome::Ok,
        usage: None,
        limits: vec![said(LimitKind::InputTokens, 600, 50), said(LimitKind::Tokens, 10_000, 300)],
    };
    s.release(t0, x, a, report);
    // Input: clamped to the 50 the provider has left, its burst to the provider's 600 limit.
    let snap = s.snapshot(Some(&pid("p"))).unwrap();
    let b = snap.pools[0].budget.clone().unwrap();
    assert_eq!((b.levels[0].level, b.levels[0].burst, b.levels[0].rate), (50, 600, 600));
    // Output: a combined `tokens` limit clamps the level (900 -> 300), not the rate.
    assert_eq!((b.levels[1].level, b.levels[1].burst), (300, 1000));
    assert_eq!(b.provider.len(), 2);
    assert!(b.provider.iter().all(|v| v.seen_at == t0));
    // A request needing 100 input now waits for the provider's refill rate: 50 at 10/s = 5 s.
    let d = s.request(t0, x, est("b", "p", 100, 100));
    assert_eq!(
        queued_gate(&d, "b"),
        Some(Closed::Budget { pool: pid("p"), kind: BudgetKind::InputTokens, until: t0 + secs(5) })
    );
    // A request may ask up to the configured burst even while the provider's burst is smaller: it
    // waits for the smaller full bucket rather than forever.
    granted(&s.tick(t0 + secs(5)), x, "b");
}

#[test]
fn shadow_mode_never_blocks_and_records_the_wait() {
    let t0 = Instant::now();
    let mut cfg = rpm(1);
    cfg.budget.shadow = true;
    let mut s = sched(&[("p", cfg)], t0);
    let x = s.open_session();
    granted(&s.request(t0, x, req("a", "p")), x, "a");
    let d = s.request(t0, x, req("b", "p"));
    granted(&d, x, "b");
    assert!(
        d.facts.iter().any(|f| matches!(f, Fact::Budget { fact: BudgetFact::ShadowWait { would_wait, .. }, .. } if *would_wait == secs(1))),
        "{:#?}",
        d.facts
    );
    let c = s.snapshot(None).unwrap().pools[0].budget.as_ref().unwrap().counters;
    assert_eq!((c.shadow_waits, c.shadow_wait), (1, secs(1)));
    s.check_budgets(t0);
}

#[test]
fn usage_reported_outside_a_lease_is_charged() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", tpm())], t0);
    let u =
        Usage { input_tokens: 300, output_tokens: 200, cache_read_tokens: 5000, cache_creation_tokens: 100 };
    let (b, _) = s.report_usage(t0, &pid("p"), Some(u), &[]).unwrap();
    let b = b.unwrap();
    // Cache reads are free; cache writes count as input.
    assert_eq!((b.levels[0].level, b.levels[1].level), (600, 800));
    assert!(matches!(s.report_usage(t0, &pid("nope"), None, &[]), Err(Error::UnknownPool(_))));
}

#[test]
fn budget_settings_are_validated() {
    let bad = |b: BudgetConfig| PoolConfig { budget: b, ..limit(1) }.validate(&pid("p")).unwrap_err();
    assert!(
        bad(BudgetConfig { requests_per_minute: Some(0), ..Default::default() }).contains("out of range")
    );
    assert!(bad(BudgetConfig { window: ms(1), ..Default::default() }).contains("window"));
    let e = bad(BudgetConfig { input_tokens_per_minute: Some(10), ..Default::default() });
    assert!(e.contains("default estimate"), "{e}");
    let e = bad(BudgetConfig { output_tokens_per_minute: Some(Usage::MAX_TOKENS + 1), ..Default::default() });
    assert!(e.contains("out of range"), "{e}");
}
