#!/usr/bin/env bash
# The cost of authentication: wrk against four clawproxy gateways on one nginx backend,
# alternating, same tree:
#   plain    no auth
#   apikey   auth.api_key, the request carries a valid key (Authorization: Bearer)
#   jwt      auth.jwt HS256, the request carries a valid token (verified once, then cached)
#   nocache  the same, with the verified-token cache off (a copy of the tree, cache size 0)
#
#   bash bench/auth_ab.sh [ROUNDS] [SECONDS]
#
# Prints req/s and the gateway's CPU time per request (utime+stime / requests) per round
# and their medians. All gateways on CPU $BENCH_PROXY_CPU (one loaded at a time), wrk and
# nginx on $BENCH_LOAD_CPU.
set -euo pipefail
if [[ -z "${BENCH_INNER:-}" ]]; then
    exec timeout --signal=TERM --kill-after=10 400 env BENCH_INNER=1 bash "$0" "$@"
fi
R=${1:-3}; D=${2:-6}
HERE="$(cd "$(dirname "$0")" && pwd)"; TREE="$(cd "$HERE/.." && pwd)"
PCPU="${BENCH_PROXY_CPU:-1}"; LCPU="${BENCH_LOAD_CPU:-0}"
BASE=$(( ${BENCH_PORT_BASE:-18080} + 50 ))
NAMES=(plain apikey jwt nocache)
P_NGINX=$BASE
source "$HERE/lib.sh"
check_ports $(seq "$BASE" $((BASE + 8)))
bench_tmp clawauth

SECRET=bench-jwt-secret-0123456789abcdef
TOKEN=$(python3 -c "import jwt, time; print(jwt.encode({'sub': 'bench', 'exp': int(time.time()) + 3600}, '$SECRET', 'HS256'))")
KEY_HASH=$(PYTHONPATH=$TREE python3 -c "from clawproxy.config import hash_key; print(hash_key('sk-bench'))")
cp "$HERE/gateway-bench.yaml" "$TMP/plain.yaml"
{ cat "$HERE/gateway-bench.yaml"; echo "agents: {bench: {keys: [\"$KEY_HASH\"]}}"; } >"$TMP/apikey.yaml"
{ cat "$HERE/gateway-bench.yaml"; echo "auth: {jwt: {secret: $SECRET}}"; } >"$TMP/jwt.yaml"
cp "$TMP/jwt.yaml" "$TMP/nocache.yaml"
mkdir -p "$TMP/nocache-tree"
cp -r "$TREE/clawproxy" "$TMP/nocache-tree/"
sed -i 's/def __init__(self, size: int = 4096, ttl: float = 60.0)/def __init__(self, size: int = 0, ttl: float = 60.0)/' \
    "$TMP/nocache-tree/clawproxy/policy/jwt.py"
grep -q "size: int = 0" "$TMP/nocache-tree/clawproxy/policy/jwt.py"
sed -e 's#"Bearer sk-bench"#os.getenv("BENCH_AUTH")#' "$HERE/chat.lua" >"$TMP/chat.lua"

start_nginx "$P_NGINX" "$LCPU" 390
declare -A PORT PID
i=1
for n in "${NAMES[@]}"; do
    PORT[$n]=$((BASE + i)); tree=$TREE
    [[ $n == nocache ]] && tree=$TMP/nocache-tree
    BENCH_BACKEND_PORT=$P_NGINX BENCH_PROXY_PORT=${PORT[$n]} BENCH_ADMIN_PORT=$((BASE + 4 + i)) \
        BENCH_ACCESS_LOG=off PYTHONPATH=$tree timeout 390 taskset -c "$PCPU" \
        twistd -n --pidfile= clawproxy -c "$TMP/$n.yaml" >"$TMP/$n.out" 2>&1 &
    PIDS+=($!)
    i=$((i + 1))
done
for n in "${NAMES[@]}"; do
    for _ in $(seq 1 100); do ss -Hltn "sport = :${PORT[$n]}" | grep -q . && break; sleep 0.1; done
done
i=1
for n in "${NAMES[@]}"; do PID[$n]=$(pgrep -P "${PIDS[$i]}" | head -1); i=$((i + 1)); done

auth_for() { [[ $1 == plain || $1 == apikey ]] && echo "Bearer sk-bench" || echo "Bearer $TOKEN"; }
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
run() {  # run NAME -> "req/s cpu_us_per_request non2xx"
    local c0 c1 out
    c0=$(cpu "${PID[$1]}")
    out=$(BENCH_AUTH=$(auth_for "$1") timeout 60 taskset -c "$LCPU" wrk -t1 -c50 -d"${D}s" \
        -s "$TMP/chat.lua" "http://127.0.0.1:${PORT[$1]}")
    c1=$(cpu "${PID[$1]}")
    echo "$out" | awk -v t=$((c1 - c0)) -v hz="$(getconf CLK_TCK)" \
        '/requests in/{n=$1} /Requests\/sec/{r=$2} /Non-2xx/{bad=$NF}
         END{printf "%s %.1f %d\n", r, t / hz * 1e6 / n, bad}'
}
for n in "${NAMES[@]}"; do  # warm up, and check every variant answers 200
    code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: $(auth_for "$n")" \
        -H 'Content-Type: application/json' -d '{"model":"m","messages":[]}' \
        "http://127.0.0.1:${PORT[$n]}/v1/chat/completions")
    [[ $code == 200 ]] || { echo "$n answered $code" >&2; cat "$TMP/$n.out" >&2; exit 1; }
    BENCH_AUTH=$(auth_for "$n") timeout 30 taskset -c "$LCPU" wrk -t1 -c50 -d2s \
        -s "$TMP/chat.lua" "http://127.0.0.1:${PORT[$n]}" >/dev/null
done
declare -A RES
for _ in $(seq 1 "$R"); do
    for n in "${NAMES[@]}"; do RES[$n]+="$(run "$n");"; done
done
args=(); for n in "${NAMES[@]}"; do args+=("$n=${RES[$n]}"); done
python3 - "${args[@]}" <<'EOF'
import statistics as st
import sys

base = None
for arg in sys.argv[1:]:
    name, _, rows = arg.partition("=")
    r = [tuple(map(float, x.split())) for x in rows.split(";") if x.strip()]
    rps, cpu = st.median(x[0] for x in r), st.median(x[1] for x in r)
    bad = sum(x[2] for x in r)
    base = base or (rps, cpu)
    print(f"{name:8} req/s {[round(x[0]) for x in r]} median {rps:.0f} ({100 * (rps / base[0] - 1):+.1f}%)"
          f" | CPU us/req {[x[1] for x in r]} median {cpu:.0f} ({100 * (cpu / base[1] - 1):+.1f}%)"
          f" | non-2xx {bad:.0f}")
EOF
