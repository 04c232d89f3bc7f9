#!/usr/bin/env bash
# Burst benchmark: 400 SSE streams opened at the same instant, 50 events 20 ms apart,
# direct vs bare Twisted relay vs clawproxy (and optionally an older clawproxy tree),
# side by side in one run.
#
#   bash bench/burst.sh                      # 3 repetitions, about 1 minute
#   bash bench/burst.sh --before TREE        # also a gateway importing clawproxy from TREE
#   bash bench/burst.sh --reps 5 --rounds 3 --profile
#
# Each repetition runs `loadgen.py burst` against every target in turn (alternated);
# each burst opens all connections, then writes every request in one go. The first
# burst of a fresh proxy is "cold" (no pooled upstream connections); the figures are
# the warm ones, with the cold ones reported apart. Proxies are pinned to CPU
# $BENCH_PROXY_CPU (default 1), the backend and the load generator to $BENCH_LOAD_CPU.
# --settle S: seconds between the last connect and the requests (default 0: the proxy
# accepts the connections while the requests arrive, as in a real burst of new clients).
# The server's CPU time per burst (ms, from /proc) is reported too: less noisy than TTFB.
# Ports: $BENCH_PORT_BASE + 40 .. + 47. Raw outputs: $BURST_OUT (default bench/out/burst).
# --profile: after the figures, py-spy records the (after) gateway over more bursts.
set -euo pipefail

if [[ -z "${BENCH_INNER:-}" ]]; then
    exec timeout --signal=TERM --kill-after=15 300 env BENCH_INNER=1 bash "$0" "$@"
fi

BEFORE=""
REPS=3
ROUNDS=3
STREAMS=400
PROFILE=0
SETTLE=${BURST_SETTLE:-0}
while [[ $# -gt 0 ]]; do
    case "$1" in
        --before) BEFORE="$(cd "$2" && pwd)"; shift ;;
        --reps) REPS=$2; shift ;;
        --rounds) ROUNDS=$2; shift ;;
        --streams) STREAMS=$2; shift ;;
        --settle) SETTLE=$2; shift ;;
        --profile) PROFILE=1 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done
[[ -z "$BEFORE" || -d "$BEFORE/clawproxy" ]] || { echo "--before: no clawproxy/ in $BEFORE" >&2; exit 2; }

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
OUT="${BURST_OUT:-$HERE/out/burst}"
SERVER_TIMEOUT=290
source "$HERE/lib.sh"
PY="${PYTHON:-python3}"
PCPU="${BENCH_PROXY_CPU:-1}"
LCPU="${BENCH_LOAD_CPU:-0}"
BASE=$(( ${BENCH_PORT_BASE:-18080} + 40 ))
EVENTS=${BURST_EVENTS:-50}
INTERVAL=${BURST_INTERVAL:-0.02}
P_SSE=$BASE; P_BARE=$((BASE + 1)); P_CLAW=$((BASE + 2)); P_BEFORE=$((BASE + 3))
A_CLAW=$((BASE + 6)); A_BEFORE=$((BASE + 7))
check_ports $P_SSE $P_BARE $P_CLAW $P_BEFORE $A_CLAW $A_BEFORE
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
rm -rf "$OUT"
mkdir -p "$OUT"
trap stop_servers EXIT
trap 'exit 130' INT TERM

tree_rev() { git -C "$1" rev-parse --short HEAD 2>/dev/null || echo '?'; }
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "after: $ROOT ($(tree_rev "$ROOT")$(git -C "$ROOT" diff --quiet -- clawproxy 2>/dev/null || echo '+dirty'))"
    [[ -n "$BEFORE" ]] && echo "before: $BEFORE ($(tree_rev "$BEFORE"))"
    echo "workload: $STREAMS streams at once, $EVENTS events ${INTERVAL}s apart, $REPS reps x $ROUNDS bursts, settle ${SETTLE}s"
    echo "pinning: proxies cpu $PCPU, backend and load generator cpu $LCPU"
    echo "loadavg: $(cut -d' ' -f1-3 /proc/loadavg)"
} >"$OUT/machine.txt"
cat "$OUT/machine.txt" >&2

