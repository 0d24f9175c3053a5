"""Benchmarks of the Python client against a real daemon (numbers for docs/BENCHMARKS.md).

1. acquire+release cycle latency (p50/p99) through ``slotd.Client`` on a one-slot pool (each cycle's
   acquire also waits for the previous release to be applied), against a bare grpcio unary round
   trip (``Status``) to the same daemon in the same run;
2. the CPU the client's threads spend keeping 1,000 leases alive (heartbeats at a third of a 3 s TTL);
3. how long after ``kill -9`` of a client process holding a lease the daemon shows the slot free.

    python python/bench/bench_client.py [--slotd target/release/slotd] [--cycles 3000] [--hold 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

import slotd
from slotd.v1 import slotd_pb2, slotd_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
CONFIG = """
[pools.bench]
max_concurrent = 1
default_ttl = "30s"

[pools.many]
max_concurrent = 1000
default_ttl = "3s"
"""


def start(exe: str, tmp: Path) -> tuple[subprocess.Popen[str], str]:
    cfg = tmp / "bench.toml"
    cfg.write_text(CONFIG)
    args = [exe, "--config", str(cfg), "--listen", "127.0.0.1:0", "--restart-marker", "none"]
    args += ["--state-dir", str(tmp), "--log-format", "json"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        try:
            addr = json.loads(line).get("fields", {}).get("addr")
        except json.JSONDecodeError:
            continue
        if addr:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
            return proc, addr
    raise SystemExit("slotd exited before logging its address")


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] * 1e6


def thread_cpu(native_ids: list[int]) -> float:
    """User+system CPU seconds of the given threads of this process (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for tid in native_ids:
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / tick


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = REPO / "target" / "release" / "slotd"
    if not default.exists():
        default = REPO / "target" / "debug" / "slotd"
    ap.add_argument("--slotd", default=str(default))
    ap.add_argument("--cycles", type=int, default=3000)
    ap.add_argument("--hold", type=float, default=10.0, help="seconds to hold the 1,000 leases")
    ap.add_argument("--kills", type=int, default=10, help="client processes to kill -9 while holding")
    ns = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        proc, addr = start(ns.slotd, Path(tmp))
        try:
            run(addr, ns)
        finally:
            proc.kill()
            proc.wait()


def run(addr: str, ns: argparse.Namespace) -> None:
    print(f"slotd {ns.slotd}, python {sys.version.split()[0]}, grpcio {grpc.__version__}")
    client = slotd.Client(addr)
    channel = grpc.insecure_channel(addr)
    stub = slotd_pb2_grpc.SlotdStub(channel)  # type: ignore[no-untyped-call]
    req = slotd_pb2.StatusRequest(pool="bench")
    for _ in range(200):  # warm up both paths
        stub.Status(req)
        client.acquire("bench").release()

    # Interleaved rounds, so that both paths see the same machine load.
    cycle: list[float] = []
    unary: list[float] = []
    for _ in range(ns.cycles):
        t = time.perf_counter()
        stub.Status(req)
        unary.append(time.perf_counter() - t)
        t = time.perf_counter()
        lease = client.acquire("bench")
        lease.release()
        cycle.append(time.perf_counter() - t)
    p50c, p99c, p50u, p99u = pct(cycle, 50), pct(cycle, 99), pct(unary, 50), pct(unary, 99)
    print(
        f"acquire+release cycle: p50 {p50c:.0f} us  p99 {p99c:.0f} us  "
        f"(mean {statistics.mean(cycle) * 1e6:.0f} us)"
    )
    print(
        f"bare grpcio unary:     p50 {p50u:.0f} us  p99 {p99u:.0f} us  "
        f"(mean {statistics.mean(unary) * 1e6:.0f} us)"
    )
    print(f"ratio p50 {p50c / p50u:.2f}x  p99 {p99c / p99u:.2f}x")

    # 1,000 held leases: the client's own threads' CPU while heartbeats keep them.
    leases = [client.acquire("many") for _ in range(1000)]
    session = client._core.session
    time.sleep(1.0)  # let the grant burst settle
    ids = [t.native_id for t in threading.enumerate() if t.name.startswith("slotd-") and t.native_id]
    cpu0, proc0, wall0 = thread_cpu(ids), time.process_time(), time.monotonic()
    time.sleep(ns.hold)
    cpu1, proc1, wall1 = thread_cpu(ids), time.process_time(), time.monotonic()
    lost = sum(lease.lost.is_set() for lease in leases)
    held = len(client.status("many").leases)
    wall = wall1 - wall0
    print(
        f"1000 leases held {wall:.1f}s (ttl 3s, heartbeats every 1s): client threads "
        f"{(cpu1 - cpu0) / wall * 100:.2f}% of a core, whole process {(proc1 - proc0) / wall * 100:.2f}%; "
        f"lost {lost}, held {held}"
    )
    assert session is not None
    for lease in leases:
        lease.release()

    # kill -9 of a client process holding a lease: time until the daemon shows the slot free.
    freed = []
    for _ in range(ns.kills):
        child = subprocess.Popen([sys.executable, "-c", CHILD, addr], stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        child.stdout.readline()
        t = time.perf_counter()
        child.kill()
        while next(p.in_flight for p in stub.Status(req).pools if p.name == "bench") != 0:
            time.sleep(0.0005)
        freed.append(time.perf_counter() - t)
        child.wait()
    print(
        f"kill -9 of a client holding a lease -> slot free: median {statistics.median(freed) * 1e3:.1f} ms, "
        f"max {max(freed) * 1e3:.1f} ms over {len(freed)} kills"
    )
    client.close()
    channel.close()


CHILD = """
import sys, time, slotd
client = slotd.Client(sys.argv[1])
client.acquire("bench")
print("held", flush=True)
time.sleep(60)
"""


if __name__ == "__main__":
    main()
