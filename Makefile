# dodo-segment: `make demo` runs the whole job on the embedded sandbox; `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RUNTIME__DLTHUB_TELEMETRY ?= false

.PHONY: install demo test test-fast lint format bench bench-smoke bench-delta bench-webhooks soak notebooks clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,notebooks]"
	touch $(STAMP)

demo: install
	$(BIN)/dodo-segment demo

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	$(BIN)/python -m bench.run
	$(BIN)/python -m bench.webhook_bench
	$(BIN)/python -m bench.delta_bench

bench-delta: install
	$(BIN)/python -m bench.delta_bench

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
