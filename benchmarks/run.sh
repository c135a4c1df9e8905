#!/usr/bin/env bash
# Skylane whole-path benchmark (issues 2 and 14): HTTPS request rate and latency over
# HTTP/1.1 and HTTP/2, websocket echo round trips and 1 GB download throughput for
#   (a) demo-origin directly (plain HTTP, no TLS),
#   (b) nginx terminating TLS in front of demo-origin (keep-alive upstream),
#   (c) mesh-node edge -> QUIC tunnel over the mesh socket -> origin-connector -> demo-origin,
#   (d) nginx terminating TLS -> rathole 0.5.0 (Noise tunnel) -> demo-origin: the like-for-like
#       peer, a TLS edge plus an encrypted tunnel (rathole is built once with `cargo install`
#       and kept in ~/.cache/skylane-bench),
# all measured in the same run on this machine, plus the "half load" comparison: every target
# at a fixed request rate equal to half of (b)'s measured maximum.
#
#   benchmarks/run.sh                          build the binaries (production profile), then measure
#   SKYLANE_BIN_DIR=/path/to/release benchmarks/run.sh   use prebuilt binaries
#   PROFILE=1 benchmarks/run.sh                also perf-record edge + connector under load
#   PROFILE=only benchmarks/run.sh             only the profile (no measurements, no report);
#                                              perf.data files are kept in the results dir
#
# Other knobs (defaults in brackets): BENCH_DURATION [10] seconds per wrk run,
# BENCH_CONNECTIONS [32], BENCH_ROUNDS [3] interleaved a/b/c/d rounds (the median is
# reported), BENCH_PATH [/api/time], WS_COUNT [2000], BULK_BYTES [1073741824],
# BENCH_PORT_BASE [28080] (ten consecutive ports from here, TCP and UDP, on 127.0.0.1),
# BENCH_H2_CONNECTIONS [16] and BENCH_H2_STREAMS [10] for the HTTP/2 run (h2load -c -m),
# BENCH_HALF_CONNECTIONS [2 x BENCH_CONNECTIONS] for the fixed-rate run, BENCH_KEEP_LOGS [0]
# (1 keeps h2load's per-request logs, several MB each), BENCH_SKYLANE_WORKER_THREADS [unset:
# the nodes' default, a worker per CPU] sets node.worker_threads of the edge and the connector,
# BENCH_OUT [benchmarks/results/<UTC timestamp>].
#
# Everything listens on 127.0.0.1 only and sends traffic to loopback only. Every load step
# is bounded in time (wrk -d, h2load -D, curl --max-time, `timeout`). Every process this
# script starts is stopped on exit, however it exits.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"

DURATION="${BENCH_DURATION:-10}"
CONNS="${BENCH_CONNECTIONS:-32}"
# Open-loop half load over HTTP/1.1 needs spare connections: a connection waiting for a
# slow response cannot send its next scheduled request.
HALF_CONNS="${BENCH_HALF_CONNECTIONS:-$((CONNS * 2))}"
ROUNDS="${BENCH_ROUNDS:-3}"
REQ_PATH="${BENCH_PATH:-/api/time}"
WS_COUNT="${WS_COUNT:-2000}"
BULK_BYTES="${BULK_BYTES:-1073741824}"
BASE="${BENCH_PORT_BASE:-28080}"
PROFILE="${PROFILE:-0}"
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
out="${BENCH_OUT:-$here/results/$stamp}"

P_ORIGIN=$BASE            # demo-origin, plain HTTP
P_NGINX=$((BASE + 1))     # nginx, HTTPS
P_EDGE=$((BASE + 2))      # mesh-node edge, HTTPS
P_EDGE_ADMIN=$((BASE + 3))
P_CONN_ADMIN=$((BASE + 4))
P_CONN_MESH=$((BASE + 5)) # UDP
P_EDGE_MESH=$((BASE + 6)) # UDP
P_PEER=$((BASE + 7))      # nginx, HTTPS, in front of rathole
P_RATHOLE=$((BASE + 8))   # rathole server's control and data channels (Noise over TCP)
P_RATHOLE_SVC=$((BASE + 9)) # rathole server's exposed service (what nginx proxies to)
H2_CONNS="${BENCH_H2_CONNECTIONS:-16}"
H2_STREAMS="${BENCH_H2_STREAMS:-10}"

