# Plain targets; strict shell so a failing step stops the recipe.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV := .venv
PY := $(VENV)/bin/python
STATE := .state
# llama.cpp: build only the library llama-cpp-python loads (no server, tools or examples); pip's
# wheel cache keeps the result, so only the first install on a machine compiles (~7 min, 2 cores).
LLAMA_CMAKE_ARGS := -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DGGML_NATIVE=OFF

.PHONY: help setup proto proto-deps proto-check lint typecheck test test-unit test-integration bench faults run up down clean

help:
	@echo "make run       install everything, start the mesh, chat in the terminal"
	@echo "make test      the whole test suite"
	@echo "make up/down   start/stop the mesh in the background (scale-out profile: PROFILE=scale)"
	@echo "make proto     regenerate stubs;  make lint typecheck bench faults"

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade --progress-bar on pip wheel
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install --progress-bar on -e '.[dev,scale]'
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund
	touch $@

setup: $(VENV)/.installed node_modules/.installed

proto: setup
	scripts/protogen.sh
	npm run build:web  # the page bundles the generated TypeScript

# CI: regenerated stubs must equal the committed ones.
proto-check: proto
	git diff --exit-code -- gen/ || (echo "generated code is stale: run make proto and commit" >&2; exit 1)

# The google/rpc protos that proto/ imports, copied from the installed googleapis-common-protos.
proto-deps: setup
	scripts/protogen.sh --deps-only

lint: proto-deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	npx buf lint

typecheck: setup
	$(VENV)/bin/mypy mesh services

test: setup
	$(PY) -m pytest

test-unit: setup
	$(PY) -m pytest -m "not integration and not infra and not browser"

bench: setup
	$(PY) -m bench

# The fault suite (docs/reliability.md): minutes, not part of `make test`.
faults: setup
	$(PY) -m bench.faults --write

run: setup
	$(PY) -m mesh.run

up: setup
	$(PY) -m mesh.run --detach $(if $(PROFILE),--profile $(PROFILE),) \
		$(if $(AGENTS),--agents $(AGENTS),) $(if $(GATEWAYS),--gateways $(GATEWAYS),) \
		$(if $(MONITORING),--monitoring,)

down:
	$(PY) -m mesh.run --down

clean:
	rm -rf $(STATE) .build
