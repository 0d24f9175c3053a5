"""httpx transports that hold a slotd lease for every request, until its response is done.

::

    import httpx, slotd, slotd.httpx
    client = slotd.Client()
    http = httpx.Client(transport=slotd.httpx.LeaseTransport(client, pool="anthropic"))

The lease is taken before the request is sent and released when the response is closed or fully
read (streams included), so a streamed answer holds its slot until its last byte. The release
carries the outcome read from the answer (429 with ``Retry-After`` as seconds or an HTTP date pauses
the pool for everyone; 529/503 overloaded; 402 quota; other 5xx error), the provider's rate-limit
headers, and the usage found in the body. A request that fails, or a body cut mid-way, releases the
lease with ``ERROR``; one abandoned before its end, with ``CANCELLED``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx

from slotd._client import AsyncClient, Client, Lease
from slotd._http import MAX_ERROR_BODY, UsageScanner, classify, provider_limits
from slotd._types import Outcome

__all__ = ["AsyncLeaseTransport", "LeaseTransport"]


class _Tracker:
    """The lease of one response, and how its body went; releases exactly once."""

    def __init__(self, lease: Lease, response: httpx.Response, outcome: Outcome, retry: float | None) -> None:
        self.lease = lease
        self.outcome = outcome
        self.retry = retry
        self.scanner = UsageScanner(response.headers.get("content-type"))
        self.lease.settle(limits=provider_limits(response.headers, time.time()))
        self._done = threading.Lock()
        self._finished = False

    def feed(self, chunk: bytes) -> None:
        self.scanner.feed(chunk)

    def finish(self, outcome: Outcome | None = None) -> None:
        with self._done:
            if self._finished:
                return
            self._finished = True
        final = self.outcome if outcome is None or self.outcome != Outcome.OK else outcome
        usage = self.scanner.finish()
        if usage is not None:
            self.lease.settle(usage=usage)
        if final in (Outcome.RATE_LIMITED, Outcome.OVERLOADED, Outcome.QUOTA_EXHAUSTED):
            self.lease._set(final, self.retry)
            self.lease.release()
        else:
            self.lease.release(final)


class _LeaseStream(httpx.SyncByteStream):
    def __init__(self, inner: httpx.SyncByteStream, tracker: _Tracker) -> None:
        self._inner = inner
        self._tracker = tracker

    def __iter__(self) -> Iterator[bytes]:
        try:
            for chunk in self._inner:
                self._tracker.feed(chunk)
                yield chunk
        except GeneratorExit:
            self._tracker.finish(Outcome.CANCELLED)
            raise
        except BaseException:
            self._tracker.finish(Outcome.ERROR)
            raise
        self._tracker.finish()

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            # Closed before the end (the caller stopped reading): the call did not complete.
            self._tracker.finish(Outcome.CANCELLED)


class _AsyncLeaseStream(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, tracker: _Tracker) -> None:
        self._inner = inner
        self._tracker = tracker

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                self._tracker.feed(chunk)
                yield chunk
        except GeneratorExit:
            self._tracker.finish(Outcome.CANCELLED)
            raise
        except BaseException as e:
            self._tracker.finish(Outcome.CANCELLED if _is_cancel(e) else Outcome.ERROR)
            raise
        self._tracker.finish()

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            self._tracker.finish(Outcome.CANCELLED)


def _is_cancel(e: BaseException) -> bool:
    import asyncio

    return isinstance(e, (asyncio.CancelledError, KeyboardInterrupt))


class LeaseTransport(httpx.BaseTransport):
    """A sync httpx transport: one lease per request on ``pool``, held until the response is done.

    ``transport`` is the transport that really sends (default ``httpx.HTTPTransport()``); the other
    keyword arguments are those of :meth:`slotd.Client.acquire`.
    """

    def __init__(
        self,
        client: Client,
        *,
        pool: str,
        priority: int | None = None,
        ttl: float | None = None,
        max_wait: float | None = None,
        holder: str | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._client = client
        self._pool = pool
        self._acquire: dict[str, Any] = {
            "priority": priority,
            "ttl": ttl,
            "max_wait": max_wait,
            "holder": holder,
        }
        self._inner = transport or httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        lease = self._client.acquire(self._pool, **self._acquire)
        try:
            response = self._inner.handle_request(request)
            if response.status_code == 429:
                # A 429 is answered at once (it pauses the pool for everyone): read its small error
                # body (a quota 429 reads differently), release, and hand the caller the bytes.
                body = response.read()
                response.close()
                outcome, retry = classify(429, response.headers, body[:MAX_ERROR_BODY])
                _Tracker(lease, response, outcome, retry).finish()
                return httpx.Response(
                    429,
                    headers=response.headers,
                    content=body,
                    request=request,
                    extensions=response.extensions,
                )
        except BaseException as e:
            lease.release(Outcome.CANCELLED if _is_cancel(e) else Outcome.ERROR)
            raise
        outcome, retry = classify(response.status_code, response.headers)
        tracker = _Tracker(lease, response, outcome, retry)
        assert isinstance(response.stream, httpx.SyncByteStream)
        response.stream = _LeaseStream(response.stream, tracker)
        return response

    def close(self) -> None:
        self._inner.close()


class AsyncLeaseTransport(httpx.AsyncBaseTransport):
    """The asyncio twin of :class:`LeaseTransport`, over an :class:`slotd.AsyncClient`."""

    def __init__(
        self,
        client: AsyncClient,
        *,
        pool: str,
        priority: int | None = None,
        ttl: float | None = None,
        max_wait: float | None = None,
        holder: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._client = client
        self._pool = pool
        self._acquire: dict[str, Any] = {
            "priority": priority,
            "ttl": ttl,
            "max_wait": max_wait,
            "holder": holder,
        }
        self._inner = transport or httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        lease = await self._client.acquire(self._pool, **self._acquire)
        try:
            response = await self._inner.handle_async_request(request)
            if response.status_code == 429:
                body = await response.aread()
                await response.aclose()
                outcome, retry = classify(429, response.headers, body[:MAX_ERROR_BODY])
                _Tracker(lease, response, outcome, retry).finish()
                return httpx.Response(
                    429,
                    headers=response.headers,
                    content=body,
                    request=request,
                    extensions=response.extensions,
                )
        except BaseException as e:
            lease.release(Outcome.CANCELLED if _is_cancel(e) else Outcome.ERROR)
            raise
        outcome, retry = classify(response.status_code, response.headers)
        tracker = _Tracker(lease, response, outcome, retry)
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _AsyncLeaseStream(response.stream, tracker)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()
