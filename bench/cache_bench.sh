#!/usr/bin/env bash
# The response cache's figures (issue 9), in one run on one nginx backend:
#
#   bash bench/cache_bench.sh [ROUNDS] [SECONDS] [ENTRIES]
#
# 1. req/s and gateway CPU per request under wrk (50 connections, chat.lua) for a
#    gateway without cache (proxied) and one whose route caches (every request a
#    hit after the first), alternating, ROUNDS (3) x SECONDS (6);
# 2. memory per cached entry: ENTRIES (20000) distinct requests stored, the cache
#    gateway's VmRSS growth / ENTRIES beside the entries' stored bytes.
# Both gateways run on CPU $BENCH_PROXY_CPU (one loaded at a time), wrk and nginx
# on $BENCH_LOAD_CPU. Every server runs under `timeout` and is stopped by PID.
set -euo pipefail
if [[ -z "${BENCH_INNER:-}" ]]; then
    exec timeout --signal=TERM --kill-after=10 400 env BENCH_INNER=1 bash "$0" "$@"
fi
R=${1:-3}; D=${2:-6}; N=${3:-20000}
HERE="$(cd "$(dirname "$0")" && pwd)"; TREE="$(cd "$HERE/.." && pwd)"
PCPU="${BENCH_PROXY_CPU:-1}"; LCPU="${BENCH_LOAD_CPU:-0}"
BASE=$(( ${BENCH_PORT_BASE:-18080} + 50 ))
P_NGINX=$BASE; P_P=$((BASE + 1)); P_C=$((BASE + 2)); A_P=$((BASE + 11)); A_C=$((BASE + 12))
source "$HERE/lib.sh"
check_ports $P_NGINX $P_P $P_C $A_P $A_C
bench_tmp clawcache

start_nginx "$P_NGINX" "$LCPU" 390
gateway() {  # gateway CONFIG PORT ADMIN NAME
    BENCH_BACKEND_PORT=$P_NGINX BENCH_PROXY_PORT=$2 BENCH_ADMIN_PORT=$3 BENCH_ACCESS_LOG=off \
        PYTHONPATH=$TREE timeout 390 taskset -c "$PCPU" twistd -n --pidfile= clawproxy \
        -c "$HERE/$1" >"$TMP/$4.out" 2>&1 &
    PIDS+=($!)
}
gateway gateway-bench.yaml "$P_P" "$A_P" proxied
gateway gateway-cache.yaml "$P_C" "$A_C" cached
wait_ports $P_NGINX $P_P $P_C
PID_P=$(pgrep -P "${PIDS[1]}" | head -1); PID_C=$(pgrep -P "${PIDS[2]}" | head -1)

cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
run() {  # run PORT PID -> "req/s cpu_us_per_request"
    local c0 c1 out
    c0=$(cpu "$2")
    out=$(timeout 60 taskset -c "$LCPU" wrk -t1 -c50 -d"${D}s" -s "$HERE/chat.lua" "http://127.0.0.1:$1")
    c1=$(cpu "$2")
    echo "$out" | awk -v t=$((c1 - c0)) -v hz="$(getconf CLK_TCK)" \
        '/requests in/{n=$1} /Requests\/sec/{r=$2} /Non-2xx/{bad=$4} END{printf "%s %.1f %d\n", r, t / hz * 1e6 / n, bad}'
}
for p in $P_P $P_C; do
    timeout 30 taskset -c "$LCPU" wrk -t1 -c50 -d2s -s "$HERE/chat.lua" "http://127.0.0.1:$p" >/dev/null
done
curl -s -o /dev/null -D - -X POST -H 'Content-Type: application/json' \
    -d '{"model":"bench-model","messages":[{"role":"user","content":"Say hello."}],"max_tokens":16}' \
    "http://127.0.0.1:$P_C/v1/chat/completions" | grep -i '^x-cache' || true
proxied=(); cached=()
for _ in $(seq 1 "$R"); do
    proxied+=("$(run "$P_P" "$PID_P")"); cached+=("$(run "$P_C" "$PID_C")")
done
python3 - "$(printf '%s;' "${proxied[@]}")" "$(printf '%s;' "${cached[@]}")" <<'PY'
import statistics as st
import sys

rows = [[tuple(map(float, x.split())) for x in arg.split(";") if x.strip()] for arg in sys.argv[1:]]
for name, r in zip(("proxied   ", "cache hit "), rows):
    print(name, "req/s", [round(x) for x, _, _ in r], "| CPU us/req", [c for _, c, _ in r],
          "| non-2xx", sum(b for _, _, b in r))
(rp, cp), (rc, cc) = [(st.median(x for x, _, _ in r), st.median(c for _, c, _ in r)) for r in rows]
print(f"median req/s proxied {rp:.0f}, cache hit {rc:.0f}: x{rc / rp:.2f}; "
      f"CPU per request {cp:.0f} -> {cc:.0f} us (x{cp / cc:.2f})")
PY
# Memory per cached entry.
python3 - "$P_C" "$A_C" "$PID_C" "$N" <<'PY'
import http.client
import json
import sys

port, admin, pid, n = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])

def rss() -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("no VmRSS")

def status() -> dict:
    c = http.client.HTTPConnection("127.0.0.1", admin, timeout=10)
    c.request("GET", "/admin/status")
    return json.loads(c.getresponse().read())["cache"]

conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

def fill(start: int, count: int) -> None:
    for i in range(start, start + count):
        body = json.dumps({"model": "bench-model", "max_tokens": 16, "messages": [
            {"role": "user", "content": f"Question number {i}: say hello."}]})
        conn.request("POST", "/v1/chat/completions", body,
                     {"Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        assert r.status == 200 and r.getheader("x-cache") == "MISS", (r.status, i)

fill(0, 2000)  # warm: allocator arenas, dict resizes
before, s0 = rss(), status()
fill(2000, n)
after, s1 = rss(), status()
entries = s1["entries"] - s0["entries"]
stored = (s1["bytes"] - s0["bytes"]) / entries
print(f"memory per cached entry: {entries} entries, VmRSS +{(after - before) / 1024:.0f} KiB"
      f" = {(after - before) / entries:.0f} B/entry (its encoded size, what max_bytes"
      f" counts: {stored:.0f} B/entry)")
PY
