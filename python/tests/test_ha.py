"""High availability: the client follows the leader of three real members on a real etcd.

A client given every member's address finds the leader through a standby's redirect, resumes its
leases on the new leader after a SIGKILL of the old one (same lease id and fencing token, released
cleanly there), keeps serving cycling threads across the failover without ever exceeding the limit,
and answers unary calls made through a standby. (Rust: ``tests/ha.rs``,
``clients_follow_the_leader_through_a_failover``.)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import eventually
from ha_cluster import FAILOVER_TIMEOUT, Cluster

import slotd

#: What the failover tests give the client: leases kept across the cut (see the README's "High
#: availability"), and a reconnect backoff well inside the new leader's learning period.
HA = {
    "resume_grace": slotd.Client.FAILOVER_RESUME_GRACE,
    "backoff_initial": 0.02,
    "backoff_max": 0.2,
    "connect_timeout": 2 * FAILOVER_TIMEOUT,
}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, limit=2)
    yield c
    c.stop()


def others_first(c: Cluster, lead: int) -> list[str]:
    """Every member's address, the leader last."""
    return [c.addr(i) for i in c.live() if i != lead] + [c.addr(lead)]


def held(addr: str, pool: str = "p") -> list[str]:
    """Lease ids the member at ``addr`` (the leader) shows held on ``pool``."""
    with slotd.Client(addr) as c:
        return [s.lease_id for s in c.status(pool, timeout=5).leases]


def test_client_given_every_member_acquires_on_the_leader(cluster: Cluster) -> None:
    lead = cluster.leader()
    endpoints = others_first(cluster, lead)
    with slotd.Client(endpoints=endpoints) as c:
        with c.lease("p", max_wait=FAILOVER_TIMEOUT) as lease:
            assert held(cluster.addr(lead)) == [lease.id]
            assert c._core.session.members.current()[0] == cluster.addr(lead)
    eventually(lambda: held(cluster.addr(lead)) == [], "released on the leader")
    # A comma-separated string works the same.
    with slotd.Client(",".join(endpoints)) as c:
        c.acquire("p", max_wait=FAILOVER_TIMEOUT).release()


async def test_async_client_given_every_member_acquires_on_the_leader(cluster: Cluster) -> None:
    lead = cluster.leader()
    async with slotd.AsyncClient(endpoints=others_first(cluster, lead)) as c:
        async with c.lease("p", max_wait=FAILOVER_TIMEOUT) as lease:
            status = await c.status("p")
            assert [s.lease_id for s in status.leases] == [lease.id]


# Without a grace too: the new leader re-adopts by the credential, whatever the dead leader kept.
@pytest.mark.parametrize("grace", [slotd.Client.FAILOVER_RESUME_GRACE, None], ids=["grace", "no-grace"])
def test_lease_held_across_a_leader_kill_is_resumed_on_the_new_leader(
    cluster: Cluster, grace: float | None
) -> None:
    lead = cluster.leader()
    lost: list[slotd.LeaseLost] = []
    kwargs = {**HA, "resume_grace": grace, "on_lost": lambda _l, e: lost.append(e)}
    with slotd.Client(endpoints=others_first(cluster, lead), **kwargs) as c:  # type: ignore[arg-type]
        lease = c.acquire("p", max_wait=FAILOVER_TIMEOUT)
        token = lease.fencing_token
        cluster.kill(lead)
        new = cluster.leader()
        assert new != lead
        # Re-presented on the new leader with its credential: the same lease, the same token.
        eventually(lambda: held(cluster.addr(new)) == [lease.id], "the lease resumed on the new leader",
                   timeout=FAILOVER_TIMEOUT)  # fmt: skip
        with slotd.Client(cluster.addr(new)) as probe:
            s = probe.status("p").leases[0]
            assert s.fencing_token == token
        # Renewed there: still held past its TTL.
        time.sleep(lease.ttl + 0.5)
        assert held(cluster.addr(new)) == [lease.id]
        assert not lease.lost.is_set() and not lost, lost
        lease.release()
        eventually(lambda: held(cluster.addr(new)) == [], "released on the new leader")
        assert c.close(), "the release was acknowledged"
    assert not lost, lost


