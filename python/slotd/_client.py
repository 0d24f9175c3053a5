"""``Client`` / ``AsyncClient`` and their ``Lease``: the public face over one shared session.

The two clients share one core (the session thread) and differ only in how they wait, as httpx's
twins do: ``Client`` blocks the calling thread on a future, ``AsyncClient`` awaits the same future.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import random
import sys
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime, timezone
from types import TracebackType
from typing import Any

import grpc

from slotd._errors import ClientClosed, LeaseLost, Rejected, SlotdError, Unavailable
from slotd._machine import LeaseInfo, RequestSpec
from slotd._members import parse_endpoints
from slotd._session import Session, Settings
from slotd._types import Outcome, Pause, ProviderLimit, Report, Usage, duration, seconds, timestamp
from slotd.v1 import slotd_pb2 as pb

log = logging.getLogger("slotd")

#: Clients of this process, so that a fork can mark them unusable in the child.
_CLIENTS: weakref.WeakSet[_Core] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for core in list(_CLIENTS):
        core.forked = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

#: At interpreter exit, how long each client still open may take to flush its last releases.
EXIT_FLUSH_TIMEOUT = 1.0


@atexit.register
def _close_at_exit() -> None:
    # A program that never called close(): send what its leases recorded (a 429's pause, usage)
    # instead of letting the daemon see the stream drop. Bounded, so an unreachable daemon cannot
    # hold the exit up for long.
    for core in list(_CLIENTS):
        if not core.closed and not core.forked:
            core.closed = True
            core.session.close(EXIT_FLUSH_TIMEOUT)


LostCallback = Callable[["Lease", LeaseLost], None]


class Lease:
    """A granted slot. Release it (leaving the ``with`` block does) when the provider call is over.

    ``lost`` is a :class:`threading.Event` set when the lease ended without a release (expired,
    revoked, taken over, not resumable): stop using the slot then. The outcome setters
    (:meth:`rate_limited`, :meth:`failed`, :meth:`overloaded`, ...) record how the call ended; the
    release sends it. :meth:`release` is idempotent and may be called from any thread or task.
    """

    def __init__(self, session: Session, info: LeaseInfo) -> None:
        self._session = session
        self._info = info
        self._report: Report | None = None
        self._released = False
        self._lock = threading.Lock()
        self._callbacks: list[LostCallback] = []
        self.lost = threading.Event()
        self.lost_reason: LeaseLost | None = None

    # -- what the daemon granted ----------------------------------------------------------------

    @property
    def id(self) -> str:
        """The lease id (32 hex digits)."""
        return self._info.lease_id

    @property
    def fencing_token(self) -> int:
        """Strictly increasing per pool: pass it to anything that must reject stale holders."""
        return self._info.fencing_token

    @property
    def pool(self) -> str:
        return self._info.pool

    @property
    def ttl(self) -> float:
        """The TTL the daemon granted, in seconds (heartbeats run at a third of it)."""
        return self._info.ttl

    @property
    def expires_at(self) -> datetime:
        """When the lease expires unless renewed (moved by every acknowledged heartbeat)."""
        return datetime.fromtimestamp(self._info.expires_at, tz=timezone.utc)

    @property
    def released(self) -> bool:
        return self._released

    # -- how the call ended ---------------------------------------------------------------------

    def _set(self, outcome: Outcome | None = None, retry_after: float | None = None) -> None:
        with self._lock:
            report = self._report or Report()
            if outcome is not None:
                report.outcome = outcome
            report.retry_after = seconds(retry_after, "retry_after")
            self._report = report

    def rate_limited(self, retry_after: float | None = None) -> None:
        """The provider answered 429: the release pauses the pool for ``retry_after`` seconds (unset:
        the pool's default)."""
        self._set(Outcome.RATE_LIMITED, retry_after)

    def overloaded(self, retry_after: float | None = None) -> None:
        """The provider is overloaded (529/503)."""
        self._set(Outcome.OVERLOADED, retry_after)

    def quota_exhausted(self, retry_after: float | None = None) -> None:
        """The key is out of credit (402, ``insufficient_quota``)."""
        self._set(Outcome.QUOTA_EXHAUSTED, retry_after)

    def failed(self) -> None:
        """The call failed (a 5xx, a transport error)."""
        self._set(Outcome.ERROR)

    def cancelled(self) -> None:
        """The caller gave up before the call ended."""
        self._set(Outcome.CANCELLED)

    def settle(self, usage: Usage | None = None, limits: list[ProviderLimit] | None = None) -> None:
        """Records the tokens the call used and the provider's rate-limit headers, sent on release."""
        with self._lock:
            report = self._report or Report()
            if usage is not None:
                report.usage = usage
            if limits is not None:
                report.limits = list(limits)
            self._report = report

    @property
    def report(self) -> Report | None:
        """What the release sends (or sent): outcome, retry_after, usage and provider limits."""
        return self._report

    @property
    def outcome(self) -> Outcome | None:
        """The outcome recorded so far, if any."""
        return self._report.outcome if self._report is not None else None

    def release(self, outcome: Outcome | None = None) -> None:
        """Gives the slot back now, with ``outcome`` or the one recorded (default ``OK``).
        Idempotent; never blocks on the network (the session thread sends it)."""
        with self._lock:
            if self._released:
                return
            self._released = True
            report = self._report or Report()
            if outcome is not None:
                report.outcome = outcome
            self._report = report
        if not self.lost.is_set():
            self._session.release(self.id, report)

    def check(self) -> None:
        """Raises :class:`LeaseLost` if the lease was lost."""
        if self.lost_reason is not None:
            raise self.lost_reason

    def on_lost(self, callback: LostCallback) -> None:
        """Calls ``callback(lease, error)`` (on the session thread) when the lease is lost; at once if
        it already was."""
        with self._lock:
            if self.lost_reason is None:
                self._callbacks.append(callback)
                return
        _call(callback, self, self.lost_reason)

    def _lose(self, err: LeaseLost, client_callback: LostCallback | None) -> None:
        with self._lock:
            if self.lost_reason is not None:
                return
            self.lost_reason = err
            callbacks = list(self._callbacks)
        self.lost.set()
        if not self._released:
            log.warning("slotd: %s", err)
        for cb in [*callbacks, *([client_callback] if client_callback else [])]:
            _call(cb, self, err)

    def _exit(self, exc: BaseException | None) -> None:
        if exc is None:
            self.release()
            return
        cancelled = isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt, GeneratorExit))
        with self._lock:
            recorded = self._report is not None and self._report.outcome != Outcome.OK
        self.release(None if recorded else (Outcome.CANCELLED if cancelled else Outcome.ERROR))

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._exit(e)

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._exit(e)

    def __repr__(self) -> str:
        state = "lost" if self.lost.is_set() else "released" if self._released else "held"
        return f"Lease(id={self.id!r}, pool={self.pool!r}, fencing_token={self.fencing_token}, {state})"


