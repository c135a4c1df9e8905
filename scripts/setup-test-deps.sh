#!/usr/bin/env bash
# Installs what the test suite needs beyond the Rust toolchain. Idempotent.
# The Rust tests themselves need nothing else today; curl is used by deploy/local/up.sh.
set -euo pipefail
need=()
command -v curl >/dev/null || need+=(curl)
if ((${#need[@]})); then
  if [[ $(id -u) == 0 ]]; then
    apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "please install: ${need[*]}" >&2
  fi
fi
