#!/usr/bin/env bash
# Runs .ci/run as a machine that never ran the project would: on a fresh clone of HEAD (no .venv,
# node_modules, .build or .state) with an empty HOME, so pip's wheel cache, npm's cache, Maven's
# ~/.m2 and Go's module and build caches all start empty. llama-cpp-python compiles again (the
# longest step, 5 to 10 minutes on 2 cores). Only system packages stay: .ci/run installs
# chromium and tmux with apt-get when missing, and PostgreSQL's install is tested by
# `python -m mesh.infra.postgres install` on a machine without it.
#
#   scripts/ci-cold.sh            # commit first: the clone holds HEAD, not the work tree
#   KEEP=1 scripts/ci-cold.sh     # keep the scratch directory for a look afterwards
set -euo pipefail
source_repo=$(cd "$(dirname "$0")/.." && pwd)
scratch=$(mktemp -d /tmp/mesh-cold.XXXXXX)
if [[ -z ${KEEP:-} ]]; then
  trap 'rm -rf "$scratch"' EXIT
fi
git clone -q "$source_repo" "$scratch/repo"
mkdir "$scratch/home"
# PYENV_ROOT and the like keep the machine's own toolchains reachable; caches follow HOME.
echo "ci-cold: .ci/run in $scratch/repo with HOME=$scratch/home" >&2
started=$SECONDS
cd "$scratch/repo"
status=0
HOME=$scratch/home CI=true bash .ci/run || status=$?
echo "ci-cold: .ci/run exited $status after $((SECONDS - started)) s" >&2
exit "$status"
