#!/usr/bin/env bash
# Socket writes per fanned-out message: the daemon's write/writev/sendto calls (strace -c, attached
# to the daemon) during `slotd-bench fanout` with 1 round and with N rounds; the difference divided
# by (N - 1) × waiters leaves the setup out. One write per connection per round is the goal.
#   bench/writes.sh [--rounds N] [--waiters W] [--streams-per-connection S] [path/to/slotd]
# Needs strace (and ptrace permission). Uses the release bench built by bench/run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
rounds=5 waiters=10000 spc=100
while [[ $# -gt 0 ]]; do
    case $1 in
        --rounds) rounds=$2; shift 2 ;;
        --waiters) waiters=$2; shift 2 ;;
        --streams-per-connection) spc=$2; shift 2 ;;
        *) break ;;
    esac
done
daemon=${1:-target/release/slotd}
b=target/release/slotd-bench
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
bench_config "$dir/slotd.toml" $((waiters * 2 + 64)) 1
# calls R: the daemon's socket writes during a fanout of R rounds.
calls() {
    local port
    port=$(free_port)
    "$daemon" --config "$dir/slotd.toml" --listen "127.0.0.1:$port" 2>/dev/null &
    local pid=$!
    wait_listening "$port"
    strace -f -c -p "$pid" -o "$dir/strace.out" -e trace=write,writev,sendto,sendmsg 2>/dev/null &
    local spid=$!
    sleep 0.5
    "$b" --json --endpoint "http://127.0.0.1:$port" --daemon-pid "$pid" fanout --waiters "$waiters" \
        --rounds "$1" --streams-per-connection "$spc" >"$dir/run.json"
    kill -INT "$spid"
    wait "$spid" || true
    kill "$pid"
    wait "$pid" || true
    awk '$NF == "total" { print $4 }' "$dir/strace.out"
}
one=$(calls 1)
many=$(calls "$rounds")
connections=$(((waiters + spc - 1) / spc))
python3 -c "
d = ($many - $one) / ($rounds - 1)
print(f'{d:.0f} socket writes per round of $waiters messages on $connections connections: '
      f'{d / $waiters:.3f} per message, {d / $connections:.1f} per connection')"
