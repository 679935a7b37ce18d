# `make demo` and `make test` are all a newcomer needs: each creates .venv and installs the pinned
# dependencies when they are missing or changed, then runs.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ffasynth-installed
# GPU users on a CUDA other than the default wheel's: make setup TORCH_INDEX_URL=<PyTorch wheel index for your CUDA>
TORCH_INDEX_URL ?=
PIP_FLAGS := -q --disable-pip-version-check $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL))
# Quiet the environment's "Location ... is ignored" notices, keep real errors.
PIP_FILTER := { grep -v "is ignored: it is neither a file nor a directory" || true; }
DEMO_OUT ?= demo-out

.PHONY: setup browser test test-fast demo lint format clean

setup: $(STAMP)

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python requirements.txt constraints.txt pyproject.toml
	$(BIN)/pip install $(PIP_FLAGS) -r requirements.txt -c constraints.txt 2>&1 | $(PIP_FILTER)
	$(BIN)/pip install $(PIP_FLAGS) --no-deps -e . 2>&1 | $(PIP_FILTER)
	touch $@

# The web-page test drives Debian's chromium (no browser download); installed here when we can.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; }; }; } || \
	echo "note: chromium not installed; the browser test will be skipped (apt-get install chromium)"

test: setup browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

DEMO_MINUTES ?= 5
demo: setup
	$(BIN)/ffasynth quickstart --out $(DEMO_OUT) --minutes $(DEMO_MINUTES)

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: setup
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
