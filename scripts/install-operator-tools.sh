#!/usr/bin/env bash
# Installs the operator probes into .build/bin: grpc_health_probe (grpc.health.v1 checks, as a
# Kubernetes exec probe runs them) and grpcurl (lists and calls every service through reflection).
#
# Both are built from the Go module proxy at pinned versions, so CI and operators run the same
# binaries. A binary that is already there with the pinned version (read from the Go build info
# embedded in it) is kept, so running this again costs well under a second. The upstream release
# binary is called grpc_health_probe while `go install` names it after the module path; we rename
# it so the commands in docs/operators.md match the ones in upstream's documentation.
set -euo pipefail
cd "$(dirname "$0")/.."

GRPC_HEALTH_PROBE_VERSION=v0.4.53
GRPCURL_VERSION=v1.9.4

BIN_DIR=$PWD/.build/bin
mkdir -p "$BIN_DIR"

# Tests on parallel sessions may call this at the same time; one installs, the others wait.
exec 9>"$PWD/.build/operator-tools.lock"
flock 9

if ! command -v go >/dev/null; then
  if [[ -x $BIN_DIR/grpc_health_probe && -x $BIN_DIR/grpcurl ]]; then
    echo "install-operator-tools: no Go toolchain to check versions; keeping .build/bin as is" >&2
    exit 0
  fi
  echo "install-operator-tools: Go is needed to build grpc_health_probe and grpcurl" \
    "(https://go.dev/dl/, any release from 1.24 on)" >&2
  exit 1
fi

# The module version a Go binary was built from, or nothing if it is missing or not a Go binary.
built_version() {
  [[ -x $1 ]] || return 0
  go version -m "$1" 2>/dev/null | awk '$1 == "mod" { print $3; exit }'
}

# install BINARY PACKAGE VERSION [NAME_GO_INSTALL_GIVES]
install() {
  local binary=$1 package=$2 version=$3 built_as=${4:-$1}
  if [[ $(built_version "$BIN_DIR/$binary") == "$version" ]]; then
    return
  fi
  echo "install-operator-tools: go install $package@$version" >&2
  local staging
  staging=$(mktemp -d "$PWD/.build/operator-tools.XXXXXX")
  # Build into a private directory and move into place, so an interrupted build never leaves a
  # half-written binary that a later run would take for the right one.
  if ! GOBIN=$staging go install "$package@$version"; then
    rm -rf "$staging"
    return 1
  fi
  mv -f "$staging/$built_as" "$BIN_DIR/$binary"
  rm -rf "$staging"
}

install grpc_health_probe github.com/grpc-ecosystem/grpc-health-probe \
  "$GRPC_HEALTH_PROBE_VERSION" grpc-health-probe
install grpcurl github.com/fullstorydev/grpcurl/cmd/grpcurl "$GRPCURL_VERSION"

echo "install-operator-tools: grpc_health_probe $GRPC_HEALTH_PROBE_VERSION," \
  "grpcurl $GRPCURL_VERSION in .build/bin" >&2