start sse "$LCPU" "$PY" "$HERE/sse_backend.py" "$P_SSE" --events "$EVENTS" --interval "$INTERVAL"
wait_port "$P_SSE" sse
start bare "$PCPU" "$PY" "$HERE/bare_relay.py" "$P_BARE" "http://127.0.0.1:$P_SSE"
claw() {  # claw NAME TREE PORT ADMIN: the bench config, its clawproxy imported from TREE
    BENCH_PROXY_PORT=$3 BENCH_ADMIN_PORT=$4 BENCH_BACKEND_PORT=$P_SSE \
        BENCH_ACCESS_LOG="$OUT/access-$1.log" PYTHONPATH="$2" \
        start "$1" "$PCPU" twistd -n --pidfile= clawproxy -c "$HERE/gateway-bench.yaml"
}
claw claw "$ROOT" "$P_CLAW" "$A_CLAW"
TARGETS=(direct:$P_SSE bare:$P_BARE claw:$P_CLAW)
if [[ -n "$BEFORE" ]]; then
    claw before "$BEFORE" "$P_BEFORE" "$A_BEFORE"
    TARGETS=(direct:$P_SSE bare:$P_BARE before:$P_BEFORE claw:$P_CLAW)
fi
for t in "${TARGETS[@]}"; do wait_port "${t#*:}" "${t%%:*}"; done
sleep 1

declare -A SERVER
SERVER[direct]=$(child_of "$PID_sse")
SERVER[bare]=$(child_of "$PID_bare")
SERVER[claw]=$(child_of "$PID_claw")
[[ -n "$BEFORE" ]] && SERVER[before]=$(child_of "$PID_before")
burst() {  # burst LABEL PORT ROUNDS FILE: the server's CPU time goes in FILE.cpu
    local c0 c1
    c0=$(cpu_ticks "${SERVER[$1]}")
    timeout 120 taskset -c "$LCPU" "$PY" "$HERE/loadgen.py" burst --port "$2" \
        --streams "$STREAMS" --events "$EVENTS" --interval "$INTERVAL" --rounds "$3" \
        --settle "$SETTLE" --label "$1" >"$4"
    c1=$(cpu_ticks "${SERVER[$1]}")
    echo "$(( (c1 - c0) * 1000 / $(getconf CLK_TCK) )) $3" >"$4.cpu"
}
for rep in $(seq 1 "$REPS"); do
    for t in "${TARGETS[@]}"; do
        label=${t%%:*}
        burst "$label" "${t#*:}" "$ROUNDS" "$OUT/burst-$label-$rep.json"
        log "rep $rep $label: $("$PY" -c 'import json,sys; r=json.load(open(sys.argv[1])); print(" ".join("%s/%s" % (x["ttfb_mean_ms"], x["ttfb_ms"]["p99"]) for x in r["rounds"]), "ms (TTFB mean/p99 per burst)")' "$OUT/burst-$label-$rep.json")"
        sleep 0.5
    done
done

if [[ $PROFILE == 1 ]] && command -v py-spy >/dev/null; then
    CLAW_PID=$(child_of "$PID_claw")
    log "profile: py-spy on clawproxy (pid $CLAW_PID) over 6 bursts"
    timeout 60 py-spy record -r 500 -d 14 -f raw -o "$OUT/profile-burst.txt" --pid "$CLAW_PID" \
        >"$OUT/py-spy.log" 2>&1 &
    SPY=$!
    sleep 1
    burst claw "$P_CLAW" 6 "$OUT/profiled-claw.json"
    wait "$SPY" || log "py-spy failed (see $OUT/py-spy.log)"
    [[ -s "$OUT/profile-burst.txt" ]] && "$PY" "$HERE/pyspy_summary.py" "$OUT/profile-burst.txt" 40 \
        >"$OUT/profile-burst-summary.txt"
fi

"$PY" "$HERE/burst_report.py" "$OUT" | tee "$OUT/summary.md"
