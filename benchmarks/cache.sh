#!/usr/bin/env bash
# Edge cache benchmark (issue 11): cache hits served by
#   nginx   nginx proxy_cache, terminating TLS
#   varnish Varnish (malloc storage), plain HTTP: Varnish has no TLS of its own
#   hitch   hitch terminating TLS → Varnish (PROXY v2): how Varnish is run behind TLS
#   skylane the mesh-node edge's cache, terminating TLS (the connector behind it idles on hits)
# all in front of the same demo-origin, in the same run on this machine:
#   1. small object (100 bytes, `Cache-Control: public, max-age=3600`): hit req/s, p50/p99
#      latency (wrk, HTTP/1.1, keep-alive) and server CPU per request (user+sys from /proc);
#   2. a 1 GiB object: the first download (filled while it streams) and then hits, MB/s
#      (curl, HTTP/1.1).
# Each server's origin request count is read back from demo-origin's /counts, so a "hit"
# that went to the origin shows.
#
#   benchmarks/cache.sh                                   build the binaries (production profile), then measure
#   SKYLANE_BIN_DIR=/path/to/release benchmarks/cache.sh  use prebuilt binaries
#
# Knobs (defaults in brackets): BENCH_DURATION [10] seconds per wrk run, BENCH_THREADS [2]
# and BENCH_CONNECTIONS [64] of wrk, BENCH_ROUNDS [3] interleaved rounds (medians
# reported), BULK_BYTES [1073741824], BULK_HITS [3], BENCH_PORT_BASE [29080] (ten
# consecutive ports on 127.0.0.1, TCP and UDP), BENCH_OUT
# [benchmarks/results/cache/<UTC timestamp>]. PROFILE=1 also records the edge with `perf`
# under the small-hit load (profile-edge-*.txt in the results); PROFILE=only does only that.
#
# Loopback only. Every load step is bounded in time (wrk -d, curl --max-time, `timeout`);
# every process started here is stopped on exit. Packages missing (nginx, varnish, hitch,
# wrk, curl) are installed with apt-get.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"

DURATION="${BENCH_DURATION:-10}"
THREADS="${BENCH_THREADS:-2}"
CONNS="${BENCH_CONNECTIONS:-64}"
ROUNDS="${BENCH_ROUNDS:-3}"
BULK_BYTES="${BULK_BYTES:-1073741824}"
BULK_HITS="${BULK_HITS:-3}"
BASE="${BENCH_PORT_BASE:-29080}"
PROFILE="${PROFILE:-0}"
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
out="${BENCH_OUT:-$here/results/cache/$stamp}"

P_ORIGIN=$BASE
P_NGINX=$((BASE + 1))
P_VARNISH=$((BASE + 2))
P_VARNISH_PROXY=$((BASE + 3)) # Varnish's PROXY-protocol listener, for hitch
P_HITCH=$((BASE + 4))
P_EDGE=$((BASE + 5))
P_EDGE_ADMIN=$((BASE + 6))
P_CONN_ADMIN=$((BASE + 7))
P_CONN_MESH=$((BASE + 8)) # UDP
P_EDGE_MESH=$((BASE + 9)) # UDP
TARGETS=(nginx varnish hitch skylane)

# shellcheck source=benchmarks/lib.sh
source "$here/lib.sh"

need_apt=()
command -v nginx >/dev/null || need_apt+=(nginx)
command -v varnishd >/dev/null || [[ -x /usr/sbin/varnishd ]] || need_apt+=(varnish)
command -v hitch >/dev/null || [[ -x /usr/sbin/hitch ]] || need_apt+=(hitch)
command -v wrk >/dev/null || need_apt+=(wrk)
command -v curl >/dev/null || need_apt+=(curl)
if [[ "$PROFILE" != 0 ]] && ! command -v perf >/dev/null; then need_apt+=(linux-perf); fi
apt_install "${need_apt[@]}"
export PATH="$PATH:/usr/sbin"

skylane_bins
ports_free $P_ORIGIN $P_NGINX $P_VARNISH $P_VARNISH_PROXY $P_HITCH $P_EDGE $P_EDGE_ADMIN $P_CONN_ADMIN \
  -- $P_CONN_MESH $P_EDGE_MESH
mkdir -p "$out/raw"
log "results go to $out"
machine_json "nginx=$(nginx -v 2>&1 | sed 's/.*: //')" \
  "varnish=$(varnishd -V 2>&1 | head -1 | sed 's/^varnishd (//; s/ revision.*//')" \
  "hitch=$(hitch --version 2>&1 | head -1)" \
  "wrk=$(wrk -v 2>&1 | head -1 | awk '{print $2}')" \
  "load=wrk -t$THREADS -c$CONNS -d${DURATION}s, $ROUNDS rounds" >"$out/raw/machine.json"

# Varnish's cache process runs as its own user and must reach its working directory.
chmod 755 "$run_dir"

