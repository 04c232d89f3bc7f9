#!/usr/bin/env bash
# req/s with server.workers: 1 vs 2 (and more, given as arguments), same run,
# alternating, on the bench nginx backend.
#
#   bash bench/workers.sh [ROUNDS] [SECONDS] [VARIANT...]      (default: 3 6 1 2)
#
# A VARIANT is a worker count N, or N:FILE to append FILE (YAML) to that
# gateway's config, e.g. 2:bench/limit-memory.yaml 2:bench/limit-redis.yaml to
# compare a rate limit kept in the parent's memory store with one in Redis
# (a redis-server is started on a free port for ${BENCH_REDIS_URL}).
#
# Each gateway runs alone while it is measured; wrk and nginx run on
# $BENCH_LOAD_CPU (default core 0). The gateway's processes run on
# $BENCH_PROXY_CPUS (default: every core, so that N workers can use N cores;
# on a 2-core machine they then share core 0 with wrk and nginx).
# EXTRA_YAML (a file) is appended to the bench config, e.g. a store section
# or rate limits, to compare state served by the parent with Redis.
set -euo pipefail
if [[ -z "${BENCH_INNER:-}" ]]; then
    exec timeout --signal=TERM --kill-after=10 900 env BENCH_INNER=1 bash "$0" "$@"
fi
R=${1:-3}; D=${2:-6}; shift 2 2>/dev/null || shift $#
VARIANTS=("$@"); [[ ${#VARIANTS[@]} -gt 0 ]] || VARIANTS=(1 2)
HERE="$(cd "$(dirname "$0")" && pwd)"
LCPU="${BENCH_LOAD_CPU:-0}"; PCPUS="${BENCH_PROXY_CPUS:-0-$(( $(nproc) - 1 ))}"
BASE=$(( ${BENCH_PORT_BASE:-18080} + 60 ))
P_NGINX=$BASE
source "$HERE/lib.sh"
bench_tmp clawworkers

start_nginx "$P_NGINX" "$LCPU" 880
P_REDIS=$((BASE + 50))
export BENCH_REDIS_URL="redis://127.0.0.1:$P_REDIS/0"
if [[ "${VARIANTS[*]}" == *redis* ]]; then
    timeout 880 taskset -c "$LCPU" redis-server --port "$P_REDIS" --bind 127.0.0.1 --save "" \
        --appendonly no >"$TMP/redis.log" 2>&1 &
    PIDS+=($!)
fi

port_of() { echo $((BASE + 1 + 2 * $1)); }
count_of() { echo "${1%%:*}"; }
i=0
for v in "${VARIANTS[@]}"; do
    i=$((i + 1)); n=$(count_of "$v")
    { sed "s/^  client_timeout: 120s/  client_timeout: 120s\n  workers: $n/" "$HERE/gateway-bench.yaml"
      [[ "$v" == *:* ]] && cat "${v#*:}"; } >"$TMP/gw$i.yaml"
    BENCH_BACKEND_PORT=$P_NGINX BENCH_PROXY_PORT=$(port_of "$i") \
        BENCH_ADMIN_PORT=$(( $(port_of "$i") + 1 )) BENCH_ACCESS_LOG=off \
        PYTHONPATH="$HERE/.." timeout 880 taskset -c "$PCPUS" twistd -n --pidfile= clawproxy \
        -c "$TMP/gw$i.yaml" >"$TMP/gw$i.out" 2>&1 &
    PIDS+=($!)
done
i=0
for v in "${VARIANTS[@]}"; do
    i=$((i + 1)); n=$(count_of "$v")
    for _ in $(seq 1 300); do
        [[ $(grep -c "listening on" "$TMP/gw$i.out" 2>/dev/null) -ge $(( n > 1 ? n + 2 : 2 )) ]] && break
        sleep 0.1
    done
    timeout 30 taskset -c "$LCPU" wrk -t1 -c64 -d2s -s "$HERE/chat.lua" \
        "http://127.0.0.1:$(port_of "$i")" >/dev/null
done

results=()
for _ in $(seq 1 "$R"); do
    i=0
    for v in "${VARIANTS[@]}"; do
        i=$((i + 1))
        rps=$(timeout 60 taskset -c "$LCPU" wrk -t1 -c64 -d"${D}s" -s "$HERE/chat.lua" \
            "http://127.0.0.1:$(port_of "$i")" | awk '/Requests\/sec/{print $2}')
        results+=("$v=$rps")
    done
done
python3 - "${results[@]}" <<'EOF'
import statistics as st
import sys

runs = {}
for item in sys.argv[1:]:
    variant, rps = item.rsplit("=", 1)
    runs.setdefault(variant, []).append(float(rps))
base = st.median(next(iter(runs.values())))
for variant, r in runs.items():
    m = st.median(r)
    print(f"{variant}: req/s {[round(x) for x in r]} median {m:.0f} ({m / base:.2f}x)")
EOF
