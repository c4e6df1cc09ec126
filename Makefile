# dodo-segment: `make demo` runs the whole job on the embedded sandbox; `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RUNTIME__DLTHUB_TELEMETRY ?= false

.PHONY: install browser demo report test test-fast lint format bench bench-smoke bench-delta bench-webhooks bench-incremental bench-report bench-flood bench-run-cost soak soak-month notebooks clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,notebooks]"
	touch $(STAMP)

# Debian's Chromium for the report's browser test (tests/test_report.py), where it is missing.
CHROMIUM := /usr/bin/chromium
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
browser: $(CHROMIUM)

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium

demo: install
	$(BIN)/dodo-segment demo

report: install
	$(BIN)/dodo-segment report

# The suite on both cores (pytest-xdist): tests go one by one to the next free worker, except a
# module whose tests share a module-scoped setup (marked xdist_group), which stays on one worker.
# test-fast: the tests not marked slow: no subprocess (CLI, wheel, notebook kernel, browser) and
# no heavy in-process scenario (several job runs); make test runs them all.
PYTEST_WORKERS ?= 4

test: install browser
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup --durations=10

test-fast: install
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	$(BIN)/python -m bench.run
	$(BIN)/python -m bench.webhook_bench
	$(BIN)/python -m bench.report_bench
	$(BIN)/python -m bench.delta_bench

bench-report: install
	$(BIN)/python -m bench.report_bench

bench-delta: install
	$(BIN)/python -m bench.delta_bench

# Issue 21's sizes. The 1M webhook round is 4,272 deliveries (~50 minutes on the 2-core box).
BENCH_SIZES ?= 100k,1m

bench-webhooks: install
	$(BIN)/python -m bench.webhook_bench --payments $(BENCH_SIZES)

# Issue 21's table in one invocation: delta vs full builds and webhook -> Segment latency at
# each size (bench/incremental_bench.py)
# 1m@100k: the 100k business over 900k older closed payments (the same delta, ten times the history)
INCREMENTAL_SIZES ?= 100k,1m@100k,1m
bench-incremental: install
	$(BIN)/python -m bench.incremental_bench --sizes $(INCREMENTAL_SIZES)

# 200 deliveries/s (10% duplicates) for a minute while a run holds the lock (README: Performance)
bench-flood: install
	$(BIN)/python -m bench.flood_bench --rate 200 --seconds 60

# A run's fixed cost by step, CPU and wall: soak-like and no-change runs (bench/run_cost.py)
bench-run-cost: install
	$(BIN)/python -m bench.run_cost --runs 6

bench-smoke: install
	$(BIN)/python -m bench.run --quick

soak: install
	DODO_SEGMENT_SOAK_KILLS=200 $(BIN)/python -m pytest -q tests/test_reliability.py -k kill

# A month of 5-minute cron runs compressed in time, with faults, kills and a lost warehouse
# (hours; not part of `make test`). Its state lives in SOAK_STATE: stopped, killed or paused
# (SOAK_WALL_MINUTES=60 pauses it after an hour), the same command resumes it; the final run and
# the checks come when the SOAK_DAYS are simulated. SOAK_DAYS=1 for a shorter soak of the same.
SOAK_DAYS ?= 30
SOAK_STATE ?= bench/_work/soak-month-$(SOAK_DAYS)d
soak-month: install
	$(BIN)/python -m bench.soak_month --days $(SOAK_DAYS) --state-dir $(SOAK_STATE) $(if $(SOAK_WALL_MINUTES),--wall-minutes $(SOAK_WALL_MINUTES))

notebooks: install
	$(BIN)/python -m pip install --quiet -e ".[dev,notebooks,lab]"
	$(BIN)/jupyter lab notebooks/

clean:
	rm -rf $(VENV) demo.duckdb demo.duckdb.* demo-report.html report.html .pytest_cache
