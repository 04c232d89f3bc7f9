#!/usr/bin/env bash
# The cost of rate limits: wrk against four gateways of this tree, alternating, same run:
#   plain   gateway-bench.yaml (no auth, no limits)
#   key     gateway-limits.yaml less its rate_limits: API key only
#   memory  gateway-limits.yaml: API key + one rate limit, memory store
#   redis   gateway-limits.yaml: API key + one rate limit, Redis store (a local redis-server)
#
#   bash bench/limits.sh [ROUNDS] [SECONDS]
#
# Gateways on CPU $BENCH_PROXY_CPU (default 1; one loaded at a time), wrk, nginx and
# redis-server on $BENCH_LOAD_CPU (default 0). Prints req/s and the gateway's CPU time per
# request (utime+stime / requests) for each, and the cost relative to plain.
set -euo pipefail
if [[ -z "${BENCH_INNER:-}" ]]; then
    exec timeout --signal=TERM --kill-after=10 400 env BENCH_INNER=1 bash "$0" "$@"
fi
R=${1:-3}; D=${2:-6}
HERE="$(cd "$(dirname "$0")" && pwd)"; TREE="$(cd "$HERE/.." && pwd)"
PCPU="${BENCH_PROXY_CPU:-1}"; LCPU="${BENCH_LOAD_CPU:-0}"
BASE=$(( ${BENCH_PORT_BASE:-18080} + 50 ))
P_NGINX=$BASE; P_REDIS=$((BASE + 1)); P_PLAIN=$((BASE + 2)); P_MEM=$((BASE + 3)); P_RED=$((BASE + 4))
P_KEY=$((BASE + 5))
source "$HERE/lib.sh"
check_ports $P_NGINX $P_REDIS $P_PLAIN $P_MEM $P_RED $P_KEY $((BASE + 12)) $((BASE + 13)) \
    $((BASE + 14)) $((BASE + 15))
bench_tmp clawlimits

start_nginx "$P_NGINX" "$LCPU" 390
timeout 390 taskset -c "$LCPU" redis-server --port "$P_REDIS" --bind 127.0.0.1 --save "" \
    --appendonly no --dir "$TMP" >"$TMP/redis.out" 2>&1 &
PIDS+=($!)
sed '/^rate_limits:/,+1d' "$HERE/gateway-limits.yaml" >"$TMP/gateway-key.yaml"
gateway() {  # gateway CONFIG PORT ADMIN STORE NAME (CONFIG relative to bench/, or absolute)
    BENCH_BACKEND_PORT=$P_NGINX BENCH_PROXY_PORT=$2 BENCH_ADMIN_PORT=$3 BENCH_STORE=$4 \
        BENCH_REDIS_URL="redis://127.0.0.1:$P_REDIS/0" BENCH_ACCESS_LOG=off \
        PYTHONPATH=$TREE timeout 390 taskset -c "$PCPU" twistd -n --pidfile= clawproxy \
        -c "$(cd "$HERE" && realpath "$1")" >"$TMP/$5.out" 2>&1 &
    PIDS+=($!)
}
gateway gateway-bench.yaml "$P_PLAIN" $((BASE + 12)) memory plain
gateway gateway-limits.yaml "$P_MEM" $((BASE + 13)) memory memory
gateway gateway-limits.yaml "$P_RED" $((BASE + 14)) redis redis
gateway "$TMP/gateway-key.yaml" "$P_KEY" $((BASE + 15)) memory key
wait_ports $P_NGINX $P_REDIS $P_PLAIN $P_MEM $P_RED $P_KEY
PID_PLAIN=$(pgrep -P "${PIDS[2]}" | head -1); PID_MEM=$(pgrep -P "${PIDS[3]}" | head -1)
PID_RED=$(pgrep -P "${PIDS[4]}" | head -1); PID_KEY=$(pgrep -P "${PIDS[5]}" | head -1)

# Each limited gateway must answer 200 with X-RateLimit headers (Redis reached, key accepted).
for p in $P_MEM $P_RED; do
    ok=""
    for _ in $(seq 1 50); do
        if curl -s -D - -o /dev/null -H 'Authorization: Bearer sk-bench' \
            -H 'Content-Type: application/json' -d '{"model":"bench-model","messages":[]}' \
            "http://127.0.0.1:$p/v1/chat/completions" | grep -qi '^x-ratelimit-remaining'; then
            ok=1; break
        fi
        sleep 0.1
    done
    [[ -n "$ok" ]] || { echo "gateway on $p does not rate limit; see $TMP" >&2; exit 1; }
done

cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
run() {  # run PORT PID -> "req/s cpu_us_per_request non2xx"
    local c0 c1 out
    c0=$(cpu "$2")
    out=$(timeout 60 taskset -c "$LCPU" wrk -t1 -c50 -d"${D}s" -s "$HERE/chat.lua" "http://127.0.0.1:$1")
    c1=$(cpu "$2")
    echo "$out" | awk -v t=$((c1 - c0)) -v hz="$(getconf CLK_TCK)" \
        '/requests in/{n=$1} /Requests\/sec/{r=$2} /Non-2xx/{bad=$NF} END{printf "%s %.1f %d\n", r, t / hz * 1e6 / n, bad}'
}
for p in $P_PLAIN $P_KEY $P_MEM $P_RED; do
    timeout 30 taskset -c "$LCPU" wrk -t1 -c50 -d2s -s "$HERE/chat.lua" "http://127.0.0.1:$p" >/dev/null
done
plain=(); key=(); mem=(); red=()
for _ in $(seq 1 "$R"); do
    plain+=("$(run "$P_PLAIN" "$PID_PLAIN")")
    key+=("$(run "$P_KEY" "$PID_KEY")")
    mem+=("$(run "$P_MEM" "$PID_MEM")")
    red+=("$(run "$P_RED" "$PID_RED")")
done
python3 - "$(printf '%s;' "${plain[@]}")" "$(printf '%s;' "${key[@]}")" \
    "$(printf '%s;' "${mem[@]}")" "$(printf '%s;' "${red[@]}")" <<'PY'
import statistics as st
import sys

rows = [[tuple(map(float, x.split())) for x in arg.split(";") if x.strip()] for arg in sys.argv[1:]]
names = ("plain", "key", "memory", "redis")
med = {}
for name, r in zip(names, rows):
    print(f"{name:6} req/s", [round(x) for x, _, _ in r], "| CPU us/req", [c for _, c, _ in r],
          "| non-2xx", [int(b) for _, _, b in r])
    med[name] = (st.median(x for x, _, _ in r), st.median(c for _, c, _ in r))
rp, cp = med["plain"]
print("| gateway | req/s (median) | vs plain | CPU µs/req (median) | vs plain |")
print("|---|---:|---:|---:|---:|")
for name in names:
    r, c = med[name]
    print(f"| {name} | {r:.0f} | {100 * (r / rp - 1):+.1f} % | {c:.0f} | {100 * (c / cp - 1):+.1f} % |")
PY
