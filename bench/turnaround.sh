#!/usr/bin/env bash
# The daemon's own hand-off turnaround, read off the wire: tcpdump on loopback timestamps the holder's
# release packet arriving and the waiter's grant packet leaving, so no client library counts. Runs,
# alternated REPS times: slotd (`slotd-bench handoff`), slotd with `--worker-threads 1`, Redis's list
# semaphore through the same loop (RPUSH in -> the blocked BLPOP's reply out), and the floor: a tokio
# process answering a one-byte ping (`slotd-bench floor`, ping in -> pong out). Prints p50/p90/p99 of
# each run.
#   bench/turnaround.sh [REPS] [COUNT]
# Needs tcpdump and redis-server (apt-get install -y tcpdump redis-server), root or CAP_NET_RAW for
# tcpdump, and the release builds of slotd and slotd-bench (bench/run.sh builds them).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
reps=${1:-3}
count=${2:-3000}
b=target/release/slotd-bench
daemon=target/release/slotd
dir=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$dir"' EXIT
bench_config "$dir/slotd.toml" 100 1

# turnaround PORT MODE < capture: packets with payload; the time from a client's packet to the
# server's next packet to another client (MODE other: a hand-off) or to the same one (MODE same).
turnaround() {
    python3 -c '
import re, sys
port, mode = sys.argv[1], sys.argv[2]
rx = re.compile(r"^(\d+\.\d+) IP 127\.0\.0\.1\.(\d+) > 127\.0\.0\.1\.(\d+):.* length (\d+)")
last_in, out = None, []
for line in sys.stdin:
    m = rx.match(line)
    if not m or int(m.group(4)) == 0:
        continue
    t, src, dst = float(m.group(1)), m.group(2), m.group(3)
    if dst == port:
        last_in = (t, src)
    elif src == port and last_in is not None and (dst == last_in[1]) == (mode == "same"):
        out.append(t - last_in[0])
        last_in = None
out.sort()
q = lambda p: out[min(len(out) - 1, int(p * len(out)))] * 1e6 if out else float("nan")
print(f"p50 {q(0.5):4.0f} us   p90 {q(0.9):4.0f} us   p99 {q(0.99):5.0f} us   (n={len(out)})")
' "$1" "$2"
}

# capture FILTER FILE CMD...: runs CMD while tcpdump writes FILTER's packets on lo to FILE.
capture() {
    local filter=$1 file=$2
    shift 2
    tcpdump -tt -n -l -i lo "$filter" >"$file" 2>/dev/null &
    local tp=$!
    sleep 1
    "$@" >/dev/null
    sleep 0.3
    kill -INT "$tp"
    wait "$tp" 2>/dev/null || true
}

sport=$(free_port)
"$daemon" --config "$dir/slotd.toml" --listen "127.0.0.1:$sport" 2>/dev/null &
pids+=($!)
sport1=$(free_port)
"$daemon" --config "$dir/slotd.toml" --listen "127.0.0.1:$sport1" --worker-threads 1 2>/dev/null &
pids+=($!)
rport=$(free_port)
redis-server --port "$rport" --save '' --appendonly no >/dev/null 2>&1 &
pids+=($!)
wait_listening "$sport"
wait_listening "$sport1"
wait_listening "$rport"
echo "machine: $(nproc) CPUs; load: $(cut -d' ' -f1-3 /proc/loadavg); $count hand-offs or pings per run"
for rep in $(seq "$reps"); do
    echo "== rep $rep"
    capture "tcp port $sport" "$dir/s.txt" "$b" --endpoint "http://127.0.0.1:$sport" handoff --count "$count"
    echo "slotd, release in -> grant out:          $(turnaround "$sport" other <"$dir/s.txt")"
    capture "tcp port $sport1" "$dir/s1.txt" "$b" --endpoint "http://127.0.0.1:$sport1" handoff --count "$count"
    echo "slotd 1 thread, release in -> grant out: $(turnaround "$sport1" other <"$dir/s1.txt")"
    capture "tcp port $rport" "$dir/r.txt" "$b" --endpoint "redis://127.0.0.1:$rport" handoff \
        --backend redis-list --count "$count"
    echo "Redis, RPUSH in -> BLPOP reply out:      $(turnaround "$rport" other <"$dir/r.txt")"
    # The floor's server listens on a port of its own: the first SYN on lo names it.
    capture "tcp" "$dir/f.txt" "$b" floor --sockets 1 --rounds 1 --pings "$count"
    fport=$(grep -m1 'Flags \[S\],' "$dir/f.txt" | sed -E 's/.* > 127\.0\.0\.1\.([0-9]+):.*/\1/')
    echo "floor, ping in -> pong out:              $(turnaround "$fport" same <"$dir/f.txt")"
done
