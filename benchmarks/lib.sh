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

# skylane_bins: sets `bin` to a directory holding mesh-node, origin-connector and
# demo-origin ($SKYLANE_BIN_DIR, else built here with the production profile, the build
# operators deploy: see Cargo.toml).
skylane_bins() {
  if [[ -n "${SKYLANE_BIN_DIR:-}" ]]; then
    # Absolute, because the servers are started from the run directory.
    bin="$(cd "$SKYLANE_BIN_DIR" && pwd)" || die "SKYLANE_BIN_DIR=$SKYLANE_BIN_DIR is not a directory"
    log "using prebuilt binaries in $bin"
  else
    log "building binaries (cargo build --profile production)"
    (cd "$root" && SKYLANE_COMMIT="$(checkout_commit)" \
      cargo build --profile production --bin mesh-node --bin origin-connector --bin demo-origin)
    bin="${CARGO_TARGET_DIR:-$root/target}/production"
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

# Context switches so far of a process, all its threads together (voluntary: the thread
# slept, waiting for work; involuntary: it was preempted). A steadier measure of wake-ups
# per request than CPU time on a shared machine.
ctxsw_of() {
  cat /proc/"$1"/task/*/status 2>/dev/null |
    awk '/^(non)?voluntary_ctxt_switches/ {n += $2} END {print n + 0}'
}

# edge_frames ADMIN_PORT: QUIC datagrams the edge's mesh socket sent and received so far,
# "sent received" (0 0 when its /status does not answer).
edge_frames() {
  curl -fsS --max-time 2 "http://127.0.0.1:$1/status" 2>/dev/null |
    python3 -c 'import json,sys; f=json.load(sys.stdin)["frames"]; print(f["quic_sent"], f["quic_received"])' 2>/dev/null ||
    echo "0 0"
}
frames_json() { # before after -> {"sent": n, "received": n}
  python3 -c 'import json,sys; b=sys.argv[1].split(); a=sys.argv[2].split(); print(json.dumps({"sent": int(a[0])-int(b[0]), "received": int(a[1])-int(b[1])}))' "$1" "$2"
}

# The checkout's commit, "+dirty" when it has uncommitted changes.
checkout_commit() {
  echo "$(cd "$root" && git rev-parse --short HEAD 2>/dev/null || echo unknown)$(cd "$root" && git diff --quiet HEAD -- 2>/dev/null || echo '+dirty')"
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
  echo "  \"git_commit\": \"$(checkout_commit)\","
  # What the binaries say they are: prebuilt ones (SKYLANE_BIN_DIR) need not come from
  # the checkout; a build with SKYLANE_COMMIT set names its commit here.
  echo "  \"bin_version\": \"$("$bin/mesh-node" --version 2>/dev/null || echo unknown)\","
  for kv in "$@"; do
    echo "  \"${kv%%=*}\": \"${kv#*=}\","
  done
  echo "  \"bin_dir\": \"$bin\""
  echo "}"
}

# skylane_configs: keys, a dev certificate, connector.toml and edge.toml in $run_dir for one
# connector and one edge on loopback. Reads P_ORIGIN, P_CONN_MESH, P_EDGE_MESH, P_EDGE,
# P_EDGE_ADMIN, P_CONN_ADMIN; optional CONNECTOR_EXTRA and EDGE_EXTRA (TOML appended) and
# BENCH_SKYLANE_WORKER_THREADS (`node.worker_threads` of both) and BENCH_TRANSPORT (`quic`,
# the default, or `wireguard`: how the edge tunnels to the connector).
skylane_configs() {
  "$bin/mesh-node" keygen --out "$run_dir/conn.key" >/dev/null
  "$bin/mesh-node" keygen --out "$run_dir/edge.key" >/dev/null
  "$bin/mesh-node" dev-cert --out-dir "$run_dir/certs" >/dev/null
  local threads=""
  if [[ -n "${BENCH_SKYLANE_WORKER_THREADS:-}" ]]; then
    threads="worker_threads = $BENCH_SKYLANE_WORKER_THREADS"
  fi
  local members="[[mesh.members]]
name = \"bench-connector\"
role = \"connector\"
public_key_file = \"conn.key.pub\"
address = \"127.0.0.1:$P_CONN_MESH\"
region = \"Frankfurt\"
transport = \"${BENCH_TRANSPORT:-quic}\"

[[mesh.members]]
name = \"bench-edge\"
role = \"edge\"
public_key_file = \"edge.key.pub\"
region = \"Frankfurt\""
  cat >"$run_dir/connector.toml" <<EOF
shutdown_grace_ms = 1000

[node]
name = "bench-connector"
region = "Frankfurt"
key_file = "conn.key"
listen = "127.0.0.1:$P_CONN_MESH"
$threads

$members

[admin]
listen = "127.0.0.1:$P_CONN_ADMIN"

[log]
format = "text"
level = "warn"

[services.web]
kind = "http"
servers = ["127.0.0.1:$P_ORIGIN"]
connect_timeout_ms = 2000
${CONNECTOR_EXTRA:-}
EOF
  cat >"$run_dir/edge.toml" <<EOF
shutdown_grace_ms = 1000

[node]
name = "bench-edge"
region = "Frankfurt"
key_file = "edge.key"
listen = "127.0.0.1:$P_EDGE_MESH"
$threads

$members

[https]
listen = "127.0.0.1:$P_EDGE"

[[https.certificates]]
cert_file = "certs/edge.pem"
key_file = "certs/edge.key"
server_names = ["localhost"]

[[routes]]
host = "*"
path_prefix = "/"
service = "web"

[admin]
listen = "127.0.0.1:$P_EDGE_ADMIN"

[log]
format = "text"
level = "warn"
${EDGE_EXTRA:-}
EOF
}

# nginx_preamble: the start of an nginx.conf for a foreground nginx whose files all live in
# $run_dir, up to the `upstream origin` block (demo-origin at P_ORIGIN, keep-alive); the
# caller writes the rest of `http { … }`.
nginx_preamble() {
  mkdir -p "$run_dir/nginx-tmp"
  cat <<EOF
user root;
worker_processes auto;
daemon off;
pid $run_dir/nginx.pid;
error_log $run_dir/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $run_dir/nginx-tmp/body;
  proxy_temp_path $run_dir/nginx-tmp/proxy;
  fastcgi_temp_path $run_dir/nginx-tmp/fastcgi;
  uwsgi_temp_path $run_dir/nginx-tmp/uwsgi;
  scgi_temp_path $run_dir/nginx-tmp/scgi;
  upstream origin {
    server 127.0.0.1:$P_ORIGIN;
    keepalive 64;
  }
EOF
}

# ---------------------------------------------------------------- tools built with cargo
# cargo_tool CRATE VERSION [cargo install flags...]: prints the bin directory of CRATE
# VERSION, installed once with `cargo install` into ~/.cache/skylane-bench/CRATE-VERSION
# and reused by every later run.
cargo_tool() {
  local crate=$1 version=$2 root
  shift 2
  root="${XDG_CACHE_HOME:-$HOME/.cache}/skylane-bench/$crate-$version"
  if [[ ! -f "$root/.crates.toml" ]]; then
    log "building $crate $version with cargo install (once; kept in $root)"
    cargo install "$crate" --version "$version" "$@" --root "$root" >&2 || die "could not build $crate"
  fi
  echo "$root/bin"
}

# ---------------------------------------------------------------- rathole, the peer
RATHOLE_VERSION=0.5.0
# rathole_bin: sets `rathole` to a rathole 0.5.0 binary ($RATHOLE_BIN, else the one cached in
# ~/.cache/skylane-bench, built there with `cargo install` the first time). Only the server,
# client and Noise transport are built: no TLS library is needed. Not --locked: the versions
# its lock file pins (time 0.3.2x) no longer compile with current Rust.
rathole_bin() {
  rathole="${RATHOLE_BIN:-$(cargo_tool rathole "$RATHOLE_VERSION" --no-default-features \
    --features server,client,noise)/rathole}"
  [[ -x "$rathole" ]] || die "$rathole is not executable"
}

# rathole_configs: a Noise key pair (rathole's default pattern, Noise_NK_25519_ChaChaPoly_BLAKE2s)
# and rathole-server.toml / rathole-client.toml in $run_dir: the server listens for its client
# on P_RATHOLE and exposes the origin on P_RATHOLE_SVC; the client, beside the origin, dials
# the server and forwards to P_ORIGIN.
rathole_configs() {
  local keys private public token="bench-$RANDOM$RANDOM"
  keys="$("$rathole" --genkey)"
  private="$(awk '/Private Key:/ {getline; print}' <<<"$keys")"
  public="$(awk '/Public Key:/ {getline; print}' <<<"$keys")"
  [[ -n "$private" && -n "$public" ]] || die "rathole --genkey gave no key pair"
  cat >"$run_dir/rathole-server.toml" <<EOF
[server]
bind_addr = "127.0.0.1:$P_RATHOLE"

[server.transport]
type = "noise"

[server.transport.noise]
local_private_key = "$private"

[server.services.web]
token = "$token"
bind_addr = "127.0.0.1:$P_RATHOLE_SVC"
EOF
  cat >"$run_dir/rathole-client.toml" <<EOF
[client]
remote_addr = "127.0.0.1:$P_RATHOLE"

[client.transport]
type = "noise"

[client.transport.noise]
remote_public_key = "$public"

[client.services.web]
token = "$token"
local_addr = "127.0.0.1:$P_ORIGIN"
EOF
}

# inferno_bins: sets `inferno` to a directory with inferno's inferno-collapse-perf and
# inferno-flamegraph (flame graphs as SVG), built once with `cargo install` and cached like
# rathole ($INFERNO_DIR names another directory).
INFERNO_VERSION=0.12.3
inferno_bins() {
  inferno="${INFERNO_DIR:-$(cargo_tool inferno "$INFERNO_VERSION" --locked)}"
  [[ -x "$inferno/inferno-flamegraph" && -x "$inferno/inferno-collapse-perf" ]] ||
    die "no inferno-flamegraph / inferno-collapse-perf in $inferno"
}
