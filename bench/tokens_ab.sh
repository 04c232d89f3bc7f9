#!/usr/bin/env bash
# Stream TTFB of token accounting and of the Ollama translation vs plain pass-through,
# same run, rounds alternated:
#   plain       BEFORE tree (no accounting), openai pool  -> sim /v1/chat/completions
#   accounting  AFTER tree, openai pool (include_usage asked for and its chunk dropped)
#   translation AFTER tree, ollama pool (/v1 -> /api/chat, NDJSON -> SSE, plus accounting)
# Usage: bash bench/tokens_ab.sh BEFORE_TREE AFTER_TREE [ROUNDS] [STREAMS]; raw results in /tmp/tok.
set -u
mkdir -p /tmp/tok
BEFORE=$1; AFTER=$2; ROUNDS=${3:-2}; STREAMS=${4:-1000}
cd "$(dirname "$0")/.."
PY=python3
source bench/lib.sh
trap kill_pids EXIT
start_sim 19101 /tmp/tok/sim.log "$AFTER"
start_gw() { # name port admin tree protocol
  BENCH_PROXY_PORT=$2 BENCH_ADMIN_PORT=$3 BENCH_BACKEND_PORT=19101 BENCH_PROTOCOL=$5 BENCH_ACCESS_LOG=/tmp/tok/access-$1.log PYTHONPATH=$4 \
    taskset -c 1 twistd -n --pidfile= clawproxy -c bench/gateway-tokens.yaml > /tmp/tok/$1.log 2>&1 &
  PIDS+=($!)
}
start_gw plain 19110 19111 "$BEFORE" openai
start_gw accounting 19120 19121 "$AFTER" openai
start_gw translation 19130 19131 "$AFTER" ollama
sleep 5
for r in $(seq 1 "$ROUNDS"); do
  for t in plain:19110 accounting:19120 translation:19130; do
    timeout 120 taskset -c 0 $PY bench/loadgen.py sse --port ${t#*:} --streams "$STREAMS" --ramp ${RAMP:-8} --tokens 24 --token-rate 2 --label ${t%%:*} > /tmp/tok/sse-${t%%:*}-$r.json
    echo "round $r ${t%%:*}: $(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print({k: d[k] for k in d if "ttfb" in k or k in ("completed_ok","bad_status")})' /tmp/tok/sse-${t%%:*}-$r.json)"
    sleep 2
  done
done
# The accounting gateways counted the streams' tokens (metrics are on the admin port).
for a in accounting:19121 translation:19131; do
  echo "${a%%:*}: $(curl -s http://127.0.0.1:${a#*:}/metrics | grep '^clawproxy_tokens_total' | tr '\n' ' ')"
done
