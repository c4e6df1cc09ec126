# dodo-segment: `make demo` runs the whole job on the embedded sandbox; `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RUNTIME__DLTHUB_TELEMETRY ?= false

.PHONY: install demo test test-fast lint format bench bench-smoke bench-webhooks soak notebooks clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,notebooks]"
	touch $(STAMP)

demo: install
	$(BIN)/dodo-segment demo

# The suite on both cores (pytest-xdist); a module's tests stay on one worker, so a module-scoped
# fixture (a generated business, a first sync) is built once. test-fast: no subprocess, no wheel,
# no notebook kernel, no browser (the tests marked slow are left out).
PYTEST_WORKERS ?= 2

test: install
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadscope

test-fast: install
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadscope -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	$(BIN)/python -m bench.run
	$(BIN)/python -m bench.webhook_bench

bench-webhooks: install
	$(BIN)/python -m bench.webhook_bench

bench-smoke: install
	$(BIN)/python -m bench.run --quick

soak: install
	DODO_SEGMENT_SOAK_KILLS=200 $(BIN)/python -m pytest -q tests/test_reliability.py -k kill

notebooks: install
	$(BIN)/python -m pip install --quiet -e ".[dev,notebooks,lab]"
	$(BIN)/jupyter lab notebooks/

clean:
	rm -rf $(VENV) demo.duckdb demo.duckdb.* .pytest_cache
