#!/usr/bin/env bash
# Where an idle session's memory goes: the daemon runs under heaptrack while `slotd-bench idle` holds
# N queued sessions; prints the daemon's RSS (smaps_rollup) before and with the sessions, then the
# live heap at its peak grouped by the first call site outside the allocator (bytes per session;
# a fixed allocation, such as the Watch broadcast buffer, is spread over the sessions too).
#   bench/idle-profile.sh [SESSIONS] [STREAMS_PER_CONNECTION] [path/to/slotd]
# Needs heaptrack (apt-get install -y heaptrack) and rustfilt (cargo install rustfilt). Uses the
# release bench built by bench/run.sh. heaptrack slows the daemon down; the RSS it reports includes
# heaptrack's own few MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
sessions=${1:-10000}
spc=${2:-1}
daemon=${3:-target/release/slotd}
b=target/release/slotd-bench
dir=$(mktemp -d)
hpid=""
pid=""
# The daemon is stopped on any exit (a failed run too); the scratch directory is removed unless KEEP is set.
trap '[[ -n $pid ]] && kill "$pid" 2>/dev/null; [[ -n $hpid ]] && pkill -P "$hpid" 2>/dev/null; [[ -n ${KEEP:-} ]] && echo "kept $dir" || rm -rf "$dir"' EXIT
ulimit -n "$(ulimit -Hn)"
bench_config "$dir/slotd.toml" $((sessions + 64)) 1
port=$(free_port)
heaptrack -o "$dir/heap" "$daemon" --config "$dir/slotd.toml" --listen "127.0.0.1:$port" \
    >"$dir/heaptrack.log" 2>"$dir/slotd.log" &
hpid=$!
# heaptrack starts the daemon as its child; wait until it listens.
for _ in $(seq 100); do
    pid=$(pgrep -P "$hpid" -f -- "--listen 127.0.0.1:$port" || true)
    [[ -n $pid ]] && python3 -c "import socket; socket.create_connection(('127.0.0.1', $port)).close()" 2>/dev/null && break
    sleep 0.1
done
rss() { awk '/^Rss:/ { printf "%.1f MiB", $2 / 1024 }' "/proc/$pid/smaps_rollup"; }
echo "daemon RSS with no session: $(rss)"
"$b" --endpoint "http://127.0.0.1:$port" --daemon-pid "$pid" idle --sessions "$sessions" \
    --streams-per-connection "$spc" --settle 2s | head -2
kill -INT "$pid"
wait "$hpid" || true
heaptrack_print -f "$dir"/heap.*zst --print-peaks 0 --print-allocators 0 --print-leaks 0 \
    --print-temporary 0 --flamegraph-cost-type peak -F "$dir/peak.raw" >/dev/null 2>&1
# heaptrack does not demangle Rust's v0 symbols; rustfilt does.
rustfilt <"$dir/peak.raw" >"$dir/peak.txt"
python3 - "$dir/peak.txt" "$sessions" <<'PY'
import collections, re, sys
# Frames of the allocator and of generic containers say nothing about who allocated.
skip = re.compile(r"^(<?alloc::|<?bytes::|<?core::|<?std::|<?hashbrown|indexmap|slab::|smallvec|_RN|<unresolved|__rust|0x|malloc|calloc|realloc)|RawVec|tokio::loom")
tidy = lambda f: re.sub(r"::h[0-9a-f]{16}| \(.*\)$", "", f).replace("$LT$", "<").replace("$GT$", ">").replace("$C$", ",")
sites, total = collections.Counter(), 0
for line in open(sys.argv[1]):
    stack, _, n = line.rstrip().rpartition(" ")
    total += int(n)
    frames = [tidy(f) for f in stack.rstrip(";").split(";") if f]
    site = next((f for f in reversed(frames) if not skip.search(f)), "?")
    sites[site] += int(n)
n = int(sys.argv[2])
print(f"live heap at its peak: {total / 2**20:.1f} MiB, {total / n:.0f} bytes per session")
for site, b in sites.most_common(20):
    print(f"{b / 2**20:8.2f} MiB {b / n:8.0f} B/session  {site[:100]}")
PY
