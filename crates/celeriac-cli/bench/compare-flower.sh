#!/usr/bin/env bash
# Measures the standalone `celeriac dashboard` against Flower on one private Redis with one
# Python Celery worker: start-up time to the first HTTP 200, resident memory (VmRSS from
# /proc) idle and with N tasks in history, the CPU time each spends taking in the N tasks'
# events, and page and API load times with N tasks in history (pages in headless Chromium).
#
#   cargo build --release -p celeriac-cli && scripts/python-env >/dev/null
#   crates/celeriac-cli/bench/compare-flower.sh [N (default 100000)]
#
# RATE (default 1000) paces the history in tasks per second (3 events each); RATE=0 sends it
# as fast as Python can. RUNS (default 5) is the number of timings of each kind.
#
# Needs redis-server, curl, chromium and the test venv (target/py-venv, which has Flower).
# Everything it starts listens on loopback and is killed on exit.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
venv="$root/target/py-venv"
bin="${CELERIAC_BIN:-$root/target/release/celeriac}"
N="${1:-100000}"
RUNS="${RUNS:-5}"
py="$venv/bin/python"
free_port() { "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

rport=$(free_port)
redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no >/dev/null 2>&1 &
pids+=($!)
broker="redis://127.0.0.1:$rport/0"
until redis-cli -p "$rport" ping >/dev/null 2>&1; do sleep 0.05; done

log="$(mktemp -d)"
(cd "$root/examples/python" && CELERY_BROKER_URL="$broker" PYTHONDONTWRITEBYTECODE=1 \
    exec "$venv/bin/celery" -A tasks worker -E -P threads -c 2 -n benchpy@bench -Q bench \
    --without-mingle --without-gossip -l WARNING >"$log/worker.log" 2>&1) &
pids+=($!)

start_ours() { RUST_LOG=warn "$bin" -b "$broker" dashboard --bind "127.0.0.1:$1" >>"$log/ours.log" 2>&1 & }
start_flower() {
    FLOWER_UNAUTHENTICATED_API=1 "$venv/bin/celery" -b "$broker" flower --address=127.0.0.1 \
        --port="$1" --logging=warning >>"$log/flower.log" 2>&1 &
}
# Starts one; sets $startup_ms (from the spawn to the first HTTP 200 on /) and $started_pid.
startup() {
    local kind=$1 port=$2 t0
    t0=$(now_ms)
    "start_$kind" "$port"
    started_pid=$!
    until [[ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/")" == 200 ]]; do
        sleep 0.01
    done
    startup_ms=$(( $(now_ms) - t0 ))
}
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
hwm_kib() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }
cpu_ms() { awk -v t="$(getconf CLK_TCK)" '{print int(($14 + $15) * 1000 / t)}' "/proc/$1/stat"; }
median() { tr ' ' '\n' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

sleep 3 # the worker
echo "## start-up to first HTTP 200 (ms), $RUNS runs each, interleaved"
ours_s=() flower_s=()
for _ in $(seq "$RUNS"); do
    startup ours "$(free_port)"; ours_s+=("$startup_ms"); kill "$started_pid"; wait "$started_pid" 2>/dev/null || true
    startup flower "$(free_port)"; flower_s+=("$startup_ms"); kill "$started_pid"; wait "$started_pid" 2>/dev/null || true
done
echo "celeriac: ${ours_s[*]} (median $(echo "${ours_s[*]}" | median))"
echo "flower:   ${flower_s[*]} (median $(echo "${flower_s[*]}" | median))"

oport=$(free_port); startup ours "$oport"; opid=$started_pid; pids+=("$opid")
fport=$(free_port); startup flower "$fport"; fpid=$started_pid; pids+=("$fpid")
sleep 5
echo "## idle, one worker: VmRSS (KiB)"
echo "celeriac: $(rss_kib "$opid")"
echo "flower:   $(rss_kib "$fpid")"

ocpu0=$(cpu_ms "$opid"); fcpu0=$(cpu_ms "$fpid")
t0=$(now_ms)
BROKER="$broker" RATE="${RATE:-1000}" "$py" "$here/gen_history.py" "$N"
sent=$(now_ms)
ours_count() { curl -s "http://127.0.0.1:$oport/api/tasks?limit=1" | "$py" -c 'import json,sys; print(json.load(sys.stdin)["kept"])'; }
flower_count() {
    curl -s "http://127.0.0.1:$fport/tasks/datatable?draw=1&start=0&length=1&search%5Bvalue%5D=&order%5B0%5D%5Bcolumn%5D=0&order%5B0%5D%5Bdir%5D=desc&columns%5B0%5D%5Bdata%5D=name" |
        "$py" -c 'import json,sys; print(json.load(sys.stdin)["recordsTotal"])'
}
# Polled every 2 s (a Flower count sorts its whole history). Done when all N are in, or when
# the count has not moved for 20 s (an LRU may keep a few less than N).
ours_done="" flower_done="" ours_last=-1 flower_last=-1 ours_since=$sent flower_since=$sent
while [[ -z "$ours_done" || -z "$flower_done" ]]; do
    if [[ -z "$ours_done" ]]; then
        c=$(ours_count || echo -1)
        if [[ "$c" != "$ours_last" ]]; then ours_last=$c; ours_since=$(now_ms); fi
        if (( c >= N || $(now_ms) - ours_since > 20000 )); then ours_done="$(( ours_since - sent )) ms ($c tasks)"; fi
    fi
    if [[ -z "$flower_done" ]]; then
        c=$(flower_count || echo -1)
        if [[ "$c" != "$flower_last" ]]; then flower_last=$c; flower_since=$(now_ms); fi
        if (( c >= N || $(now_ms) - flower_since > 20000 )); then flower_done="$(( flower_since - sent )) ms ($c tasks)"; fi
    fi
    if (( $(now_ms) - sent > 900000 )); then echo "still taking events in after 15 min"; break; fi
    sleep 2
done
echo "## $N tasks ($((3 * N)) events) sent in $(( sent - t0 )) ms"
echo "history complete, after the last event was sent: celeriac ${ours_done:-never}, flower ${flower_done:-never} (last count $flower_last)"
echo "CPU time taking them in (ms): celeriac $(( $(cpu_ms "$opid") - ocpu0 )), flower $(( $(cpu_ms "$fpid") - fcpu0 ))"
sleep 2
echo "## with $N tasks in history: VmRSS / VmHWM (KiB)"
echo "celeriac: $(rss_kib "$opid") / $(hwm_kib "$opid")"
echo "flower:   $(rss_kib "$fpid") / $(hwm_kib "$fpid")"

echo "## page load in headless Chromium, cache off (ms, $RUNS runs), $N tasks in history"
ours_rows="document.querySelectorAll('#tasks tr[data-id]').length > 0"
flower_rows="document.querySelectorAll('#tasks-table tbody tr td:not(.dataTables_empty)').length > 0"
worker_shown="document.body && document.body.innerText.includes('histgen@bench')"
page() { local t; t=$("$py" "$here/page_load.py" "$1" "$2" "$RUNS"); echo "$3: $t (median $(echo "$t" | tr -d '[],' | median))"; }
page "http://127.0.0.1:$oport/#/tasks" "$ours_rows" "celeriac tasks page (#/tasks, rows shown)"
page "http://127.0.0.1:$fport/tasks" "$flower_rows" "flower tasks page (/tasks, rows shown)"
page "http://127.0.0.1:$oport/#/" "$worker_shown" "celeriac overview (#/, worker shown)"
page "http://127.0.0.1:$fport/" "$worker_shown" "flower workers page (/, worker shown)"

echo "## API, $N tasks in history (ms, curl time_total, $RUNS runs)"
api() {
    local t=()
    for _ in $(seq "$RUNS"); do
        t+=("$(curl -s -o /dev/null -w '%{time_total}' "$2" | awk '{printf "%.1f", $1 * 1000}')")
    done
    echo "$1: ${t[*]} (median $(echo "${t[*]}" | median)), $(curl -s "$2" | wc -c) bytes"
}
api "celeriac /api/tasks?limit=100" "http://127.0.0.1:$oport/api/tasks?limit=100"
api "flower   /api/tasks?limit=100" "http://127.0.0.1:$fport/api/tasks?limit=100"
api "celeriac /api/tasks?limit=1000" "http://127.0.0.1:$oport/api/tasks?limit=1000"
api "flower   /api/tasks?limit=1000" "http://127.0.0.1:$fport/api/tasks?limit=1000"
# A filter matching nothing: a scan of the whole history.
api "celeriac /api/tasks?state=FAILURE" "http://127.0.0.1:$oport/api/tasks?state=FAILURE"
api "flower   /api/tasks?state=FAILURE" "http://127.0.0.1:$fport/api/tasks?state=FAILURE"
api "celeriac /api/workers" "http://127.0.0.1:$oport/api/workers"
api "flower   /api/workers" "http://127.0.0.1:$fport/api/workers"
echo "## after the page and API loads: VmRSS / VmHWM (KiB)"
echo "celeriac: $(rss_kib "$opid") / $(hwm_kib "$opid")"
echo "flower:   $(rss_kib "$fpid") / $(hwm_kib "$fpid")"
echo "machine: $(nproc) cores, $(uname -sr), $(chromium --version 2>/dev/null), flower $("$venv/bin/python" -c 'import flower; print(flower.__version__)')"
