#!/usr/bin/env bash
# Installs the operator probes into .build/bin: grpc_health_probe (grpc.health.v1 checks, as a
# Kubernetes exec probe runs them) and grpcurl (lists and calls every service through reflection).
#
# Both are built from the Go module proxy at pinned versions, checked against the Go checksum
# database, so CI and operators run the same binaries. A binary already there with the pinned
# version (read from the Go build info embedded in it) is kept: a second run takes well under a
# second. Go 1.24 or later is needed only when something has to be built.
#
# Why not plain `go install module@version`: outside a module it also fetches the module's list
# of versions to look for a deprecation notice, and proxies or mirrors that serve pinned versions
# only (ours here does) refuse that list, which fails the install. Building from a one-line
# module that requires the pinned version needs that version alone and resolves the same
# dependencies, since the tool's own go.mod is the only other requirement.
set -euo pipefail
cd "$(dirname "$0")/.."

GRPC_HEALTH_PROBE_VERSION=v0.4.53
GRPCURL_VERSION=v1.9.4

BIN_DIR=$PWD/.build/bin
WORK_DIR=$PWD/.build/operator-tools
mkdir -p "$BIN_DIR" "$WORK_DIR"

# Test sessions running side by side may call this at once: one builds, the others wait for it.
exec 9>"$WORK_DIR/lock"
flock 9

# The module version a Go binary was built from; empty if it is missing or not a Go binary.
built_version() {
  [[ -x $1 ]] && command -v go >/dev/null || return 0
  go version -m "$1" 2>/dev/null | awk '$1 == "mod" { print $3; exit }'
}

# build BINARY MODULE PACKAGE VERSION LDFLAGS
build() {
  local binary=$1 module=$2 package=$3 version=$4 ldflags=$5
  if [[ $(built_version "$BIN_DIR/$binary") == "$version" ]]; then
    return
  fi
  if ! command -v go >/dev/null; then
    if [[ -x $BIN_DIR/$binary ]]; then
      echo "install-operator-tools: no Go to check $binary's version; keeping it" >&2
      return
    fi
    echo "install-operator-tools: Go (1.24 or later, https://go.dev/dl/) is needed to build" \
      "$binary $version into .build/bin" >&2
    return 1
  fi
  echo "install-operator-tools: building $binary from $module@$version" >&2
  local dir=$WORK_DIR/$binary
  rm -rf "$dir"
  mkdir -p "$dir"
  printf 'module operator-tools/%s\n\ngo 1.24\n\nrequire %s %s\n' \
    "$binary" "$module" "$version" >"$dir/go.mod"
  # Write next to the target and rename, so an interrupted build never leaves a half-written
  # binary that the version check above could mistake for a good one. -mod=mod lets go fill in
  # go.sum from the checksum database.
  (cd "$dir" && GOFLAGS=-mod=mod go build -trimpath -ldflags "$ldflags" \
    -o "$BIN_DIR/.$binary.partial" "$package")
  mv -f "$BIN_DIR/.$binary.partial" "$BIN_DIR/$binary"
}

# -X sets the version each tool prints with -version (upstream's release builds do the same).
build grpc_health_probe github.com/grpc-ecosystem/grpc-health-probe \
  github.com/grpc-ecosystem/grpc-health-probe "$GRPC_HEALTH_PROBE_VERSION" \
  "-X main.versionTag=$GRPC_HEALTH_PROBE_VERSION"
build grpcurl github.com/fullstorydev/grpcurl github.com/fullstorydev/grpcurl/cmd/grpcurl \
  "$GRPCURL_VERSION" "-X main.version=$GRPCURL_VERSION"

echo "install-operator-tools: .build/bin has grpc_health_probe $GRPC_HEALTH_PROBE_VERSION" \
  "and grpcurl $GRPCURL_VERSION" >&2