# shellcheck source=benchmarks/lib.sh
source "$here/lib.sh"

# ---------------------------------------------------------------- tools
need_apt=()
command -v nginx >/dev/null || need_apt+=(nginx)
command -v wrk >/dev/null || need_apt+=(wrk)
command -v h2load >/dev/null || need_apt+=(nghttp2-client)
command -v curl >/dev/null || need_apt+=(curl)
command -v python3 >/dev/null || need_apt+=(python3)
if [[ "$PROFILE" != 0 ]] && ! command -v perf >/dev/null; then need_apt+=(linux-perf); fi
apt_install "${need_apt[@]}"

# ---------------------------------------------------------------- binaries
skylane_bins
rathole_bin
if [[ "$PROFILE" != 0 ]]; then inferno_bins; fi

# ---------------------------------------------------------------- ports
ports_free $P_ORIGIN $P_NGINX $P_EDGE $P_EDGE_ADMIN $P_CONN_ADMIN $P_PEER $P_RATHOLE $P_RATHOLE_SVC \
  -- $P_CONN_MESH $P_EDGE_MESH

mkdir -p "$out/raw"
log "results go to $out"

# ---------------------------------------------------------------- machine
machine_json "nginx=$(nginx -v 2>&1 | sed 's/.*: //')" \
  "wrk=$(wrk -v 2>&1 | head -1 | awk '{print $2}')" \
  "h2load=$(h2load --version 2>&1 | head -1 | awk '{print $2}')" \
  "rathole=$("$rathole" --version 2>&1 | sed -n 's/^Build Version: *//p')" \
  "skylane_worker_threads=${BENCH_SKYLANE_WORKER_THREADS:-default}" >"$out/raw/machine.json"

# ---------------------------------------------------------------- keys, certs, configs
CONNECTOR_EXTRA='response_timeout_ms = 30000

[services.web.health_check]
path = "/health"
interval_ms = 1000
timeout_ms = 500
healthy_threshold = 1
unhealthy_threshold = 3'
skylane_configs

rathole_configs

# nginx_proxy PORT UPSTREAM: a server block terminating TLS on PORT for UPSTREAM.
nginx_proxy() {
  cat <<EOF
  server {
    listen 127.0.0.1:$1 ssl http2;
    ssl_certificate $run_dir/certs/edge.pem;
    ssl_certificate_key $run_dir/certs/edge.key;
    keepalive_requests 1000000;
    location / {
      proxy_pass http://$2;
      proxy_http_version 1.1;
      proxy_set_header Host \$host;
      proxy_set_header Upgrade \$http_upgrade;
      proxy_set_header Connection \$connection_upgrade;
      proxy_max_temp_file_size 0;
      proxy_read_timeout 120s;
    }
  }
EOF
}
cat >"$run_dir/nginx.conf" <<EOF
# nginx as the TLS-terminating reverse proxy, (b) straight to the origin and (d) to rathole:
# same certificate as the edge, HTTP/2 on, keep-alive upstream, websocket upgrade headers,
# no temp files.
$(nginx_preamble)
  upstream rathole {
    server 127.0.0.1:$P_RATHOLE_SVC;
    keepalive 64;
  }
  map \$http_upgrade \$connection_upgrade { default upgrade; '' ''; }
$(nginx_proxy "$P_NGINX" origin)
$(nginx_proxy "$P_PEER" rathole)
}
EOF

# ---------------------------------------------------------------- start
log "starting demo-origin, nginx, origin-connector, mesh-node"
"$bin/demo-origin" --listen "127.0.0.1:$P_ORIGIN" --name bench >"$run_dir/demo-origin.log" 2>&1 &
pids+=($!); PID_ORIGIN=$!
wait_for "http://127.0.0.1:$P_ORIGIN/health" || die "demo-origin did not start"

nginx -p "$run_dir" -c "$run_dir/nginx.conf" >"$run_dir/nginx.log" 2>&1 &
pids+=($!); PID_NGINX=$!
wait_for "https://127.0.0.1:$P_NGINX/health" -k || die "nginx did not start (see $run_dir/nginx-error.log)"

