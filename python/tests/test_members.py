"""Which member the client talks to (no daemon): endpoint parsing, the ``slotd-leader`` redirect and
its bounds, moving on to the next endpoint. The behaviour against real members is in test_ha.py."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

import slotd
from slotd._members import (
    LEADER_HEADER,
    MAX_ENDPOINTS,
    MAX_LEADER_BYTES,
    MAX_REDIRECTS,
    Members,
    leader_of,
    parse_endpoints,
)

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def names(leader: str) -> tuple[tuple[str, str], ...]:
    return ((LEADER_HEADER, leader),)


@pytest.fixture
def members() -> Iterator[Members]:
    m = Members(["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"], None, [])
    yield m
    m.close()


def test_endpoints_are_one_a_comma_separated_string_or_a_sequence() -> None:
    assert parse_endpoints("127.0.0.1:1") == ["127.0.0.1:1"]
    assert parse_endpoints("http://a:1, b:2,http://a:1/") == ["a:1", "b:2"]
    assert parse_endpoints(["http://a:1", "b:2"]) == ["a:1", "b:2"]
    for bad in ["", " , ", [], ["a:1", ""], "a b:1", "x" * (MAX_LEADER_BYTES + 1)]:
        with pytest.raises(ValueError):
            parse_endpoints(bad)
    with pytest.raises(ValueError, match="1 to 16"):
        parse_endpoints([f"h:{i}" for i in range(MAX_ENDPOINTS + 1)])
    with pytest.raises(ValueError, match="not both"):
        slotd.Client("a:1", endpoints=["b:2"])


def test_only_a_standby_unavailable_with_a_usable_address_names_a_leader() -> None:
    assert leader_of(UNAVAILABLE, names("http://127.0.0.1:7001")) == "127.0.0.1:7001"
    assert leader_of(UNAVAILABLE, ((LEADER_HEADER, b"http://h:1"),)) == "h:1"
    assert leader_of(grpc.StatusCode.NOT_FOUND, names("http://h:1")) is None
    assert leader_of(UNAVAILABLE, None) is None
    assert leader_of(UNAVAILABLE, (("other", "http://h:1"),)) is None
    assert leader_of(UNAVAILABLE, names("")) is None
    assert leader_of(UNAVAILABLE, names("http://" + "h" * MAX_LEADER_BYTES)) is None
    assert leader_of(UNAVAILABLE, names("h:1\nx")) is None


def test_a_redirect_switches_at_once_other_failures_move_to_the_next_endpoint(members: Members) -> None:
    assert members.current()[0] == "127.0.0.1:1"
    # The first member is down: the next one, after the backoff.
    assert not members.failed("127.0.0.1:1", UNAVAILABLE)
    assert members.current()[0] == "127.0.0.1:2"
    # A standby names the third: there at once.
    assert members.failed("127.0.0.1:2", UNAVAILABLE, names("http://127.0.0.1:3"))
    assert members.current()[0] == "127.0.0.1:3"
    # The leader dies: the rotation goes on after it.
    assert not members.failed("127.0.0.1:3", None)
    assert members.current()[0] == "127.0.0.1:1"
    # A failure reported for a member no longer in use changes nothing.
    assert not members.failed("127.0.0.1:3", None)
    assert members.current()[0] == "127.0.0.1:1"


def test_a_leader_outside_the_endpoints_is_reached_on_its_own_channel(members: Members) -> None:
    assert members.failed("127.0.0.1:1", UNAVAILABLE, names("http://10.0.0.9:50051"))
    target, stub = members.current()
    assert target == "10.0.0.9:50051" and stub is not None
    assert not members.failed(target, UNAVAILABLE)
    assert members.current()[0] == "127.0.0.1:2"


def test_redirects_in_a_row_are_bounded(members: Members) -> None:
    # Two standbys naming each other: followed at once a few times, then only after the backoff.
    at_once = []
    for i in range(MAX_REDIRECTS + 2):
        tried = members.current()[0]
        other = "127.0.0.1:2" if tried == "127.0.0.1:1" else "127.0.0.1:1"
        at_once.append(members.failed(tried, UNAVAILABLE, names(f"http://{other}")))
        assert members.current()[0] == other, i
    assert at_once == [True] * MAX_REDIRECTS + [False, False]
    # A call that gets through resets the count.
    members.succeeded()
    tried = members.current()[0]
    assert members.failed(tried, UNAVAILABLE, names("http://127.0.0.1:3"))


def test_single_endpoint_follows_a_redirect_and_comes_back_when_that_leader_fails() -> None:
    m = Members(["127.0.0.1:1"], None, [])
    try:
        assert not m.failed("127.0.0.1:1", UNAVAILABLE)
        assert m.current()[0] == "127.0.0.1:1"
        assert m.failed("127.0.0.1:1", UNAVAILABLE, names("http://127.0.0.1:2"))
        assert m.current()[0] == "127.0.0.1:2"
        # That leader died: back to the one configured member, which will name the next, soon.
        assert not m.failed("127.0.0.1:2", None)
        assert m.current()[0] == "127.0.0.1:1"
        assert m.failover_likely
        # The configured member itself failing is an ordinary failure (the usual backoff).
        assert not m.failed("127.0.0.1:1", None)
        assert not m.failover_likely
    finally:
        m.close()
