#!/usr/bin/env bash
# clawproxy benchmark: direct backend vs a bare Twisted relay vs clawproxy, in one run.
#
#   bash bench/run.sh            # full run, about 6 minutes (hard limit 8)
#   bash bench/run.sh --quick    # shorter phases, about 3.5 minutes
#   bash bench/run.sh --no-profile
#   bash bench/run.sh --before TREE   # also measure the clawproxy of another tree (e.g. a
#                                     # worktree of the baseline commit), same run, side by side
#   bash bench/run.sh --no-burst      # skip phase 5 (bench/burst.sh)
#
# Everything listens on 127.0.0.1 only. Each proxy is pinned to CPU $BENCH_PROXY_CPU
# (default 1), load generators and backends to $BENCH_LOAD_CPU (default 0).
# Raw outputs go to bench/out/ (gitignored); the tables to bench/out/summary.md.
# Ports: $BENCH_PORT_BASE (default 18080) .. +16; the run refuses to start if one is taken.
set -euo pipefail

if [[ -z "${BENCH_INNER:-}" ]]; then
    # Bound the whole run, whatever happens inside it (longer with a second tree).
    limit=480
    [[ " $* " == *" --before "* ]] && limit=720
    exec timeout --signal=TERM --kill-after=15 "$limit" env BENCH_INNER=1 bash "$0" "$@"
fi

QUICK=0
PROFILE=1
BURST=1
BEFORE=""
ARGS="$*"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --no-profile) PROFILE=0 ;;
        --no-burst) BURST=0 ;;
        --before) BEFORE="$(cd "$2" && pwd)"; shift ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
if [[ -n "$BEFORE" && ! -d "$BEFORE/clawproxy" ]]; then
    echo "--before: no clawproxy/ in $BEFORE" >&2
    exit 2
fi
OUT="$HERE/out"
SERVER_TIMEOUT=700
source "$HERE/lib.sh"
PY="${PYTHON:-python}"
PCPU="${BENCH_PROXY_CPU:-1}"
LCPU="${BENCH_LOAD_CPU:-0}"
BASE="${BENCH_PORT_BASE:-18080}"

if [[ $QUICK == 1 ]]; then
    WRK_WARM=1; WRK_DUR=5; WRK_ROUNDS=1
    RATE_DUR=8
    SSE_RAMP=5; SSE_TOKENS=14
    IDLE_CONNS=5000
    PROFILE=0
else
    WRK_WARM=2; WRK_DUR=10; WRK_ROUNDS=2
    RATE_DUR=20
    SSE_RAMP=8; SSE_TOKENS=24
    IDLE_CONNS=5000
fi
SSE_STREAMS=2000
SSE_TOKEN_RATE=2
RATE=500
CONNS=50

P_NGINX=$BASE; P_SSE=$((BASE + 1))
P_BARE=$((BASE + 2)); P_BARE_SSE=$((BASE + 3))
P_CLAW=$((BASE + 4)); P_CLAW_NOLOG=$((BASE + 5)); P_CLAW_SSE=$((BASE + 6))
P_BARE_NOFP=$((BASE + 7)); P_BEF=$((BASE + 8)); P_BEF_SSE=$((BASE + 9))
A_CLAW=$((BASE + 14)); A_CLAW_NOLOG=$((BASE + 15)); A_CLAW_SSE=$((BASE + 16))
A_BEF=$((BASE + 17)); A_BEF_SSE=$((BASE + 18))

check_ports $P_NGINX $P_SSE $P_BARE $P_BARE_SSE $P_CLAW $P_CLAW_NOLOG $P_CLAW_SSE $P_BARE_NOFP \
            $P_BEF $P_BEF_SSE $A_CLAW $A_CLAW_NOLOG $A_CLAW_SSE $A_BEF $A_BEF_SSE

for tool in wrk nginx taskset ss; do
    command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install $tool)" >&2; exit 1; }
