# Shepherd: the two commands are `make run` (the main job) and `make test` (every test).
# Everything else is a building block they call; each installs what it needs on a fresh machine.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The venv is rebuilt whenever pyproject.toml changes.
VENV_STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
NODE_STAMP := node_modules/.installed-$(shell sha1sum package.json | cut -c1-12)

.PHONY: run serve test lint unit integration fuzz venv tools binaries cluster-up cluster-down cluster-status image deploy-local undeploy-local protos bench bench-airflow chaos clean

## run: start the control plane and the three services, and run the demo workload (TASKS=300).
## AIRFLOW=1: a real Airflow on Shepherd runs an example DAG instead (KEEP=1 keeps it up until Ctrl-C).
TASKS ?= 300
AIRFLOW ?=
KEEP ?=
run: venv tools
	$(BIN)/python -m demo $(if $(filter 1,$(AIRFLOW)),--airflow $(if $(filter 1,$(KEEP)),--keep),--tasks $(TASKS))

## serve: the three services in the foreground until Ctrl-C (`shepherd serve`; SERVE_ARGS for flags).
serve: venv tools
	$(BIN)/shepherd serve $(SERVE_ARGS)

## test: lint, type-check, then every unit, contract and integration test (starts the control plane).
test: lint
	$(BIN)/pytest

lint: venv tools
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

unit: venv tools
	$(BIN)/pytest tests/unit tests/contract

integration: venv tools
	$(BIN)/pytest tests/integration

## fuzz: the fuzz test with more requests per RPC than `make test` sends (FUZZ_EXAMPLES=20000).
FUZZ_EXAMPLES ?= 20000
fuzz: venv tools
	SHEPHERD_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/pytest tests/integration/test_fuzz.py

venv: $(VENV_STAMP)
$(VENV_STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python >= 3.11" >&2; exit 1; }
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "error: Python >= 3.11 is required" >&2; exit 1; }
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

## tools: buf (npm) plus the Go-built control plane, ghz, grpcurl, helm and the protoc plugins for Go
## (cached outside the checkout).
tools: $(NODE_STAMP) binaries
# No lock file: buf is pinned exactly in package.json and pins its platform binary itself, and npm 11
# leaves other platforms' optional packages out of a lock file, which `npm ci` then rejects.
$(NODE_STAMP): package.json
	@command -v npm >/dev/null || { echo "error: npm not found; install Node.js >= 18 (buf comes from npm)" >&2; exit 1; }
	npm install --no-package-lock --no-audit --no-fund --loglevel=error
	touch $@

binaries:
	@bash controlplane/build.sh >/dev/null

cluster-up: venv binaries
	$(BIN)/python -m controlplane up

cluster-down: venv
	$(BIN)/python -m controlplane down

cluster-status: venv
	$(BIN)/python -m controlplane status

## image: the services' image from the Dockerfile (mmdebstrap base + buildah, no registry, cached by
## its inputs), imported into the local cluster's real node.
image: cluster-up
	$(BIN)/python -m controlplane build-image

## deploy-local: Shepherd itself running in the local cluster from deploy/local/ (builds the image first).
deploy-local: cluster-up
	$(BIN)/python -m controlplane deploy

undeploy-local: venv
	$(BIN)/python -m controlplane undeploy

## bench: the performance figures (launch rate vs raw ceiling, event latency, memory); see README.
bench: venv tools
	$(BIN)/python -m bench $(BENCH_ARGS)

## bench-airflow: one DAG through a real Airflow, KubernetesExecutor (defaults, tuned) vs Shepherd
## (AIRFLOW_TASKS=30); needs the real node, installs Airflow. Not part of `make bench`.
AIRFLOW_TASKS ?= 30
bench-airflow: venv tools
	$(BIN)/python -m bench --only airflow --airflow-tasks $(AIRFLOW_TASKS) $(BENCH_ARGS)

## chaos: seeded fault injection on a throw-away control plane (SEEDS=N; SEED=S replays a seed).
SEEDS ?= 1
SEED ?=
chaos: venv binaries
	$(BIN)/python -m chaos --seeds $(SEEDS) $(if $(SEED),--seed $(SEED)) $(CHAOS_ARGS)

## protos: regenerate the Python code and .pyi stubs from protos/, and the Airflow package's copy (tests fail when stale).
protos: venv
	$(BIN)/python tools/gen_protos.py

clean: cluster-down
	rm -rf $(VENV) node_modules .mypy_cache .ruff_cache .pytest_cache
