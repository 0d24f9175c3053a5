#!/usr/bin/env bash
# One sitting of every figure in docs/BENCHMARKS.md's "Speed" table: slotd (a release daemon that each
# run spawns on a free loopback port), optionally an older slotd binary for before/after, a throwaway
# Redis list semaphore driven by the same Rust loops, and the raw-TCP floor. The round-trip, hand-off
# and cycle figures are repeated (--reps, interleaved so the machine's drift hits every side alike);
# bench/summary.py prints medians and the ratios against Redis and the floor.
#   bench/run.sh [--reps N] [--before path/to/old/slotd] [--quick] [path/to/slotd]
# Needs redis-server for the Redis columns (apt-get install -y redis-server). Results (one JSON file
# per run) go to target/bench/<time>/. Bounded: about 4 minutes per daemon at --reps 3.
set -euo pipefail
cd "$(dirname "$0")/.."
reps=3
before=""
quick=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --reps) reps=$2; shift 2 ;;
        --before) before=$2; shift 2 ;;
        --quick) quick=1; shift ;;
        *) break ;;
    esac
done
daemon=${1:-target/release/slotd}
cargo build --release -p slotd -p slotd-bench >/dev/null
b=target/release/slotd-bench
out=target/bench/$(date -u +%Y%m%dT%H%M%S)
mkdir -p "$out"
echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); load: $(cut -d' ' -f1-3 /proc/loadavg)" | tee "$out/machine.txt"
echo "results: $out"
# run NAME DAEMON ARGS...: one slotd-bench run against a daemon it spawns, JSON into $out/NAME.json.
run() {
    local name=$1 bin=$2
    shift 2
    echo "== $name: slotd-bench --spawn-daemon $bin $*"
    "$b" --json --spawn-daemon "$bin" "$@" >"$out/$name.json" || echo "   failed: $name"
}
daemons=("after:$daemon")
[[ -n $before ]] && daemons+=("before:$before")

redis_pid=""
if command -v redis-server >/dev/null; then
    port=6391
    redis-server --port $port --bind 127.0.0.1 --save '' --appendonly no --daemonize yes >/dev/null
    sleep 0.5
    redis_pid=$(redis-cli -p $port info server | tr -d '\r' | sed -n 's/^process_id://p')
    trap 'redis-cli -p '$port' shutdown nosave >/dev/null 2>&1 || true' EXIT
else
    echo "redis-server not installed: no Redis columns"
fi
redis() {
    local name=$1
    shift
    [[ -z $redis_pid ]] && return 0
    echo "== $name: slotd-bench --endpoint redis://127.0.0.1:$port $* --backend redis-list"
    "$b" --json --endpoint "redis://127.0.0.1:$port" --daemon-pid "$redis_pid" "$@" --backend redis-list \
        >"$out/$name.json" || echo "   failed: $name"
}

# The repeated figures, interleaved: round trip, hand-off, contended cycles.
count=20000 dur=10s
[[ $quick == 1 ]] && count=5000 dur=4s
for r in $(seq 1 "$reps"); do
    "$b" --json floor --sockets 1 --rounds 1 --pings 5000 >"$out/floor-rtt.r$r.json"
    for d in "${daemons[@]}"; do
        tag=${d%%:*} bin=${d#*:}
        run "$tag-rtt.r$r" "$bin" rtt --count $count
        run "$tag-handoff.r$r" "$bin" handoff
        run "$tag-cycles.r$r" "$bin" cycles --sessions 64 --slots 8 --hold 0s --duration $dur
    done
    redis "redis-rtt.r$r" rtt --count $count
    redis "redis-handoff.r$r" handoff
    redis "redis-cycles.r$r" cycles --sessions 64 --slots 8 --hold 0s --duration $dur
done
# Once per daemon: fan-out and memory (each run already has several rounds or 10k samples).
"$b" --json floor --sockets 10000 --rounds 5 >"$out/floor-10k.json"
"$b" --json floor --sockets 100 --rounds 5 --pings 0 >"$out/floor-100.json"
for d in "${daemons[@]}"; do
    tag=${d%%:*} bin=${d#*:}
    run "$tag-fanout-10k" "$bin" fanout --waiters 10000 --rounds 5
    run "$tag-fanout-mux" "$bin" fanout --waiters 10000 --rounds 5 --streams-per-connection 100
    run "$tag-idle-10k" "$bin" idle --sessions 10000
    [[ $quick == 1 ]] || run "$tag-idle-100k-mux" "$bin" idle --sessions 100000 --streams-per-connection 100
done
python3 bench/summary.py "$out" | tee "$out/summary.md"
