"""Leases through the real daemon: with-blocks, acquire/release, idempotence, errors, pauses."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from conftest import DEFAULT_CONFIG, Daemon, eventually

import slotd


def test_with_block_releases_ok(daemon: Daemon) -> None:
    with daemon.client() as c:
        with c.lease("anthropic", priority=7, started_at=time.time(), ttl=30, max_wait=120) as lease:
            assert len(lease.id) == 32 and lease.fencing_token > 0 and lease.pool == "anthropic"
            assert lease.ttl == 30 and not lease.lost.is_set()
            assert daemon.in_flight("anthropic") == 1
            held = [s for s in c.status().leases if s.lease_id == lease.id]
            assert held and held[0].priority == 7
        assert lease.report is not None and lease.report.outcome == slotd.Outcome.OK
        eventually(lambda: daemon.in_flight("anthropic") == 0, "released on leaving the block")


def test_exception_releases_with_error(daemon: Daemon) -> None:
    with daemon.client() as c:
        with pytest.raises(RuntimeError), c.lease("anthropic") as lease:
            raise RuntimeError("provider call failed")
        assert lease.report is not None and lease.report.outcome == slotd.Outcome.ERROR
        eventually(lambda: daemon.in_flight("anthropic") == 0, "released after the exception")


def test_recorded_outcome_survives_an_exception(daemon: Daemon) -> None:
    with daemon.client() as c:
        with pytest.raises(ValueError), c.lease("anthropic") as lease:
            lease.rate_limited(retry_after=2)
            raise ValueError("429")
        assert lease.report is not None and lease.report.outcome == slotd.Outcome.RATE_LIMITED
        eventually(
            lambda: c.status("anthropic").pools[0].HasField("paused_until"), "pool paused by the release"
        )


def test_acquire_release_from_another_thread_is_idempotent(daemon: Daemon) -> None:
    with daemon.client() as c:
        lease = c.acquire("one")
        threads = [threading.Thread(target=lease.release) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        c.release(lease)
        lease.release()
        # The one slot is free again: a zero-wait acquire gets it.
        again = c.acquire("one", max_wait=0)
        again.release()
        eventually(lambda: daemon.in_flight("one") == 0, "every release applied once")


def test_rejected_carries_the_code(daemon: Daemon) -> None:
    with daemon.client() as c:
        with pytest.raises(slotd.Rejected) as e:
            c.acquire("no-such-pool")
        assert e.value.code == grpc.StatusCode.NOT_FOUND
        assert "no-such-pool" in str(e.value)
        held = c.acquire("one")
        with pytest.raises(slotd.Rejected) as e:
            c.acquire("one", max_wait=0)
        assert e.value.code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert isinstance(e.value, slotd.SlotdError)
        held.release()


def test_bad_arguments_are_refused_locally(daemon: Daemon) -> None:
    with daemon.client() as c:
        for kwargs in ({"priority": 10}, {"ttl": 0}, {"ttl": -1}, {"max_wait": float("nan")}, {"ttl": 1e12}):
            with pytest.raises(ValueError):
                c.acquire("anthropic", **kwargs)  # type: ignore[arg-type]
        with pytest.raises(slotd.Rejected) as e:
            c.acquire("anthropic", ttl=3600 * 24 * 2)  # above the pool's max_ttl
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_unreachable_daemon_is_unavailable() -> None:
    import socket

    s = socket.create_server(("127.0.0.1", 0))
    addr = f"127.0.0.1:{s.getsockname()[1]}"
    s.close()  # nothing listens there now
    with slotd.Client(addr, connect_timeout=0.3) as c, pytest.raises(slotd.Unavailable):
        c.acquire("anthropic")
    with slotd.Client(addr) as c, pytest.raises(slotd.Unavailable):
        c.status(timeout=1)


def test_closed_client_refuses(daemon: Daemon) -> None:
    c = daemon.client()
    assert c.close() is True
    assert c.close() is True  # idempotent
    with pytest.raises(slotd.ClientClosed):
        c.acquire("anthropic")


def test_local_timeout_withdraws_the_request(daemon: Daemon) -> None:
    with daemon.client() as c:
        held = c.acquire("one")
        with pytest.raises(TimeoutError):
            c.acquire("one", timeout=0.05)
        eventually(lambda: c.status("one").pools[0].queued == 0, "the timed-out request left the queue")
        held.release()
        eventually(lambda: daemon.in_flight("one") == 0, "nothing granted to the withdrawn request")


def test_pauses_show_the_pool_pause(daemon: Daemon) -> None:
    with daemon.client() as c, daemon.client() as other:
        lease = c.acquire("anthropic")
        other.report_rate_limit("anthropic", retry_after=2, reason="test")
        eventually(lambda: "anthropic" in c.pauses(), "the pause pushed to a holder")
        pause = c.pauses()["anthropic"]
        assert pause.until.timestamp() > time.time() and pause.reason
        lease.release()


def test_bearer_token(daemon_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    token = tmp_path / "agent.token"
    token.write_text("s3cret-token\n")
    token.chmod(0o600)
    d = daemon_factory(DEFAULT_CONFIG, "--agent-token-file", str(token))
    with slotd.Client(d.addr, token="s3cret-token") as c:
        c.acquire("one").release()
    for wrong in (None, "guess"):
        with slotd.Client(d.addr, token=wrong) as c:
            with pytest.raises(slotd.Rejected) as e:
                c.acquire("one")
            assert e.value.code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
            with pytest.raises(slotd.Rejected):
                c.status()
    with pytest.raises(ValueError):
        slotd.Client(d.addr, token="line\nbreak")
