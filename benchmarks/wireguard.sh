#!/usr/bin/env bash
# WireGuard against QUIC through the same Skylane path, in one run on this machine: edge ->
# tunnel over the mesh socket -> origin-connector -> demo-origin, once with the connector's
# transport = "quic" and once with "wireguard" (boringtun + smoltcp in user space), measuring
#   HTTPS request rate (wrk, HTTP/1.1) and server CPU per request (edge + connector, /proc),
#   websocket echo round trips (sequential, one connection),
#   a bulk download (1 GiB by default) and its CPU per MB.
#
#   benchmarks/wireguard.sh                          build release binaries, then measure
#   SKYLANE_BIN_DIR=/path/to/release benchmarks/wireguard.sh
#
# Knobs [defaults]: BENCH_DURATION [10] s per wrk run, BENCH_CONNECTIONS [32], BENCH_ROUNDS
# [3] interleaved quic/wireguard rounds (medians reported), BENCH_PATH [/api/time], WS_COUNT
# [2000], BULK_BYTES [1073741824], BENCH_PORT_BASE [29080] (seven ports, TCP and UDP),
# BENCH_OUT [benchmarks/results/wireguard-<UTC timestamp>].
#
# Everything listens on 127.0.0.1 and sends to loopback only; every load step is bounded
# in time; every process started here is stopped on exit.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
DURATION="${BENCH_DURATION:-10}"
CONNS="${BENCH_CONNECTIONS:-32}"
ROUNDS="${BENCH_ROUNDS:-3}"
REQ_PATH="${BENCH_PATH:-/api/time}"
WS_COUNT="${WS_COUNT:-2000}"
BULK_BYTES="${BULK_BYTES:-1073741824}"
BASE="${BENCH_PORT_BASE:-29080}"
out="${BENCH_OUT:-$here/results/wireguard-$(date -u +%Y%m%dT%H%M%SZ)}"
P_ORIGIN=$BASE P_EDGE=$((BASE + 2)) P_EDGE_ADMIN=$((BASE + 3)) P_CONN_ADMIN=$((BASE + 4))
P_CONN_MESH=$((BASE + 5)) P_EDGE_MESH=$((BASE + 6))
# shellcheck source=benchmarks/lib.sh
source "$here/lib.sh"

need=()
command -v wrk >/dev/null || need+=(wrk)
apt_install "${need[@]}"
skylane_bins
ports_free "$P_ORIGIN" "$P_EDGE" "$P_EDGE_ADMIN" "$P_CONN_ADMIN" -- "$P_CONN_MESH" "$P_EDGE_MESH"
mkdir -p "$out/raw"
machine_json "wrk=$(wrk -v 2>&1 | head -1)" >"$out/machine.json"

"$bin/demo-origin" --listen "127.0.0.1:$P_ORIGIN" --name bench >"$run_dir/demo-origin.log" 2>&1 &
pids+=($!); PID_ORIGIN=$!
wait_for "http://127.0.0.1:$P_ORIGIN/health" || die "demo-origin did not start"

# start TRANSPORT: a fresh connector and edge with that transport; sets PID_CONN, PID_EDGE.
start() {
  # Fresh keys and certificate for each pair: skylane_configs makes them.
  rm -rf "$run_dir"/conn.key* "$run_dir"/edge.key* "$run_dir/certs"
  BENCH_TRANSPORT=$1 CONNECTOR_EXTRA='response_timeout_ms = 30000' skylane_configs
  (cd "$run_dir" && exec "$bin/origin-connector" --config connector.toml) >>"$run_dir/connector-$1.log" 2>&1 &
  pids+=($!); PID_CONN=$!
  (cd "$run_dir" && exec "$bin/mesh-node" --config edge.toml) >>"$run_dir/edge-$1.log" 2>&1 &
  pids+=($!); PID_EDGE=$!
  wait_for "http://127.0.0.1:$P_EDGE_ADMIN/readyz" || die "$1: edge not ready"
  wait_for "https://127.0.0.1:$P_EDGE/health" -k || die "$1: no answer through the tunnel"
}
stop_pair() {
  kill -TERM "$PID_EDGE" "$PID_CONN" 2>/dev/null || true
  wait "$PID_EDGE" "$PID_CONN" 2>/dev/null || true
}
cpu_pair() { echo "$(cpu_of "$PID_EDGE") $(cpu_of "$PID_CONN")"; }

