# The project's commands. Each one sets itself up on a fresh clone:
# a pinned uv in .tools/, then the locked environment in .venv/ (Python 3.11).

SHELL := /bin/bash
UV_VERSION := 0.13.9
UV := .tools/uv/bin/uv
VENV := .venv
BIN := $(VENV)/bin
PYTHON_VERSION := 3.11
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)

.PHONY: help setup run ui serve test test-faults lint typecheck pytest bench clean

help:
	@echo "make run    - run the pipeline on the built-in sample (sets itself up)"
	@echo "make test   - ruff, mypy, then pytest (sets itself up)"
	@echo "make ui     - Airflow UI and MLflow UI on 127.0.0.1 over the same stores"
	@echo "make serve  - the prediction service on 127.0.0.1:8000, serving the champion (mlops predict FILE...)"
	@echo "make bench  - benchmarks (ratios against plain baselines), written to benchmarks/results.md"
	@echo "make test-faults - the slow fault-injection tests"

$(UV):
	python$(PYTHON_VERSION) -m venv .tools/uv
	.tools/uv/bin/python -m pip install --quiet "uv==$(UV_VERSION)"

$(VENV)/.synced: $(UV) pyproject.toml uv.lock
	$(UV) sync --frozen --compile-bytecode --python $(PYTHON_VERSION)
	touch $@

setup: $(VENV)/.synced

run: setup
	$(BIN)/python -m pipelines.platform.local_airflow run

ui: setup
	$(BIN)/python -m pipelines.platform.local_airflow ui

serve: setup
	$(BIN)/python -m pipelines.cli serve

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

pytest: setup
	$(BIN)/pytest -m "not faults" --durations=15

# Slow fault-injection tests (Airflow services, MLflow outage, interrupted DVC push); CI runs them too.
test-faults: setup
	$(BIN)/pytest -m faults

bench: setup
	$(BIN)/python -m benchmarks.run

test: lint typecheck pytest

clean:
	rm -rf $(VENV) .tools .mypy_cache .ruff_cache .pytest_cache
