//! Bad input gets the right event and changes nothing; parsing of untrusted ids.

use super::*;

/// A scheduler with one lease and one waiter on `p`, owned by the first of two sessions.
fn busy(t0: Instant) -> (Scheduler, SessionId, SessionId, LeaseId) {
    let mut s = sched(&[("p", PoolConfig { max_ttl: secs(60), ..limit(1) })], t0);
    let x = s.open_session();
    let y = s.open_session();
    let l = granted(&s.request(t0, x, req("h", "p")), x, "h");
    assert_only(&s.request(t0, x, req("w", "p")), x, queued("w", 0));
    (s, x, y, l)
}

#[test]
fn refused_requests_change_nothing() {
    let t0 = Instant::now();
    let (mut s, x, _y, _l) = busy(t0);
    let before = fingerprint(&s);
    let with_ttl = |ttl| NewRequest { ttl: Some(ttl), ..req("t", "p") };
    let cases = [
        (req("u", "nope"), rejected("u", Error::UnknownPool(pid("nope")))),
        (req("w", "p"), rejected("w", Error::DuplicateRequest("w".into()))),
        (
            with_ttl(Duration::ZERO),
            rejected("t", Error::InvalidTtl { pool: pid("p"), got: Duration::ZERO, max: secs(60) }),
        ),
        (
            with_ttl(secs(61)),
            rejected("t", Error::InvalidTtl { pool: pid("p"), got: secs(61), max: secs(60) }),
        ),
    ];
    for (r, want) in cases {
        assert_only(&s.request(t0, x, r), x, want);
        assert_eq!(fingerprint(&s), before);
        s.check_invariants(t0);
    }
    // The duplicate did not disturb the original.
    assert_eq!(load(&s, "p"), (1, 1));
    // The largest TTL is fine.
    assert_only(&s.request(t0, x, with_ttl(secs(60))), x, queued("t", 1));
}

#[test]
fn requests_from_unknown_sessions_are_refused() {
    let t0 = Instant::now();
    let (mut s, _x, _y, _l) = busy(t0);
    let before = fingerprint(&s);
    let ghost = SessionId(999);
    let d = s.request(t0, ghost, req("g", "p"));
    assert_only(&d, ghost, rejected("g", Error::ShuttingDown));
    assert_eq!(fingerprint(&s), before);
}

#[test]
fn lease_messages_for_other_or_unknown_leases_change_nothing() {
    let t0 = Instant::now();
    let (mut s, x, y, l) = busy(t0);
    let t1 = t0 + ms(1);
    s.tick(t1);
    let before = fingerprint(&s);

    // Another session's lease.
    assert_only(&s.release(t1, y, l, Outcome::Ok), y, lease_error(l, Error::NotYourLease(l)));
    assert_eq!(fingerprint(&s), before);
    assert_eq!(
        s.heartbeat(t1, y, &[l]).events,
        vec![(y, lease_error(l, Error::NotYourLease(l))), (y, Event::HeartbeatAck { renewed: 0 })]
    );
    assert_eq!(fingerprint(&s), before);
    // Even a 429 outcome on someone else's lease does not pause the pool.
    s.release(t1, y, l, Outcome::RateLimited(Some(secs(60))));
    assert_eq!(fingerprint(&s), before);

    // A lease nobody ever had.
    let ghost = LeaseId(0xdead_beef);
    assert_only(&s.release(t1, x, ghost, Outcome::Ok), x, lease_error(ghost, Error::UnknownLease(ghost)));
    assert_eq!(fingerprint(&s), before);
    assert_eq!(
        s.heartbeat(t1, x, &[ghost]).events,
        vec![(x, lease_error(ghost, Error::UnknownLease(ghost))), (x, Event::HeartbeatAck { renewed: 0 })]
    );
    assert_eq!(fingerprint(&s), before);

    // Cancel of a request that is not queued (never sent, or another session's).
    assert_only(&s.cancel(t1, x, "never"), x, rejected("never", Error::UnknownRequest("never".into())));
    assert_only(&s.cancel(t1, y, "w"), y, rejected("w", Error::UnknownRequest("w".into())));
    assert_eq!(fingerprint(&s), before);

    // A release twice: the second is refused.
    s.release(t1, x, l, Outcome::Ok);
    let after = fingerprint(&s);
    assert_only(
        &s.release(t1, x, l, Outcome::Ok),
        x,
        lease_error(l, Error::LeaseEnded { id: l, how: "released" }),
    );
    assert_eq!(fingerprint(&s), after);
    s.check_invariants(t1);
}

