#!/usr/bin/env python3
"""Optional: the `slotd-bench cycles` loop against slotd, Redis, ZooKeeper and etcd semaphores, all
driven by the same Python asyncio harness, so the systems are compared with clients of one weight.

C sessions, each on its own connection, loop acquire -> hold -> release on K slots for a bounded time,
and report what `slotd-bench cycles` reports: acquire latency p50/p99/p99.9, cycles/s, Jain fairness
over per-session cycles, slot use = held time / (K x wall time) (held = acquire returned -> release
sent, clipped to the measured window).

Kinds:
  slotd       an Acquire stream per session (grpcio asyncio; stubs compiled from proto/ at start);
              release is sent without waiting for Released, as slotd-client's guard does.
  redis-list  K tokens in a list: BLPOP / RPUSH. Queued and fair, but a crashed holder leaks its token.
  redis-zset  the "fair semaphore with timeouts" Lua pattern: holders expire like leases, but a full
              semaphore is polled every --poll seconds (no queue).
  zookeeper   kazoo's Semaphore recipe (Curator's InterProcessSemaphoreV2 design: ephemeral sequential
              nodes, a lock around lease-taking, watches). kazoo is thread-based: one thread per session.
  etcd        the etcd lock recipe generalised to K: one lease per session with keep-alive, a key per
              request under a prefix; a request holds once fewer than K keys are older (create
              revision). Each session watches the prefix for deletions and re-counts on each, so every
              release wakes every waiter (no server-side queue). Over etcd's JSON gateway (httpx).

Loopback only, bounded in time (--duration <= 120 s). Needs (Debian + PyPI):
  apt-get install -y redis-server zookeeperd etcd-server
  pip install grpcio grpcio-tools redis kazoo httpx
See docs/BENCHMARKS.md for the servers' start commands and recorded results.
"""

import argparse
import asyncio
import base64
import concurrent.futures
import json
import os
import sys
import tempfile
import time
import uuid


def pct(xs, q):
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# ---------------------------------------------------------------------------------------------- slotd


def slotd_stubs():
    """Compiles proto/slotd/v1/slotd.proto into a temp dir and imports the generated modules."""
    import grpc_tools
    from grpc_tools import protoc

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "proto")
    out = tempfile.mkdtemp(prefix="slotd-py-")
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    rc = protoc.main(
        ["protoc", f"-I{root}", f"-I{well_known}", f"--python_out={out}", f"--grpc_python_out={out}",
         os.path.join(root, "slotd", "v1", "slotd.proto")]
    )
    if rc != 0:
        sys.exit("cannot compile slotd.proto")
    sys.path.insert(0, out)
    from slotd.v1 import slotd_pb2, slotd_pb2_grpc

    return slotd_pb2, slotd_pb2_grpc


class Slotd:
    def __init__(self, args, stubs):
        import grpc

        self.pb, self.pb_grpc = stubs
        self.args = args
        self.channel = grpc.aio.insecure_channel(args.endpoint)
        self.up = asyncio.Queue()
        self.n = 0

    async def start(self):
        async def messages():
            while True:
                m = await self.up.get()
                if m is None:
                    return
                yield m

        self.down = self.pb_grpc.SlotdStub(self.channel).Acquire(messages())

    async def acquire(self):
        self.n += 1
        rid = str(self.n)
        req = self.pb.LeaseRequest(request_id=rid, pool=self.args.pool, holder="semaphores.py")
        await self.up.put(self.pb.ClientMessage(request=req))
        while True:
            m = await self.down.read()
            kind = m.WhichOneof("msg")
            if kind == "granted" and m.granted.request_id == rid:
                return m.granted.lease_id
            if kind == "rejected":
                raise RuntimeError(f"rejected: {m.rejected.message}")

    async def release(self, lease):
        await self.up.put(self.pb.ClientMessage(release=self.pb.ReleaseLease(lease_id=lease, outcome=1)))

    async def close(self):
        await self.up.put(None)
        self.down.cancel()
        await self.channel.close()


# ---------------------------------------------------------------------------------------------- redis

ACQUIRE_ZSET = """
local key, limit, now, ttl, token = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - ttl)
if redis.call('ZCARD', key) < limit then
  redis.call('ZADD', key, now, token)
  return 1
end
return 0
"""


