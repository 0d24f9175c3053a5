"""Connection cuts through a TCP proxy: held leases are resumed with their credential (same id, lost
never set), queued requests are re-sent; a lease that cannot be resumed is signalled as lost."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from conftest import Daemon, eventually
from support import Proxy

import slotd
from slotd.v1 import admin_pb2, admin_pb2_grpc


@pytest.fixture
def proxy(daemon: Daemon) -> Iterator[Proxy]:
    p = Proxy(daemon.addr)
    yield p
    p.close()


def test_reconnect_through_a_cutting_proxy_keeps_the_lease(daemon: Daemon, proxy: Proxy) -> None:
    lost: list[slotd.LeaseLost] = []
    kwargs = {"resume_grace": 5, "backoff_initial": 0.01, "backoff_max": 0.1}
    with slotd.Client(proxy.addr, on_lost=lambda _l, e: lost.append(e), **kwargs) as c:  # type: ignore[arg-type]
        lease = c.acquire("one", ttl=0.8)
        waiter_result: list[slotd.Lease] = []
        waiter = threading.Thread(target=lambda: waiter_result.append(c.acquire("one")))
        waiter.start()
        eventually(
            lambda: daemon.in_flight("one") == 1 and _queued(daemon, "one") == 1, "one held, one queued"
        )
        for cut in range(3):
            before = proxy.accepted
            proxy.cut()
            eventually(lambda b=before: proxy.accepted > b, f"reconnected after cut {cut}")
        # Same lease on the daemon, never reported lost, heartbeats still renewing it after the cuts.
        time.sleep(1.0)  # over a TTL: only heartbeats on the new stream keep it
        eventually(lambda: _queued(daemon, "one") == 1, "the queued request re-sent")
        held = _leases(daemon, "one")
        assert held == [lease.id]
        assert not lease.lost.is_set() and not lost
        lease.release()
        waiter.join(10)
        assert waiter_result and waiter_result[0].id != lease.id
        waiter_result[0].release()
    eventually(lambda: daemon.in_flight("one") == 0, "everything released")


def test_lease_not_resumable_is_signalled_lost(daemon: Daemon, proxy: Proxy) -> None:
    lost: list[tuple[slotd.Lease, slotd.LeaseLost]] = []
    called = threading.Event()

    def on_lost(lease: slotd.Lease, e: slotd.LeaseLost) -> None:
        lost.append((lease, e))
        called.set()

    # No resume grace: the daemon frees the slot the moment the connection drops.
    with slotd.Client(proxy.addr, on_lost=on_lost) as c:
        lease = c.acquire("one")
        proxy.cut()
        assert lease.lost.wait(10), "lost never set"
        assert called.wait(10), "callback never called"
        assert lost and lost[0][0] is lease and lost[0][1].lease_id == lease.id
        assert "could not be resumed" in str(lost[0][1])
        with pytest.raises(slotd.LeaseLost):
            lease.check()
        lease.release()  # harmless
        # The client itself carries on.
        c.acquire("one", max_wait=5).release()


def test_revoked_lease_is_signalled_lost(daemon: Daemon) -> None:
    seen = threading.Event()
    with daemon.client() as c:
        lease = c.acquire("one")
        lease.on_lost(lambda _l, _e: seen.set())
        with grpc.insecure_channel(daemon.addr) as ch:
            admin_pb2_grpc.AdminStub(ch).RevokeLease(
                admin_pb2.RevokeLeaseRequest(lease_id=lease.id), timeout=5
            )
        assert lease.lost.wait(10) and seen.wait(10)
        assert lease.lost_reason is not None and "revoked" in lease.lost_reason.reason


def _queued(daemon: Daemon, pool: str) -> int:
    with slotd.Client(daemon.addr) as c:
        return c.status(pool).pools[0].queued


def _leases(daemon: Daemon, pool: str) -> list[str]:
    with slotd.Client(daemon.addr) as c:
        return [s.lease_id for s in c.status(pool).leases]
