"""AsyncClient: cancel-safe acquires, release from another task, heartbeats that a blocked loop
cannot starve."""

from __future__ import annotations

import asyncio
import time

import pytest
from conftest import Daemon, eventually

import slotd


async def test_cancel_while_queued_leaves_the_queue(daemon: Daemon) -> None:
    async with slotd.AsyncClient(daemon.addr) as c:
        held = await c.acquire("one")
        waiter = asyncio.create_task(c.acquire("one"))
        await asyncio.to_thread(eventually, lambda: c._sync.status("one").pools[0].queued == 1, "queued")
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await asyncio.to_thread(
            eventually, lambda: c._sync.status("one").pools[0].queued == 0, "left the queue"
        )
        held.release()
        # Nobody is granted the freed slot: the cancelled request really left.
        await asyncio.to_thread(eventually, lambda: daemon.in_flight("one") == 0, "slot free")
        again = await c.acquire("one", max_wait=0)
        again.release()


async def test_release_from_another_task(daemon: Daemon) -> None:
    async with slotd.AsyncClient(daemon.addr) as c:
        async with c.lease("one") as lease:
            await asyncio.create_task(c.release(lease))
            await asyncio.to_thread(
                eventually, lambda: daemon.in_flight("one") == 0, "released by the other task"
            )
        assert lease.released


async def test_busy_event_loop_does_not_lose_the_lease(daemon: Daemon) -> None:
    async with slotd.AsyncClient(daemon.addr) as c:
        async with c.lease("short", ttl=0.3) as lease:
            assert lease.ttl == pytest.approx(0.3)
            time.sleep(1.0)  # blocks the loop for more than three TTLs
            assert not lease.lost.is_set()
            status = await c.status("short")
            assert [s.lease_id for s in status.leases] == [lease.id]
        await asyncio.to_thread(eventually, lambda: daemon.in_flight("short") == 0, "released")


async def test_async_with_exception_releases_error(daemon: Daemon) -> None:
    async with slotd.AsyncClient(daemon.addr) as c:
        with pytest.raises(KeyError):
            async with c.lease("one") as lease:
                raise KeyError("x")
        assert lease.report is not None and lease.report.outcome == slotd.Outcome.ERROR
        await asyncio.to_thread(eventually, lambda: daemon.in_flight("one") == 0, "released")
