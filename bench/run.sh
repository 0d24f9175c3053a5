#!/usr/bin/env bash
# Runs every slotd-bench measurement that docs/BENCHMARKS.md records, against a release daemon that
# each run spawns on a free loopback port. Bounded: about two minutes in all.
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
