//! State-machine tests: no daemon, no runtime, time passed in by hand.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::machine::{
    Credential, Expiry, FromDaemon, Input, LeaseInfo, Machine, Notify, Now, Step, ToDaemon,
};
use crate::{Error, Lost, Outcome, command::RequestSpec};

const TTL: Duration = Duration::from_secs(30);

/// A machine with a movable clock.
struct Harness {
    m: Machine,
    now: Now,
}

impl Harness {
    fn new() -> Self {
        let now = Now { mono: Instant::now(), wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000) };
        Harness { m: Machine::new(None), now }
    }

    fn connected() -> Self {
        let mut h = Self::new();
        let step = h.on(Input::Connected);
        assert!(step.send.is_empty() && step.notify.is_empty(), "{step:?}");
        h
    }

    fn advance(&mut self, by: Duration) {
        self.now.mono += by;
        self.now.wall += by;
    }

    fn on(&mut self, input: Input) -> Step {
        self.m.handle(self.now, input)
    }

    fn msg(&mut self, msg: FromDaemon) -> Step {
        self.on(Input::Message(msg))
    }

    fn acquire(&mut self, request_id: &str, max_wait: Option<Duration>) -> Step {
        self.on(Input::Acquire { request_id: request_id.into(), spec: spec(max_wait) })
    }

    fn grant(&mut self, request_id: &str, lease_id: &str) -> Step {
        let lease = lease(lease_id, self.now.wall);
        self.msg(FromDaemon::Granted { request_id: request_id.into(), lease })
    }

    fn release(&mut self, lease_id: &str, ticket: Option<u64>) -> Step {
        self.on(Input::Release { lease_id: lease_id.into(), report: Outcome::Ok.into(), ticket })
    }

    /// Acquires and grants `lease_id` on a connected machine.
    #[track_caller]
    fn held(&mut self, lease_id: &str) {
        let request_id = format!("r-{lease_id}");
        self.acquire(&request_id, None);
        let step = self.grant(&request_id, lease_id);
        assert!(matches!(&step.notify[..], [Notify::Granted { .. }]), "{step:?}");
    }
}

fn spec(max_wait: Option<Duration>) -> RequestSpec {
    RequestSpec {
        pool: "p".into(),
        any_pools: Vec::new(),
        priority: Some(7),
        started_at: SystemTime::UNIX_EPOCH,
        ttl: None,
        max_wait,
        holder: "agent".into(),
        tokens: None,
    }
}

fn lease(lease_id: &str, now: SystemTime) -> LeaseInfo {
    LeaseInfo {
        lease_id: lease_id.into(),
        pool: "p".into(),
        fencing_token: 42,
        ttl: TTL,
        expires_at: now + TTL,
        credential: credential(lease_id),
        probe: false,
    }
}

fn credential(lease_id: &str) -> Credential {
    Credential(format!("secret-of-{lease_id}"))
}

fn release_msg(lease_id: &str, outcome: Outcome) -> ToDaemon {
    ToDaemon::Release { lease_id: lease_id.into(), report: outcome.into() }
}

#[test]
fn an_acquire_is_sent_and_its_grant_delivered() {
    let mut h = Harness::connected();
    let step = h.acquire("r1", None);
    assert_eq!(step.send, [ToDaemon::Request { request_id: "r1".into(), spec: spec(None), max_wait: None }]);
    assert!(step.notify.is_empty());
    assert_eq!(h.m.next_heartbeat(), None, "nothing held, nothing to renew");

    let step = h.grant("r1", "l1");
    assert!(step.send.is_empty());
    match &step.notify[..] {
        [Notify::Granted { request_id, lease: l }] => {
            assert_eq!(request_id, "r1");
            assert_eq!(l, &lease("l1", h.now.wall));
        }
        other => panic!("want one grant, got {other:?}"),
    }
    assert_eq!(h.m.next_heartbeat(), Some(h.now.mono + TTL / 3), "heartbeats at a third of the TTL");
}

#[test]
fn a_queued_request_waits_for_its_grant() {
    let mut h = Harness::connected();
    h.acquire("r1", None);
    let step = h.msg(FromDaemon::Queued { request_id: "r1".into(), position: 3 });
    assert!(step.send.is_empty() && step.notify.is_empty());
    assert_eq!(h.m.counts(), (0, 1));
    h.grant("r1", "l1");
    assert_eq!(h.m.counts(), (1, 0));
}