done

ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
rm -rf "$OUT"
mkdir -p "$OUT"
TMP="$(mktemp -d /tmp/clawbench.XXXXXX)"
cleanup() {
    stop_servers
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# -- machine ------------------------------------------------------------------

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "nproc: $(nproc)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "kernel: $(uname -r)"
    echo "python: $($PY -c 'import sys; print(sys.version.split()[0])')"
    echo "twisted: $($PY -c 'import twisted; print(twisted.__version__)')"
    echo "nginx: $(nginx -v 2>&1 | cut -d/ -f2)"
    echo "wrk: $(wrk -v 2>&1 | head -1 | awk '{print $2}')"
    echo "clawproxy: $ROOT $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet -- clawproxy || echo '+dirty')"
    if [[ -n "$BEFORE" ]]; then
        echo "before: $BEFORE $(git -C "$BEFORE" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$BEFORE" diff --quiet -- clawproxy 2>/dev/null || echo '+dirty')"
    fi
    echo "mode: $([[ $QUICK == 1 ]] && echo quick || echo full)"
    echo "command: bash bench/run.sh $ARGS"
} >"$OUT/machine.txt"
cat "$OUT/machine.txt" >&2

# -- servers ------------------------------------------------------------------

mkdir -p "$TMP/nginx"
sed -e "s#@DIR@#$TMP/nginx#g" -e "s#@PORT@#$P_NGINX#g" "$HERE/nginx.conf.in" >"$TMP/nginx/nginx.conf"
start nginx "$LCPU" nginx -c "$TMP/nginx/nginx.conf" -p "$TMP/nginx"
# SSE backend: clawproxy's own simulator, first token at once, then 2 tokens/s.
# Its collector is off: a backend pausing for GC would show up as proxy TTFB.
PYTHONPATH="$ROOT" start sse "$LCPU" "$PY" -c 'import gc, sys; gc.disable(); from clawproxy.cli import main; sys.exit(main())' \
    sim --listen "tcp:$P_SSE:interface=127.0.0.1:backlog=4096" --ttft 0 \
    --tokens-per-second "$SSE_TOKEN_RATE" --max-tokens 1000 --id sim-bench --model sim-stream
wait_port "$P_NGINX" nginx
wait_port "$P_SSE" sse

start bare "$PCPU" "$PY" "$HERE/bare_relay.py" "$P_BARE" "http://127.0.0.1:$P_NGINX"
start bare-sse "$PCPU" "$PY" "$HERE/bare_relay.py" "$P_BARE_SSE" "http://127.0.0.1:$P_SSE"
# Informational: the bare relay without Twisted's form parsing of POST bodies,
# which clawproxy turns off (the reference figure is the stock bare relay).
start bare-nofp "$PCPU" "$PY" "$HERE/bare_relay.py" "$P_BARE_NOFP" "http://127.0.0.1:$P_NGINX" \
    --no-form-parsing
# Every clawproxy process imports clawproxy from the tree it measures, never from
# whatever `pip install -e` points at.
claw() {  # claw NAME PORT ADMIN BACKEND ACCESS_LOG [TREE]
    BENCH_PROXY_PORT=$2 BENCH_ADMIN_PORT=$3 BENCH_BACKEND_PORT=$4 BENCH_ACCESS_LOG=$5 \
        PYTHONPATH="${6:-$ROOT}" \
        start "$1" "$PCPU" twistd -n --pidfile= clawproxy -c "$HERE/gateway-bench.yaml"
}
claw claw "$P_CLAW" "$A_CLAW" "$P_NGINX" "$OUT/access-claw.log"
claw claw-nolog "$P_CLAW_NOLOG" "$A_CLAW_NOLOG" "$P_NGINX" off
claw claw-sse "$P_CLAW_SSE" "$A_CLAW_SSE" "$P_SSE" "$OUT/access-claw-sse.log"
WAIT=(bare:$P_BARE bare-sse:$P_BARE_SSE bare-nofp:$P_BARE_NOFP claw:$P_CLAW
      claw-nolog:$P_CLAW_NOLOG claw-sse:$P_CLAW_SSE)
