#!/usr/bin/env bash
# Stream time to first byte with server.workers: 1 vs 2: 2,000 SSE streams each
# (ramped over 8 s, 24 tokens at 2/s from a simulator), alternating, same run.
#
#   bash bench/workers_sse.sh [ROUNDS]        raw results in $OUT (default /tmp/workers-sse)
#
# The simulator and the load generator run on core 0, each gateway's processes on
# both cores (one gateway loaded at a time).
set -u
ROUNDS=${1:-2}; OUT=${OUT:-/tmp/workers-sse}; mkdir -p "$OUT"
cd "$(dirname "$0")/.."
BASE=$(( ${BENCH_PORT_BASE:-18080} + 90 ))
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; }
trap cleanup EXIT
timeout 600 taskset -c 0 python3 -m clawproxy.cli sim --listen "tcp:$BASE:interface=127.0.0.1:backlog=4096" \
    --ttft 0 --tokens-per-second 2 --max-tokens 1000 --id sim-bench --model sim-stream >"$OUT/sim.log" 2>&1 &
PIDS+=($!)
for n in 1 2; do
    sed "s/^  client_timeout: 120s/  client_timeout: 120s\n  workers: $n/" bench/gateway-bench.yaml >"$OUT/gw$n.yaml"
    BENCH_PROXY_PORT=$((BASE + 10 * n)) BENCH_ADMIN_PORT=$((BASE + 10 * n + 1)) BENCH_BACKEND_PORT=$BASE \
        BENCH_ACCESS_LOG=off PYTHONPATH=. timeout 600 twistd -n --pidfile= clawproxy -c "$OUT/gw$n.yaml" \
        >"$OUT/gw$n.log" 2>&1 &
    PIDS+=($!)
done
sleep 8
for r in $(seq 1 "$ROUNDS"); do
    for n in 1 2; do
        timeout 120 taskset -c 0 python3 bench/loadgen.py sse --port $((BASE + 10 * n)) --streams 2000 \
            --ramp 8 --tokens 24 --token-rate 2 --label "workers-$n" >"$OUT/sse-$n-$r.json"
        echo "round $r workers $n: $(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print({k: d[k] for k in d if "ttfb" in k or k in ("completed","peak_open")})' "$OUT/sse-$n-$r.json")"
        sleep 2
    done
done