#[test]
fn priorities_out_of_range_are_refused() {
    assert_eq!(Priority::try_from(0).unwrap(), Priority::MIN);
    assert_eq!(Priority::try_from(9).unwrap(), Priority::MAX);
    assert_eq!(Priority::try_from(5).unwrap(), Priority::DEFAULT);
    assert_eq!(Priority::default(), Priority::DEFAULT);
    for bad in [10, 255, 256, u32::MAX] {
        assert_eq!(
            Priority::try_from(bad).map_err(Error::from),
            Err(Error::PriorityOutOfRange { got: bad, max: 9 })
        );
    }
    assert_eq!(Error::PriorityOutOfRange { got: 10, max: 9 }.to_string(), "priority 10 out of range 0..=9");
}

#[test]
fn pool_names_are_validated() {
    for ok in ["a", "openai-key-2", "anthropic/claude.v1:eu", "under_score", &"x".repeat(128)] {
        assert_eq!(PoolId::parse(ok).unwrap().as_str(), ok);
    }
    for bad in ["", "has space", "semi;colon", "é", "a\n", &"x".repeat(129)] {
        assert!(matches!(PoolId::parse(bad).map_err(Error::from), Err(Error::InvalidArgument(_))), "{bad:?}");
    }
}

#[test]
fn request_ids_are_validated() {
    for ok in ["r", "any thing ✓", &"x".repeat(128)] {
        assert_eq!(RequestId::parse(ok).unwrap().as_str(), ok);
    }
    for bad in ["", &"x".repeat(129)] {
        assert!(
            matches!(RequestId::parse(bad).map_err(Error::from), Err(Error::InvalidArgument(_))),
            "{bad:?}"
        );
    }
    // A huge id is truncated in the message.
    let Err(Error::InvalidArgument(msg)) = RequestId::parse(&"y".repeat(10_000)).map_err(Error::from) else {
        panic!("accepted");
    };
    assert!(msg.len() < 200, "{msg}");
}

#[test]
fn lease_ids_are_32_hex_digits() {
    let id = LeaseId(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
    let text = id.to_string();
    assert_eq!(text, "0123456789abcdef0011223344556677");
    assert_eq!(text.parse::<LeaseId>().unwrap(), id);
    assert_eq!(text.to_uppercase().parse::<LeaseId>().unwrap(), id, "upper case is accepted");
    assert_eq!(LeaseId(1).to_string().len(), 32);
    assert_eq!(format!("{:?}", LeaseId(1)), format!("LeaseId({})", LeaseId(1)));
    let sign = format!("+{}", &text[1..]);
    let multibyte = format!("{}é", &text[..30]);
    for bad in [
        "",
        &text[1..],
        &format!("{text}0"),
        &sign,
        &multibyte,
        "0123456789abcdef001122334455667g",
        &" ".repeat(32),
    ] {
        assert!(
            matches!(bad.parse::<LeaseId>().map_err(Error::from), Err(Error::InvalidArgument(_))),
            "{bad:?}"
        );
    }
}

#[test]
fn id_errors_keep_their_messages_as_scheduler_errors() {
    let pool = Error::from(PoolId::parse("a b").unwrap_err());
    assert_eq!(
        pool,
        Error::InvalidArgument(r#"invalid pool name "a b": want 1..=128 bytes of [A-Za-z0-9._:/-]"#.into())
    );
    let request = Error::from(RequestId::parse("").unwrap_err());
    assert_eq!(request.to_string(), r#"invalid request_id "": want 1..=128 bytes"#);
    let lease = Error::from("xyz".parse::<LeaseId>().unwrap_err());
    assert_eq!(lease.to_string(), r#"invalid lease id "xyz": want 32 hex digits"#);
    assert_eq!(
        Error::from(Priority::try_from(10).unwrap_err()),
        Error::PriorityOutOfRange { got: 10, max: 9 }
    );
}
