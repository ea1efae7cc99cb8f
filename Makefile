# TuneForge developer commands. `make demo` and `make test` do all the set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build by default; on a GPU machine use e.g. TORCH_SPEC=torch==2.13.0 TORCH_INDEX=--index-url=<cuda index>
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
# buf from clients/ts's lockfile (pinned, works offline once `npm ci` ran: the clients-ts-deps target).
BUF ?= clients/ts/node_modules/.bin/buf
PYTEST_ARGS ?=
PROTO_FILES := $(shell find protos -name '*.proto' | sort)

.PHONY: venv proto proto-check openapi openapi-check proto-lint lint typecheck test test-fast demo up lock clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24"
	$(BIN)/pip install --quiet "$(TORCH_SPEC)" $(TORCH_INDEX)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[train,postgres,dev]"
	touch $@

venv: $(BIN)/.installed

# Regenerates the Python code (messages, gRPC stubs, typed .pyi stubs) and gen/openapi/ from protos/
# Also the TypeScript (gen/ts) and Go (gen/go) clients of buf.gen.yaml; Go is skipped, saying so, where its
# Debian tools cannot be installed (make go-tools).
proto: venv clients-ts-deps go-tools
	@scripts/gen_protos.sh $(BIN)/python gen/python
	@scripts/gen_clients.sh $(BIN)/python .
	@$(BIN)/python -m services.gateway.openapi gen/openapi/tuneforge.v1.openapi.json

# Fails when the committed generated code differs from what the protos generate.
proto-check: venv clients-ts-deps go-tools
	@rm -rf .cache/gen-check && mkdir -p .cache/gen-check/clients
	@scripts/gen_protos.sh $(BIN)/python .cache/gen-check
	@diff -r -x __pycache__ -x '__init__.py' -x py.typed gen/python/tuneforge .cache/gen-check/tuneforge \
		|| (echo "generated code is stale: run 'make proto' and commit gen/" >&2; exit 1)
	@scripts/gen_clients.sh $(BIN)/python .cache/gen-check/clients
	@diff -r -x node_modules gen/ts .cache/gen-check/clients/gen/ts \
		|| (echo "generated TypeScript is stale: run 'make proto' and commit gen/ts" >&2; exit 1)
	@if [ -d .cache/gen-check/clients/gen/go ]; then \
		diff -r -x go.mod gen/go .cache/gen-check/clients/gen/go \
		|| { echo "generated Go is stale: run 'make proto' and commit gen/go" >&2; exit 1; }; \
	else echo "Go not checked: no protoc-gen-go"; fi
	@echo "generated code is up to date"

# The TypeScript client's npm packages (buf, protoc-gen-es, Connect, tsc), exactly as package-lock.json
# pins them. --ignore-scripts: buf's postinstall only checks for its platform binary, which the lockfile's
# optional @bufbuild/buf-linux-x64 (or the like) installs anyway.
CLIENTS_TS := clients/ts
$(CLIENTS_TS)/node_modules/.installed: $(CLIENTS_TS)/package.json $(CLIENTS_TS)/package-lock.json
	cd $(CLIENTS_TS) && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	touch $@

.PHONY: clients-ts-deps clients-ts go-tools go-check
clients-ts-deps: $(CLIENTS_TS)/node_modules/.installed

# Compiles clients/ts/src with gen/ts into clients/ts/dist (tests/clients/test_typescript.py runs it).
clients-ts: clients-ts-deps
	@cd $(CLIENTS_TS) && npm run --silent build

# Installs Debian's Go toolchain and protobuf/gRPC packages where they are missing and apt-get can (root or
# passwordless sudo); otherwise says why and goes on, and Go is skipped.
go-tools:
	@scripts/install_go_tools.sh || true

# Vets and compiles gen/go and the clients/go example (GOPATH mode, Debian's packages).
go-check: go-tools
	@scripts/go_build.sh

