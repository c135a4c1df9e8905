#!/usr/bin/env bash
# System calls per proxied request at the edge and at the connector, and where their futex
# calls come from: edge -> tunnel over the mesh socket -> origin-connector -> demo-origin,
# under the HTTP/1.1 load of ab.sh (wrk -t1 -c32) or its HTTP/2 load (h2load -c16 -m10).
#
#   benchmarks/syscalls.sh                     counts per request, HTTP/1.1
#   SYSCALLS_LOAD=h2 benchmarks/syscalls.sh    the same under HTTP/2
#   SYSCALLS_FUTEX=1 benchmarks/syscalls.sh    also record each futex call's callers
#                                              (perf record, DWARF call graphs; large)
#
# Counts come from the kernel's syscall tracepoints (perf stat -e syscalls:sys_enter_*),
# which need root or perf_event_paranoid <= -1, and are exact: unlike CPU time they do not
# move with the machine's load. Knobs [defaults]: BENCH_DURATION [5] s of load,
# BENCH_PORT_BASE [29180] (seven ports, TCP and UDP), SKYLANE_BIN_DIR (a directory with
# mesh-node, origin-connector and demo-origin; else built here), BENCH_OUT
# [benchmarks/results/syscalls-<UTC timestamp>].
#
# Everything listens on 127.0.0.1 and sends to loopback only; the load is bounded in time;
# every process started here is stopped on exit.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
DURATION="${BENCH_DURATION:-5}"
LOAD="${SYSCALLS_LOAD:-h1}"
FUTEX="${SYSCALLS_FUTEX:-0}"
BASE="${BENCH_PORT_BASE:-29180}"
out="${BENCH_OUT:-$here/results/syscalls-$(date -u +%Y%m%dT%H%M%SZ)}"
P_ORIGIN=$BASE P_EDGE=$((BASE + 2)) P_EDGE_ADMIN=$((BASE + 3)) P_CONN_ADMIN=$((BASE + 4))
P_CONN_MESH=$((BASE + 5)) P_EDGE_MESH=$((BASE + 6))
# shellcheck source=benchmarks/lib.sh
source "$here/lib.sh"

[[ $LOAD == h1 || $LOAD == h2 ]] || die "SYSCALLS_LOAD must be h1 or h2, not $LOAD"
need=()
command -v wrk >/dev/null || need+=(wrk)
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v perf >/dev/null || need+=(linux-perf)
apt_install "${need[@]}"
skylane_bins
ports_free "$P_ORIGIN" "$P_EDGE" "$P_EDGE_ADMIN" "$P_CONN_ADMIN" -- "$P_CONN_MESH" "$P_EDGE_MESH"
mkdir -p "$out"
machine_json "load=$LOAD" "duration_s=$DURATION" >"$out/machine.json"

"$bin/demo-origin" --listen "127.0.0.1:$P_ORIGIN" --name bench >"$run_dir/demo-origin.log" 2>&1 &
pids+=($!)
wait_for "http://127.0.0.1:$P_ORIGIN/health" || die "demo-origin did not start"
CONNECTOR_EXTRA='response_timeout_ms = 30000' skylane_configs
(cd "$run_dir" && exec "$bin/origin-connector" --config connector.toml) >"$run_dir/connector.log" 2>&1 &
pids+=($!); PID_CONN=$!
(cd "$run_dir" && exec "$bin/mesh-node" --config edge.toml) >"$run_dir/edge.log" 2>&1 &
pids+=($!); PID_EDGE=$!
wait_for "http://127.0.0.1:$P_EDGE_ADMIN/readyz" || die "edge not ready"
url="https://127.0.0.1:$P_EDGE/api/time"
wait_for "$url" -k || die "no answer through the tunnel"

load() { # load SECONDS OUTFILE: the chosen load on the edge; prints nothing
  if [[ $LOAD == h1 ]]; then
    timeout $(($1 + 30)) wrk -t1 -c32 -d"${1}s" "$url" >"$2"
  else
    timeout $(($1 + 30)) h2load -c16 -m10 -D "$1" "$url" >"$2"
  fi
}
requests_of() { # the completed requests in a load's output
  if [[ $LOAD == h1 ]]; then
    awk '/requests in/ {print $1}' "$1"
  else
    awk '/^requests:/ {print $8}' "$1"
  fi
}

log "warm-up"
load 2 /dev/null

calls=(sendmsg sendmmsg recvmsg recvmmsg write writev read readv sendto recvfrom epoll_wait futex)
events="raw_syscalls:sys_enter$(printf ',syscalls:sys_enter_%s' "${calls[@]}")"
# Each counter runs a second longer than the load, so it sees all of it.
watch=$((DURATION + 1))
perfs=()
for who in edge connector; do
  pid=$PID_EDGE; [[ $who == connector ]] && pid=$PID_CONN
  timeout $((watch + 20)) perf stat -x, -e "$events" -p "$pid" -o "$out/stat-$who.csv" -- sleep "$watch" &
  perfs+=($!)
done
sleep 0.3
log "$LOAD load for ${DURATION}s, counting the edge's and the connector's system calls"
load "$DURATION" "$out/load.txt"
wait "${perfs[@]}"

if [[ $FUTEX != 0 ]]; then
  perfs=()
  for who in edge connector; do
    pid=$PID_EDGE; [[ $who == connector ]] && pid=$PID_CONN
    timeout $((watch + 20)) perf record -q -e syscalls:sys_enter_futex --call-graph dwarf,16384 \
      -p "$pid" -o "$run_dir/futex-$who.data" -- sleep "$watch" 2>/dev/null &
    perfs+=($!)
  done
  sleep 0.3
  log "$LOAD load for ${DURATION}s again, recording the callers of futex"
  load "$DURATION" "$out/load-futex.txt"
  wait "${perfs[@]}" || true
  for who in edge connector; do
    # The callers, two frames deep is enough to tell tokio's parking from a lock.
    perf report -i "$run_dir/futex-$who.data" --no-children --stdio --sort sym \
      -g caller,1,callee,function,percent --max-stack 12 2>/dev/null |
      grep -E '[0-9]+\.[0-9]+%' >"$out/futex-callers-$who.txt" || true
  done
fi

n="$(requests_of "$out/load.txt")"
[[ -n $n && $n -gt 0 ]] || die "the load completed no request (see $out/load.txt)"
{
  echo "# System calls per request, $LOAD load, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "$n requests in ${DURATION}s; binaries in $bin. Command: \`SYSCALLS_LOAD=$LOAD benchmarks/syscalls.sh\`."
  echo
  echo "| system call | edge | connector |"
  echo "|---|---:|---:|"
  for ev in raw_syscalls:sys_enter "${calls[@]/#/syscalls:sys_enter_}"; do
    e=$(awk -F, -v ev="$ev" '$3 == ev {print $1}' "$out/stat-edge.csv")
    c=$(awk -F, -v ev="$ev" '$3 == ev {print $1}' "$out/stat-connector.csv")
    [[ ${e:-0} == 0 && ${c:-0} == 0 ]] && continue
    name=${ev#syscalls:sys_enter_}; [[ $name == raw_syscalls:sys_enter ]] && name="all"
    awk -v name="$name" -v e="${e:-0}" -v c="${c:-0}" -v n="$n" \
      'BEGIN {printf "| %s | %.2f | %.2f |\n", name, e / n, c / n}'
  done
} >"$out/results.md"
cat "$out/results.md"
log "results in $out"
