"""The session thread: owns the ``Acquire`` stream, the heartbeats and the reconnects.

With several endpoints (high availability) the stream is opened on one member at a time (see
:mod:`slotd._members`): a standby's redirect is followed at once, any other failure moves to the next
member after a jittered backoff, and the held leases are resumed on whichever member leads.

Callers (any thread, any event loop) only put commands in an unbounded queue and wait on
``concurrent.futures.Future``s, so nothing a caller does can starve a heartbeat, and a blocked event
loop cannot lose a lease. One reader thread per stream turns the daemon's messages into queue items
too; the session thread alone touches the :class:`~slotd._machine.Machine`.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from slotd._errors import ClientClosed, LeaseLost, Rejected, Unavailable
from slotd._machine import LeaseInfo, Machine, RequestSpec
from slotd._members import ELECTION_RETRY_MAX, Members
from slotd._types import Pause, Report
from slotd.v1 import slotd_pb2 as pb

if TYPE_CHECKING:
    from slotd._client import Lease

log = logging.getLogger("slotd")

#: The metadata key that asks the daemon to keep this client's leases after its stream breaks.
RESUME_GRACE_HEADER = "slotd-resume-grace"


@dataclass(frozen=True)
class Settings:
    """Everything the session needs from the client's keyword arguments."""

    endpoints: list[str]
    metadata: tuple[tuple[str, str], ...]
    credentials: grpc.ChannelCredentials | None
    resume_grace: float | None
    backoff_initial: float
    backoff_max: float
    connect_timeout: float
    close_timeout: float
    on_lost: Callable[[Lease, LeaseLost], None] | None


_STOP = object()