for r in $(seq 1 "$ROUNDS"); do
  for t in quic wireguard; do
    start "$t"
    timeout 30 wrk -t1 -c"$CONNS" -d2s "https://127.0.0.1:$P_EDGE$REQ_PATH" >/dev/null
    log "round $r $t: wrk -t1 -c$CONNS -d${DURATION}s"
    before=$(cpu_pair)
    timeout $((DURATION + 30)) wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency \
      -s "$here/wrk_json.lua" "https://127.0.0.1:$P_EDGE$REQ_PATH" >"$out/raw/wrk-$t-$r.txt"
    after=$(cpu_pair)
    echo "$before $after" >"$out/raw/wrk-$t-$r.cpu"
    if [[ $r == 1 ]]; then
      log "$t: websocket echo, $WS_COUNT messages"
      timeout 120 python3 "$here/ws_rtt.py" "wss://127.0.0.1:$P_EDGE/ws" --count "$WS_COUNT" \
        --insecure --max-seconds 90 >"$out/raw/ws-$t.json"
      log "$t: bulk download of $BULK_BYTES bytes"
      before=$(cpu_pair)
      curl -ksS --http1.1 --max-time 300 -o /dev/null \
        -w '{"bytes": %{size_download}, "seconds": %{time_total}, "bytes_per_s": %{speed_download}, "status": %{http_code}}\n' \
        "https://127.0.0.1:$P_EDGE/bytes/$BULK_BYTES" >"$out/raw/bulk-$t.json" || echo '{"error": "curl failed"}' >"$out/raw/bulk-$t.json"
      after=$(cpu_pair)
      echo "$before $after" >"$out/raw/bulk-$t.cpu"
    fi
    stop_pair
  done
done

python3 - "$out" "$ROUNDS" >"$out/report.md" <<'PY'
import json, re, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def cpu(path):
    b_e, b_c, a_e, a_c = (float(x) for x in open(path).read().split())
    return a_e - b_e, a_c - b_c
rows = {}
for t in ("quic", "wireguard"):
    rps, p99, per_req = [], [], []
    for r in range(1, rounds + 1):
        text = open(f"{out}/raw/wrk-{t}-{r}.txt").read()
        d = json.loads(re.search(r"^JSON (.*)$", text, re.M).group(1))
        e, c = cpu(f"{out}/raw/wrk-{t}-{r}.cpu")
        rps.append(d["rps"]); p99.append(d["p99_us"])
        per_req.append((e + c) / max(d["requests"], 1) * 1e6)
    ws = json.load(open(f"{out}/raw/ws-{t}.json"))
    bulk = json.load(open(f"{out}/raw/bulk-{t}.json"))
    be, bc = cpu(f"{out}/raw/bulk-{t}.cpu")
    mb = bulk.get("bytes", 0) / 1e6
    rows[t] = {
        "req/s (median)": f"{statistics.median(rps):,.0f}",
        "p99 ms (median)": f"{statistics.median(p99) / 1000:.2f}",
        "edge+connector CPU per request (µs)": f"{statistics.median(per_req):.0f}",
        "websocket echo p50 / p99 (µs)": f"{ws['p50_us']:.0f} / {ws['p99_us']:.0f}",
        "bulk MB/s": f"{bulk.get('bytes_per_s', 0) / 1e6:.0f}",
        "bulk CPU per MB (ms)": f"{(be + bc) / max(mb, 1e-9) * 1000:.2f}",
    }
m = json.load(open(f"{out}/machine.json"))
print(f"# WireGuard against QUIC, one run\n\n{m['date_utc']}, {m['nproc']} × {m['cpu_model']}, commit {m['git_commit']}.\n")
print("| | QUIC | WireGuard |\n|---|---:|---:|")
for k in rows["quic"]:
    print(f"| {k} | {rows['quic'][k]} | {rows['wireguard'][k]} |")
PY
cat "$out/report.md"
