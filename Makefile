# The two commands a newcomer needs: `make up` and `make test`. Everything heavy is cached outside
# the repo (TIGHTWAD_CACHE, default ~/.cache/tightwad), so a warm machine skips straight to work.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
TIGHTWAD := $(VENV)/bin/tightwad
MANIFEST ?= examples/local.yaml

.PHONY: up test lint bench toolchain models venv system kube browser clean

up: venv toolchain models ## bring the local appliance up (foreground; Ctrl-C stops it)
	$(TIGHTWAD) up $(MANIFEST)

test: venv toolchain models kube browser lint ## install what the tests need and run them all
	$(PY) -m pytest -q

lint: venv system
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	shellcheck scripts/*.sh docker/*.sh .ci/run
	$(VENV)/bin/hadolint Dockerfile.*

bench: venv toolchain models
	@for b in bench/*.py; do [[ -e "$$b" ]] || continue; echo "== $$b"; $(PY) "$$b" || exit 1; done

system:
	scripts/install-system-deps.sh

kube: system ## the CRD API server and helm that the Kubernetes tests use (cached)
	scripts/build-crd-apiserver.sh >/dev/null
	scripts/fetch-helm.sh >/dev/null

browser: system ## playwright-core for the dashboard's headless-browser test (cached)
	scripts/install-browser.sh

toolchain: system
	scripts/build-llama.sh >/dev/null

$(VENV)/.installed: pyproject.toml scripts/install-python.sh | toolchain
	scripts/install-python.sh $(VENV)
	touch $@

venv: toolchain $(VENV)/.installed

models: venv
	$(TIGHTWAD) models fetch

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
