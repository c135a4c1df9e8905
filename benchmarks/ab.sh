#!/usr/bin/env bash
# Two Skylane variants through the same path, interleaved in one run on this machine: edge ->
# tunnel over the mesh socket -> origin-connector -> demo-origin, each round starting a fresh
# connector and edge of variant A, then of B, and measuring
#   HTTPS request rate over HTTP/1.1 (wrk) and HTTP/2 (h2load), with server CPU per request
#   (edge + connector + origin, from /proc), the QUIC datagrams per request through the
#   edge's mesh socket (from its /status) and the context switches per request of the edge
#   and the connector (from /proc),
#   websocket echo round trips (sequential, one connection),
#   a bulk download (1 GiB by default, one per round) and its CPU per MB.
# For "before and after" of a change (two builds), a setting (worker threads) or a transport.
#
#   AB_A="name=before bin=/tmp/old" AB_B="name=after" benchmarks/ab.sh
#   AB_A="name=multi" AB_B="name=single threads=1" benchmarks/ab.sh
#
# A variant is space-separated key=value pairs: name (its label), bin (a directory with
# release mesh-node and origin-connector; default: $SKYLANE_BIN_DIR, else built here),
# threads (node.worker_threads of both nodes; default: unset) and transport (quic or
# wireguard; default quic). demo-origin comes from the default directory.
#
# Knobs [defaults]: BENCH_DURATION [10] s per load run, BENCH_CONNECTIONS [32] for wrk,
# BENCH_H2_CONNECTIONS [16] and BENCH_H2_STREAMS [10] for h2load, BENCH_ROUNDS [3]
# interleaved rounds (medians reported), BENCH_PATH [/api/time], WS_COUNT [2000] (0: none),
# BULK_BYTES [1073741824] (0: none), BENCH_PORT_BASE [29080] (seven ports, TCP and UDP),
# AB_TITLE [A against B], BENCH_OUT [benchmarks/results/ab-<UTC timestamp>].
#
# Everything listens on 127.0.0.1 and sends to loopback only; every load step is bounded
# in time; every process started here is stopped on exit.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
DURATION="${BENCH_DURATION:-10}"
CONNS="${BENCH_CONNECTIONS:-32}"
H2_CONNS="${BENCH_H2_CONNECTIONS:-16}"
H2_STREAMS="${BENCH_H2_STREAMS:-10}"
ROUNDS="${BENCH_ROUNDS:-3}"
REQ_PATH="${BENCH_PATH:-/api/time}"
WS_COUNT="${WS_COUNT:-2000}"
BULK_BYTES="${BULK_BYTES:-1073741824}"
BASE="${BENCH_PORT_BASE:-29080}"
AB_A="${AB_A:-name=A}"
AB_B="${AB_B:-name=B}"
out="${BENCH_OUT:-$here/results/ab-$(date -u +%Y%m%dT%H%M%SZ)}"
P_ORIGIN=$BASE P_EDGE=$((BASE + 2)) P_EDGE_ADMIN=$((BASE + 3)) P_CONN_ADMIN=$((BASE + 4))
P_CONN_MESH=$((BASE + 5)) P_EDGE_MESH=$((BASE + 6))
# shellcheck source=benchmarks/lib.sh
source "$here/lib.sh"

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v h2load >/dev/null || need+=(nghttp2-client)
apt_install "${need[@]}"
skylane_bins
default_bin="$bin"
ports_free "$P_ORIGIN" "$P_EDGE" "$P_EDGE_ADMIN" "$P_CONN_ADMIN" -- "$P_CONN_MESH" "$P_EDGE_MESH"
mkdir -p "$out/raw"

