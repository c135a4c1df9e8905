# Shared by the benchmark scripts (sourced, not run): logging, Debian packages, the process
# list stopped on exit, readiness polling and CPU accounting from /proc.
#
# The sourcing script sets `out` (its results directory) before sourcing; `run_dir` is
# made here and removed on exit, after its *.log files are copied to "$out/logs".

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- processes and cleanup
pids=()
run_dir="$(mktemp -d /tmp/skylane-bench.XXXXXX)"
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  # Give them a moment to drain, then make sure.
  for _ in $(seq 1 50); do
    local alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [[ $alive == 0 ]] && break
    sleep 0.1
  done
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [[ -d "$run_dir" && -d "$out" ]]; then
    mkdir -p "$out/logs"
    cp "$run_dir"/*.log "$out/logs/" 2>/dev/null || true
  fi
  rm -rf "$run_dir"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- tools
# apt_install PKG...: installs the Debian packages given (nothing when none).
apt_install() {
  (($#)) || return 0
  log "installing $* with apt-get"
  apt-get update -qq
  # policy-rc.d keeps packages such as nginx and varnish from starting system-wide daemons.
  local prc=/usr/sbin/policy-rc.d made_prc=0
  if [[ ! -e $prc ]]; then printf '#!/bin/sh\nexit 101\n' >"$prc"; chmod +x "$prc"; made_prc=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  [[ $made_prc == 1 ]] && rm -f "$prc"
  return 0
}

# skylane_bins: sets `bin` to a directory holding release mesh-node, origin-connector and
# demo-origin ($SKYLANE_BIN_DIR, else built here).
skylane_bins() {
  if [[ -n "${SKYLANE_BIN_DIR:-}" ]]; then
    # Absolute, because the servers are started from the run directory.
    bin="$(cd "$SKYLANE_BIN_DIR" && pwd)" || die "SKYLANE_BIN_DIR=$SKYLANE_BIN_DIR is not a directory"
    log "using prebuilt binaries in $bin"
  else
    log "building release binaries"
    (cd "$root" && cargo build --release --bin mesh-node --bin origin-connector --bin demo-origin)
    bin="${CARGO_TARGET_DIR:-$root/target}/release"
  fi
  local b
  for b in mesh-node origin-connector demo-origin; do
    [[ -x "$bin/$b" ]] || die "$bin/$b not found (set SKYLANE_BIN_DIR or fix the build)"
  done
}

# ports_free TCP_PORTS -- UDP_PORTS: dies naming the first port in use.
ports_free() {
  local proto=t p
  for p in "$@"; do
    if [[ $p == -- ]]; then proto=u; continue; fi
    ss -Hl${proto}n "sport = :$p" | grep -q . && die "port $p is in use; set BENCH_PORT_BASE"
  done
  return 0
}

# ---------------------------------------------------------------- readiness and CPU
wait_for() { # url [curl flags...]: poll up to 10 s
  local url=$1; shift
  for _ in $(seq 1 100); do
    curl -fsS --max-time 1 "$@" -o /dev/null "$url" 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

# CPU seconds (user+sys) used so far by a process and its children (nginx workers).
cpu_of() {
  local files=() p
  for p in "$1" $(pgrep -P "$1" 2>/dev/null || true); do
    [[ -r /proc/$p/stat ]] && files+=("/proc/$p/stat")
  done
  ((${#files[@]})) || { echo 0; return; }
  # Fields 14 and 15 are utime and stime; the command name (field 2) has no spaces here.
  awk -v hz="$(getconf CLK_TCK)" '{t += $14 + $15} END {printf "%.3f", t / hz}' "${files[@]}" 2>/dev/null || echo 0
}

# machine_json KEY=VALUE...: the machine and the commit as JSON, plus the pairs given
# (tool versions, knobs).
machine_json() {
  local kv
  echo "{"
  echo "  \"date_utc\": \"$(date -u +%Y-%m-%dT%H:%M:%SZ)\","
  echo "  \"nproc\": $(nproc),"
  echo "  \"cpu_model\": \"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')\","
  echo "  \"kernel\": \"$(uname -sr)\","
  echo "  \"mem_total\": \"$(grep MemTotal /proc/meminfo | awk '{print $2 " " $3}')\","
  echo "  \"loadavg_before\": \"$(cut -d' ' -f1-3 /proc/loadavg)\","
  echo "  \"rustc\": \"$(rustc --version 2>/dev/null || echo unknown)\","
  echo "  \"git_commit\": \"$(cd "$root" && git rev-parse --short HEAD 2>/dev/null || echo unknown)$(cd "$root" && git diff --quiet HEAD -- 2>/dev/null || echo '+dirty')\","
  for kv in "$@"; do
    echo "  \"${kv%%=*}\": \"${kv#*=}\","
  done
  echo "  \"bin_dir\": \"$bin\""
  echo "}"
}
