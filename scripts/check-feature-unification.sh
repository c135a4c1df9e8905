#!/usr/bin/env bash
# Fails when a dependency is built with other features under `cargo test` than under a
# plain `cargo build` (a dev-dependency turning a feature on). Each difference makes the
# end-to-end tests, which `cargo build` the binaries they start, compile the tree twice.
#   scripts/check-feature-unification.sh
set -euo pipefail
cd "$(dirname "$0")/.."
features() { # cargo tree edge kinds -> "crate version features" lines
  cargo tree --workspace --locked -e "$1" -f '{p} {f}' --prefix none | sed 's/ (\*)$//; s/ (proc-macro)//' | sort -u
}
plain=$(features normal,build)
with_dev=$(features normal,build,dev)
# Crates only the test build has are fine; a crate in both with other features is not.
diff=$(comm -23 <(echo "$plain") <(echo "$with_dev") || true)
if [[ -n $diff ]]; then
  echo "check-feature-unification: these crates get other features in test builds:" >&2
  echo "$diff" >&2
  echo "(give the normal dependency the same features, see shared/Cargo.toml)" >&2
  exit 1
fi
echo "check-feature-unification: test and plain builds share one dependency build"