def _call(cb: LostCallback, lease: Lease, err: LeaseLost) -> None:
    try:
        cb(lease, err)
    except Exception:
        log.exception("slotd: lost-lease callback failed")


def _credentials(tls: bool | str | bytes | grpc.ChannelCredentials | None) -> grpc.ChannelCredentials | None:
    if tls is None or tls is False:
        return None
    if tls is True:
        return grpc.ssl_channel_credentials()
    if isinstance(tls, grpc.ChannelCredentials):
        return tls
    pem = tls if isinstance(tls, bytes) else open(tls, "rb").read()
    return grpc.ssl_channel_credentials(root_certificates=pem)


#: One endpoint (``host:port`` or ``http://host:port``), several separated by commas, or a sequence.
Endpoints = str | Sequence[str]
#: The daemon's default listen address.
DEFAULT_ENDPOINT = "127.0.0.1:50051"


def _endpoints(endpoint: Endpoints | None, endpoints: Endpoints | None) -> list[str]:
    if endpoint is not None and endpoints is not None:
        raise ValueError("give either the endpoint or endpoints=, not both")
    given = endpoints if endpoints is not None else endpoint
    return parse_endpoints(DEFAULT_ENDPOINT if given is None else given)


#: A ``resume_grace`` (seconds) for clients of a highly available deployment. A failover itself does
#: not need one (the new leader re-adopts re-presented leases by their credentials during its learning
#: period, whatever the grace); a cut that is *not* a failover does (the leader stays and would free the
#: leases of the broken stream at once). A client cannot tell the two apart when its stream breaks, and
#: may walk through a standby or two (a redirect, a backoff of at most ``backoff_max``) before it is
#: back on the leader: 10 s covers that with room to spare, and the default ``[ha] lease_ttl`` (5 s).
#: The price: a dead client's slots come back after at most this long (or its leases' TTL, if
#: shorter), not at once.
FAILOVER_RESUME_GRACE = 10.0