if [[ -n "$BEFORE" ]]; then
    claw before "$P_BEF" "$A_BEF" "$P_NGINX" "$OUT/access-before.log" "$BEFORE"
    claw before-sse "$P_BEF_SSE" "$A_BEF_SSE" "$P_SSE" "$OUT/access-before-sse.log" "$BEFORE"
    WAIT+=(before:$P_BEF before-sse:$P_BEF_SSE)
fi
for p in "${WAIT[@]}"; do
    wait_port "${p#*:}" "${p%%:*}"
done
NGINX_WORKER=$(pgrep -P "$(cat "$TMP/nginx/nginx.pid")" | head -1)
BARE_PID=$(child_of "$PID_bare")
CLAW_PID=$(child_of "$PID_claw")
sleep 1
SMOKE=($P_NGINX $P_BARE $P_CLAW $P_CLAW_NOLOG)
[[ -n "$BEFORE" ]] && SMOKE+=($P_BEF)
for p in "${SMOKE[@]}"; do  # smoke test: every target answers 200
    code=$(curl -s -o /dev/null -w '%{http_code}' -m 5 -H 'Content-Type: application/json' \
        -d '{"model":"bench-model","messages":[{"role":"user","content":"hi"}]}' \
        "http://127.0.0.1:$p/v1/chat/completions")
    [[ $code == 200 ]] || { echo "smoke test on port $p answered $code" >&2; exit 1; }
done

LOAD=(timeout 120 taskset -c "$LCPU")

# -- 1. throughput at 50 connections (wrk) -------------------------------------

wrk_run() {  # wrk_run LABEL PORT ROUND SERVER_PID
    "${LOAD[@]}" wrk -t1 -c"$CONNS" -d"${WRK_WARM}s" -s "$HERE/chat.lua" "http://127.0.0.1:$2" >/dev/null
    local before after
    before=$(cpu_ticks "$4")
    "${LOAD[@]}" wrk -t1 -c"$CONNS" -d"${WRK_DUR}s" --latency -s "$HERE/chat.lua" \
        "http://127.0.0.1:$2" >"$OUT/wrk-$1-$3.txt"
    after=$(cpu_ticks "$4")
    echo "cpu_ticks: $((after - before)) hz: $(getconf CLK_TCK)" >>"$OUT/wrk-$1-$3.txt"
    log "wrk $1 round $3: $(grep Requests/sec "$OUT/wrk-$1-$3.txt")"
}
log "1/5 wrk: ${CONNS} connections, ${WRK_DUR}s per target, ${WRK_ROUNDS} round(s)"
wrk_run direct "$P_NGINX" 1 "$NGINX_WORKER"
for r in $(seq 1 "$WRK_ROUNDS"); do
    wrk_run bare "$P_BARE" "$r" "$BARE_PID"
    wrk_run bare-nofp "$P_BARE_NOFP" "$r" "$(child_of "$PID_bare_nofp")"
    wrk_run claw "$P_CLAW" "$r" "$CLAW_PID"
    wrk_run claw-nolog "$P_CLAW_NOLOG" "$r" "$(child_of "$PID_claw_nolog")"
    if [[ -n "$BEFORE" ]]; then
        wrk_run before "$P_BEF" "$r" "$(child_of "$PID_before")"
    fi
done

# -- 2. added latency at a fixed 500 req/s (open loop) --------------------------

RATE_T=(direct:$P_NGINX bare:$P_BARE claw:$P_CLAW)
SSE_T=(direct:$P_SSE bare:$P_BARE_SSE claw:$P_CLAW_SSE)
if [[ -n "$BEFORE" ]]; then
    RATE_T+=(before:$P_BEF)
    SSE_T+=(before:$P_BEF_SSE)
