#!/usr/bin/env python3
"""Prints the "Speed" table of docs/BENCHMARKS.md from one sitting of bench/run.sh.

Usage: bench/summary.py target/bench/<time>/

Medians over the repetitions (files NAME.rN.json); ratios are taken within the sitting: against the
Redis list semaphore driven by the same Rust loop, and against the raw-TCP floor (`slotd-bench floor`).
"""

import glob
import json
import os
import statistics
import sys


def load(d, name):
    """The reports of NAME (one per repetition, or the single NAME.json)."""
    out = []
    for p in sorted(glob.glob(os.path.join(d, name + ".r*.json"))) + glob.glob(os.path.join(d, name + ".json")):
        try:
            with open(p) as f:
                out.append(json.load(f))
        except (OSError, ValueError):
            pass
    return out


def med(reports, f):
    vals = []
    for r in reports:
        try:
            v = f(r)
        except (KeyError, TypeError, ZeroDivisionError):
            continue
        if v is not None:
            vals.append(v)
    return statistics.median(vals) if vals else None


def cpu_us_per_cycle(r):
    return r["resources"]["daemon_cpu_cores"] / r["cycles_per_sec"] * 1e6


def fmt(v, unit=""):
    if v is None:
        return "—"
    if abs(v) >= 100:
        s = f"{v:,.0f}"
    elif abs(v) >= 10:
        s = f"{v:.1f}"
    else:
        s = f"{v:.2f}"
    return s + unit


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def main(d):
    tags = [t for t in ("before", "after") if load(d, t + "-rtt") or load(d, t + "-fanout-10k")]
    rtt_floor = med(load(d, "floor-rtt"), lambda r: r["ping_pong"]["p50_us"])
    floor_10k = med(load(d, "floor-10k"), lambda r: r["all_rounds"]["p99_us"])
    floor_100 = med(load(d, "floor-100"), lambda r: r["all_rounds"]["p99_us"])
    redis = {
        "cpu": med(load(d, "redis-cycles"), cpu_us_per_cycle),
        "rtt": med(load(d, "redis-rtt"), lambda r: r["acquire_release"]["p50_us"]),
        "cycles": med(load(d, "redis-cycles"), lambda r: r["cycles_per_sec"]),
        "handoff": med(load(d, "redis-handoff"), lambda r: r["handoff"]["p50_us"]),
    }
    fig = {}
    for t in tags:
        cyc = load(d, t + "-cycles")
        fig[t] = {
            "cpu": med(cyc, cpu_us_per_cycle),
            "rtt": med(load(d, t + "-rtt"), lambda r: r["acquire_release"]["p50_us"]),
            "cycles": med(cyc, lambda r: r["cycles_per_sec"]),
            "jain": med(cyc, lambda r: r["jain"]),
            "fanout_10k": med(load(d, t + "-fanout-10k"), lambda r: r["all_rounds"]["p99_us"] / 1000),
            "fanout_mux": med(load(d, t + "-fanout-mux"), lambda r: r["all_rounds"]["p99_us"] / 1000),
            "idle_10k": med(load(d, t + "-idle-10k"), lambda r: r["daemon_rss_mib"]),
            "idle_100k": med(load(d, t + "-idle-100k-mux"), lambda r: r["daemon_rss_mib"]),
            "handoff": med(load(d, t + "-handoff"), lambda r: r["handoff"]["p50_us"]),
        }
        h = fig[t]["handoff"]
        fig[t]["handoff_daemon"] = None if h is None or rtt_floor is None else max(h - rtt_floor, 0.0)

    def cell(key, unit=""):
        return [fmt(fig[t][key], unit) for t in tags]

    rtt_floor2 = None if rtt_floor is None else 2 * rtt_floor
    last = fig[tags[-1]] if tags else {}
    rows = [
        ("daemon CPU per acquire+release cycle (C=64, K=8, h=0)", cell("cpu", " µs"), fmt(redis["cpu"], " µs"),
         "≥ 2× better than Redis",
         f"Redis/slotd {fmt(ratio(redis['cpu'], last.get('cpu')))}×"),
        ("uncontended acquire+release round trip p50", cell("rtt", " µs"), fmt(redis["rtt"], " µs"),
         "≤ 0.9× Redis and ≤ 1.25× floor",
         f"{fmt(ratio(last.get('rtt'), redis['rtt']))}× Redis, {fmt(ratio(last.get('rtt'), rtt_floor2))}× floor "
         f"(two ping-pongs, {fmt(rtt_floor2, ' µs')})"),
        ("contended cycles/s (C=64, K=8, h=0)", cell("cycles"), fmt(redis["cycles"]), "≥ 1.5× Redis, Jain ≥ 0.99",
         f"{fmt(ratio(last.get('cycles'), redis['cycles']))}× Redis, Jain {fmt(last.get('jain'))}"),
        ("pause fan-out, 10k waiters on 10k connections, p99", cell("fanout_10k", " ms"), "—",
         "≤ 1.25× floor", f"{fmt(ratio(last.get('fanout_10k'), floor_10k and floor_10k / 1000))}× floor "
         f"({fmt(floor_10k and floor_10k / 1000, ' ms')})"),
        ("pause fan-out, 10k waiters on 100 connections, p99", cell("fanout_mux", " ms"), "—", "≤ 20 ms",
         f"floor {fmt(floor_100 and floor_100 / 1000, ' ms')}"),
        ("RSS, 10k idle connections", cell("idle_10k", " MiB"), "—", "≤ 128 MiB", ""),
        ("RSS, 100k idle sessions, 100 per connection", cell("idle_100k", " MiB"), "—", "≤ 1024 MiB", ""),
        ("release in → next grant out, daemon side, p50 (hand-off − floor RTT)", cell("handoff_daemon", " µs"),
         "—", "≤ 50 µs", f"hand-off p50 {fmt(last.get('handoff'), ' µs')}, Redis {fmt(redis['handoff'], ' µs')}, "
         f"floor RTT {fmt(rtt_floor, ' µs')}"),
    ]
    head = ["figure"] + tags + ["Redis", "target", "ratio (" + (tags[-1] if tags else "") + ")"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, cells, red, target, rat in rows:
        print("| " + " | ".join([name] + cells + [red, target, rat]) + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