# ---------------------------------------------------------------- keys, certs, configs
CONNECTOR_EXTRA='response_timeout_ms = 300000'
# The 1 GiB object has no caching headers: each server is told to keep it (a rule here,
# proxy_cache_valid for nginx, Varnish's default TTL).
EDGE_EXTRA='
[cache]
memory_bytes = 3221225472
max_object_bytes = 2147483648

[[cache.rules]]
host = "*"
path_prefix = "/bytes/"
mode = "everything"
edge_ttl_s = 3600'
skylane_configs
cat "$run_dir/certs/edge.pem" "$run_dir/certs/edge.key" >"$run_dir/certs/hitch.pem"

mkdir -p "$run_dir/nginx-cache"
cat >"$run_dir/nginx.conf" <<EOF
# nginx proxy_cache: same certificate as the edge, keep-alive upstream, the cache on disk
# (as nginx keeps it; the page cache holds it here), access log off as in the edge.
$(nginx_preamble)
  proxy_cache_path $run_dir/nginx-cache levels=1:2 keys_zone=bench:16m max_size=4g inactive=1h use_temp_path=off;
  server {
    listen 127.0.0.1:$P_NGINX ssl http2;
    ssl_certificate $run_dir/certs/edge.pem;
    ssl_certificate_key $run_dir/certs/edge.key;
    keepalive_requests 1000000;
    location / {
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Host \$host;
      proxy_set_header Connection "";
      proxy_cache bench;
      proxy_cache_valid 200 1h;
      proxy_cache_lock on;
      proxy_read_timeout 300s;
      add_header X-Cache-Status \$upstream_cache_status;
    }
  }
}
EOF

cat >"$run_dir/varnish.vcl" <<EOF
vcl 4.1;
backend origin { .host = "127.0.0.1"; .port = "$P_ORIGIN"; .between_bytes_timeout = 300s; }
EOF

# ---------------------------------------------------------------- start
log "starting demo-origin, nginx, varnish, hitch, origin-connector, mesh-node"
"$bin/demo-origin" --listen "127.0.0.1:$P_ORIGIN" --name bench >"$run_dir/demo-origin.log" 2>&1 &
pids+=($!)
wait_for "http://127.0.0.1:$P_ORIGIN/health" || die "demo-origin did not start"

nginx -p "$run_dir" -c "$run_dir/nginx.conf" >"$run_dir/nginx.log" 2>&1 &
pids+=($!); PID_NGINX=$!

# -F: foreground; -t: default TTL for responses without caching headers (the 1 GiB one).
varnishd -F -n "$run_dir/varnish" -f "$run_dir/varnish.vcl" \
  -a "127.0.0.1:$P_VARNISH" -a "127.0.0.1:$P_VARNISH_PROXY,PROXY" \
  -s malloc,3G -t 3600 >"$run_dir/varnish.log" 2>&1 &
pids+=($!); PID_VARNISH=$!

# hitch refuses to run its workers as root.
hitch_user=()
[[ $(id -u) == 0 ]] && hitch_user=(--user=nobody --group=nogroup)
hitch "${hitch_user[@]}" --frontend="[127.0.0.1]:$P_HITCH" --backend="[127.0.0.1]:$P_VARNISH_PROXY" \
  --write-proxy-v2=on --workers="$(nproc)" --alpn-protos=http/1.1 --daemon=off \
  "$run_dir/certs/hitch.pem" >"$run_dir/hitch.log" 2>&1 &
pids+=($!); PID_HITCH=$!

(cd "$run_dir" && exec "$bin/origin-connector" --config connector.toml) >"$run_dir/connector.log" 2>&1 &
pids+=($!); PID_CONN=$!
(cd "$run_dir" && exec "$bin/mesh-node" --config edge.toml) >"$run_dir/edge.log" 2>&1 &
pids+=($!); PID_EDGE=$!

declare -A URL=(
  [nginx]="https://127.0.0.1:$P_NGINX"
  [varnish]="http://127.0.0.1:$P_VARNISH"
  [hitch]="https://127.0.0.1:$P_HITCH"
  [skylane]="https://127.0.0.1:$P_EDGE"
)
wait_for "${URL[nginx]}/health" -k || die "nginx did not start (see $run_dir/nginx-error.log)"
wait_for "${URL[varnish]}/health" || die "varnish did not start (see $run_dir/varnish.log)"
wait_for "${URL[hitch]}/health" -k || die "hitch did not start (see $run_dir/hitch.log)"
wait_for "http://127.0.0.1:$P_EDGE_ADMIN/readyz" || die "edge tunnel not ready (see logs)"
wait_for "${URL[skylane]}/health" -k || die "no answer through the tunnel"