#[test]
fn a_rejection_answers_the_acquire() {
    let mut h = Harness::connected();
    h.acquire("r1", None);
    let step = h.msg(FromDaemon::Rejected {
        request_id: "r1".into(),
        code: tonic::Code::ResourceExhausted,
        message: "queue full".into(),
        retry_after: Some(Duration::from_secs(2)),
    });
    match &step.notify[..] {
        [Notify::Refused { request_id, error }] => {
            assert_eq!(request_id, "r1");
            assert_eq!(error.code(), Some(tonic::Code::ResourceExhausted));
            assert_eq!(error.retry_after(), Some(Duration::from_secs(2)));
        }
        other => panic!("want one refusal, got {other:?}"),
    }
    assert_eq!(h.m.counts(), (0, 0));
}

#[test]
fn a_release_is_answered_when_the_daemon_confirms_it() {
    let mut h = Harness::connected();
    h.held("l1");
    let step = h.release("l1", Some(9));
    assert_eq!(step.send, [release_msg("l1", Outcome::Ok)]);
    assert!(step.notify.is_empty(), "not answered before the daemon confirms");

    let step = h.msg(FromDaemon::Released { lease_id: "l1".into() });
    match &step.notify[..] {
        [Notify::ReleaseDone { ticket: 9, result: Ok(()) }, Notify::LeaseEnded { lease_id }] => {
            assert_eq!(lease_id, "l1");
        }
        other => panic!("want the answer then the end, got {other:?}"),
    }
    assert_eq!(h.m.next_heartbeat(), None, "nothing left to renew");
}

#[test]
fn releasing_twice_or_an_unknown_lease_is_refused_at_once() {
    let mut h = Harness::connected();
    h.held("l1");
    h.release("l1", None);
    let step = h.release("l1", Some(1));
    assert!(step.send.is_empty(), "one release on the wire: {step:?}");
    assert!(matches!(
        &step.notify[..],
        [Notify::ReleaseDone {
            ticket: 1,
            result: Err(Error::Lease { code: tonic::Code::FailedPrecondition, .. })
        }]
    ));
    let step = h.release("nope", Some(2));
    assert!(matches!(
        &step.notify[..],
        [Notify::ReleaseDone { ticket: 2, result: Err(Error::Lease { .. }) }]
    ));
    // A release nobody waits for is not answered at all.
    assert!(h.release("nope", None).notify.is_empty());
}

#[test]
fn heartbeats_renew_held_leases_from_their_send_time() {
    let mut h = Harness::connected();
    h.held("l1");
    let due = h.m.next_heartbeat().expect("scheduled");
    h.now.mono = due;
    h.now.wall += TTL / 3;
    let sent_at = h.now.wall;
    let step = h.on(Input::HeartbeatDue);
    assert_eq!(step.send, [ToDaemon::Heartbeat]);
    assert_eq!(h.m.next_heartbeat(), Some(due + TTL / 3));

    h.advance(Duration::from_millis(40));
    let step = h.msg(FromDaemon::HeartbeatAck);
    match &step.notify[..] {
        [Notify::Renewed { lease_id, expires_at }] => {
            assert_eq!(lease_id, "l1");
            assert_eq!(*expires_at, sent_at + TTL, "renewed from when the heartbeat left");
        }
        other => panic!("want one renewal, got {other:?}"),
    }
}

#[test]
fn a_reconnect_resumes_leases_first_then_resends_requests_with_what_is_left_of_max_wait() {
    let mut h = Harness::connected();
    h.held("l1");
    h.acquire("r2", Some(Duration::from_secs(10)));
    h.advance(Duration::from_secs(4));

    let step = h.on(Input::Disconnected);
    assert!(step.send.is_empty() && step.notify.is_empty());
    assert_eq!(h.m.next_heartbeat(), None, "no heartbeats while disconnected");
    // Nothing goes out while disconnected.
    assert!(h.on(Input::HeartbeatDue).send.is_empty());
    h.advance(Duration::from_secs(1));

    let step = h.on(Input::Connected);
    assert_eq!(
        step.send,
        [
            ToDaemon::Resume {
                lease_id: "l1".into(),
                fencing_token: 42,
                pool: "p".into(),
                priority: Some(7),
                ttl: TTL,
                holder: "agent".into(),
                credential: credential("l1"),
            },
            ToDaemon::Request {
                request_id: "r2".into(),
                spec: spec(Some(Duration::from_secs(10))),
                max_wait: Some(Duration::from_secs(5)),
            },
        ]
    );
    assert!(h.m.next_heartbeat().is_some());

    let expires_at = h.now.wall + TTL;
    let step = h.msg(FromDaemon::LeaseResumed { lease_id: "l1".into(), expires_at: Some(expires_at) });
    assert!(matches!(&step.notify[..], [Notify::Renewed { expires_at: e, .. }] if *e == expires_at));
    // Held again: a release goes straight out.
    assert_eq!(h.release("l1", None).send, [release_msg("l1", Outcome::Ok)]);
}

