"""100 threads x 50 cycles on one client: no leak, never more than the limit (an auditor watches)."""

from __future__ import annotations

import threading

from conftest import Daemon

import slotd

THREADS = 100
CYCLES = 50
LIMIT = 5  # the `audit` pool's max_concurrent


def test_100_threads_50_cycles_no_leak_never_over_limit(daemon: Daemon) -> None:
    holders = 0
    peak = 0
    lock = threading.Lock()
    errors: list[BaseException] = []
    status_peak = 0
    stop = threading.Event()

    def auditor() -> None:
        # The daemon's own count, sampled while the load runs, must never pass the limit either.
        nonlocal status_peak
        with slotd.Client(daemon.addr) as watcher:
            while not stop.is_set():
                n = next(p.in_flight for p in watcher.status("audit").pools if p.name == "audit")
                status_peak = max(status_peak, n)
                stop.wait(0.002)

    with daemon.client() as client:

        def worker() -> None:
            nonlocal holders, peak
            try:
                for _ in range(CYCLES):
                    with client.lease("audit") as lease:
                        with lock:
                            holders += 1
                            peak = max(peak, holders)
                        assert not lease.lost.is_set()
                        with lock:
                            holders -= 1
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        watch = threading.Thread(target=auditor)
        watch.start()
        threads = [threading.Thread(target=worker) for _ in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stop.set()
        watch.join()
        assert not errors, errors[:3]
        assert 1 <= peak <= LIMIT, peak
        assert status_peak <= LIMIT, status_peak
        assert client.close() is True
    status = slotd.Client(daemon.addr)
    try:
        pool = status.status("audit").pools[0]
        assert pool.in_flight == 0 and pool.queued == 0, pool
        assert not [lease for lease in status.status().leases if lease.pool == "audit"]
    finally:
        status.close()
