"""The session machine with explicit instants (no daemon, no clock): per-lease heartbeats at a third of
each lease's granted TTL, resume on reconnect, grants that cross a cancel."""

from __future__ import annotations

import pytest
from google.protobuf import duration_pb2

from slotd._machine import Machine, RequestSpec
from slotd._types import Outcome, Report
from slotd.v1 import slotd_pb2 as pb


def spec(pool: str = "p", ttl: float | None = None) -> RequestSpec:
    return RequestSpec(pool, None, None, ttl, None, "holder")


def grant(m: Machine, now: float, request_id: str, lease_id: str, ttl: float) -> None:
    d = duration_pb2.Duration(seconds=int(ttl), nanos=int(round((ttl - int(ttl)) * 1e9)))
    g = pb.Granted(
        request_id=request_id, lease_id=lease_id, fencing_token=1, ttl=d, pool="p", resume_credential="c"
    )
    m.message(now, 1e9 + now, pb.ServerMessage(granted=g))


def heartbeats(m: Machine) -> list[list[str]]:
    out = [list(msg.heartbeat.lease_ids) for msg in m.out if msg.WhichOneof("msg") == "heartbeat"]
    m.out.clear()
    return out


def test_heartbeats_follow_each_leases_granted_ttl() -> None:
    m = Machine()
    m.connected_(0.0)
    m.acquire(0.0, "r1", spec())  # no TTL asked: the pool's default decides
    m.acquire(0.0, "r2", spec(ttl=30))
    assert m.next_heartbeat() is None, "no heartbeat before any lease exists"
    grant(m, 0.0, "r1", "short", 0.3)
    grant(m, 0.0, "r2", "long", 30.0)
    m.out.clear()
    assert m.next_heartbeat() == pytest.approx(
        0.1
    )  # a third of the granted 300 ms, not of anything guessed earlier
    for step in range(1, 30):
        now = step * 0.1
        m.heartbeat(now, now)
        sent = heartbeats(m)
        assert sent == [["short"]], (now, sent)  # the 30 s lease is not renewed every 100 ms
    m.heartbeat(9.95, 9.95)  # the long lease is due at 10 s: renewed with the short one
    assert heartbeats(m) == [[]]  # every lease of the stream: the empty list renews them all


def test_many_due_leases_are_split_into_bounded_messages() -> None:
    m = Machine()
    m.connected_(0.0)
    m.acquire(0.0, "r-long", spec(ttl=600))
    grant(m, 0.0, "r-long", "long", 600.0)
    for i in range(2500):
        m.acquire(0.0, f"r{i}", spec(ttl=3))
        grant(m, 0.0, f"r{i}", f"L{i:04}", 3.0)
    m.out.clear()
    m.heartbeat(1.0, 1.0)
    sent = heartbeats(m)
    assert [len(ids) for ids in sent] == [1024, 1024, 452]
    assert all(msg.ByteSize() < 64 * 1024 for msg in [pb.Heartbeat(lease_ids=ids) for ids in sent])
    assert "long" not in {i for ids in sent for i in ids}


def test_disconnect_resumes_then_releases_and_resends() -> None:
    m = Machine()
    m.connected_(0.0)
    m.acquire(0.0, "r1", spec())
    m.acquire(0.0, "r2", spec())
    grant(m, 0.0, "r1", "L1", 3.0)
    m.out.clear()
    m.disconnected()
    m.release("L1", Report(Outcome.ERROR))
    assert m.out == []  # nothing sent while disconnected
    m.connected_(1.0)
    kinds = [msg.WhichOneof("msg") for msg in m.out]
    assert kinds == ["resume", "release", "request"]
    assert m.out[0].resume.credential == "c" and m.out[1].release.outcome == pb.OUTCOME_ERROR


def test_grant_crossing_a_cancel_is_released() -> None:
    m = Machine()
    m.connected_(0.0)
    m.acquire(0.0, "r1", spec())
    m.cancel("r1")
    m.out.clear()
    grant(m, 0.0, "r1", "L1", 3.0)
    assert [msg.release.outcome for msg in m.out] == [pb.OUTCOME_CANCELLED]
    assert not [e for e in m.events if e[0] == "granted"]


def test_an_unavailable_rejection_without_retry_info_waits_for_the_next_stream() -> None:
    m = Machine()
    m.connected_(0.0)
    m.acquire(0.0, "r1", spec())
    rejected = pb.Rejected(request_id="r1", code=14, message="shutting down")  # UNAVAILABLE
    m.message(0.0, 1e9, pb.ServerMessage(rejected=rejected))
    assert not [e for e in m.events if e[0] == "refused"]
    m.out.clear()
    m.disconnected()
    m.connected_(1.0)
    assert [msg.WhichOneof("msg") for msg in m.out] == ["request"]


def test_an_open_breaker_failing_fast_is_the_callers_refusal() -> None:
    m = Machine()
    m.connected_(0.0)
    m.acquire(0.0, "r1", spec())
    rejected = pb.Rejected(
        request_id="r1",
        code=14,  # UNAVAILABLE
        message="circuit breaker of pool p is open for another 5s",
        retry_after=duration_pb2.Duration(seconds=5),
    )
    m.message(0.0, 1e9, pb.ServerMessage(rejected=rejected))
    refused = [e for e in m.events if e[0] == "refused"]
    assert len(refused) == 1 and refused[0][1] == "r1" and refused[0][2].retry_after == 5.0
    m.out.clear()
    m.disconnected()
    m.connected_(1.0)
    assert m.out == []  # not re-sent: the request is over
