# Shared by the bench scripts (sourced): the daemon config slotd-bench's own spawned daemon uses, a free
# loopback port, and waiting until a daemon listens.

# bench_config FILE MAX_STREAMS MAX_CONCURRENT: pool `bench` with a large queue and long TTLs (the
# scripts measure scheduling, not admission or expiry).
bench_config() {
    cat >"$1" <<TOML
[limits]
max_streams = $2

[pools.bench]
max_concurrent = $3
adaptive = false
max_queue_depth = 1000000
default_ttl = "1h"
max_ttl = "1h"
TOML
}

# free_port: a loopback port nobody listens on now.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_listening PORT: returns once 127.0.0.1:PORT accepts a connection (fails after 10 s).
wait_listening() {
    for _ in $(seq 100); do
        python3 -c "import socket; socket.create_connection(('127.0.0.1', $1)).close()" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on 127.0.0.1:$1" >&2
    return 1
}