class _Core:
    """What both clients share: the settings, the session and the unary stub."""

    #: How long the daemon keeps this client's leases after its stream breaks (seconds), by default:
    #: none, so a dead process (even ``kill -9``) frees its slots the moment its socket closes. Set
    #: ``resume_grace`` to survive connection cuts (a reconnect then resumes the leases).
    DEFAULT_RESUME_GRACE: float | None = None
    #: The first reconnect delay (seconds, before full jitter); it doubles up to ``DEFAULT_BACKOFF_MAX``.
    DEFAULT_BACKOFF_INITIAL = 0.05
    DEFAULT_BACKOFF_MAX = 5.0
    #: Acquires fail with :class:`Unavailable` once the daemon has been unreachable this long.
    DEFAULT_CONNECT_TIMEOUT = 10.0
    #: How long ``close()`` waits for the daemon to acknowledge the last releases.
    DEFAULT_CLOSE_TIMEOUT = 5.0

    def __init__(
        self,
        endpoint: Endpoints | None = None,
        *,
        endpoints: Endpoints | None = None,
        token: str | None = None,
        tls: bool | str | bytes | grpc.ChannelCredentials | None = None,
        holder: str | None = None,
        resume_grace: float | None = DEFAULT_RESUME_GRACE,
        backoff_initial: float = DEFAULT_BACKOFF_INITIAL,
        backoff_max: float = DEFAULT_BACKOFF_MAX,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
        on_lost: LostCallback | None = None,
    ) -> None:
        if token is not None and ("\n" in token or "\r" in token):
            raise ValueError("token must not contain line breaks")
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.holder = holder or f"{os.path.basename(sys.argv[0] or 'python')} pid {os.getpid()}"
        if len(self.holder.encode()) > 256:
            raise ValueError("holder must be at most 256 bytes")
        initial = seconds(backoff_initial, "backoff_initial", allow_zero=False) or 0.05
        self.settings = Settings(
            endpoints=_endpoints(endpoint, endpoints),
            metadata=metadata,
            credentials=_credentials(tls),
            resume_grace=seconds(resume_grace, "resume_grace"),
            backoff_initial=initial,
            backoff_max=max(initial, seconds(backoff_max, "backoff_max") or initial),
            connect_timeout=seconds(connect_timeout, "connect_timeout", allow_zero=False) or 10.0,
            close_timeout=seconds(close_timeout, "close_timeout") or 0.0,
            on_lost=on_lost,
        )
        self.forked = False
        self.closed = False
        self.session = Session(self.settings, Lease)
        _CLIENTS.add(self)

    def check_usable(self) -> None:
        if self.forked:
            raise ClientClosed(
                "this slotd client was created before os.fork(); create a new client in the child process"
            )
        if self.closed:
            raise ClientClosed("the slotd client is closed")

    def spec(
        self,
        pool: str,
        priority: int | None,
        started_at: datetime | float | None,
        ttl: float | None,
        max_wait: float | None,
        holder: str | None,
    ) -> RequestSpec:
        if not pool:
            raise ValueError("pool must not be empty")
        if priority is not None and not (0 <= int(priority) <= 9):
            raise ValueError(f"priority must be 0..=9, got {priority!r}")
        return RequestSpec(
            pool=pool,
            priority=None if priority is None else int(priority),
            started_at=None if started_at is None else timestamp(started_at),
            ttl=seconds(ttl, "ttl", allow_zero=False),
            max_wait=seconds(max_wait, "max_wait"),
            holder=holder or self.holder,
        )

    def unary(self, method: str, request: Any, timeout: float) -> Any:
        """Calls ``method`` on the member in use, following a standby's redirect to the leader (at
        most :data:`~slotd._members.MAX_REDIRECTS` in a row). With several endpoints, an unreachable
        member, or a standby that knows no leader yet (an election), moves the call to the next one,
        after a jittered backoff once every endpoint was tried, until ``timeout`` runs out."""
        self.check_usable()
        members = self.session.members
        deadline = time.monotonic() + timeout
        backoff = self.settings.backoff_initial
        tried = 0
        while True:
            member, stub = members.current()
            left = max(0.0, deadline - time.monotonic())
            try:
                response = getattr(stub, method)(request, metadata=self.settings.metadata, timeout=left)
                members.succeeded()
                return response
            except grpc.RpcError as e:
                code, details = e.code(), e.details() or ""
                if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise Rejected(code, details) from None
                trailers = e.trailing_metadata() if hasattr(e, "trailing_metadata") else None
                if members.failed(member, code, trailers) and time.monotonic() < deadline:
                    continue  # a standby named the leader: ask it at once
                tried += 1
                if not members.several or time.monotonic() >= deadline:
                    raise Unavailable(f"slotd at {member}: {details}") from None
                if tried % len(members.endpoints) == 0:
                    # Every member refused or was unreachable: wait a little, spread out.
                    pause = min(random.uniform(0, backoff), max(0.0, deadline - time.monotonic()))
                    backoff = min(backoff * 2, self.settings.backoff_max)
                    time.sleep(pause)


