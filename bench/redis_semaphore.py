#!/usr/bin/python3
"""Optional: the `slotd-bench cycles` loop against a Redis semaphore, for comparison.

C asyncio sessions, each on its own Redis connection, loop acquire -> hold -> release on K slots for a
bounded time, and report the same numbers as `slotd-bench cycles` (acquire latency p50/p99/p99.9,
cycles/s, Jain fairness over per-session cycles, slot use = held time / (K x wall time)).

Two common semaphores:
  list  K tokens in a list; acquire = BLPOP (Redis serves blocked clients first come, first served),
        release = RPUSH. Push-based and fair, but a crashed holder leaks its token (no lease/TTL).
  zset  the "fair semaphore with timeouts" pattern: a Lua script drops expired holders from a sorted set
        and adds the caller if fewer than K remain; a full semaphore is retried after --poll.
        Holders expire (like slotd's leases), but waiters poll and are not queued.

The client is Python (redis-py asyncio), so this measures Redis plus a much heavier client than
slotd-bench's; compare shapes (fairness, slot use, tail latency) more than raw throughput.
Loopback only; needs `redis-server` and `python3-redis` (Debian: apt-get install redis-server python3-redis).

  redis-server --port 6390 --save '' --appendonly no --daemonize yes
  python3 bench/redis_semaphore.py --port 6390 --kind list --sessions 64 --slots 8 --hold 0 --duration 10
  redis-cli -p 6390 shutdown nosave
"""

import argparse
import asyncio
import json
import time
import uuid

import redis.asyncio as redis

ACQUIRE_ZSET = """
local key, limit, now, ttl, token = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - ttl)
if redis.call('ZCARD', key) < limit then
  redis.call('ZADD', key, now, token)
  return 1
end
return 0
"""


async def close(r):
    # redis-py >= 5 has aclose(); Debian 12's 4.3 only close().
    await (r.aclose() if hasattr(r, "aclose") else r.close())


def pct(xs, q):
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def session(args, key, start, end, acquire_sha):
    r = redis.Redis(host="127.0.0.1", port=args.port)
    lat, cycles, held = [], 0, 0.0
    try:
        while time.monotonic() < end:
            t0 = time.monotonic()
            token = None
            if args.kind == "list":
                await r.blpop([key], timeout=0)
            else:
                token = uuid.uuid4().hex
                while True:
                    ok = await r.evalsha(acquire_sha, 1, key, args.slots, time.time(), 3600, token)
                    if ok == 1:
                        break
                    await asyncio.sleep(args.poll)
            t1 = time.monotonic()
            if args.hold > 0:
                await asyncio.sleep(max(0.0, min(t1 + args.hold, end) - t1))
            t2 = time.monotonic()
            if args.kind == "list":
                await r.rpush(key, 1)
            else:
                await r.zrem(key, token)
            if t0 >= start and t1 <= end:
                lat.append(t1 - t0)
            held += max(0.0, min(t2, end) - max(t1, start))
            if start <= t2 <= end and t2 - t1 >= args.hold:
                cycles += 1
    finally:
        await close(r)
    return lat, cycles, held


async def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=6379)
    p.add_argument("--kind", choices=["list", "zset"], default="list")
    p.add_argument("--sessions", type=int, default=64)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--hold", type=float, default=0.0, help="seconds")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds (max 120)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds")
    p.add_argument("--poll", type=float, default=0.001, help="zset: retry interval, seconds")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    args.duration = min(args.duration, 120.0)

    key = f"slotd-bench:{uuid.uuid4().hex}"
    admin = redis.Redis(host="127.0.0.1", port=args.port)
    acquire_sha = await admin.script_load(ACQUIRE_ZSET)
    if args.kind == "list":
        await admin.rpush(key, *([1] * args.slots))
    start = time.monotonic() + args.warmup
    end = start + args.duration
    results = await asyncio.gather(
        *(session(args, key, start, end, acquire_sha) for _ in range(args.sessions))
    )
    await admin.delete(key)
    await close(admin)

    lat = [x for r in results for x in r[0]]
    per = [r[1] for r in results]
    held = sum(r[2] for r in results)
    total = sum(per)
    sq = sum(c * c for c in per)
    report = {
        "mode": f"redis-{args.kind}",
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
            f"redis {args.kind}: C={args.sessions} K={args.slots} h={args.hold * 1000:.0f}ms over {args.duration:.1f}s\n"
            f"cycles/s: {report['cycles_per_sec']:.0f} ({total} cycles)\n"
            f"acquire: p50 {report['acquire_p50_us']:.0f} us / p99 {report['acquire_p99_us']:.0f} us"
            f" / p99.9 {report['acquire_p999_us']:.0f} us\n"
            f"Jain fairness: {report['jain']:.4f} (per-session cycles min {min(per)} max {max(per)})\n"
            f"slot use: {report['slot_use'] * 100:.2f}%"
        )


if __name__ == "__main__":
    asyncio.run(main())
