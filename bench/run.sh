#!/usr/bin/env bash
# Runs every slotd-bench measurement that docs/BENCHMARKS.md records, against a release daemon that
# each run spawns on a free loopback port (default runtime, then worker_threads = 1), plus the raw-TCP
# floor and the same round trips with both processes pinned to one CPU. With redis-server installed, also
# a Redis list semaphore through the same loops. Bounded: about five minutes.
#   bench/run.sh [path/to/slotd]        (add --json to any slotd-bench line for machine-readable output)
set -euo pipefail
cd "$(dirname "$0")/.."
daemon=${1:-target/release/slotd}
cargo build --release -p slotd -p slotd-bench >/dev/null
b=target/release/slotd-bench
run() {
    local name=$1
    shift
    echo "== $name: slotd-bench --spawn-daemon $daemon $*"
    "$b" --spawn-daemon "$daemon" "$@"
}
echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); load: $(cut -d' ' -f1-3 /proc/loadavg)"
run rtt rtt --count 20000
run cycles-h0 cycles --sessions 64 --slots 8 --hold 0s --duration 10s
run cycles-h50ms cycles --sessions 64 --slots 8 --hold 50ms --duration 10s
run idle idle --sessions 10000
run idle-mux idle --sessions 10000 --streams-per-connection 100
run fanout fanout --waiters 10000 --rounds 5
run fanout-mux fanout --waiters 10000 --rounds 5 --streams-per-connection 100
# The same daemon on a single-threaded runtime (the spawned daemon inherits the variable).
export SLOTD_WORKER_THREADS=1
run rtt-1thread rtt --count 20000
run cycles-h0-1thread cycles --sessions 64 --slots 8 --hold 0s --duration 10s
run idle-1thread idle --sessions 10000
run fanout-1thread fanout --waiters 10000 --rounds 5
run fanout-mux-1thread fanout --waiters 10000 --rounds 5 --streams-per-connection 100
unset SLOTD_WORKER_THREADS
# What any daemon pays here: raw TCP between two tokio processes (round trip, fan-out to 10k sockets).
echo "== floor: slotd-bench floor"
"$b" floor --sockets 10000 --rounds 5
echo "== floor, 100 sockets: slotd-bench floor --sockets 100"
"$b" floor --sockets 100 --rounds 5 --pings 0
# Round trips with the bench and the daemon pinned to one CPU: no cross-CPU wake-up on any hop.
echo "== pinned to CPU 0: taskset -c 0 slotd-bench floor / rtt"
taskset -c 0 "$b" floor --sockets 100 --rounds 1
taskset -c 0 "$b" --spawn-daemon "$daemon" rtt --count 20000
# The same loops against a Redis list semaphore, when redis-server is installed (a throwaway instance).
if command -v redis-server >/dev/null; then
    port=6391
    redis-server --port $port --bind 127.0.0.1 --save '' --appendonly no --daemonize yes >/dev/null
    sleep 0.5
    pid=$(redis-cli -p $port info server | tr -d '\r' | sed -n 's/^process_id://p')
    r() { echo "== redis $*"; "$b" --endpoint redis://127.0.0.1:$port --daemon-pid "$pid" "$@" --backend redis-list; }
    r rtt --count 20000
    r cycles --sessions 64 --slots 8 --hold 0s --duration 10s
    r cycles --sessions 64 --slots 8 --hold 50ms --duration 10s
    redis-cli -p $port shutdown nosave >/dev/null 2>&1 || true
fi