# Logs at warn, as the Skylane nodes'.
RUST_LOG=warn "$rathole" --server "$run_dir/rathole-server.toml" >"$run_dir/rathole-server.log" 2>&1 &
pids+=($!); PID_RH_SERVER=$!
RUST_LOG=warn "$rathole" --client "$run_dir/rathole-client.toml" >"$run_dir/rathole-client.log" 2>&1 &
pids+=($!); PID_RH_CLIENT=$!
wait_for "https://127.0.0.1:$P_PEER/health" -k || die "no answer through rathole (see its logs)"

(cd "$run_dir" && exec "$bin/origin-connector" --config connector.toml) >"$run_dir/connector.log" 2>&1 &
pids+=($!); PID_CONN=$!
(cd "$run_dir" && exec "$bin/mesh-node" --config edge.toml) >"$run_dir/edge.log" 2>&1 &
pids+=($!); PID_EDGE=$!
wait_for "http://127.0.0.1:$P_EDGE_ADMIN/readyz" || die "edge tunnel not ready (see logs)"
wait_for "https://127.0.0.1:$P_EDGE/health" -k || die "no answer through the tunnel"

cpu_snapshot() { # -> "origin nginx connector edge rathole_server rathole_client"
  echo "$(cpu_of $PID_ORIGIN) $(cpu_of $PID_NGINX) $(cpu_of $PID_CONN) $(cpu_of $PID_EDGE)" \
    "$(cpu_of $PID_RH_SERVER) $(cpu_of $PID_RH_CLIENT)"
}
cpu_json() { # before after -> json object of deltas
  python3 - "$1" "$2" <<'PY'
import json, sys
b = [float(x) for x in sys.argv[1].split()]; a = [float(x) for x in sys.argv[2].split()]
names = ["origin", "nginx", "connector", "edge", "rathole_server", "rathole_client"]
print(json.dumps({n: round(y - x, 3) for n, x, y in zip(names, b, a)}))
PY
}

declare -A URL=(
  [a]="http://127.0.0.1:$P_ORIGIN"
  [b]="https://127.0.0.1:$P_NGINX"
  [c]="https://127.0.0.1:$P_EDGE"
  [d]="https://127.0.0.1:$P_PEER"
)
declare -A WSURL=(
  [a]="ws://127.0.0.1:$P_ORIGIN/ws"
  [b]="wss://127.0.0.1:$P_NGINX/ws"
  [c]="wss://127.0.0.1:$P_EDGE/ws"
  [d]="wss://127.0.0.1:$P_PEER/ws"
)

if [[ "$PROFILE" != only ]]; then
# ---------------------------------------------------------------- 1. max request rate
log "warm-up"
for t in a b c d; do
  timeout 30 wrk -t1 -c"$CONNS" -d2s "${URL[$t]}$REQ_PATH" >/dev/null
done

for r in $(seq 1 "$ROUNDS"); do
  for t in a b c d; do
    log "wrk round $r target $t: -t1 -c$CONNS -d${DURATION}s ${URL[$t]}$REQ_PATH"
    before=$(cpu_snapshot); fb=$(edge_frames "$P_EDGE_ADMIN")
    timeout $((DURATION + 30)) wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency \
      -s "$here/wrk_json.lua" "${URL[$t]}$REQ_PATH" >"$out/raw/wrk-$t-$r.txt"
    after=$(cpu_snapshot); fa=$(edge_frames "$P_EDGE_ADMIN")
    json=$(grep '^JSON ' "$out/raw/wrk-$t-$r.txt" | sed 's/^JSON //')
    python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d["cpu_s"]=json.loads(sys.argv[2]); d["edge_datagrams"]=json.loads(sys.argv[3]); print(json.dumps(d))' \
      "$json" "$(cpu_json "$before" "$after")" "$(frames_json "$fb" "$fa")" >"$out/raw/wrk-$t-$r.json"
  done
done

# The tunnel's QUIC path after the load (congestion window, losses, packet size).
curl -fsS --max-time 2 "http://127.0.0.1:$P_EDGE_ADMIN/status" >"$out/raw/edge-status-after-wrk.json" 2>/dev/null || true