class Session:
    """One ``Acquire`` stream, multiplexed, kept open by a dedicated thread."""

    def __init__(self, settings: Settings, make_lease: Callable[[Session, LeaseInfo], Lease]) -> None:
        self.settings = settings
        self._make_lease = make_lease
        self._inbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._machine = Machine()
        self._ids = itertools.count(1)
        self._acquirers: dict[str, Future[Lease]] = {}
        self._leases: dict[str, Lease] = {}
        self._pauses: dict[str, Pause] = {}
        self._pauses_lock = threading.Lock()
        self.members = Members(settings.endpoints, settings.credentials, self._channel_options())
        # The current stream: generation, the member it was opened on, its outgoing queue and its call.
        self._gen = 0
        self._member = settings.endpoints[0]
        self._out: queue.SimpleQueue[pb.ClientMessage | None] | None = None
        self._call: Any = None
        self._down_since: float | None = time.monotonic()
        self._last_error = "not connected yet"
        self._reconnect_at = 0.0
        self._backoff = settings.backoff_initial
        self._closing_deadline: float | None = None
        self._done = threading.Event()
        self.pid = os.getpid()
        self._thread = threading.Thread(target=self._run, name="slotd-session", daemon=True)
        self._thread.start()

    # -- called from any thread -----------------------------------------------------------------

    def acquire(self, spec: RequestSpec) -> tuple[str, Future[Lease]]:
        request_id = f"r{next(self._ids)}"
        fut: Future[Lease] = Future()
        if self._done.is_set():
            fut.set_exception(ClientClosed("the slotd client is closed"))
            return request_id, fut

        def on_done(f: Future[Lease]) -> None:
            if f.cancelled():
                self._inbox.put(("cancel", request_id))

        fut.add_done_callback(on_done)
        self._inbox.put(("acquire", request_id, spec, fut))
        return request_id, fut

    def release(self, lease_id: str, report: Report) -> None:
        self._inbox.put(("release", lease_id, report))

    def pauses(self) -> dict[str, Pause]:
        with self._pauses_lock:
            return dict(self._pauses)

    def close(self, timeout: float | None = None) -> bool:
        """Withdraws queued requests, releases every lease and waits (bounded) for the daemon's
        answers. Returns whether everything was acknowledged. Idempotent."""
        if not self._done.is_set():
            self._inbox.put(("close",))
        wait = self.settings.close_timeout + 1.0 if timeout is None else timeout
        self._thread.join(wait)
        return self._done.is_set() and self._flushed

    _flushed = False

    # -- the session thread ---------------------------------------------------------------------

    def _channel_options(self) -> list[tuple[str, Any]]:
        return [
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.initial_reconnect_backoff_ms", 50),
            ("grpc.max_reconnect_backoff_ms", int(self.settings.backoff_max * 1000)),
            ("grpc.enable_retries", 0),
        ]

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:  # pragma: no cover - a bug; never leave callers hanging
            log.exception("slotd session thread failed")
        finally:
            self._teardown_stream()
            for fut in self._acquirers.values():
                if not fut.done():
                    fut.set_exception(ClientClosed("the slotd client is closed"))
            self._acquirers.clear()
            self.members.close()
            self._done.set()

    def _loop(self) -> None:
        m = self._machine
        while True:
            now = time.monotonic()
            if m.closed and (m.finished() or (self._closing_deadline or 0) <= now):
                self._flushed = m.finished()
                return
            if not m.connected and now >= self._reconnect_at:
                self._connect(now)
            deadlines = [self._closing_deadline, m.next_heartbeat()]
            if not m.connected:
                deadlines.append(self._reconnect_at)
            # Down since the last stream broke (or the start), until a stream opens again.
            if m.pending and self._down_since is not None:
                deadlines.append(self._down_since + self.settings.connect_timeout)
            due = min((d for d in deadlines if d is not None), default=now + 1.0)
            try:
                item = self._inbox.get(timeout=max(0.0, due - time.monotonic()))
            except queue.Empty:
                item = None
            now, wall = time.monotonic(), time.time()
            if item is not None:
                self._handle(item, now, wall)
                # Drain what else is already there before flushing, to batch the writes.
                for _ in range(256):
                    try:
                        self._handle(self._inbox.get_nowait(), now, wall)
                    except queue.Empty:
                        break
            hb = m.next_heartbeat()
            if hb is not None and hb <= now:
                m.heartbeat(now, wall)
            if m.pending and self._down_since is not None:
                if now - self._down_since >= self.settings.connect_timeout:
                    self._fail_pending()
            self._apply()

    def _handle(self, item: tuple[Any, ...], now: float, wall: float) -> None:
        m = self._machine
        kind = item[0]
        if kind == "msg":
            if item[1] == self._gen:
                m.message(now, wall, item[2])
        elif kind == "opened":
            if item[1] == self._gen:
                self._backoff = self.settings.backoff_initial
                self._down_since = None
                self.members.succeeded()
        elif kind == "broken":
            if item[1] == self._gen and m.connected:
                self._last_error = item[2]
                log.debug("slotd stream broke: %s", item[2])
                self._teardown_stream()
                m.disconnected()
                if self._down_since is None:
                    self._down_since = now
                code = item[3] if len(item) > 3 else None
                if self.members.failed(self._member, code, item[4] if len(item) > 4 else None):
                    # A standby named the leader: go there at once (the leases resume there).
                    self._reconnect_at = now
                    return
                # Full jitter: anywhere in [0, backoff), then double up to the maximum. The same when
                # no member leads yet (an election): standbys without a leader to name are retried
                # in turn, spread out.
                cap = self.settings.backoff_max
                if self.members.failover_likely:
                    # The leader a standby named is gone: look for the next one often.
                    cap = min(cap, ELECTION_RETRY_MAX)
                    self._backoff = min(self._backoff, cap)
                self._reconnect_at = now + random.uniform(0, self._backoff)
                self._backoff = min(self._backoff * 2, cap)
                if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    # A wrong or missing token will not get better by waiting: tell the callers now.
                    self._fail_pending(
                        Rejected(code, "the stream was refused: " + item[2].split(": ", 1)[-1])
                    )
        elif kind == "acquire":
            _, request_id, spec, fut = item
            if fut.cancelled():
                return
            self._acquirers[request_id] = fut
            m.acquire(now, request_id, spec)
        elif kind == "cancel":
            if self._acquirers.pop(item[1], None) is not None:
                m.cancel(item[1])
        elif kind == "release":
            m.release(item[1], item[2])
        elif kind == "close":
            if not m.closed:
                m.close()
                self._closing_deadline = now + self.settings.close_timeout

    def _apply(self) -> None:
        m = self._machine
        if m.out:
            if self._out is not None:
                for msg in m.out:
                    self._out.put(msg)
            m.out.clear()
        events, m.events = m.events, []
        for ev in events:
            kind = ev[0]
            if kind == "granted":
                _, request_id, info = ev
                lease = self._make_lease(self, info)
                self._leases[info.lease_id] = lease
                fut = self._acquirers.pop(request_id, None)
                delivered = False
                if fut is not None:
                    try:
                        fut.set_result(lease)
                        delivered = True
                    except Exception:  # cancelled while the grant was on its way
                        delivered = False
                if not delivered:
                    lease.release()
            elif kind == "refused":
                fut = self._acquirers.pop(ev[1], None)
                if fut is not None and not fut.done():
                    fut.set_exception(ev[2])
            elif kind == "lost":
                lost = self._leases.get(ev[1])
                if lost is not None:
                    lost._lose(ev[2], self.settings.on_lost)
            elif kind == "ended":
                self._leases.pop(ev[1], None)
            elif kind == "pauses":
                with self._pauses_lock:
                    self._pauses = ev[1]
        if m.out:
            self._apply()  # releases of grants nobody waited for

    def _fail_pending(self, err: Exception | None = None) -> None:
        m = self._machine
        where = ", ".join(self.settings.endpoints)
        err = err or Unavailable(
            f"slotd at {where} unreachable for {self.settings.connect_timeout:g}s: {self._last_error}"
        )
        for request_id in list(m.pending):
            m.cancel(request_id)
            fut = self._acquirers.pop(request_id, None)
            if fut is not None and not fut.done():
                fut.set_exception(err)

    def _connect(self, now: float) -> None:
        self._gen += 1
        gen = self._gen
        out: queue.SimpleQueue[pb.ClientMessage | None] = queue.SimpleQueue()

        def requests() -> Iterator[pb.ClientMessage]:
            while True:
                msg = out.get()
                if msg is None:
                    return
                yield msg

        metadata = list(self.settings.metadata)
        if self.settings.resume_grace:
            metadata.append((RESUME_GRACE_HEADER, f"{int(self.settings.resume_grace * 1000)}ms"))
        self._member, stub = self.members.current()
        try:
            call = stub.Acquire(requests(), metadata=metadata)
        except Exception as e:  # pragma: no cover - grpc raises lazily; be safe anyway
            self._inbox.put(("broken", gen, str(e)))
            return
        self._out, self._call = out, call
        # Optimistically connected: what the machine sends now is buffered until the stream is up;
        # if it never comes up the reader reports the break and the machine rebuilds next time.
        self._machine.connected_(now)
        threading.Thread(target=self._read, args=(gen, call), name="slotd-reader", daemon=True).start()

    def _read(self, gen: int, call: Any) -> None:
        try:
            call.initial_metadata()
            # initial_metadata() also returns when the call failed before any header: only a call
            # still running has really opened a stream.
            if not call.done():
                self._inbox.put(("opened", gen))
            for msg in call:
                self._inbox.put(("msg", gen, msg))
            self._inbox.put(("broken", gen, "the daemon ended the stream"))
        except grpc.RpcError as e:
            # A standby names the leader in the trailing metadata.
            trailers = e.trailing_metadata() if hasattr(e, "trailing_metadata") else None
            self._inbox.put(("broken", gen, f"{e.code().name.lower()}: {e.details()}", e.code(), trailers))
        except Exception as e:  # pragma: no cover
            self._inbox.put(("broken", gen, repr(e)))

    def _teardown_stream(self) -> None:
        if self._out is not None:
            self._out.put(None)
            self._out = None
        if self._call is not None:
            self._call.cancel()
            self._call = None
