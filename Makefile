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

.PHONY: setup test test-fast demo lint format clean

setup: $(STAMP)

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python requirements.txt constraints.txt pyproject.toml
	$(BIN)/pip install $(PIP_FLAGS) -r requirements.txt -c constraints.txt 2>&1 | $(PIP_FILTER)
	$(BIN)/pip install $(PIP_FLAGS) --no-deps -e . 2>&1 | $(PIP_FILTER)
	touch $@

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

DEMO_MINUTES ?= 5
demo: setup
	$(BIN)/ffasynth quickstart --out $(DEMO_OUT) --minutes $(DEMO_MINUTES)

lint: setup
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

format: setup
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --fix src tests

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
