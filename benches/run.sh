#!/usr/bin/env bash
# Prints the figures we track, each measured in this run on this machine:
# release binary size, idle RSS of `twokey demo`, and API workflow latency at 50
# concurrent clients with its ratio to a /healthz baseline from the same run, and SSH
# certificates minted per second through the API against signing alone; the SSH relay
# against direct OpenSSH and an OpenSSH jump host (throughput, round trip, idle memory);
# the PostgreSQL relay against direct and PgBouncer (pgbench tps, select 1 latency, idle memory).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --quiet
bin=target/release/twokey
awk -v b="$(stat -c %s $bin)" 'BEGIN { printf "release binary: %d bytes (%.1f MiB)\n", b, b / 1048576 }'

dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
TWOKEY_LOG=warn $bin demo --listen 127.0.0.1:$port --data-dir "$dir" >/dev/null 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.05; done
curl -fs "http://127.0.0.1:$port/login" >/dev/null
echo "idle RSS of twokey demo: $(awk '/VmRSS/ {print $2, $3}' /proc/$pid/status)"
kill $pid

cargo bench --locked --quiet --bench approval_latency
cargo bench --locked --quiet --bench ssh_certificates
cargo bench --locked --quiet --bench relay
cargo bench --locked --quiet --bench pg_relay --features bench-unjudged
