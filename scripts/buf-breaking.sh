#!/usr/bin/env bash
# `buf breaking` against another revision (default: origin/main, else main). The google/rpc
# protos proto/ imports are copied in at build time (not committed), so the other revision is
# built into an image from a temporary worktree that gets the same copies.
set -euo pipefail
cd "$(dirname "$0")/.."
ref=${1:-}
if [[ -z "$ref" ]]; then
  ref=main
  git rev-parse --verify -q origin/main >/dev/null && ref=origin/main
fi
buf="$PWD/node_modules/.bin/buf"
scripts/protogen.sh --deps-only
tree=$(mktemp -d)
trap 'git worktree remove --force "$tree" >/dev/null 2>&1 || rm -rf "$tree"' EXIT
git worktree add --detach -q "$tree" "$ref"
mkdir -p "$tree/.build"
cp -r .build/proto-deps "$tree/.build/"
(cd "$tree" && "$buf" build -o "$tree/against.binpb")
"$buf" build -o "$tree/input.binpb"
"$buf" breaking "$tree/input.binpb" --against "$tree/against.binpb"
echo "buf breaking: no breaking changes against $ref"
