# The two commands a newcomer needs: `make up` and `make test`; `make help` lists the rest.
# Everything heavy is cached outside the repo (TIGHTWAD_CACHE, default ~/.cache/tightwad), keyed by
# version and flags, so a warm machine skips straight to work.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV ?= .venv
PY := $(VENV)/bin/python
TIGHTWAD := $(VENV)/bin/tightwad
MANIFEST ?= examples/local.yaml

.PHONY: help up test unit lint bench soak toolchain models venv kube browser clean gpu-compile-check gpu-check

help: ## list these targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-17s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

up: venv toolchain models ## bring the local appliance up on examples/local.yaml (foreground; Ctrl-C stops it)
	$(TIGHTWAD) up $(MANIFEST)

test: venv toolchain models kube browser lint ## install everything the tests need, then run them all
	$(PY) -m pytest -q

unit: venv ## only the pure tests: seconds, no root, no system packages, no llama.cpp build
	$(PY) -m pytest -q -m "not integration and not system"

lint: venv ## ruff, shellcheck and hadolint (installs shellcheck only)
	scripts/install-system-deps.sh lint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	shellcheck scripts/*.sh docker/*.sh .ci/run
	$(VENV)/bin/hadolint Dockerfile.*

bench: venv toolchain models ## every benchmark in bench/ (minutes; prints ratios, asserts nothing)
	@for b in bench/*.py; do [[ -e "$$b" && "$$b" != bench/_* ]] || continue; echo "== $$b"; $(PY) "$$b" || exit 1; done

SOAK_MINUTES ?= 5
soak: venv toolchain models ## 16 clients through the local appliance for SOAK_MINUTES (5), a drafter and a worker killed midway
	$(PY) bench/soak.py --minutes $(SOAK_MINUTES)

toolchain: ## the pinned llama.cpp build: libllama, ggml-rpc-server, llama-server (cached)
	scripts/install-system-deps.sh build
	scripts/build-llama.sh >/dev/null

venv: $(VENV)/.installed ## the Python environment (.venv), with the test tools

$(VENV)/.installed: pyproject.toml scripts/install-python.sh
	scripts/install-python.sh $(VENV)
	touch $@

models: venv ## the small real models the examples and tests use (cached)
	$(TIGHTWAD) models fetch

kube: ## the CRD API server, a full Kubernetes control plane and helm that the Kubernetes tests use (cached)
	scripts/install-system-deps.sh test
	scripts/build-crd-apiserver.sh >/dev/null
	scripts/build-full-kube.sh >/dev/null
	scripts/fetch-helm.sh >/dev/null

browser: ## playwright-core for the dashboard's headless-browser test (cached)
	scripts/install-system-deps.sh test
	scripts/install-browser.sh

gpu-compile-check: ## no GPU needed: build the pinned llama.cpp with CUDA (sm_86) and, where ROCm allows, HIP (long; cached)
	scripts/install-system-deps.sh build
	scripts/gpu-compile-check.sh cuda hip

gpu-check: venv models ## on an NVIDIA GPU machine: CUDA build, golden tests, invariance, speculation; one table
	scripts/gpu-check.sh

clean: ## remove the virtual environment and tool caches in the repo (not TIGHTWAD_CACHE)
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
