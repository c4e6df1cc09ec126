# dodo-segment: `make demo` runs the whole job on the embedded sandbox; `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RUNTIME__DLTHUB_TELEMETRY ?= false

.PHONY: install demo test test-fast lint format bench bench-smoke bench-webhooks bench-flood soak soak-month notebooks clean

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

bench-webhooks: install
	$(BIN)/python -m bench.webhook_bench

# 200 deliveries/s (10% duplicates) for a minute while a run holds the lock (README: Performance)
bench-flood: install
	$(BIN)/python -m bench.flood_bench --rate 200 --seconds 60

bench-smoke: install
	$(BIN)/python -m bench.run --quick

soak: install
	DODO_SEGMENT_SOAK_KILLS=200 $(BIN)/python -m pytest -q tests/test_reliability.py -k kill

# A month of 5-minute cron runs compressed in time, with faults, kills and a lost warehouse
# (hours; not part of `make test`). SOAK_DAYS=1 for a shorter run of the same.
SOAK_DAYS ?= 30
soak-month: install
	$(BIN)/python -m bench.soak_month --days $(SOAK_DAYS)

notebooks: install
	$(BIN)/python -m pip install --quiet -e ".[dev,notebooks,lab]"
	$(BIN)/jupyter lab notebooks/

clean:
	rm -rf $(VENV) demo.duckdb demo.duckdb.* .pytest_cache
