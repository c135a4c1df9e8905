#!/usr/bin/env bash
# Runs a local Skylane: demo-origin, one origin connector and three edges on loopback
# (edge-c tunnels over WireGuard, the others over QUIC).
# Creates dev keys and certificates on first run. Ctrl-C (or SIGTERM) stops everything.
#
#   deploy/local/up.sh            build (debug) and run
#   RELEASE=1 deploy/local/up.sh  build with --release
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
profile=debug; build_flags=()
if [[ "${RELEASE:-}" == 1 ]]; then profile=release; build_flags=(--release); fi

echo "building…" >&2
cargo build --quiet "${build_flags[@]}" --manifest-path "$root/Cargo.toml" \
  --bin mesh-node --bin origin-connector --bin demo-origin
bin="${CARGO_TARGET_DIR:-$root/target}/$profile"

mkdir -p "$here/keys" "$here/certs" "$here/run"
for n in fra-connector edge-a edge-b edge-c; do
  [[ -f "$here/keys/$n.key" ]] || "$bin/mesh-node" keygen --out "$here/keys/$n.key" >/dev/null
done
[[ -f "$here/certs/edge.pem" ]] || "$bin/mesh-node" dev-cert --out-dir "$here/certs" >/dev/null
# The mesh-wide secret of the "under attack" challenge (the same for every edge).
[[ -f "$here/keys/challenge.secret" ]] || ( umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$here/keys/challenge.secret" )

pids=()
stop() {
  trap - INT TERM EXIT
  echo "stopping…" >&2
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  exit 0
}
trap stop INT TERM EXIT

"$bin/demo-origin" --listen 127.0.0.1:8080 >"$here/run/demo-origin.log" 2>&1 & pids+=($!)
"$bin/origin-connector" --config "$here/connector.toml" 2>"$here/run/connector.log" & pids+=($!)
"$bin/mesh-node" --config "$here/edge-a.toml" 2>"$here/run/edge-a.log" & pids+=($!)
"$bin/mesh-node" --config "$here/edge-b.toml" 2>"$here/run/edge-b.log" & pids+=($!)
"$bin/mesh-node" --config "$here/edge-c.toml" 2>"$here/run/edge-c.log" & pids+=($!)

# Ready when each edge's /readyz says its tunnel is up.
for admin in 9101 9102 9103; do
  for _ in $(seq 1 100); do
    if curl -fsS "http://127.0.0.1:$admin/readyz" >/dev/null 2>&1; then break; fi
    sleep 0.1
  done
  curl -fsS "http://127.0.0.1:$admin/readyz" >/dev/null || { echo "edge on admin port $admin did not become ready; see $here/run/*.log" >&2; exit 1; }
done

cat <<MSG
Skylane is up (logs in $here/run/):
  edge-a   https://localhost:8443/      (status page http://127.0.0.1:9101/)
  edge-b   https://localhost:9443/      (status page http://127.0.0.1:9102/)
  edge-c   https://localhost:10443/     (status page http://127.0.0.1:9103/; WireGuard to the connector)
  connector                             (status page http://127.0.0.1:9100/)
  origin   http://127.0.0.1:8080/
Trust the dev CA with: curl --cacert $here/certs/ca.pem https://localhost:8443/health
Ctrl-C stops everything.
MSG
wait -n "${pids[@]}" || true
echo "a process exited; see $here/run/*.log" >&2
