#!/usr/bin/env bash
# Runs the README's first command, in its short form (--duration 20), in a clone of HEAD
# made in an empty temporary folder: what a new user does first. It fails when the demo
# needs anything that is not committed, or anything beside the checkout.
#
# The build reuses this checkout's target directory (CARGO_TARGET_DIR). The demo command
# builds with the same profile and features as `cargo test --workspace`, so after the tests
# it costs nothing to build. Usage: scripts/fresh-clone-demo.sh
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

# The first command of the README's first sh block that runs the demo.
readme_cmd=$(awk '/^```sh/{inblock=1; next} /^```/{if (inblock) exit} inblock' README.md |
  grep -m1 -- 'simulate -- demo' | sed 's/#.*//; s/[[:space:]]*$//')
if [[ -z $readme_cmd ]]; then
  echo "fresh-clone-demo: README.md's first sh block has no 'simulate -- demo' command" >&2
  exit 1
fi

work=$(mktemp -d /tmp/skylane-fresh-clone.XXXXXX)
trap 'rm -rf "$work"' EXIT
git clone --quiet --no-hardlinks "$repo" "$work/skylane"
cd "$work/skylane"
git checkout --quiet "$(git -C "$repo" rev-parse HEAD)"

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
echo "fresh-clone-demo: in $work/skylane (HEAD $(git rev-parse --short HEAD)): $readme_cmd --duration 20"
started=$(date +%s)
# The command comes from our own README, word-split as a shell would.
read -r -a argv <<<"$readme_cmd"
if ! timeout 1200 "${argv[@]}" --duration 20 >"$work/demo.out" 2>"$work/demo.err"; then
  echo "fresh-clone-demo: FAILED: the README's first command did not run from a fresh clone" >&2
  tail -n 30 "$work/demo.err" >&2
  tail -n 30 "$work/demo.out" >&2
  exit 1
fi
if ! grep -q 'through the edge\|via edge' "$work/demo.out"; then
  echo "fresh-clone-demo: FAILED: the demo exited 0 but printed no comparison" >&2
  cat "$work/demo.out" >&2
  exit 1
fi
echo "fresh-clone-demo: ok in $(($(date +%s) - started)) s"