class Redis:
    def __init__(self, args, shared):
        import redis.asyncio as redis

        self.args, (self.key, self.sha) = args, shared
        self.r = redis.Redis(host="127.0.0.1", port=args.port)

    @staticmethod
    async def setup(args):
        import redis.asyncio as redis

        key = f"slotd-bench:{uuid.uuid4().hex}"
        admin = redis.Redis(host="127.0.0.1", port=args.port)
        sha = await admin.script_load(ACQUIRE_ZSET)
        if args.kind == "redis-list":
            await admin.rpush(key, *([1] * args.slots))
        await admin.close()
        return key, sha

    async def start(self):
        pass

    async def acquire(self):
        if self.args.kind == "redis-list":
            await self.r.blpop([self.key], timeout=0)
            return None
        token = uuid.uuid4().hex
        while await self.r.evalsha(self.sha, 1, self.key, self.args.slots, time.time(), 3600, token) != 1:
            await asyncio.sleep(self.args.poll)
        return token

    async def release(self, token):
        if self.args.kind == "redis-list":
            await self.r.rpush(self.key, 1)
        else:
            await self.r.zrem(self.key, token)

    async def close(self):
        await (self.r.aclose() if hasattr(self.r, "aclose") else self.r.close())


# ------------------------------------------------------------------------------------------ zookeeper


class ZooKeeper:
    """kazoo is blocking: each session's calls run on a thread of its own."""

    def __init__(self, args, path):
        from kazoo.client import KazooClient

        self.args = args
        self.zk = KazooClient(hosts=f"127.0.0.1:{args.port}", timeout=10)
        self.path = path
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    @staticmethod
    async def setup(args):
        return f"/slotd-bench/{uuid.uuid4().hex}"

    async def call(self, f, *a):
        return await asyncio.get_running_loop().run_in_executor(self.pool, f, *a)

    async def start(self):
        await self.call(self.zk.start)
        self.sem = self.zk.Semaphore(self.path, identifier=uuid.uuid4().hex, max_leases=self.args.slots)

    async def acquire(self):
        await self.call(self.sem.acquire)

    async def release(self, _):
        await self.call(self.sem.release)

    async def close(self):
        await self.call(self.zk.stop)
        await self.call(self.zk.close)
        self.pool.shutdown()


# ----------------------------------------------------------------------------------------------- etcd


def b64(s):
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


class Etcd:
    """The K-holder form of etcd's concurrency.Mutex over the v3 JSON gateway."""

    def __init__(self, args, prefix):
        import httpx

        self.args, self.prefix = args, prefix
        self.end = b64(prefix[:-1] + chr(ord(prefix[-1]) + 1))
        self.base = f"http://127.0.0.1:{args.port}/v3"
        self.http = httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=4))
        self.deleted = asyncio.Event()

    @staticmethod
    async def setup(args):
        return f"/slotd-bench/{uuid.uuid4().hex}/"

    async def post(self, path, body):
        r = await self.http.post(self.base + path, json=body)
        r.raise_for_status()
        return r.json()

    async def start(self):
        self.lease = (await self.post("/lease/grant", {"TTL": 60}))["ID"]
        self.watching = asyncio.Event()
        self.tasks = [asyncio.create_task(self.keepalive()), asyncio.create_task(self.watch())]
        # A deletion before the watch exists would be missed by a waiter that counted just before it.
        await asyncio.wait_for(self.watching.wait(), 10)

    async def keepalive(self):
        while True:
            await asyncio.sleep(20)
            await self.post("/lease/keepalive", {"ID": self.lease})

    async def watch(self):
        """One watch per session for deletions under the prefix; each sets `deleted`."""
        body = {"create_request": {"key": b64(self.prefix), "range_end": self.end, "filters": ["NOPUT"]}}
        async with self.http.stream("POST", self.base + "/watch", json=body) as resp:
            async for line in resp.aiter_lines():
                if not line.strip():
                    continue
                result = json.loads(line).get("result", {})
                if result.get("created"):
                    self.watching.set()
                if result.get("events"):
                    self.deleted.set()

    async def acquire(self):
        key = self.prefix + uuid.uuid4().hex
        put = await self.post("/kv/put", {"key": b64(key), "value": b64("1"), "lease": self.lease})
        rev = int(put["header"]["revision"])
        while True:
            self.deleted.clear()
            # Hold when fewer than K keys under the prefix are older than this one.
            # (etcd's `count` ignores the revision filter: count the keys returned instead.)
            older = await self.post(
                "/kv/range",
                {"key": b64(self.prefix), "range_end": self.end, "max_create_revision": rev - 1,
                 "keys_only": True, "sort_target": "CREATE", "limit": self.args.slots},
            )
            if len(older.get("kvs", [])) < self.args.slots:
                return key
            await self.deleted.wait()

    async def release(self, key):
        await self.post("/kv/deleterange", {"key": b64(key)})

    async def close(self):
        for t in self.tasks:
            t.cancel()
        await self.post("/lease/revoke", {"ID": self.lease})
        await self.http.aclose()