def test_clients_follow_the_leader_through_a_failover(cluster: Cluster) -> None:
    """Conformance (docs/CLIENTS.md): threads cycling leases are all served again after a SIGKILL of
    the leader, never more holders than the limit by fencing token, new-term tokens above the old."""
    limit, workers = 2, 4
    lead = cluster.leader()
    endpoints = others_first(cluster, lead)
    claims: list[tuple[int, int, float, float]] = []  # (worker, fencing token, from, to)
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            with slotd.Client(endpoints=endpoints, holder=f"worker-{n}", **HA) as c:  # type: ignore[arg-type]
                while not stop.is_set():
                    with c.lease("p", max_wait=2 * FAILOVER_TIMEOUT) as lease:
                        start = time.monotonic()
                        time.sleep(0.02)
                        with lock:
                            claims.append((n, lease.fencing_token, start, time.monotonic()))
        except BaseException as e:  # noqa: BLE001 - reported by the test thread
            errors.append(e)

    def served(after: float) -> bool:
        with lock:
            return all(any(w == n and t0 > after for w, _, t0, _ in claims) for n in range(workers))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(workers)]
    for t in threads:
        t.start()
    try:
        start = time.monotonic()
        eventually(lambda: served(start) or bool(errors), "every worker served before the failover")
        cluster.kill(lead)
        killed = time.monotonic()
        eventually(lambda: served(killed) or bool(errors), "every worker served again after the failover",
                   timeout=2 * FAILOVER_TIMEOUT)  # fmt: skip
    finally:
        stop.set()
        for t in threads:
            t.join(2 * FAILOVER_TIMEOUT)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)

    # The auditor: never more claims at once than the limit.
    edges = sorted([(t0, 1) for _, _, t0, _ in claims] + [(t1, -1) for _, _, _, t1 in claims])
    now = most = 0
    for _, d in edges:
        now += d
        most = max(most, now)
    assert most <= limit, f"{most} holders at once, limit {limit}"
    # Fencing tokens are unique, and the new term's (a higher epoch in the high bits) come after the kill.
    tokens = [tok for _, tok, _, _ in claims]
    assert len(set(tokens)) == len(tokens), "a fencing token was granted twice"
    old_epoch = max(tok >> 32 for _, tok, t0, _ in claims if t0 < killed)
    after = [(tok, t0) for _, tok, t0, _ in claims if tok >> 32 > old_epoch]
    assert after, "no grant on the new leader"
    assert all(t0 > killed for _, t0 in after), "a new-term grant before the kill"


def test_unary_calls_through_a_standby_are_answered_by_the_leader(cluster: Cluster) -> None:
    lead = cluster.leader()
    standby = next(i for i in cluster.live() if i != lead)
    with slotd.Client(cluster.addr(standby)) as c:
        status = c.status("p")
        assert [p.name for p in status.pools] == ["p"]
        assert c._core.session.members.current()[0] == cluster.addr(lead)
    with slotd.Client(cluster.addr(standby)) as c:
        c.report_rate_limit("p", retry_after=30, reason="seen through a standby")
    with slotd.Client(cluster.addr(lead)) as c:
        pool = c.status("p").pools[0]
        assert pool.pause_reason and pool.paused_until.seconds > time.time()
    # Through an election: the standbys name the dead leader, then none, then the new one; the call
    # goes round them (with a jittered pause after each round) until the new leader answers.
    standbys = [cluster.addr(i) for i in cluster.live() if i != lead]
    with slotd.Client(endpoints=standbys, backoff_initial=0.02, backoff_max=0.2) as c:
        cluster.kill(lead)
        status = c.status("p", timeout=FAILOVER_TIMEOUT)
        assert [p.name for p in status.pools] == ["p"]
        assert c._core.session.members.current()[0] == cluster.addr(cluster.leader())


def test_a_client_given_one_standby_follows_the_leader_and_comes_back_after_it_dies(
    cluster: Cluster,
) -> None:
    lead = cluster.leader()
    standby = next(i for i in cluster.live() if i != lead)
    with slotd.Client(cluster.addr(standby), **HA) as c:  # type: ignore[arg-type]
        lease = c.acquire("p", max_wait=FAILOVER_TIMEOUT)
        assert held(cluster.addr(lead)) == [lease.id]
        cluster.kill(lead)
        new = cluster.leader()
        # Through the one configured member again, to whichever leads now.
        eventually(lambda: held(cluster.addr(new)) == [lease.id], "the lease resumed on the new leader",
                   timeout=FAILOVER_TIMEOUT)  # fmt: skip
        assert c._core.session.members.current()[0] == cluster.addr(new)
        assert not lease.lost.is_set()
        lease.release()
        eventually(lambda: held(cluster.addr(new)) == [], "released on the new leader")
