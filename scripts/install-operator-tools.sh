#!/usr/bin/env bash
# Installs the operator tools into .build/bin: grpc_health_probe (grpc.health.v1 checks, as a
# Kubernetes exec probe runs them), grpcurl (lists and calls every service through reflection) and
# jaeger (Jaeger v2, the OTLP trace backend `make up MONITORING=1` and the tracing tests use; its
# first build takes about 4 minutes on 2 cores).
#
# All are built from the Go module proxy at pinned versions. Each has a module of ours,
# scripts/operator-tools/<tool>/go.mod and go.sum: go.mod pins the tool's version and go.sum the
# hash of every module it builds from, and the build runs with -mod=readonly, so a module whose
# download differs from the committed hash fails the build (nothing depends on a checksum
# database being reachable). A binary already there with the pinned version (read from the Go
# build info embedded in it) is kept: a second run takes well under a second. Go 1.25 or later is
# needed only when something has to be built.
#
# Why not plain `go install module@version`: outside a module it also fetches the module's list
# of versions to look for a deprecation notice, and proxies or mirrors that serve pinned versions
# only (ours here does) refuse that list, which fails the install.
#
# To upgrade a tool: change the version in its go.mod, run `go mod tidy` in that folder (it
# rewrites go.sum from the proxy and the checksum database) and commit both files.
set -euo pipefail
cd "$(dirname "$0")/.."

PINS=$PWD/scripts/operator-tools
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

# The version of MODULE that the committed go.mod of BINARY requires.
pinned_version() {
  awk -v module="$2" '$1 == "require" && $2 == module { print $3 }' "$PINS/$1/go.mod"
}

# build BINARY MODULE PACKAGE LDFLAGS_FORMAT (%s: the version)
build() {
  local binary=$1 module=$2 package=$3 version
  version=$(pinned_version "$binary" "$module")
  if [[ -z $version ]]; then
    echo "install-operator-tools: no $module in $PINS/$binary/go.mod" >&2
    return 1
  fi
  local ldflags
  ldflags=$(printf -- "$4" "$version")  # the format comes from this script
  if [[ $(built_version "$BIN_DIR/$binary") == "$version" ]]; then
    echo "$binary $version"
    return
  fi
  if ! command -v go >/dev/null; then
    if [[ -x $BIN_DIR/$binary ]]; then
      echo "install-operator-tools: no Go to check $binary's version; keeping it" >&2
      return
    fi
    echo "install-operator-tools: Go (1.25 or later, https://go.dev/dl/) is needed to build" \
      "$binary $version into .build/bin" >&2
    return 1
  fi
  echo "install-operator-tools: building $binary from $module@$version" >&2
  local dir=$WORK_DIR/$binary
  rm -rf "$dir"
  mkdir -p "$dir"
  cp "$PINS/$binary/go.mod" "$PINS/$binary/go.sum" "$dir/"
  # Write next to the target and rename, so an interrupted build never leaves a half-written
  # binary that the version check above could mistake for a good one.
  (cd "$dir" && GOFLAGS=-mod=readonly go build -trimpath -ldflags "$ldflags" \
    -o "$BIN_DIR/.$binary.partial" "$package")
  mv -f "$BIN_DIR/.$binary.partial" "$BIN_DIR/$binary"
  echo "$binary $version"
}

# -X sets the version each tool prints with -version (upstream's release builds do the same).
probe=$(build grpc_health_probe github.com/grpc-ecosystem/grpc-health-probe \
  github.com/grpc-ecosystem/grpc-health-probe "-X main.versionTag=%s")
grpcurl=$(build grpcurl github.com/fullstorydev/grpcurl github.com/fullstorydev/grpcurl/cmd/grpcurl \
  "-X main.version=%s")
# Jaeger v2 is released as module version v1.x of github.com/jaegertracing/jaeger.
jaeger=$(build jaeger github.com/jaegertracing/jaeger github.com/jaegertracing/jaeger/cmd/jaeger \
  "-X github.com/jaegertracing/jaeger/internal/version.latestVersion=%s")
echo "install-operator-tools: .build/bin has $probe, $grpcurl and $jaeger" >&2