# OpenAPI of the REST/JSON routes, from the protos' google.api.http rules and comments (services/gateway/openapi.py).
openapi: venv
	@$(BIN)/python -m services.gateway.openapi gen/openapi/tuneforge.v1.openapi.json

# Fails when the committed OpenAPI differs from what the protos generate.
openapi-check: venv
	@mkdir -p .cache && $(BIN)/python -m services.gateway.openapi .cache/openapi-check.json
	@diff -q gen/openapi/tuneforge.v1.openapi.json .cache/openapi-check.json >/dev/null \
		|| (echo "gen/openapi is stale: run 'make openapi' and commit gen/openapi/" >&2; exit 1)
	@echo "OpenAPI is up to date"

proto-lint: clients-ts-deps
	@$(BUF) lint && echo "buf lint: ok"

# Fails when protos/ break the released contract, protos/released/tuneforge-v1.binpb (buf's FILE rules:
# wire, JSON and generated-code compatibility; see buf.yaml).
.PHONY: proto-breaking proto-release
proto-breaking: clients-ts-deps
	@$(BUF) breaking protos --against protos/released/tuneforge-v1.binpb && echo "buf breaking: ok"

# Writes the image later changes are checked against (the protos module, without comments, so that it
# changes only when the contract does): run it when a version of the API is released, and commit it.
proto-release: clients-ts-deps
	$(BUF) build protos --exclude-source-info -o protos/released/tuneforge-v1.binpb

lint: venv proto-lint
	$(BIN)/ruff check .

# mypy over services/, trainer_worker/ and tuneforge_core/ (settings in pyproject.toml); zero errors.
typecheck: venv
	$(BIN)/mypy

test: venv proto-check openapi-check lint proto-breaking typecheck console-test-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The web console's browser test (tests/console): Debian's chromium, installed with apt-get where it is
# missing (as root; about 15 s on this project's machines), and npm's playwright-core at the exact version
# tests/console/package-lock.json pins. Where chromium cannot be installed this says why and goes on, and
# the browser test is skipped with that reason.
CHROMIUM ?= /usr/bin/chromium
CONSOLE_TESTS := tests/console
.PHONY: console-test-deps
console-test-deps: $(CONSOLE_TESTS)/node_modules/.installed
	@if [ -x "$(CHROMIUM)" ]; then echo "chromium: $$($(CHROMIUM) --version 2>/dev/null)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's chromium with apt-get"; start=$$(date +%s); \
		if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
		then echo "chromium installed in $$(( $$(date +%s) - start )) s: $$($(CHROMIUM) --version 2>/dev/null)"; \
		else echo "could not install chromium with apt-get: the console's browser test will be skipped" >&2; fi; \
	else echo "no $(CHROMIUM), and apt-get needs root here: the console's browser test will be skipped" >&2; fi

$(CONSOLE_TESTS)/node_modules/.installed: $(CONSOLE_TESTS)/package.json $(CONSOLE_TESTS)/package-lock.json
	@if command -v npm >/dev/null; then \
		cd $(CONSOLE_TESTS) && npm ci --no-audit --no-fund --loglevel=error && touch node_modules/.installed; \
	else echo "npm not found: the console's browser test will be skipped" >&2; fi

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

# Python 3.12 wheels the GPU machine lacks (benchmarks/gpu/wheels.txt, versions from constraints.txt) into
# the ignored .cache/gpu-wheels, slimmed to fit the device tool's carry limit; benchmarks/gpu/run_all.sh
# installs them offline there (benchmarks/README.md, "On a GPU").
GPU_WHEELS ?= .cache/gpu-wheels
.PHONY: gpu-wheels
gpu-wheels: venv
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(BIN)/pip download --quiet --no-deps -c constraints.txt -d $(GPU_WHEELS) --python-version 3.12 \
		--implementation cp --only-binary=:all: --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 -r benchmarks/gpu/wheels.txt
	$(BIN)/python benchmarks/gpu/slim_wheels.py $(GPU_WHEELS)

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
	rm -rf $(VENV) .cache .pytest_cache .tuneforge clients/ts/node_modules clients/ts/dist