# ---------------------------------------------------------------- 1b. HTTP/2 request rate
# h2load with several streams in flight per connection; (a) speaks no TLS, so no HTTP/2.
for r in $(seq 1 "$ROUNDS"); do
  for t in b c d; do
    log "h2 round $r target $t: h2load -c$H2_CONNS -m$H2_STREAMS -D $DURATION ${URL[$t]}$REQ_PATH"
    # Warm-up in a run of its own, so the CPU counted below is only the measured requests'.
    timeout 30 h2load -t1 -c"$H2_CONNS" -m"$H2_STREAMS" -D 1 "${URL[$t]}$REQ_PATH" >/dev/null 2>&1 || true
    before=$(cpu_snapshot)
    timeout $((DURATION + 40)) h2load -t1 -c"$H2_CONNS" -m"$H2_STREAMS" -D "$DURATION" \
      "${URL[$t]}$REQ_PATH" >"$out/raw/h2-$t-$r.txt" 2>&1 || true
    after=$(cpu_snapshot)
    cpu_json "$before" "$after" >"$out/raw/h2-$t-$r.cpu.json"
  done
done

# ---------------------------------------------------------------- 2. websocket echo RTT
for t in a b c d; do
  log "websocket echo $t: $WS_COUNT sequential messages"
  timeout 120 python3 "$here/ws_rtt.py" "${WSURL[$t]}" --count "$WS_COUNT" --insecure \
    --max-seconds 90 >"$out/raw/ws-$t.json" || log "websocket echo through $t failed"
done