# variant SPEC KEY DEFAULT: the value of KEY in a variant's spec.
variant() {
  local kv kvs
  read -ra kvs <<<"$1"
  for kv in "${kvs[@]}"; do
    if [[ ${kv%%=*} == "$2" ]]; then echo "${kv#*=}"; return; fi
  done
  echo "$3"
}
# check_variant SPEC: dies on a key that is not name, bin, threads or transport.
check_variant() {
  local kv kvs
  read -ra kvs <<<"$1"
  for kv in "${kvs[@]}"; do
    case ${kv%%=*} in
      name | bin | threads | transport) ;;
      *) die "unknown key in variant \"$1\": ${kv%%=*} (name, bin, threads, transport)" ;;
    esac
  done
}
declare -A SPEC=([A]="$AB_A" [B]="$AB_B")
declare -A NAME BIN
for v in A B; do
  check_variant "${SPEC[$v]}"
  NAME[$v]="$(variant "${SPEC[$v]}" name "$v")"
  BIN[$v]="$(variant "${SPEC[$v]}" bin "$default_bin")"
  BIN[$v]="$(cd "${BIN[$v]}" && pwd)" || die "variant $v: bin ${BIN[$v]} is not a directory"
  for b in mesh-node origin-connector; do
    [[ -x "${BIN[$v]}/$b" ]] || die "variant $v: no ${BIN[$v]}/$b"
  done
done
machine_json "wrk=$(wrk -v 2>&1 | head -1 | awk '{print $2}')" \
  "h2load=$(h2load --version 2>&1 | head -1 | awk '{print $2}')" \
  "A=${SPEC[A]} (bin ${BIN[A]}: $("${BIN[A]}/mesh-node" --version 2>/dev/null))" \
  "B=${SPEC[B]} (bin ${BIN[B]}: $("${BIN[B]}/mesh-node" --version 2>/dev/null))" >"$out/raw/machine.json"

"$bin/demo-origin" --listen "127.0.0.1:$P_ORIGIN" --name bench >"$run_dir/demo-origin.log" 2>&1 &
pids+=($!); PID_ORIGIN=$!
wait_for "http://127.0.0.1:$P_ORIGIN/health" || die "demo-origin did not start"

# start V: a fresh connector and edge of variant V; sets PID_CONN, PID_EDGE.
start() {
  local spec=${SPEC[$1]} b=${BIN[$1]}
  # Fresh keys and certificate for each pair: skylane_configs makes them.
  rm -rf "$run_dir"/conn.key* "$run_dir"/edge.key* "$run_dir/certs"
  BENCH_TRANSPORT="$(variant "$spec" transport quic)" \
    BENCH_SKYLANE_WORKER_THREADS="$(variant "$spec" threads "")" \
    CONNECTOR_EXTRA='response_timeout_ms = 30000' bin="$b" skylane_configs
  (cd "$run_dir" && exec "$b/origin-connector" --config connector.toml) >>"$run_dir/connector-$1.log" 2>&1 &
  pids+=($!); PID_CONN=$!
  (cd "$run_dir" && exec "$b/mesh-node" --config edge.toml) >>"$run_dir/edge-$1.log" 2>&1 &
  pids+=($!); PID_EDGE=$!
  wait_for "http://127.0.0.1:$P_EDGE_ADMIN/readyz" || die "${NAME[$1]}: edge not ready"
  wait_for "https://127.0.0.1:$P_EDGE/health" -k || die "${NAME[$1]}: no answer through the tunnel"
}
# stop_pair: stops the pair (KILL after 10 s) and takes it off the list cleanup stops.
stop_pair() {
  kill -TERM "$PID_EDGE" "$PID_CONN" 2>/dev/null || true
  local _
  for _ in $(seq 1 100); do
    kill -0 "$PID_EDGE" 2>/dev/null || kill -0 "$PID_CONN" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$PID_EDGE" "$PID_CONN" 2>/dev/null || true
  wait "$PID_EDGE" "$PID_CONN" 2>/dev/null || true
  local keep=() p
  for p in "${pids[@]}"; do [[ $p == "$PID_EDGE" || $p == "$PID_CONN" ]] || keep+=("$p"); done
  pids=("${keep[@]}")
}
# CPU seconds so far: "edge connector origin".
cpu_now() { echo "$(cpu_of "$PID_EDGE") $(cpu_of "$PID_CONN") $(cpu_of "$PID_ORIGIN")"; }
# Context switches so far: "edge connector".
ctxsw_now() { echo "$(ctxsw_of "$PID_EDGE") $(ctxsw_of "$PID_CONN")"; }