# Server CPU of a target: the processes that serve its hits (hitch's hits cross Varnish).
cpu_target() {
  case $1 in
    nginx) cpu_of "$PID_NGINX" ;;
    varnish) cpu_of "$PID_VARNISH" ;;
    hitch) python3 -c "print($(cpu_of "$PID_HITCH") + $(cpu_of "$PID_VARNISH"))" ;;
    skylane) python3 -c "print($(cpu_of "$PID_EDGE") + $(cpu_of "$PID_CONN"))" ;;
  esac
}

small() { echo "/cache/small-$1?size=100&cc=public,%20max-age=3600"; }

# ---------------------------------------------------------------- 1. small hits
for t in "${TARGETS[@]}"; do
  # Fill, then show the hit's headers (kept with the results).
  curl -ksS --max-time 10 -o /dev/null "${URL[$t]}$(small "$t")"
  curl -ksS --max-time 10 -D "$out/raw/hit-headers-$t.txt" -o /dev/null "${URL[$t]}$(small "$t")"
  timeout 30 wrk -t1 -c"$CONNS" -d2s "${URL[$t]}$(small "$t")" >/dev/null
done
if [[ "$PROFILE" != 0 ]]; then
  log "profiling the edge under the small-hit load (perf record, cpu-clock)"
  timeout 60 perf record -q -F 999 -e cpu-clock --call-graph dwarf,8192 -p "$PID_EDGE" \
    -o "$run_dir/perf-edge.data" -- sleep "$DURATION" 2>/dev/null &
  perf_pid=$!
  sleep 0.5
  timeout $((DURATION + 30)) wrk -t"$THREADS" -c"$CONNS" -d"$((DURATION - 1))s" "${URL[skylane]}$(small skylane)" >/dev/null
  wait "$perf_pid" || true
  perf report -i "$run_dir/perf-edge.data" --no-children --sort dso,symbol --stdio \
    --percent-limit 0.7 -g none 2>/dev/null | grep -v '^$' | head -80 >"$out/profile-edge-self.txt" || true
  perf report -i "$run_dir/perf-edge.data" --children --sort symbol --stdio \
    --percent-limit 2 -g none 2>/dev/null | grep -v '^$' | head -100 >"$out/profile-edge-children.txt" || true
  perf script -i "$run_dir/perf-edge.data" -F comm,tid,period,ip,sym,dso 2>/dev/null |
    python3 "$here/perf_summary.py" >"$out/profile-edge-summary.txt" || true
  if [[ "$PROFILE" == only ]]; then log "profile written to $out"; exit 0; fi
fi

for r in $(seq 1 "$ROUNDS"); do
  for t in "${TARGETS[@]}"; do
    log "round $r $t: wrk -t$THREADS -c$CONNS -d${DURATION}s ${URL[$t]}$(small "$t")"
    before=$(cpu_target "$t")
    timeout $((DURATION + 30)) wrk -t"$THREADS" -c"$CONNS" -d"${DURATION}s" --latency \
      -s "$here/wrk_json.lua" "${URL[$t]}$(small "$t")" >"$out/raw/wrk-$t-$r.txt"
    after=$(cpu_target "$t")
    json=$(grep '^JSON ' "$out/raw/wrk-$t-$r.txt" | sed 's/^JSON //')
    python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d["cpu_s"]=round(float(sys.argv[3])-float(sys.argv[2]),3); print(json.dumps(d))' \
      "$json" "$before" "$after" >"$out/raw/wrk-$t-$r.json"
  done
done

# ---------------------------------------------------------------- 2. the 1 GiB object
bulk() { # target name -> one JSON line
  local before after
  before=$(cpu_target "$1")
  curl -ksS --http1.1 --max-time 300 -o /dev/null \
    -w '{"bytes": %{size_download}, "seconds": %{time_total}, "bytes_per_s": %{speed_download}, "status": %{http_code}' \
    "${URL[$1]}/bytes/$BULK_BYTES" || printf '{"error": "curl failed"'
  after=$(cpu_target "$1")
  printf ', "cpu_s": %s}\n' "$(python3 -c "print(round($after - $before, 3))")"
}
for t in "${TARGETS[@]}"; do
  log "$t: $BULK_BYTES bytes, first download (fills the cache) then $BULK_HITS hits"
  bulk "$t" >"$out/raw/bulk-$t-fill.json"
  for h in $(seq 1 "$BULK_HITS"); do bulk "$t" >"$out/raw/bulk-$t-hit-$h.json"; done
done

curl -fsS --max-time 5 "http://127.0.0.1:$P_ORIGIN/counts" >"$out/raw/origin-counts.json"
curl -fsS --max-time 5 "http://127.0.0.1:$P_EDGE_ADMIN/status" >"$out/raw/edge-status.json" || true
grep 'RSS\|VmHWM' "/proc/$PID_EDGE/status" >"$out/raw/edge-memory.txt" 2>/dev/null || true

python3 "$here/cache_report.py" "$out" --command "benchmarks/cache.sh" --rounds "$ROUNDS" \
  --bulk-hits "$BULK_HITS" --bulk-bytes "$BULK_BYTES"
log "done: $out/results.md"
