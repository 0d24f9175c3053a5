//! Leadership terms: the grant deadline (fencing of a leader that may be deposed) and a term's start.

use super::*;

/// Past the grant deadline nothing is granted: new requests queue (they are not refused) and are
/// served once a later deadline arrives.
#[test]
fn nothing_is_granted_at_or_after_the_grant_deadline() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", limit(2))], t0);
    let x = s.open_session();
    s.set_grant_deadline(t0, Some(t0 + ms(100)));
    let d = s.request(t0 + ms(99), x, req("before", "p"));
    assert_eq!(grants(&d), vec![(x, "before".to_owned())]);

    let d = s.request(t0 + ms(100), x, req("at", "p"));
    assert!(grants(&d).is_empty(), "granted at the deadline: {d:?}");
    assert_only(&d, x, queued("at", 0));
    s.check_invariants(t0 + ms(100));

    // A renewed keepalive moves the deadline: the waiter is served at once.
    let d = s.set_grant_deadline(t0 + ms(150), Some(t0 + ms(300)));
    assert_eq!(grants(&d), vec![(x, "at".to_owned())]);
    s.check_invariants(t0 + ms(150));
}

/// Lifting the deadline (`None`, single node) grants what waited.
#[test]
fn lifting_the_grant_deadline_grants_the_waiters() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", limit(1))], t0);
    let x = s.open_session();
    s.set_grant_deadline(t0, Some(t0));
    assert!(grants(&s.request(t0, x, req("a", "p"))).is_empty());
    assert_eq!(s.grant_deadline(), Some(t0));
    let d = s.set_grant_deadline(t0 + ms(1), None);
    assert_eq!(grants(&d), vec![(x, "a".to_owned())]);
}

/// A term's first token lifts every pool's counter, also of pools created or re-added later, and a
/// term never lowers a counter; its learning period holds new grants back.
#[test]
fn a_new_term_lifts_fencing_tokens_and_learns_first() {
    let t0 = Instant::now();
    let mut s = sched(&[("p", limit(2)), ("q", limit(1))], t0);
    let x = s.open_session();
    let epoch_base = 7u64 << 32;
    s.begin_term(t0, epoch_base, ms(500));
    assert!(s.snapshot(None).unwrap().learning);
    let d = s.request(t0 + ms(10), x, req("a", "p"));
    assert!(grants(&d).is_empty(), "granted while learning");
    let d = s.tick(t0 + ms(500));
    assert_eq!(token_of(&d, "a"), epoch_base);

    // A later term with a lower base changes nothing.
    s.begin_term(t0 + ms(501), 5, Duration::ZERO);
    let d = s.request(t0 + ms(502), x, req("b", "p"));
    assert_eq!(token_of(&d, "b"), epoch_base + 1);

    // Removed and re-added: still above the term's base.
    s.set_pools(t0 + ms(503), pools(&[("p", limit(2))])).unwrap();
    s.set_pools(t0 + ms(504), pools(&[("p", limit(2)), ("q", limit(1))])).unwrap();
    let d = s.request(t0 + ms(505), x, req("c", "q"));
    assert_eq!(token_of(&d, "c"), epoch_base);
    // A pool created during the term starts at its base too.
    s.set_pools(t0 + ms(506), pools(&[("p", limit(2)), ("q", limit(1)), ("r", limit(1))])).unwrap();
    let d = s.request(t0 + ms(507), x, req("d", "r"));
    assert_eq!(token_of(&d, "d"), epoch_base);
    s.check_invariants(t0 + ms(507));
}
