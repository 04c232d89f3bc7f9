#!/usr/bin/env bash
# A/B two clawproxy trees under wrk, alternating, on the same nginx backend.
#
#   bash bench/ab.sh BEFORE_TREE AFTER_TREE [ROUNDS] [SECONDS]
#
# A tree is a directory holding a clawproxy/ package (e.g. a copy taken before an
# edit: `cp -r clawproxy /tmp/before/`). Both gateways run at once on CPU
# $BENCH_PROXY_CPU (one loaded at a time), wrk and nginx on $BENCH_LOAD_CPU.
# Prints req/s and the gateway's CPU time per request (utime+stime / requests),
# which is far less sensitive than req/s to other load on a shared machine.
# Set LOG_BEFORE / LOG_AFTER to "off" to turn an access log off.
set -euo pipefail
[[ $# -ge 2 ]] || { sed -n '2,11p' "$0"; exit 2; }
if [[ -z "${BENCH_INNER:-}" ]]; then
    exec timeout --signal=TERM --kill-after=10 300 env BENCH_INNER=1 bash "$0" "$@"
fi
B=$(cd "$1" && pwd); A=$(cd "$2" && pwd); R=${3:-3}; D=${4:-6}
HERE="$(cd "$(dirname "$0")" && pwd)"
PCPU="${BENCH_PROXY_CPU:-1}"; LCPU="${BENCH_LOAD_CPU:-0}"
BASE=$(( ${BENCH_PORT_BASE:-18080} + 30 ))
P_NGINX=$BASE; P_B=$((BASE + 1)); P_A=$((BASE + 2))
source "$HERE/lib.sh"
check_ports $P_NGINX $P_B $P_A $((BASE + 11)) $((BASE + 12))
bench_tmp clawab

start_nginx "$P_NGINX" "$LCPU" 290
gateway() {  # gateway TREE PORT ADMIN LOG NAME
    BENCH_BACKEND_PORT=$P_NGINX BENCH_PROXY_PORT=$2 BENCH_ADMIN_PORT=$3 BENCH_ACCESS_LOG=$4 \
        PYTHONPATH=$1 timeout 290 taskset -c "$PCPU" twistd -n --pidfile= clawproxy \
        -c "$HERE/gateway-bench.yaml" >"$TMP/$5.out" 2>&1 &
    PIDS+=($!)
}
gateway "$B" "$P_B" $((BASE + 11)) "${LOG_BEFORE:-$TMP/before.log}" before
gateway "$A" "$P_A" $((BASE + 12)) "${LOG_AFTER:-$TMP/after.log}" after
wait_ports $P_NGINX $P_B $P_A
PID_B=$(pgrep -P "${PIDS[1]}" | head -1); PID_A=$(pgrep -P "${PIDS[2]}" | head -1)

cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
run() {  # run PORT PID -> "req/s cpu_us_per_request"
    local c0 c1 out
    c0=$(cpu "$2")
    out=$(timeout 60 taskset -c "$LCPU" wrk -t1 -c50 -d"${D}s" -s "$HERE/chat.lua" "http://127.0.0.1:$1")
    c1=$(cpu "$2")
    echo "$out" | awk -v t=$((c1 - c0)) -v hz="$(getconf CLK_TCK)" \
        '/requests in/{n=$1} /Requests\/sec/{r=$2} END{printf "%s %.1f\n", r, t / hz * 1e6 / n}'
}
for p in $P_B $P_A; do
    timeout 30 taskset -c "$LCPU" wrk -t1 -c50 -d2s -s "$HERE/chat.lua" "http://127.0.0.1:$p" >/dev/null
done
before=(); after=()
for _ in $(seq 1 "$R"); do
    before+=("$(run "$P_B" "$PID_B")"); after+=("$(run "$P_A" "$PID_A")")
done
python3 - "$(printf '%s;' "${before[@]}")" "$(printf '%s;' "${after[@]}")" <<'EOF'
import statistics as st
import sys

rows = [[tuple(map(float, x.split())) for x in arg.split(";") if x.strip()] for arg in sys.argv[1:]]
for name, r in zip(("before", "after "), rows):
    print(name, "req/s", [round(x) for x, _ in r], "| CPU us/req", [c for _, c in r])
(rb, cb), (ra, ca) = [(st.median(x for x, _ in r), st.median(c for _, c in r)) for r in rows]
print(f"median CPU per request {cb:.0f} -> {ca:.0f} us ({100 * (ca / cb - 1):+.1f}%), "
      f"req/s {rb:.0f} -> {ra:.0f} ({100 * (ra / rb - 1):+.1f}%)")
EOF
