"""Several daemon endpoints (slotd's high availability): which one to talk to, following the
``slotd-leader`` address a standby answers with, else trying the next endpoint.

The rules of the Rust client's ``members.rs``, with one difference noted below: a standby's
UNAVAILABLE that names the leader switches to that leader at once (with the same credentials and
token); any other failure moves to the next configured endpoint, after the caller's jittered backoff.
Redirects are bounded: after :data:`MAX_REDIRECTS` of them in a row without a call getting through,
the next one waits for the backoff like any other failure (two members naming each other cannot spin
the client).

When a leader reached through a redirect fails (a failover), both clients retry within
``ELECTION_RETRY_MAX`` (0.5 s) and ask a configured endpoint who leads now; the Rust client asks the
endpoint that redirected it, this one moves on to the next configured endpoint (with a single
endpoint, the same one).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import grpc

from slotd.v1 import slotd_pb2_grpc as pb_grpc

#: The metadata key a standby names the leader's advertised address in (``slotd_proto::LEADER_HEADER``).
LEADER_HEADER = "slotd-leader"
#: Longest leader address followed (the daemon caps ``[ha] advertise`` at the same length).
MAX_LEADER_BYTES = 256
#: Most endpoints one client takes (the daemon's ``[ha]`` takes as many etcd endpoints).
MAX_ENDPOINTS = 16
#: Redirects followed at once in a row; beyond that they wait for the reconnect backoff.
MAX_REDIRECTS = 3
#: Channels kept for leaders that are not among the configured endpoints (oldest closed first).
MAX_REDIRECT_CHANNELS = 4
#: Longest reconnect backoff while a failover is under way (a standby named a leader that then failed),
#: in seconds: the leases held are re-presented soon after the next leader is elected (the Rust
#: client's ``ELECTION_RETRY_MAX``).
ELECTION_RETRY_MAX = 0.5


def target(endpoint: str) -> str:
    """A gRPC target from an endpoint: ``host:port``, or a URL (``http://host:port``) as the daemon
    advertises it."""
    for prefix in ("http://", "https://", "grpc://"):
        if endpoint.startswith(prefix):
            return endpoint[len(prefix) :].rstrip("/")
    return endpoint


def parse_endpoints(endpoints: str | Sequence[str]) -> list[str]:
    """One endpoint, a comma-separated string of them, or a sequence; as gRPC targets, de-duplicated
    in order. Raises ``ValueError`` for none, too many, or an empty or oversized one."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"an endpoint must be a string, got {type(item).__name__}")
        t = target(item.strip())
        if not t or len(t.encode()) > MAX_LEADER_BYTES or not t.isprintable() or " " in t:
            raise ValueError(
                f"endpoint {item!r}: expected host:port or http://host:port (at most "
                f"{MAX_LEADER_BYTES} bytes)"
            )
        if t not in out:
            out.append(t)
    if not out or len(out) > MAX_ENDPOINTS:
        raise ValueError(f"give 1 to {MAX_ENDPOINTS} endpoints, got {len(out)}")
    return out


def leader_of(code: grpc.StatusCode | None, metadata: Any) -> str | None:
    """The leader a standby named in ``metadata`` (trailing metadata of an UNAVAILABLE), as a gRPC
    target; ``None`` for anything else, or an unusable address."""
    if code != grpc.StatusCode.UNAVAILABLE or not metadata:
        return None
    for key, value in metadata:
        if key != LEADER_HEADER:
            continue
        addr = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
        if not addr or len(addr.encode()) > MAX_LEADER_BYTES or not addr.isprintable() or " " in addr:
            return None
        return target(addr) or None
    return None


class Members:
    """The endpoints of one deployment and the one in use. Thread safe: the session thread opens
    streams on it while unary calls run on callers' threads."""

    def __init__(
        self,
        endpoints: list[str],
        credentials: grpc.ChannelCredentials | None,
        options: list[tuple[str, Any]],
    ) -> None:
        self.endpoints = endpoints
        self._credentials = credentials
        self._options = options
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._stubs: dict[str, pb_grpc.SlotdStub] = {}
        self._redirected: list[str] = []  # leaders outside `endpoints`, oldest first
        self._at = 0  # the configured endpoint tried last
        self._current = endpoints[0]
        self._redirects = 0  # redirects followed since a call last got through
        self._redirected_to_current = False  # the current member is a leader a standby named
        #: A leader a standby named failed: a failover is likely under way (see ELECTION_RETRY_MAX).
        self.failover_likely = False
        self._closed = False

    @property
    def several(self) -> bool:
        return len(self.endpoints) > 1

    def current(self) -> tuple[str, pb_grpc.SlotdStub]:
        """The member to talk to now, and its stub (its channel opened on first use)."""
        with self._lock:
            return self._current, self._stub(self._current)

    def succeeded(self) -> None:
        """A call or stream got through: redirects count from zero again."""
        with self._lock:
            self._redirects = 0
            self.failover_likely = False

    def failed(self, tried: str, code: grpc.StatusCode | None, metadata: Any = None) -> bool:
        """After a call to ``tried`` failed with ``code`` and trailing ``metadata`` (``None``: the
        connection broke): a standby naming the leader switches to it and returns whether to retry at
        once (within :data:`MAX_REDIRECTS`); anything else moves to the next configured endpoint and
        returns False (retry after the backoff). A failure of a member no longer current (another
        thread moved on already) changes nothing."""
        leader = leader_of(code, metadata)
        with self._lock:
            if tried != self._current:
                return leader is not None and self._redirects < MAX_REDIRECTS
            if leader is not None and leader != tried:
                self._current = leader
                self._redirected_to_current = True
                if leader in self.endpoints:
                    self._at = self.endpoints.index(leader)
                self._redirects += 1
                return self._redirects <= MAX_REDIRECTS
            self.failover_likely = self._redirected_to_current
            self._redirected_to_current = False
            # A dead leader that was reached by a redirect: back to the configured endpoints, even
            # when there is only one (it will name the next leader).
            if self.several or self._current not in self.endpoints:
                self._at = (self._at + 1) % len(self.endpoints)
                self._current = self.endpoints[self._at]
            return False

    def close(self) -> None:
        with self._lock:
            self._closed = True
            channels, self._channels = list(self._channels.values()), {}
            self._stubs.clear()
        for ch in channels:
            ch.close()

    def _stub(self, t: str) -> pb_grpc.SlotdStub:
        stub = self._stubs.get(t)
        if stub is not None:
            return stub
        if t not in self.endpoints:
            self._redirected.append(t)
            while len(self._redirected) > MAX_REDIRECT_CHANNELS:
                old = self._redirected.pop(0)
                self._stubs.pop(old, None)
                ch = self._channels.pop(old, None)
                if ch is not None:
                    ch.close()
        if self._credentials is not None:
            channel = grpc.secure_channel(t, self._credentials, options=self._options)
        else:
            channel = grpc.insecure_channel(t, options=self._options)
        if self._closed:
            channel.close()
        self._channels[t] = channel
        stub = pb_grpc.SlotdStub(channel)  # type: ignore[no-untyped-call]
        self._stubs[t] = stub
        return stub