#[test]
fn a_release_made_while_disconnected_follows_the_resume() {
    let mut h = Harness::connected();
    h.held("l1");
    h.on(Input::Disconnected);
    let step = h.on(Input::Release {
        lease_id: "l1".into(),
        report: Outcome::RateLimited { retry_after: None }.into(),
        ticket: Some(5),
    });
    assert!(step.send.is_empty() && step.notify.is_empty());

    let step = h.on(Input::Connected);
    assert!(matches!(&step.send[..], [ToDaemon::Resume { .. }, ToDaemon::Release { .. }]), "{step:?}");
    assert_eq!(step.send[1], release_msg("l1", Outcome::RateLimited { retry_after: None }));
    h.msg(FromDaemon::LeaseResumed { lease_id: "l1".into(), expires_at: None });
    let step = h.msg(FromDaemon::Released { lease_id: "l1".into() });
    assert!(matches!(
        &step.notify[..],
        [Notify::ReleaseDone { ticket: 5, result: Ok(()) }, Notify::LeaseEnded { .. }]
    ));
}

#[test]
fn a_refused_resume_loses_the_lease_and_fails_its_queued_release() {
    let mut h = Harness::connected();
    h.held("l1");
    h.held("l2");
    h.on(Input::Disconnected);
    h.release("l2", Some(3));
    h.on(Input::Connected);

    let step = h.msg(FromDaemon::LeaseError {
        lease_id: "l1".into(),
        code: tonic::Code::NotFound,
        message: "grace over".into(),
    });
    assert!(matches!(
        &step.notify[..],
        [Notify::LeaseLost { why: Lost::ResumeFailed(_), .. }, Notify::LeaseEnded { .. }]
    ));
    let step = h.msg(FromDaemon::LeaseError {
        lease_id: "l2".into(),
        code: tonic::Code::NotFound,
        message: "grace over".into(),
    });
    assert!(matches!(
        &step.notify[..],
        [
            Notify::LeaseLost { why: Lost::ResumeFailed(_), .. },
            Notify::ReleaseDone { ticket: 3, result: Err(Error::Lost { reason: Lost::ResumeFailed(_), .. }) },
            Notify::LeaseEnded { .. },
        ]
    ));
    assert_eq!(h.m.counts(), (0, 0));
}

#[test]
fn pauses_and_resumes_are_delivered_as_the_whole_map() {
    let mut h = Harness::connected();
    let until = h.now.wall + Duration::from_secs(10);
    let step = h.msg(FromDaemon::Paused { pool: "p".into(), until, reason: "429".into() });
    match &step.notify[..] {
        [Notify::Pauses(map)] => {
            assert_eq!(map.len(), 1);
            assert_eq!(map["p"].until, until);
            assert_eq!(map["p"].reason, "429");
        }
        other => panic!("want the pause map, got {other:?}"),
    }
    // A second pool's pause drops pauses that have run out meanwhile.
    h.advance(Duration::from_secs(11));
    let step = h.msg(FromDaemon::Paused { pool: "q".into(), until: h.now.wall, reason: "529".into() });
    assert!(matches!(&step.notify[..], [Notify::Pauses(m)] if m.len() == 1 && m.contains_key("q")));

    let step = h.msg(FromDaemon::Resumed { pool: "q".into() });
    assert!(matches!(&step.notify[..], [Notify::Pauses(m)] if m.is_empty()));
    // Resuming a pool that was not paused changes nothing, so nothing is delivered.
    assert!(h.msg(FromDaemon::Resumed { pool: "q".into() }).notify.is_empty());
}

#[test]
fn an_expired_or_revoked_lease_is_lost_and_a_shutdown_is_not() {
    let mut h = Harness::connected();
    h.held("l1");
    h.held("l2");
    h.held("l3");
    let step =
        h.msg(FromDaemon::Expired { lease_id: "l1".into(), reason: Expiry::Ttl, message: "ttl".into() });
    assert!(matches!(
        &step.notify[..],
        [Notify::LeaseLost { why: Lost::Expired(_), .. }, Notify::LeaseEnded { .. }]
    ));
    h.release("l2", Some(4));
    let step =
        h.msg(FromDaemon::Expired { lease_id: "l2".into(), reason: Expiry::Revoked, message: "op".into() });
    assert!(matches!(
        &step.notify[..],
        [
            Notify::LeaseLost { why: Lost::Revoked(_), .. },
            Notify::ReleaseDone { ticket: 4, result: Err(Error::Lost { reason: Lost::Revoked(_), .. }) },
            Notify::LeaseEnded { .. },
        ]
    ));
    // A shutdown is not a loss: the lease may be resumed once the daemon is back.
    let step =
        h.msg(FromDaemon::Expired { lease_id: "l3".into(), reason: Expiry::Shutdown, message: "bye".into() });
    assert!(step.notify.is_empty());
    assert_eq!(h.m.counts(), (1, 0));
}

