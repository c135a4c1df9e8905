#!/usr/bin/env bash
# WireGuard against QUIC through the same Skylane path, in one run on this machine: edge ->
# tunnel over the mesh socket -> origin-connector -> demo-origin, once with the connector's
# transport = "quic" and once with "wireguard" (boringtun + smoltcp in user space). It is
# benchmarks/ab.sh with those two variants: request rates over HTTP/1.1 and HTTP/2 with server
# CPU per request, websocket echo round trips, and a bulk download with its CPU per MB.
#
#   benchmarks/wireguard.sh                          build the binaries (production profile), then measure
#   SKYLANE_BIN_DIR=/path/to/release benchmarks/wireguard.sh
#
# ab.sh's knobs apply (BENCH_DURATION, BENCH_ROUNDS, WS_COUNT, BULK_BYTES, ...); results go to
# BENCH_OUT [benchmarks/results/wireguard-<UTC timestamp>].
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export AB_A="name=QUIC transport=quic" AB_B="name=WireGuard transport=wireguard"
export AB_TITLE="WireGuard against QUIC"
export BENCH_OUT="${BENCH_OUT:-$here/results/wireguard-$(date -u +%Y%m%dT%H%M%SZ)}"
exec "$here/ab.sh"