url="https://127.0.0.1:$P_EDGE"
for r in $(seq 1 "$ROUNDS"); do
  for v in A B; do
    start "$v"
    timeout 30 wrk -t1 -c"$CONNS" -d2s "$url$REQ_PATH" >/dev/null
    log "round $r ${NAME[$v]}: wrk -t1 -c$CONNS -d${DURATION}s"
    before=$(cpu_now); fb=$(edge_frames "$P_EDGE_ADMIN"); sb=$(ctxsw_now)
    timeout $((DURATION + 30)) wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency \
      -s "$here/wrk_json.lua" "$url$REQ_PATH" >"$out/raw/h1-$v-$r.txt"
    echo "$before $(cpu_now)" >"$out/raw/h1-$v-$r.cpu"
    echo "$sb $(ctxsw_now)" >"$out/raw/h1-$v-$r.ctxsw"
    frames_json "$fb" "$(edge_frames "$P_EDGE_ADMIN")" >"$out/raw/h1-$v-$r.frames.json"
    log "round $r ${NAME[$v]}: h2load -c$H2_CONNS -m$H2_STREAMS -D $DURATION"
    # Warm-up in a run of its own, so the CPU counted below is only the measured requests'.
    timeout 30 h2load -t1 -c"$H2_CONNS" -m"$H2_STREAMS" -D 1 "$url$REQ_PATH" >/dev/null 2>&1 || true
    before=$(cpu_now); fb=$(edge_frames "$P_EDGE_ADMIN"); sb=$(ctxsw_now)
    timeout $((DURATION + 40)) h2load -t1 -c"$H2_CONNS" -m"$H2_STREAMS" -D "$DURATION" \
      "$url$REQ_PATH" >"$out/raw/h2-$v-$r.txt" 2>&1 || true
    echo "$before $(cpu_now)" >"$out/raw/h2-$v-$r.cpu"
    echo "$sb $(ctxsw_now)" >"$out/raw/h2-$v-$r.ctxsw"
    frames_json "$fb" "$(edge_frames "$P_EDGE_ADMIN")" >"$out/raw/h2-$v-$r.frames.json"
    if [[ $r == 1 && $WS_COUNT != 0 ]]; then
      log "${NAME[$v]}: websocket echo, $WS_COUNT messages"
      timeout 120 python3 "$here/ws_rtt.py" "wss://127.0.0.1:$P_EDGE/ws" --count "$WS_COUNT" \
        --insecure --max-seconds 90 >"$out/raw/ws-$v.json" || log "${NAME[$v]}: websocket echo failed"
    fi
    if [[ $BULK_BYTES != 0 ]]; then
      log "${NAME[$v]}: bulk download of $BULK_BYTES bytes"
      before=$(cpu_now)
      curl -ksS --http1.1 --max-time 300 -o /dev/null \
        -w '{"bytes": %{size_download}, "seconds": %{time_total}, "bytes_per_s": %{speed_download}, "status": %{http_code}}\n' \
        "$url/bytes/$BULK_BYTES" >"$out/raw/bulk-$v-$r.json" || echo '{"error": "curl failed"}' >"$out/raw/bulk-$v-$r.json"
      echo "$before $(cpu_now)" >"$out/raw/bulk-$v-$r.cpu"
    fi
    stop_pair
  done
done
echo "{\"loadavg_after\": \"$(cut -d' ' -f1-3 /proc/loadavg)\"}" >"$out/raw/after.json"

python3 "$here/ab_report.py" "$out" --rounds "$ROUNDS" --title "${AB_TITLE:-${NAME[A]} against ${NAME[B]}}" \
  --name-a "${NAME[A]}" --name-b "${NAME[B]}" --conns "$CONNS" --h2 "$H2_CONNS x $H2_STREAMS" \
  --duration "$DURATION" --path "$REQ_PATH" >"$out/results.md"
log "done: $out/results.md"
cat "$out/results.md"
