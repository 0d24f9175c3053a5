#!/usr/bin/env bash
# Where the daemon's CPU goes during one slotd-bench mode: the daemon runs on a free loopback port,
# `perf record` samples it (cpu-clock, so it works on VMs without hardware counters) while the mode
# runs, and the samples are grouped by crate (h2, hyper, tonic, prost, tokio, slotd's scheduler,
# the rest of slotd, libc, the kernel), then the top symbols are listed.
#   bench/cpu-profile.sh [MODE [MODE ARGS...]]      e.g. bench/cpu-profile.sh cycles --duration 10s
# MODE defaults to `cycles` (C=64, K=8, hold 0). Needs perf (apt-get install -y linux-perf) and the
# release builds of slotd and slotd-bench (bench/run.sh builds them).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
mode=${1:-cycles}
[[ $# -gt 0 ]] && shift
daemon=${SLOTD:-target/release/slotd}
b=target/release/slotd-bench
dir=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$dir"' EXIT
ulimit -n "$(ulimit -Hn)"
bench_config "$dir/slotd.toml" 20000 8
port=$(free_port)
"$daemon" --config "$dir/slotd.toml" --listen "127.0.0.1:$port" 2>"$dir/slotd.log" &
pid=$!
wait_listening "$port"
perf record -e cpu-clock -F 999 -p "$pid" -o "$dir/perf.data" 2>"$dir/perf.log" &
perf_pid=$!
"$b" --endpoint "http://127.0.0.1:$port" --daemon-pid "$pid" "$mode" "$@"
kill -INT "$perf_pid"
wait "$perf_pid" || true
perf report -i "$dir/perf.data" --no-children --sort dso,sym --stdio -g none 2>/dev/null \
    | python3 -c '
import re, sys, collections
groups = [
    ("kernel", r"^\[kernel|\[k\]"),
    ("libc (memcpy, malloc, futex)", r"libc|ld-linux"),
    ("h2", r"\bh2::"),
    ("hyper, hyper-util", r"\bhyper(_util)?::"),
    ("tonic", r"\btonic::"),
    ("prost", r"\bprost::"),
    ("tokio, mio", r"\b(tokio|mio)::"),
    ("slotd scheduler (the core)", r"\bslotd::scheduler::"),
    ("slotd, the rest (driver, grpc, net)", r"\bslotd::|slotd_proto"),
    ("bytes, http, tower, tracing, std, alloc", r"\b(bytes|http|http_body|tower|tower_layer|tracing|tracing_core|std|alloc|core|hashbrown)::"),
]
sums, top, total = collections.Counter(), [], 0.0
for line in sys.stdin:
    m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.*)", line)
    if not m:
        continue
    pct, dso, kind, sym = float(m.group(1)), m.group(2), m.group(3), m.group(4).strip()
    total += pct
    text = ("[k] " if kind == "k" else "") + dso + " " + sym
    name = next((g for g, rx in groups if re.search(rx, text)), "other")
    sums[name] += pct
    top.append((pct, sym[:110]))
print(f"daemon samples by crate ({total:.1f}% attributed):")
for name, pct in sums.most_common():
    print(f"  {pct:6.2f}%  {name}")
print("top symbols:")
for pct, sym in sorted(top, reverse=True)[:25]:
    print(f"  {pct:6.2f}%  {sym}")
'
