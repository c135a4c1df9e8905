#!/usr/bin/env bash
# Installs what the test suite needs beyond the Rust toolchain. Idempotent.
#   curl       deploy/local/up.sh
#   chromium   tests/tests/browser.rs: a real browser solves the "under attack" challenge
#   pebble     tests/tests/acme.rs: Let's Encrypt's test CA (with pebble-challtestsrv for DNS)
#   wireguard-go, wireguard-tools, iproute2, nftables
#              tests/tests/wireguard.rs: a stock WireGuard endpoint on a TUN device in a
#              network namespace (nftables cuts one edge's way to it)
#   wrk        tests/tests/restart.rs: load across a restart that must refuse nothing
set -euo pipefail
need=()
command -v curl >/dev/null || need+=(curl)
command -v chromium >/dev/null || need+=(chromium)
command -v pebble >/dev/null || need+=(pebble)
command -v wireguard-go >/dev/null || need+=(wireguard-go)
command -v wg >/dev/null || need+=(wireguard-tools)
command -v ip >/dev/null || need+=(iproute2)
command -v nft >/dev/null || need+=(nftables)
command -v wrk >/dev/null || need+=(wrk)
if ((${#need[@]})); then
  if [[ $(id -u) == 0 ]]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "please install: ${need[*]}" >&2
  fi
fi