# ---------------------------------------------------------------- 3. half load
median_rps() { # target -> median wrk req/s over the rounds
  python3 - "$out/raw" "$ROUNDS" "$1" <<'PY'
import json, statistics, sys
d, n, t = sys.argv[1], int(sys.argv[2]), sys.argv[3]
print(statistics.median(json.load(open(f"{d}/wrk-{t}-{r}.json"))["rps"] for r in range(1, n + 1)))
PY
}
b_max=$(median_rps b)
c_max=$(median_rps c)
# The issue's comparison: half of (b)'s maximum. A diagnostic second rate: half of (c)'s own
# maximum, to see the added latency when the tunnel is not near saturation.
half=$(python3 -c "print(int(float('$b_max') / 2))")
half_c=$(python3 -c "print(int(float('$c_max') / 2))")
echo "$half" >"$out/raw/half-rate.txt"
echo "$half_c" >"$out/raw/halfc-rate.txt"
for spec in "half:$half" "halfc:$half_c"; do
  name=${spec%%:*}; rate=${spec#*:}
  per_client=$(python3 -c "print(round($rate / $HALF_CONNS, 2))")
  for r in 1 2; do
    # (a) at the same rate shows the floor of the instrument itself: h2load and the origin
    # sharing the two cores, without any proxy.
    for t in a b c d; do
      log "$name round $r target $t: $rate req/s ($HALF_CONNS connections x $per_client req/s), HTTP/1.1"
      before=$(cpu_snapshot)
      timeout $((DURATION + 40)) h2load --h1 -t1 -c"$HALF_CONNS" --rps="$per_client" \
        --warm-up-time=2 -D "$DURATION" --log-file="$out/raw/$name-$t-$r.log" \
        "${URL[$t]}$REQ_PATH" >"$out/raw/$name-$t-$r.txt" 2>&1 || log "h2load through $t failed"
      after=$(cpu_snapshot)
      cpu_json "$before" "$after" >"$out/raw/$name-$t-$r.cpu.json"
    done
  done
done

# ---------------------------------------------------------------- 4. bulk download
for t in a b c d; do
  log "bulk download $BULK_BYTES bytes via $t"
  before=$(cpu_snapshot); fb=$(edge_frames "$P_EDGE_ADMIN")
  curl -ksS --http1.1 --max-time 300 -o /dev/null \
    -w '{"bytes": %{size_download}, "seconds": %{time_total}, "bytes_per_s": %{speed_download}, "status": %{http_code}}\n' \
    "${URL[$t]}/bytes/$BULK_BYTES" >"$out/raw/bulk-$t.json" || echo '{"error": "curl failed"}' >"$out/raw/bulk-$t.json"
  after=$(cpu_snapshot); fa=$(edge_frames "$P_EDGE_ADMIN")
  cpu_json "$before" "$after" >"$out/raw/bulk-$t.cpu.json"
  frames_json "$fb" "$fa" >"$out/raw/bulk-$t.frames.json"
done

fi # measurements

# ---------------------------------------------------------------- 5. optional profile
# The edge and the connector, each under the HTTP/1.1 load of step 1 and the HTTP/2 load of
# step 1b: perf's report of self time, a summary by area with inclusive times
# (perf_summary.py) and a flame graph (SVG, inferno: built once like rathole).
if [[ "$PROFILE" == 1 || "$PROFILE" == only ]]; then
  if [[ "$PROFILE" == only ]]; then timeout 30 wrk -t1 -c"$CONNS" -d3s "${URL[c]}$REQ_PATH" >/dev/null; fi
  for load in h1 h2; do
    for who in edge connector; do
      log "profiling the $who under the $load load (perf record, cpu-clock)"
      pid=$PID_EDGE; [[ $who == connector ]] && pid=$PID_CONN
      data="$run_dir/perf-$who-$load.data"
      timeout 60 perf record -q -F 499 -e cpu-clock --call-graph dwarf,16384 -p "$pid" \
        -o "$data" -- sleep "$DURATION" 2>/dev/null &
      perf_pid=$!
      sleep 0.5
      if [[ $load == h1 ]]; then
        timeout $((DURATION + 30)) wrk -t1 -c"$CONNS" -d"$((DURATION - 1))s" "${URL[c]}$REQ_PATH" >/dev/null
      else
        timeout $((DURATION + 30)) h2load -t1 -c"$H2_CONNS" -m"$H2_STREAMS" -D "$((DURATION - 1))" \
          "${URL[c]}$REQ_PATH" >/dev/null 2>&1 || true
      fi
      wait "$perf_pid" || true
      name="$who-$load"
      # --no-inline: resolving inlined frames through addr2line takes minutes per profile.
      timeout 300 perf report -i "$data" --no-inline --no-children --sort dso,symbol --stdio \
        --percent-limit 0.7 -g none 2>/dev/null | grep -v '^$' | head -80 >"$out/profile-$name-self.txt" || true
      timeout 300 perf script -i "$data" --no-inline -F comm,tid,time,period,ip,sym,dso \
        >"$run_dir/perf-$name.script" 2>/dev/null || true
      python3 "$here/perf_summary.py" <"$run_dir/perf-$name.script" >"$out/profile-$name-summary.txt" || true
      "$inferno/inferno-collapse-perf" --all <"$run_dir/perf-$name.script" >"$run_dir/perf-$name.folded" 2>/dev/null &&
        "$inferno/inferno-flamegraph" --title "$who, $load load ($(basename "$out"))" --width 1600 --minwidth 0.5 \
          <"$run_dir/perf-$name.folded" >"$out/flame-$name.svg" 2>/dev/null || log "no flame graph for $name"
      rm -f "$run_dir/perf-$name.script" "$run_dir/perf-$name.folded"
      if [[ "$PROFILE" == only ]]; then cp "$data" "$out/"; fi
    done
  done
fi

if [[ "$PROFILE" == only ]]; then log "profile written to $out"; exit 0; fi
echo "{\"loadavg_after\": \"$(cut -d' ' -f1-3 /proc/loadavg)\"}" >"$out/raw/after.json"

# ---------------------------------------------------------------- report
cmdline="benchmarks/run.sh"
if [[ -n "${SKYLANE_BIN_DIR:-}" ]]; then cmdline="SKYLANE_BIN_DIR=$SKYLANE_BIN_DIR $cmdline"; fi
if [[ -n "${BENCH_SKYLANE_WORKER_THREADS:-}" ]]; then cmdline="BENCH_SKYLANE_WORKER_THREADS=$BENCH_SKYLANE_WORKER_THREADS $cmdline"; fi
if [[ "$PROFILE" == 1 ]]; then cmdline="PROFILE=1 $cmdline"; fi
python3 "$here/report.py" "$out" --command "$cmdline" \
  --conns "$CONNS" --half-conns "$HALF_CONNS" --duration "$DURATION" --path "$REQ_PATH" --bulk-bytes "$BULK_BYTES" \
  --h2-conns "$H2_CONNS" --h2-streams "$H2_STREAMS"
# The per-request h2load logs are large; results.json keeps their percentiles.
if [[ "${BENCH_KEEP_LOGS:-0}" != 1 ]]; then rm -f "$out"/raw/half-*.log "$out"/raw/halfc-*.log; fi
log "done: $out/results.md"
cat "$out/results.md"
