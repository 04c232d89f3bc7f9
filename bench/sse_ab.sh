#!/usr/bin/env bash
# Alternated A/B of the 2,000-stream SSE phase: before tree vs after tree.
set -u
# Usage: bash bench/sse_ab.sh BEFORE_TREE AFTER_TREE [ROUNDS]; raw results in /tmp/ab.
mkdir -p /tmp/ab
BEFORE=$1; AFTER=$2; ROUNDS=${3:-2}
cd "$(dirname "$0")/.."
PY=python3
source bench/lib.sh
trap kill_pids EXIT
start_sim 19001 /tmp/ab/sim.log "$AFTER"
start_gw() { # name port admin tree
  BENCH_PROXY_PORT=$2 BENCH_ADMIN_PORT=$3 BENCH_BACKEND_PORT=19001 BENCH_ACCESS_LOG=/tmp/ab/access-$1.log PYTHONPATH=$4 \
    taskset -c 1 twistd -n --pidfile= clawproxy -c bench/gateway-bench.yaml > /tmp/ab/$1.log 2>&1 &
  PIDS+=($!)
}
start_gw before 19010 19011 $BEFORE
start_gw after 19020 19021 $AFTER
sleep 4
for r in $(seq 1 $ROUNDS); do
  for t in before:19010 after:19020; do
    timeout 120 taskset -c 0 $PY bench/loadgen.py sse --port ${t#*:} --streams 2000 --ramp 8 --tokens 24 --token-rate 2 --label ${t%%:*} > /tmp/ab/sse-${t%%:*}-$r.json
    echo "round $r ${t%%:*}: $(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print({k: d[k] for k in d if "ttfb" in k or k in ("completed","peak_open")})' /tmp/ab/sse-${t%%:*}-$r.json)"
    sleep 2
  done
done
