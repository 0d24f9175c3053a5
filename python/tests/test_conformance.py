"""The client conformance scenarios of docs/CLIENTS.md, for the Python client (the Rust client runs
the same scenarios in client/tests/conformance.rs, under the same names)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import httpx
import pytest
from conftest import Daemon, eventually
from support import Provider, Proxy

import slotd
import slotd.httpx
from slotd.v1 import admin_pb2, admin_pb2_grpc


@pytest.fixture
def provider() -> Iterator[Provider]:
    p = Provider()
    yield p
    p.close()


def test_abort_mid_body(daemon: Daemon, provider: Provider) -> None:
    """A response body that fails (or is abandoned) half-way gives its lease back."""
    with daemon.client() as c, httpx.Client(transport=slotd.httpx.LeaseTransport(c, pool="one")) as http:
        with pytest.raises(httpx.RemoteProtocolError), http.stream("POST", f"{provider.url}/cut") as r:
            assert daemon.in_flight("one") == 1
            for _ in r.iter_bytes():
                pass
        eventually(lambda: daemon.in_flight("one") == 0, "the cut body's lease released")
        with http.stream("POST", f"{provider.url}/stream") as r:
            lines = r.iter_lines()
            next(lines)
            assert daemon.in_flight("one") == 1
        eventually(lambda: daemon.in_flight("one") == 0, "the abandoned body's lease released")
        provider.release_stream.set()


def test_retry_backoff_outside_the_lease(daemon: Daemon, provider: Provider) -> None:
    """After a 429 the caller's backoff runs with no slot held, and the retry takes a new lease."""
    tokens: list[int] = []
    with daemon.client() as c:
        acquire = c.acquire

        def spy(*a: object, **k: object) -> slotd.Lease:
            lease = acquire(*a, **k)  # type: ignore[arg-type]
            tokens.append(lease.fencing_token)
            return lease

        c.acquire = spy  # type: ignore[method-assign]
        with httpx.Client(transport=slotd.httpx.LeaseTransport(c, pool="one")) as http:
            first = http.post(f"{provider.url}/429-once")
            assert first.status_code == 429
            # The backoff (as an SDK's retry loop would sleep): nobody holds the slot meanwhile. The
            # release travels on the stream, so it is seen by Status shortly after the response.
            eventually(lambda: daemon.in_flight("one") == 0, "the 429 attempt's lease released")
            time.sleep(0.1)
            assert daemon.in_flight("one") == 0
            retry = http.post(f"{provider.url}/429-once")
            assert retry.status_code == 200
    assert len(tokens) == 2 and tokens[1] > tokens[0], tokens
    eventually(lambda: daemon.in_flight("one") == 0, "idle")


def test_reconnect_re_presents_leases(daemon: Daemon) -> None:
    """After a connection cut the client resumes each held lease with its credential (same id and
    token, never reported lost), and heartbeats keep it past its TTL."""
    proxy = Proxy(daemon.addr)
    try:
        with slotd.Client(proxy.addr, resume_grace=3, backoff_initial=0.01, backoff_max=0.1) as c:
            lease = c.acquire("one", ttl=0.3)
            for _ in range(3):
                proxy.cut()
                time.sleep(0.1)
            time.sleep(0.6)  # three TTLs after the first cut: only a resumed, renewed lease is left
            with slotd.Client(daemon.addr) as observer:
                leases = list(observer.status("one").leases)
            assert [(s.lease_id, s.fencing_token) for s in leases] == [(lease.id, lease.fencing_token)]
            assert not lease.lost.is_set()
            lease.release()
            assert c.close() is True
        assert daemon.in_flight("one") == 0
    finally:
        proxy.close()


def test_lost_lease_is_signalled(daemon: Daemon) -> None:
    """Revoked by an operator, the holder learns it: ``lease.lost`` is set and the callbacks run."""
    called = threading.Event()
    with daemon.client(on_lost=lambda _lease, _err: called.set()) as c:
        lease = c.acquire("one")
        with grpc.insecure_channel(daemon.addr) as ch:
            admin_pb2_grpc.AdminStub(ch).RevokeLease(
                admin_pb2.RevokeLeaseRequest(lease_id=lease.id), timeout=5
            )
        assert lease.lost.wait(10) and called.wait(10)
        with pytest.raises(slotd.LeaseLost, match="revoked"):
            lease.check()


def test_close_flushes_releases(daemon: Daemon) -> None:
    """Leases given back just before ``close()`` are all acknowledged by the daemon when it returns."""
    c = daemon.client()
    leases = [c.acquire("audit") for _ in range(3)]
    assert daemon.in_flight("audit") == 3
    for lease in leases:
        lease.release()
    held = c.acquire("audit")  # never released by hand: close releases it (as cancelled)
    assert c.close() is True
    # No waiting: close returned only after the daemon applied every release.
    assert daemon.in_flight("audit") == 0
    assert held.lost.is_set()
