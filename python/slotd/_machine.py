"""The session's state machine: requests, leases and pauses as plain state, no I/O and no clock.

:meth:`Machine.handle_*` methods take the current time (``mono`` for timers, ``wall`` for what the
daemon speaks in) and append to :attr:`Machine.out` (messages for the current stream) and
:attr:`Machine.events` (what to tell the callers). The session thread (``_session.py``) carries them
out; unit tests read them.

Invariants (the same as the Rust client's machine):

1. The tables are the truth. After a reconnect the stream is rebuilt from them (resume every lease,
   then re-send every queued request), so a message lost with the old stream never matters.
2. Nothing is sent while disconnected.
3. Every lease that leaves the table is announced with an ``ended`` event (after ``lost`` when it was
   lost), and every granted lease nobody waits for is released at once.
4. After :meth:`close` nothing new starts; :meth:`finished` turns true once the daemon has answered
   every release and cancel.
5. Each lease is renewed at a third of its own TTL (heartbeats name the leases that are due, so a
   short-TTL lease never forces a long one to be renewed more often, nor the reverse).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal, cast

import grpc

from slotd._errors import ClientClosed, LeaseLost, Rejected
from slotd._types import (
    MAX_PROVIDER_LIMITS,
    Outcome,
    Pause,
    Report,
    duration,
    from_duration,
    from_timestamp,
)
from slotd.v1 import slotd_pb2 as pb

#: Heartbeats are never sent more often than this for one lease, whatever its TTL (seconds).
MIN_HEARTBEAT = 0.005
#: Lease ids per Heartbeat message: about 35 KiB, well inside the daemon's default 64 KiB message bound.
MAX_HEARTBEAT_IDS = 1024

_EXPIRY = {
    pb.EXPIRY_REASON_TTL: "expired (no heartbeat within its ttl)",
    pb.EXPIRY_REASON_REVOKED: "revoked by an operator",
    pb.EXPIRY_REASON_POOL_REMOVED: "its pool was removed",
    pb.EXPIRY_REASON_RESUMED_ELSEWHERE: "resumed by another stream",
}


@dataclass(frozen=True)
class RequestSpec:
    """One acquire, as the caller asked for it."""

    pool: str
    priority: int | None
    started_at: Any  # a protobuf Timestamp or None
    ttl: float | None
    max_wait: float | None
    holder: str


@dataclass
class LeaseInfo:
    """A granted lease, as the daemon described it."""

    lease_id: str
    pool: str
    fencing_token: int
    ttl: float
    expires_at: float
    credential: str = field(repr=False)


State = Literal["held", "resuming", "releasing", "resuming_releasing"]


@dataclass
class _Held:
    info: LeaseInfo
    spec: RequestSpec
    state: State
    next_heartbeat: float
    report: Report | None = None


@dataclass
class _Pending:
    spec: RequestSpec
    created: float


def _code(n: int) -> grpc.StatusCode:
    for c in grpc.StatusCode:
        if c.value[0] == n:
            return c
    return grpc.StatusCode.UNKNOWN


def _interval(ttl: float) -> float:
    return max(ttl / 3, MIN_HEARTBEAT)


class Machine:
    """The session's state; see the module docs."""

    def __init__(self) -> None:
        self.connected = False
        self.closed = False
        self.pending: dict[str, _Pending] = {}
        # Requests cancelled on the current stream, with the holder name a crossing grant needs.
        self.cancelling: dict[str, str] = {}
        self.leases: dict[str, _Held] = {}
        self.pauses: dict[str, Pause] = {}
        # (wall time sent, lease ids) of heartbeats not yet acknowledged, oldest first.
        self._heartbeats: deque[tuple[float, list[str]]] = deque()
        self.out: list[pb.ClientMessage] = []
        self.events: list[tuple[Any, ...]] = []

    # -- what the session asks ------------------------------------------------------------------

    def next_heartbeat(self) -> float | None:
        """The monotonic time of the next heartbeat due, if any lease is held."""
        if not self.connected:
            return None
        dues = [h.next_heartbeat for h in self.leases.values() if h.state == "held"]
        return min(dues) if dues else None

    def finished(self) -> bool:
        return self.closed and not self.leases and not self.cancelling

    # -- inputs from callers --------------------------------------------------------------------

    def acquire(self, mono: float, request_id: str, spec: RequestSpec) -> None:
        if self.closed:
            self.events.append(("refused", request_id, ClientClosed("the slotd client is closed")))
            return
        self.pending[request_id] = _Pending(spec, mono)
        self._send(self._request(request_id, spec, spec.max_wait))

    def cancel(self, request_id: str) -> None:
        p = self.pending.pop(request_id, None)
        if p is not None and self.connected:
            self._send(pb.ClientMessage(cancel=pb.CancelRequest(request_id=request_id)))
            self.cancelling[request_id] = p.spec.holder

    def release(self, lease_id: str, report: Report) -> None:
        held = self.leases.get(lease_id)
        if held is None or held.state in ("releasing", "resuming_releasing"):
            return  # already ended or on its way back: release is idempotent
        held.report = report
        if held.state == "held":
            held.state = "releasing"
            self._send(self._release(lease_id, report))
        else:  # resuming: the resume goes first, the release follows it once connected
            held.state = "resuming_releasing"
            if self.connected:
                self._send(self._release(lease_id, report))

    def close(self) -> None:
        """Withdraws every queued request and releases every lease still held (as cancelled)."""
        self.closed = True
        for request_id in sorted(self.pending):
            p = self.pending.pop(request_id)
            if self.connected:
                self._send(pb.ClientMessage(cancel=pb.CancelRequest(request_id=request_id)))
                self.cancelling[request_id] = p.spec.holder
            self.events.append(("refused", request_id, ClientClosed("the slotd client was closed")))
        for lease_id in sorted(self.leases):
            if self.leases[lease_id].state in ("held", "resuming"):
                self.events.append(("lost", lease_id, LeaseLost(lease_id, "the client was closed")))
                self.release(lease_id, Report(Outcome.CANCELLED))

    # -- inputs from the stream -----------------------------------------------------------------

    def connected_(self, mono: float) -> None:
        """A new stream is open: resume every lease first, then re-send every queued request."""
        self.connected = True
        for lease_id, held in sorted(self.leases.items()):
            if held.state in ("resuming", "resuming_releasing"):
                self._send(self._resume(held))
                if held.state == "resuming_releasing" and held.report is not None:
                    self._send(self._release(lease_id, held.report))
        for request_id, p in sorted(self.pending.items(), key=lambda kv: kv[1].created):
            left = None if p.spec.max_wait is None else max(0.0, p.spec.max_wait - (mono - p.created))
            self._send(self._request(request_id, p.spec, left))

    def disconnected(self) -> None:
        """The stream broke: every lease needs a resume, and the daemon forgot our queued requests."""
        self.connected = False
        self.cancelling.clear()
        self._heartbeats.clear()
        for held in self.leases.values():
            held.state = "resuming" if held.state in ("held", "resuming") else "resuming_releasing"

    def heartbeat(self, mono: float, wall: float) -> None:
        """Renews every held lease that is due, and those within half an interval of being due (so
        leases granted close together share one message)."""
        if not self.connected:
            return
        due = []
        for lease_id, held in self.leases.items():
            if held.state != "held":
                continue
            every = _interval(held.info.ttl)
            if held.next_heartbeat <= mono + every / 2:
                due.append(lease_id)
                held.next_heartbeat = mono + every
        if not due:
            return
        if len(due) == len(self.leases):
            # Every lease of the stream is due: an empty list renews them all, in a few bytes.
            self._heartbeats.append((wall, due))
            self._send(pb.ClientMessage(heartbeat=pb.Heartbeat()))
            return
        for i in range(0, len(due), MAX_HEARTBEAT_IDS):
            batch = due[i : i + MAX_HEARTBEAT_IDS]
            self._heartbeats.append((wall, batch))
            self._send(pb.ClientMessage(heartbeat=pb.Heartbeat(lease_ids=batch)))

    def message(self, mono: float, wall: float, msg: pb.ServerMessage) -> None:
        kind = msg.WhichOneof("msg")
        if kind == "granted":
            self._granted(mono, msg.granted)
        elif kind == "rejected":
            r = msg.rejected
            retry = from_duration(r.retry_after) if r.HasField("retry_after") else None
            self._rejected(r.request_id, _code(r.code), r.message, retry)
        elif kind == "paused":
            p = msg.paused
            self.pauses = {k: v for k, v in self.pauses.items() if v.until.timestamp() > wall}
            until = datetime.fromtimestamp(from_timestamp(p.until), tz=timezone.utc)
            self.pauses[p.pool] = Pause(until=until, reason=p.reason)
            self.events.append(("pauses", dict(self.pauses)))
        elif kind == "resumed":
            if self.pauses.pop(msg.resumed.pool, None) is not None:
                self.events.append(("pauses", dict(self.pauses)))
        elif kind == "expired":
            self._expired(msg.expired)
        elif kind == "released":
            held = self.leases.pop(msg.released.lease_id, None)
            if held is not None:
                self.events.append(("ended", msg.released.lease_id))
        elif kind == "lease_error":
            self._lease_error(msg.lease_error)
        elif kind == "lease_resumed":
            held = self.leases.get(msg.lease_resumed.lease_id)
            if held is not None:
                held.state = "held" if held.state == "resuming" else "releasing"
                held.next_heartbeat = mono + _interval(held.info.ttl)
                if msg.lease_resumed.HasField("expires_at"):
                    held.info.expires_at = from_timestamp(msg.lease_resumed.expires_at)
        elif kind == "cancelled":
            self.cancelling.pop(msg.cancelled.request_id, None)
        elif kind == "heartbeat_ack":
            if self._heartbeats:
                sent, ids = self._heartbeats.popleft()
                for lease_id in ids:
                    held = self.leases.get(lease_id)
                    if held is not None and held.state == "held":
                        held.info.expires_at = sent + held.info.ttl
        # "queued" needs nothing: the request simply waits.

    # -- internals ------------------------------------------------------------------------------

    def _granted(self, mono: float, g: pb.Granted) -> None:
        info = LeaseInfo(
            lease_id=g.lease_id,
            pool=g.pool,
            fencing_token=g.fencing_token,
            ttl=from_duration(g.ttl),
            expires_at=from_timestamp(g.expires_at),
            credential=g.resume_credential,
        )
        p = self.pending.pop(g.request_id, None)
        if p is not None:
            # Heartbeats follow the TTL the daemon actually granted, never one guessed earlier.
            self.leases[g.lease_id] = _Held(info, p.spec, "held", mono + _interval(info.ttl))
            self.events.append(("granted", g.request_id, info))
            return
        # Granted while (or after) its acquire was cancelled: the slot goes straight back.
        holder = self.cancelling.pop(g.request_id, "")
        spec = RequestSpec(g.pool, None, None, info.ttl, None, holder)
        report = Report(Outcome.CANCELLED)
        self.leases[g.lease_id] = _Held(info, spec, "releasing", mono, report)
        self._send(self._release(g.lease_id, report))

    def _rejected(self, request_id: str, code: grpc.StatusCode, message: str, retry: float | None) -> None:
        if self.cancelling.pop(request_id, None) is not None:
            return
        if code == grpc.StatusCode.UNAVAILABLE and retry is None and request_id in self.pending:
            # The daemon is shutting down: keep waiting, re-send on the next stream. (An open circuit
            # breaker failing fast is UNAVAILABLE too, but always says when to retry.)
            return
        if self.pending.pop(request_id, None) is not None:
            self.events.append(("refused", request_id, Rejected(code, message, retry)))

    def _expired(self, e: pb.Expired) -> None:
        if e.reason == pb.EXPIRY_REASON_SHUTDOWN:
            return  # a restarted daemon may let the lease be resumed
        held = self.leases.pop(e.lease_id, None)
        if held is None:
            return
        why = _EXPIRY.get(e.reason, "expired")
        if e.message:
            why = f"{why}: {e.message}"
        self.events.append(("lost", e.lease_id, LeaseLost(e.lease_id, why)))
        self.events.append(("ended", e.lease_id))

    def _lease_error(self, e: pb.LeaseError) -> None:
        held = self.leases.get(e.lease_id)
        if held is None:
            return
        report = held.report
        if (
            held.state == "releasing"
            and e.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            and report is not None
            and (report.usage is not None or report.limits)
        ):
            # The daemon refused what the release reported (usage or limits out of its bounds), and
            # changed nothing: give the slot back with the outcome alone.
            held.report = Report(report.outcome, report.retry_after)
            self._send(self._release(e.lease_id, held.report))
            return
        del self.leases[e.lease_id]
        what = "could not be resumed" if held.state.startswith("resuming") else "refused by the daemon"
        self.events.append(("lost", e.lease_id, LeaseLost(e.lease_id, f"{what}: {e.message}")))
        self.events.append(("ended", e.lease_id))

    def _send(self, msg: pb.ClientMessage) -> None:
        if self.connected:
            self.out.append(msg)

    @staticmethod
    def _request(request_id: str, spec: RequestSpec, max_wait: float | None) -> pb.ClientMessage:
        req = pb.LeaseRequest(request_id=request_id, pool=spec.pool, holder=spec.holder)
        if spec.priority is not None:
            req.priority = spec.priority
        if spec.started_at is not None:
            req.started_at.CopyFrom(spec.started_at)
        if spec.ttl is not None:
            req.ttl.CopyFrom(duration(spec.ttl, "ttl"))
        if max_wait is not None:
            req.max_wait.CopyFrom(duration(max_wait, "max_wait"))
        return pb.ClientMessage(request=req)

    @staticmethod
    def _resume(held: _Held) -> pb.ClientMessage:
        r = pb.ResumeLease(
            lease_id=held.info.lease_id,
            fencing_token=held.info.fencing_token,
            pool=held.info.pool,
            holder=held.spec.holder,
            credential=held.info.credential,
        )
        if held.spec.priority is not None:
            r.priority = held.spec.priority
        r.ttl.CopyFrom(duration(held.info.ttl, "ttl"))
        return pb.ClientMessage(resume=r)

    @staticmethod
    def _release(lease_id: str, report: Report) -> pb.ClientMessage:
        rel = pb.ReleaseLease(lease_id=lease_id, outcome=cast(Any, int(report.outcome)))
        if report.retry_after is not None:
            rel.retry_after.CopyFrom(duration(report.retry_after, "retry_after"))
        if report.usage is not None:
            rel.usage.CopyFrom(report.usage.to_proto())
        limits = [lim for lim in report.limits if lim.remaining <= lim.limit]
        for limit in limits[:MAX_PROVIDER_LIMITS]:
            rel.provider_limits.append(limit.to_proto())
        return pb.ClientMessage(release=rel)