# -------------------------------------------------------------------------------------------- harness


async def session(sem, args, start, end):
    lat, cycles, held = [], 0, 0.0
    await sem.start()
    try:
        while time.monotonic() < end:
            t0 = time.monotonic()
            token = await sem.acquire()
            t1 = time.monotonic()
            if args.hold > 0:
                await asyncio.sleep(max(0.0, min(t1 + args.hold, end) - t1))
            t2 = time.monotonic()
            await sem.release(token)
            if t0 >= start and t1 <= end:
                lat.append(t1 - t0)
            held += max(0.0, min(t2, end) - max(t1, start))
            if start <= t2 <= end and t2 - t1 >= args.hold:
                cycles += 1
    finally:
        await sem.close()
    return lat, cycles, held


async def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=["slotd", "redis-list", "redis-zset", "zookeeper", "etcd"], required=True)
    p.add_argument("--port", type=int, help="redis/zookeeper/etcd port (defaults 6379/2181/2379)")
    p.add_argument("--endpoint", default="127.0.0.1:50051", help="slotd: host:port")
    p.add_argument("--pool", default="bench", help="slotd: the pool (its max_concurrent is K)")
    p.add_argument("--sessions", type=int, default=64)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--hold", type=float, default=0.0, help="seconds")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds (max 120)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds")
    p.add_argument("--poll", type=float, default=0.001, help="redis-zset: retry interval, seconds")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    args.duration = min(args.duration, 120.0)
    args.port = args.port or {"zookeeper": 2181, "etcd": 2379}.get(args.kind, 6379)

    if args.kind == "slotd":
        stubs = slotd_stubs()
        make = lambda: Slotd(args, stubs)  # noqa: E731
    else:
        cls = {"redis-list": Redis, "redis-zset": Redis, "zookeeper": ZooKeeper, "etcd": Etcd}[args.kind]
        shared = await cls.setup(args)
        make = lambda: cls(args, shared)  # noqa: E731

    start = time.monotonic() + args.warmup
    end = start + args.duration
    results = await asyncio.gather(*(session(make(), args, start, end) for _ in range(args.sessions)))

    lat = [x for r in results for x in r[0]]
    per = [r[1] for r in results]
    held = sum(r[2] for r in results)
    total = sum(per)
    sq = sum(c * c for c in per)
    report = {
        "mode": args.kind,
        "sessions": args.sessions,
        "slots": args.slots,
        "hold_ms": args.hold * 1000,
        "wall_secs": args.duration,
        "cycles": total,
        "cycles_per_sec": total / args.duration,
        "acquire_p50_us": pct(lat, 0.5) * 1e6,
        "acquire_p99_us": pct(lat, 0.99) * 1e6,
        "acquire_p999_us": pct(lat, 0.999) * 1e6,
        "jain": (total * total) / (len(per) * sq) if sq else 1.0,
        "min_max_session_cycles": [min(per), max(per)],
        "slot_use": held / (args.slots * args.duration),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"{args.kind}: C={args.sessions} K={args.slots} h={args.hold * 1000:.0f}ms over {args.duration:.1f}s\n"
            f"cycles/s: {report['cycles_per_sec']:.0f} ({total} cycles)\n"
            f"acquire: p50 {report['acquire_p50_us']:.0f} us / p99 {report['acquire_p99_us']:.0f} us"
            f" / p99.9 {report['acquire_p999_us']:.0f} us\n"
            f"Jain fairness: {report['jain']:.4f} (per-session cycles min {min(per)} max {max(per)})\n"
            f"slot use: {report['slot_use'] * 100:.2f}%"
        )


if __name__ == "__main__":
    asyncio.run(main())