fi
log "2/5 fixed rate: ${RATE} req/s for ${RATE_DUR}s per target"
for t in "${RATE_T[@]}"; do
    "${LOAD[@]}" "$PY" "$HERE/loadgen.py" rate --port "${t#*:}" --rate "$RATE" \
        --duration "$RATE_DUR" --label "${t%%:*}" >"$OUT/rate-${t%%:*}.json"
    log "rate ${t%%:*}: $(cat "$OUT/rate-${t%%:*}.json" | cut -c1-220)"
done

# -- 3. 2,000 concurrent SSE streams --------------------------------------------

log "3/5 SSE: ${SSE_STREAMS} streams over ${SSE_RAMP}s, ${SSE_TOKENS} tokens at ${SSE_TOKEN_RATE}/s"
for t in "${SSE_T[@]}"; do
    "${LOAD[@]}" "$PY" "$HERE/loadgen.py" sse --port "${t#*:}" --streams "$SSE_STREAMS" \
        --ramp "$SSE_RAMP" --tokens "$SSE_TOKENS" --token-rate "$SSE_TOKEN_RATE" \
        --label "${t%%:*}" >"$OUT/sse-${t%%:*}.json"
    log "sse ${t%%:*}: $(cat "$OUT/sse-${t%%:*}.json" | cut -c1-260)"
    sleep 1
done

# -- 4. memory per idle keep-alive connection -----------------------------------

IDLE_T=(direct:$P_NGINX:$NGINX_WORKER bare:$P_BARE:$BARE_PID claw:$P_CLAW:$CLAW_PID)
[[ -n "$BEFORE" ]] && IDLE_T+=(before:$P_BEF:$(child_of "$PID_before"))
log "4/5 idle: ${IDLE_CONNS} keep-alive connections, one request each"
for t in "${IDLE_T[@]}"; do
    IFS=: read -r label port pid <<<"$t"
    "${LOAD[@]}" "$PY" "$HERE/loadgen.py" idle --port "$port" --pid "$pid" \
        --conns "$IDLE_CONNS" --label "$label" >"$OUT/idle-$label.json"
    log "idle $label: $(cat "$OUT/idle-$label.json")"
done

# -- 5. burst: 400 SSE streams at the same instant (bench/burst.sh, its own servers) --

if [[ $BURST == 1 ]]; then
    log "5/5 burst: bench/burst.sh$([[ -n "$BEFORE" ]] && echo " --before $BEFORE")"
    B_ARGS=(--reps "$([[ $QUICK == 1 ]] && echo 2 || echo 3)")
    [[ -n "$BEFORE" ]] && B_ARGS+=(--before "$BEFORE")
    BENCH_INNER=1 BURST_OUT="$OUT/burst" bash "$HERE/burst.sh" "${B_ARGS[@]}" >/dev/null \
        2>"$OUT/burst.log" || log "burst failed: see $OUT/burst.log"
fi

# -- profile (not part of the figures: sampling slows the target) ---------------

if [[ $PROFILE == 1 ]] && command -v py-spy >/dev/null; then
    log "profile: py-spy on clawproxy under wrk (flame graph, then raw stacks)"
    "${LOAD[@]}" wrk -t1 -c"$CONNS" -d24s -s "$HERE/chat.lua" "http://127.0.0.1:$P_CLAW" \
        >"$OUT/wrk-profiled.txt" &
    WRK_PID=$!
    sleep 1
    timeout 30 py-spy record -r 200 -d 10 -o "$OUT/profile.svg" --pid "$CLAW_PID" \
        >/dev/null 2>&1 || log "py-spy failed (it needs ptrace permission)"
    timeout 30 py-spy record -r 200 -d 10 -f raw -o "$OUT/profile.txt" --pid "$CLAW_PID" \
        >/dev/null 2>&1 || true
    wait "$WRK_PID" || true
    if [[ -s "$OUT/profile.txt" ]]; then
        "$PY" "$HERE/pyspy_summary.py" "$OUT/profile.txt" 30 >"$OUT/profile-summary.txt"
    fi
fi

"$PY" "$HERE/report.py" "$OUT" | tee "$OUT/summary.md"
