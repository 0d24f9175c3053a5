"""The httpx transports against a fake provider: a lease per request, held until the response is done,
the outcome read from the answer, usage and rate-limit headers forwarded."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest
from conftest import Daemon, eventually
from support import Provider

import slotd
import slotd.httpx
from slotd._http import classify, provider_limits, retry_after


@pytest.fixture
def provider() -> Iterator[Provider]:
    p = Provider()
    yield p
    p.close()


def test_ok_response_releases_after_the_body_with_usage_and_limits(
    daemon: Daemon, provider: Provider
) -> None:
    leases: list[slotd.Lease] = []
    with daemon.client(on_lost=lambda lease, e: None) as c:
        transport = slotd.httpx.LeaseTransport(c, pool="anthropic", priority=6)
        original = c.acquire

        def spy(*a: object, **k: object) -> slotd.Lease:
            lease = original(*a, **k)  # type: ignore[arg-type]
            leases.append(lease)
            return lease

        c.acquire = spy  # type: ignore[method-assign]
        with httpx.Client(transport=transport) as http:
            r = http.post(f"{provider.url}/ok", json={"q": 1})
        assert r.status_code == 200 and r.json()["content"] == "hi"
        (lease,) = leases
        assert lease.released and lease.report is not None
        assert lease.report.outcome == slotd.Outcome.OK
        assert lease.report.usage == slotd.Usage(input_tokens=11, output_tokens=22, cache_read_tokens=3)
        (limit,) = lease.report.limits
        assert (limit.kind, limit.limit, limit.remaining) == (slotd.LimitKind.REQUESTS, 50, 49)
        eventually(lambda: daemon.in_flight("anthropic") == 0, "released once the body was read")


def test_streamed_response_holds_the_lease_until_closed(daemon: Daemon, provider: Provider) -> None:
    with (
        daemon.client() as c,
        httpx.Client(transport=slotd.httpx.LeaseTransport(c, pool="anthropic")) as http,
    ):
        with http.stream("POST", f"{provider.url}/stream") as r:
            lines = r.iter_lines()
            first = next(lines)
            assert first.startswith("event: message_start")
            # Headers and a first event arrived; the body is not over: the slot is still held.
            assert daemon.in_flight("anthropic") == 1
            provider.release_stream.set()
            rest = list(lines)
            assert any("message_delta" in line for line in rest)
        eventually(lambda: daemon.in_flight("anthropic") == 0, "released when the stream ended")


def test_stream_closed_early_releases_the_lease(daemon: Daemon, provider: Provider) -> None:
    with (
        daemon.client() as c,
        httpx.Client(transport=slotd.httpx.LeaseTransport(c, pool="anthropic")) as http,
    ):
        with http.stream("POST", f"{provider.url}/stream") as r:
            lines = r.iter_lines()
            next(lines)
            assert daemon.in_flight("anthropic") == 1
        # Left the block without reading the rest: the response is closed, so is the lease.
        eventually(lambda: daemon.in_flight("anthropic") == 0, "released on close")
        provider.release_stream.set()


def test_429_through_the_transport_pauses_the_pool_for_other_clients(
    daemon: Daemon, provider: Provider
) -> None:
    with daemon.client() as c, daemon.client() as other:
        with httpx.Client(transport=slotd.httpx.LeaseTransport(c, pool="anthropic")) as http:
            r = http.post(f"{provider.url}/429")
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        pool = other.status("anthropic").pools[0]
        eventually(lambda: other.status("anthropic").pools[0].HasField("paused_until"), "the pool paused")
        pool = other.status("anthropic").pools[0]
        assert pool.paused_until.seconds >= int(time.time()) + 1  # Retry-After: 3
        with pytest.raises(slotd.Rejected) as e:
            other.acquire("anthropic", max_wait=0)
        assert e.value.retry_after is not None and e.value.retry_after > 0


def test_429_with_an_http_date_and_529(provider: Provider, daemon: Daemon) -> None:
    with daemon.client() as c:
        with httpx.Client(transport=slotd.httpx.LeaseTransport(c, pool="audit")) as http:
            assert http.post(f"{provider.url}/529").status_code == 529
        eventually(lambda: c.status("audit").pools[0].HasField("paused_until"), "529 pauses too")
        with httpx.Client(transport=slotd.httpx.LeaseTransport(c, pool="anthropic")) as http:
            assert http.post(f"{provider.url}/429-date").status_code == 429
        eventually(lambda: c.status("anthropic").pools[0].HasField("paused_until"), "the pool paused")
        paused_until = c.status("anthropic").pools[0].paused_until.seconds
        assert paused_until >= int(time.time()) + 1  # the date is 4 s ahead


def test_stream_cut_mid_body_leaves_no_lease(daemon: Daemon, provider: Provider) -> None:
    with daemon.client() as c, httpx.Client(transport=slotd.httpx.LeaseTransport(c, pool="one")) as http:
        with pytest.raises(httpx.RemoteProtocolError), http.stream("POST", f"{provider.url}/cut") as r:
            for _ in r.iter_bytes():
                pass
        eventually(lambda: daemon.in_flight("one") == 0, "no lease left after the cut")
        c.acquire("one", max_wait=0).release()


async def test_async_transport_stream_cut_and_ok(daemon: Daemon, provider: Provider) -> None:
    async with slotd.AsyncClient(daemon.addr) as c:
        transport = slotd.httpx.AsyncLeaseTransport(c, pool="one")
        async with httpx.AsyncClient(transport=transport) as http:
            r = await http.post(f"{provider.url}/ok")
            assert r.status_code == 200
            with pytest.raises(httpx.RemoteProtocolError):
                async with http.stream("POST", f"{provider.url}/cut") as r:
                    async for _ in r.aiter_bytes():
                        pass
            r = await asyncio.wait_for(http.post(f"{provider.url}/ok"), 10)  # the one slot is free again
            assert r.status_code == 200
        eventually(lambda: daemon.in_flight("one") == 0, "no lease left")


def test_parsers() -> None:
    now = 1_000_000.0
    assert retry_after({"retry-after": "20"}, now) == 20
    assert retry_after({"retry-after": "Mon, 12 Jan 1970 13:46:50 GMT"}, now) == 10
    assert retry_after({"retry-after": "Thu, 01 Jan 1970 00:00:00 GMT"}, now) == 0
    assert retry_after({"retry-after-ms": "1500", "retry-after": "9"}, now) == 1.5
    assert retry_after({"retry-after": "soon"}, now) is None
    assert retry_after({"retry-after": "-3"}, now) is None
    assert retry_after({"retry-after": "1e300"}, now) == slotd._types.MAX_DURATION
    assert classify(429, {"retry-after": "2"}) == (slotd.Outcome.RATE_LIMITED, 2)
    quota = b'{"error": {"type": "insufficient_quota"}}'
    assert classify(429, {}, quota)[0] == slotd.Outcome.QUOTA_EXHAUSTED
    assert classify(529, {})[0] == classify(503, {})[0] == slotd.Outcome.OVERLOADED
    assert classify(402, {})[0] == slotd.Outcome.QUOTA_EXHAUSTED
    assert classify(500, {})[0] == slotd.Outcome.ERROR
    assert classify(404, {})[0] == classify(200, {})[0] == slotd.Outcome.OK
    limits = provider_limits(
        httpx.Headers(
            {
                "X-RateLimit-Limit-Requests": "60",
                "x-ratelimit-remaining-requests": "59",
                "x-ratelimit-reset-requests": "1s",
                "x-ratelimit-limit-tokens": "150000",
                "x-ratelimit-remaining-tokens": "149984",
                "x-ratelimit-reset-tokens": "6m0s",
            }
        ),
        now,
    )
    assert [(p.kind, p.limit, p.remaining, p.reset_in) for p in limits] == [
        (slotd.LimitKind.REQUESTS, 60, 59, 1.0),
        (slotd.LimitKind.TOKENS, 150000, 149984, 360.0),
    ]