#[test]
fn a_cancelled_acquire_is_withdrawn_and_a_racing_grant_goes_back() {
    let mut h = Harness::connected();
    h.acquire("r1", None);
    let step = h.on(Input::Cancel { request_id: "r1".into() });
    assert_eq!(step.send, [ToDaemon::Cancel { request_id: "r1".into() }]);

    // The grant crossed the cancel on the wire: nobody gets it, and the slot goes straight back.
    let step = h.grant("r1", "l1");
    assert!(step.notify.is_empty(), "{step:?}");
    assert_eq!(step.send, [release_msg("l1", Outcome::Cancelled)]);
    let step = h.msg(FromDaemon::Released { lease_id: "l1".into() });
    assert!(matches!(&step.notify[..], [Notify::LeaseEnded { .. }]));

    // A cancel that wins the race is confirmed, and a late rejection for it is ignored.
    h.acquire("r2", None);
    h.on(Input::Cancel { request_id: "r2".into() });
    let step = h.msg(FromDaemon::Rejected {
        request_id: "r2".into(),
        code: tonic::Code::Cancelled,
        message: "cancelled".into(),
        retry_after: None,
    });
    assert!(step.notify.is_empty());
    h.msg(FromDaemon::Cancelled { request_id: "r2".into() });
    assert_eq!(h.m.counts(), (0, 0));
}

/// The release of a grant nobody waits for survives a reconnect: the resume before it carries the
/// holder name the credential covers (the daemon refuses any other).
#[test]
fn a_racing_grant_released_across_a_reconnect_is_resumed_with_its_holder_and_credential() {
    let mut h = Harness::connected();
    h.acquire("r1", None);
    h.on(Input::Cancel { request_id: "r1".into() });
    h.grant("r1", "l1");
    h.on(Input::Disconnected);
    let step = h.on(Input::Connected);
    assert!(
        matches!(&step.send[..], [ToDaemon::Resume { holder, credential: c, .. }, ToDaemon::Release { .. }]
            if holder == "agent" && *c == credential("l1")),
        "{step:?}"
    );
}

#[test]
fn a_lease_resumed_elsewhere_is_lost() {
    let mut h = Harness::connected();
    h.held("l1");
    let step = h.msg(FromDaemon::Expired {
        lease_id: "l1".into(),
        reason: Expiry::ResumedElsewhere,
        message: "taken".into(),
    });
    assert!(
        matches!(
            &step.notify[..],
            [Notify::LeaseLost { why: Lost::ResumedElsewhere(_), .. }, Notify::LeaseEnded { .. }]
        ),
        "{step:?}"
    );
    assert!(!format!("{:?}", credential("l1")).contains("secret"), "Debug shows the credential");
}

#[test]
fn a_cancel_while_disconnected_sends_nothing_and_is_not_resent() {
    let mut h = Harness::new();
    let step = h.acquire("r1", None);
    assert!(step.send.is_empty(), "nothing is sent before the stream opens");
    assert!(h.on(Input::Cancel { request_id: "r1".into() }).send.is_empty());
    assert!(h.on(Input::Connected).send.is_empty(), "the cancelled request is gone");
}

#[test]
fn an_unavailable_rejection_keeps_the_request_for_the_next_stream() {
    let mut h = Harness::connected();
    h.acquire("r1", None);
    let step = h.msg(FromDaemon::Rejected {
        request_id: "r1".into(),
        code: tonic::Code::Unavailable,
        message: "shutting down".into(),
        retry_after: None,
    });
    assert!(step.notify.is_empty());
    h.on(Input::Disconnected);
    let step = h.on(Input::Connected);
    assert!(matches!(&step.send[..], [ToDaemon::Request { request_id, .. }] if request_id == "r1"));
}