class Client:
    """A synchronous slotd client: one multiplexed ``Acquire`` stream, kept by a background thread.

    ::

        client = slotd.Client("127.0.0.1:50051")
        with client.lease("anthropic", priority=7, ttl=30) as lease:
            ...  # call the provider
        client.close()

    **Several members (high availability):** ``Client(endpoints=["10.0.0.1:50051", "10.0.0.2:50051",
    "10.0.0.3:50051"])`` (or one comma-separated string, or the list as the first argument) talks to
    one member at a time. A standby's UNAVAILABLE naming the leader (``slotd-leader``) is followed at
    once, with the same token and TLS; any other failure, or a standby that knows no leader yet (an
    election), moves to the next member after a jittered backoff. Held leases are resumed on the new
    leader with their resume credentials during its learning period (the pools' ``max_ttl``): keep
    ``backoff_max`` well under it, and ``connect_timeout`` above the failover time so that queued
    acquires wait it out. ``resume_grace`` is not needed for the failover itself, but for the cuts that
    are not one: set :attr:`FAILOVER_RESUME_GRACE`.

    Keyword arguments (all optional): ``endpoints`` (instead of the positional endpoint), ``token``
    (sent as ``authorization: Bearer``), ``tls`` (``True`` for the system roots, a CA file path or PEM
    bytes, or ``grpc.ChannelCredentials``; also used for a leader a standby names), ``holder``
    (shown in Status; default program name and pid), ``resume_grace`` (seconds the daemon keeps this
    client's leases after a connection cut; default none), ``backoff_initial`` / ``backoff_max``
    (reconnect delays, full jitter), ``connect_timeout`` (acquires fail with :class:`Unavailable`
    after the daemon has been unreachable this long), ``close_timeout``, and ``on_lost(lease, error)``
    (called on the session thread when any lease is lost).

    **Fork safety:** the client's threads and gRPC channel do not survive ``os.fork()``. A client
    created before a fork is unusable in the child (it raises :class:`ClientClosed`); create clients
    after forking (in each worker), or use the ``spawn`` start method. Leases stay with the parent.
    """

    #: A ``resume_grace`` (seconds) for clients of a highly available deployment; see the class docs.
    FAILOVER_RESUME_GRACE = FAILOVER_RESUME_GRACE

    def __init__(self, endpoint: Endpoints | None = None, **kwargs: Any) -> None:
        self._core = _Core(endpoint, **kwargs)

    def acquire(
        self,
        pool: str,
        *,
        priority: int | None = None,
        started_at: datetime | float | None = None,
        ttl: float | None = None,
        max_wait: float | None = None,
        holder: str | None = None,
        timeout: float | None = None,
    ) -> Lease:
        """Waits for a slot on ``pool`` and returns its :class:`Lease` (release it yourself, or use it
        as a context manager). ``max_wait`` is the daemon-side wait limit (then :class:`Rejected` with
        ``DEADLINE_EXCEEDED``); ``timeout`` a local one (then ``TimeoutError``, the request withdrawn).
        An interrupt (``KeyboardInterrupt``) while waiting withdraws the request too."""
        core = self._core
        core.check_usable()
        spec = core.spec(pool, priority, started_at, ttl, max_wait, holder)
        _, fut = core.session.acquire(spec)
        try:
            return fut.result(timeout)
        except FutureTimeout:
            # Before 3.11 this is not the builtin TimeoutError: raise the one the docs promise.
            _withdraw(fut)
            raise TimeoutError(f"no slot on {pool!r} within {timeout}s (request withdrawn)") from None
        except BaseException:
            _withdraw(fut)
            raise

    def release(self, lease: Lease, outcome: Outcome | None = None) -> None:
        """Same as ``lease.release(outcome)``."""
        lease.release(outcome)

    @contextmanager
    def lease(
        self,
        pool: str,
        *,
        priority: int | None = None,
        started_at: datetime | float | None = None,
        ttl: float | None = None,
        max_wait: float | None = None,
        holder: str | None = None,
        timeout: float | None = None,
    ) -> Iterator[Lease]:
        """``with client.lease(pool) as lease:``: released on leaving the block, with ``OK``, or with
        ``ERROR`` (``CANCELLED`` for an interrupt) if an exception escaped, unless an outcome was
        recorded on the lease."""
        lease = self.acquire(
            pool,
            priority=priority,
            started_at=started_at,
            ttl=ttl,
            max_wait=max_wait,
            holder=holder,
            timeout=timeout,
        )
        try:
            yield lease
        except BaseException as e:
            lease._exit(e)
            raise
        lease._exit(None)

    def pauses(self) -> dict[str, Pause]:
        """The pause state of every pool this client waits on or holds, by pool name."""
        return self._core.session.pauses()

    def status(self, pool: str = "", *, timeout: float = 5.0) -> pb.StatusResponse:
        """The daemon's Status snapshot (every pool and lease, or only ``pool``)."""
        return self._core.unary("Status", pb.StatusRequest(pool=pool), timeout)  # type: ignore[no-any-return]

    def report_rate_limit(
        self, pool: str, retry_after: float | None = None, reason: str = "", *, timeout: float = 5.0
    ) -> pb.ReportRateLimitResponse:
        """Reports a provider 429 seen outside a lease: pauses ``pool`` for everyone."""
        req = pb.ReportRateLimitRequest(pool=pool, reason=reason)
        if retry_after is not None:
            req.retry_after.CopyFrom(duration(retry_after, "retry_after"))
        return self._core.unary("ReportRateLimit", req, timeout)  # type: ignore[no-any-return]

    def close(self, timeout: float | None = None) -> bool:
        """Withdraws queued requests, releases every lease still held (as cancelled) and waits
        (bounded by ``close_timeout``) until the daemon acknowledged the releases. Returns whether it
        did. Idempotent."""
        core = self._core
        if core.forked:
            return False
        core.closed = True
        return core.session.close(timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _withdraw(fut: Future[Lease]) -> None:
    """The caller stopped waiting: withdraw the request, or give back a grant that won the race."""
    if not fut.cancel() and fut.done() and fut.exception() is None:
        fut.result().release(Outcome.CANCELLED)


class AsyncClient:
    """The asyncio twin of :class:`Client`: the same session thread, awaited instead of blocked on.

    Heartbeats and reconnects run on the session thread, never on the event loop, so a coroutine that
    blocks the loop for longer than a TTL does not lose its lease. Cancelling a task that waits in
    :meth:`acquire` withdraws its request; a lease may be released from any task or thread.
    """

    def __init__(self, endpoint: Endpoints | None = None, **kwargs: Any) -> None:
        self._sync = Client(endpoint, **kwargs)
        self._core = self._sync._core

    async def acquire(
        self,
        pool: str,
        *,
        priority: int | None = None,
        started_at: datetime | float | None = None,
        ttl: float | None = None,
        max_wait: float | None = None,
        holder: str | None = None,
    ) -> Lease:
        """Waits for a slot on ``pool``.

        Cancel safety: cancelling the awaiting task withdraws the request (it leaves the queue); a
        grant that crossed the cancel is released at once.
        """
        core = self._core
        core.check_usable()
        spec = core.spec(pool, priority, started_at, ttl, max_wait, holder)
        _, fut = core.session.acquire(spec)
        try:
            return await asyncio.wrap_future(fut)
        except BaseException:
            _withdraw(fut)
            raise

    async def release(self, lease: Lease, outcome: Outcome | None = None) -> None:
        lease.release(outcome)

    @asynccontextmanager
    async def lease(
        self,
        pool: str,
        *,
        priority: int | None = None,
        started_at: datetime | float | None = None,
        ttl: float | None = None,
        max_wait: float | None = None,
        holder: str | None = None,
    ) -> AsyncIterator[Lease]:
        """``async with client.lease(pool) as lease:``; see :meth:`Client.lease`."""
        lease = await self.acquire(
            pool, priority=priority, started_at=started_at, ttl=ttl, max_wait=max_wait, holder=holder
        )
        try:
            yield lease
        except BaseException as e:
            lease._exit(e)
            raise
        lease._exit(None)

    def pauses(self) -> dict[str, Pause]:
        return self._sync.pauses()

    async def status(self, pool: str = "", *, timeout: float = 5.0) -> pb.StatusResponse:
        return await asyncio.to_thread(self._sync.status, pool, timeout=timeout)

    async def report_rate_limit(
        self, pool: str, retry_after: float | None = None, reason: str = ""
    ) -> pb.ReportRateLimitResponse:
        return await asyncio.to_thread(self._sync.report_rate_limit, pool, retry_after, reason)

    async def close(self, timeout: float | None = None) -> bool:
        """See :meth:`Client.close`; waits in a worker thread, not on the loop."""
        return await asyncio.to_thread(self._sync.close, timeout)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


__all__ = ["AsyncClient", "Client", "Lease", "SlotdError"]
