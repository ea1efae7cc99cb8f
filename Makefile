# TuneForge developer commands. `make demo` and `make test` do all the set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build by default; on a GPU machine use e.g. TORCH_SPEC=torch==2.13.0 TORCH_INDEX=--index-url=<cuda index>
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
BUF ?= npx --yes @bufbuild/buf@1.75.0
PYTEST_ARGS ?=
PROTO_FILES := $(shell find protos -name '*.proto' | sort)

.PHONY: venv proto proto-check proto-lint lint typecheck test test-fast demo up lock clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24"
	$(BIN)/pip install --quiet "$(TORCH_SPEC)" $(TORCH_INDEX)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[train,postgres,dev]"
	touch $@

venv: $(BIN)/.installed

# Regenerates the Python code (messages, gRPC stubs, typed .pyi stubs) from protos/.
proto: venv
	@scripts/gen_protos.sh $(BIN)/python gen/python

# Fails when the committed generated code differs from what the protos generate.
proto-check: venv
	@rm -rf .cache/gen-check && mkdir -p .cache/gen-check
	@scripts/gen_protos.sh $(BIN)/python .cache/gen-check
	@diff -r -x __pycache__ -x '__init__.py' -x py.typed gen/python/tuneforge .cache/gen-check/tuneforge \
		|| (echo "generated code is stale: run 'make proto' and commit gen/" >&2; exit 1)
	@echo "generated code is up to date"

proto-lint:
	@if command -v npx >/dev/null; then $(BUF) lint && echo "buf lint: ok"; \
	else echo "npx not found: skipping buf lint"; fi

lint: venv proto-lint
	$(BIN)/ruff check .

# mypy over services/, trainer_worker/ and tuneforge_core/ (settings in pyproject.toml); zero errors.
typecheck: venv
	$(BIN)/mypy

test: venv proto-check lint typecheck
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# Starts the platform on embedded defaults, runs a LoRA SFT job on a tiny model end to end, stops it.
demo: venv
	$(BIN)/tuneforge demo --data-dir .tuneforge/demo

up: venv
	$(BIN)/tuneforge up

# Ingest, fan-out and unary calls against their ceilings, on SQLite and PostgreSQL (benchmarks/README.md);
# e.g. BENCH_ARGS=--quick for a 2-minute smoke run.
.PHONY: bench-control-plane
bench-control-plane: venv
	$(BIN)/python benchmarks/bench_control_plane.py $(BENCH_ARGS)

# The container images of deploy/docker/ (the names docker-compose.yml uses). Needs a Docker engine; without
# one it says so and fails. IMAGE_BUILD_ARGS e.g. --build-arg FLASH_ATTN=0 --progress=plain.
DOCKER ?= docker
IMAGE_BUILD_ARGS ?=
.PHONY: images
images:
	@$(DOCKER) info >/dev/null 2>&1 || { echo "make images: no Docker engine reachable ('$(DOCKER) info' failed):" \
		"start one or set DOCKER_HOST; nothing was built" >&2; exit 1; }
	$(DOCKER) build $(IMAGE_BUILD_ARGS) -f deploy/docker/services.Dockerfile -t tuneforge-services:dev .
	$(DOCKER) build $(IMAGE_BUILD_ARGS) -f deploy/docker/worker-cpu.Dockerfile -t tuneforge-worker:cpu .
	$(DOCKER) build $(IMAGE_BUILD_ARGS) -f deploy/docker/worker-cuda.Dockerfile -t tuneforge-worker:cuda .

# Re-pins the whole dependency tree after changing pyproject.toml.
lock: venv
	$(BIN)/pip freeze --exclude-editable | grep -v '^torch==' > constraints.txt

clean:
	rm -rf $(VENV) .cache .pytest_cache .tuneforge