#[test]
fn an_open_breaker_failing_fast_is_the_callers_refusal() {
    let mut h = Harness::connected();
    h.acquire("r1", None);
    let step = h.msg(FromDaemon::Rejected {
        request_id: "r1".into(),
        code: tonic::Code::Unavailable,
        message: "circuit breaker of pool p is open for another 5s".into(),
        retry_after: Some(Duration::from_secs(5)),
    });
    assert!(
        matches!(
            &step.notify[..],
            [Notify::Refused { request_id, error: Error::Rejected { code: tonic::Code::Unavailable, retry_after: Some(_), .. } }]
                if request_id == "r1"
        ),
        "{step:?}"
    );
    // Not re-sent on the next stream: the request is over.
    h.on(Input::Disconnected);
    assert!(h.on(Input::Connected).send.is_empty());
}

#[test]
fn close_waits_for_pending_releases() {
    let mut h = Harness::connected();
    h.held("l1");
    h.held("l2");
    h.release("l1", None);
    h.release("l2", Some(1));
    h.on(Input::Close);
    assert!(h.m.is_closed());
    assert!(!h.m.is_finished(), "releases are still unanswered");
    h.msg(FromDaemon::Released { lease_id: "l1".into() });
    assert!(!h.m.is_finished());
    h.msg(FromDaemon::Released { lease_id: "l2".into() });
    assert!(h.m.is_finished());
}

#[test]
fn close_with_nothing_to_flush_is_finished_at_once() {
    let mut h = Harness::connected();
    h.on(Input::Close);
    assert!(h.m.is_finished());
    assert_eq!(h.m.unacknowledged(), 0);
}

#[test]
fn close_releases_what_is_still_held_and_waits_for_the_answer() {
    let mut h = Harness::connected();
    h.held("l1");
    let step = h.on(Input::Close);
    assert!(
        matches!(&step.send[..], [ToDaemon::Release { lease_id, report }] if lease_id == "l1" && report.outcome == Outcome::Cancelled),
        "{step:?}"
    );
    assert!(
        matches!(&step.notify[..], [Notify::LeaseLost { lease_id, why: Lost::SessionClosed }] if lease_id == "l1"),
        "{step:?}"
    );
    assert!(!h.m.is_finished());
    assert_eq!(h.m.unacknowledged(), 1);
    h.msg(FromDaemon::Released { lease_id: "l1".into() });
    assert!(h.m.is_finished());
    assert_eq!(h.m.unacknowledged(), 0);
}

#[test]
fn close_withdraws_queued_requests_and_refuses_new_ones() {
    let mut h = Harness::connected();
    h.acquire("r1", None);
    let step = h.on(Input::Close);
    assert!(matches!(&step.send[..], [ToDaemon::Cancel { request_id }] if request_id == "r1"), "{step:?}");
    assert!(
        matches!(&step.notify[..], [Notify::Refused { request_id, error: Error::SessionClosed }] if request_id == "r1"),
        "{step:?}"
    );
    assert!(!h.m.is_finished(), "the cancel is not answered yet");
    // The grant raced with the cancel: the slot goes straight back, and close waits for that too.
    let step = h.grant("r1", "l1");
    assert!(
        matches!(&step.send[..], [ToDaemon::Release { lease_id, report }] if lease_id == "l1" && report.outcome == Outcome::Cancelled),
        "{step:?}"
    );
    assert!(!h.m.is_finished());
    h.msg(FromDaemon::Released { lease_id: "l1".into() });
    assert!(h.m.is_finished());

    let step = h.acquire("r2", None);
    assert!(step.send.is_empty(), "{step:?}");
    assert!(
        matches!(&step.notify[..], [Notify::Refused { request_id, error: Error::SessionClosed }] if request_id == "r2"),
        "{step:?}"
    );
}

#[test]
fn close_while_disconnected_releases_after_the_resume() {
    let mut h = Harness::connected();
    h.held("l1");
    h.on(Input::Disconnected);
    let step = h.on(Input::Close);
    assert!(step.send.is_empty(), "nothing is sent while disconnected: {step:?}");
    let step = h.on(Input::Connected);
    assert!(
        matches!(
            &step.send[..],
            [ToDaemon::Resume { lease_id: a, .. }, ToDaemon::Release { lease_id: b, report }]
                if a == "l1" && b == "l1" && report.outcome == Outcome::Cancelled
        ),
        "{step:?}"
    );
    h.msg(FromDaemon::LeaseResumed { lease_id: "l1".into(), expires_at: None });
    assert!(!h.m.is_finished());
    h.msg(FromDaemon::Released { lease_id: "l1".into() });
    assert!(h.m.is_finished());
}

#[test]
fn closing_twice_changes_nothing_more() {
    let mut h = Harness::connected();
    h.held("l1");
    h.on(Input::Close);
    let step = h.on(Input::Close);
    assert!(step.send.is_empty() && step.notify.is_empty(), "{step:?}");
}
