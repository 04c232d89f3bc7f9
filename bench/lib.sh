# Shell helpers shared by the bench scripts (sourced, not run).
# Before calling start/wait_port, set OUT (each server's log goes to $OUT/NAME.log)
# and SERVER_TIMEOUT (each server's hard ceiling, in seconds).

PIDS=()
BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

check_ports() {  # check_ports PORT...: exit 1 if any of them is listened on
    local p
    for p in "$@"; do
        if ss -Hltn "sport = :$p" | grep -q .; then
            echo "port $p is in use; set BENCH_PORT_BASE" >&2
            exit 1
        fi
    done
}

# Each server runs under `timeout` (a hard ceiling) and is stopped by its PID.
start() {  # start NAME CPU CMD...: its `timeout` PID in PIDS and in PID_NAME
    local name=$1 cpu=$2
    shift 2
    timeout "$SERVER_TIMEOUT" taskset -c "$cpu" "$@" >"$OUT/$name.log" 2>&1 &
    PIDS+=($!)
    eval "PID_${name//-/_}=$!"
}

stop_servers() {  # TERM every server started, then KILL what is left
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    sleep 0.5
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}

wait_port() {  # wait_port PORT NAME: up to 10 s
    local i
    for i in $(seq 1 100); do
        ss -Hltn "sport = :$1" | grep -q . && return 0
        sleep 0.1
    done
    echo "$2 did not listen on $1; see $OUT/$2.log" >&2
    exit 1
}

child_of() { pgrep -P "$1" | head -1; }  # the real server under `timeout`

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }  # utime + stime of PID

# The A/B scripts (ab.sh, limits.sh, auth_ab.sh, cache_bench.sh, workers.sh): a scratch
# dir, the bench nginx, and their servers' PIDs in PIDS, killed on exit.
bench_tmp() {  # bench_tmp PREFIX: TMP=/tmp/PREFIX.XXXXXX, removed (servers killed) on exit
    TMP=$(mktemp -d "/tmp/$1.XXXXXX")
    trap bench_cleanup EXIT
    trap 'exit 130' INT TERM
}

bench_cleanup() {  # kill every PID in PIDS, wait for them, remove $TMP
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$TMP"
}

start_nginx() {  # start_nginx PORT CPU SECONDS: the bench nginx (nginx.conf.in) in $TMP/nginx
    mkdir -p "$TMP/nginx"
    sed -e "s#@DIR@#$TMP/nginx#g" -e "s#@PORT@#$1#g" "$BENCH_DIR/nginx.conf.in" >"$TMP/nginx/nginx.conf"
    timeout "$3" taskset -c "$2" nginx -c "$TMP/nginx/nginx.conf" -p "$TMP/nginx" >/dev/null 2>&1 &
    PIDS+=($!)
}

wait_ports() {  # wait_ports PORT...: up to 10 s for each to listen (no error if one does not)
    local p
    for p in "$@"; do
        for _ in $(seq 1 100); do ss -Hltn "sport = :$p" | grep -q . && break; sleep 0.1; done
    done
}

# The SSE A/B scripts (sse_ab.sh, tokens_ab.sh): a simulator backend, PIDs killed on exit.
start_sim() {  # start_sim PORT LOG TREE: the stream simulator (gc off) on core 0, its PID in PIDS
    PYTHONPATH=$3 taskset -c 0 python3 -c 'import gc, sys; gc.disable(); from clawproxy.cli import main; sys.exit(main())' \
        sim --listen "tcp:$1:interface=127.0.0.1:backlog=4096" --ttft 0 --tokens-per-second 2 \
        --max-tokens 1000 --id sim-bench --model sim-stream >"$2" 2>&1 &
    PIDS+=($!)
}

kill_pids() {  # kill every PID in PIDS (not waited for)
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
}
