"""The tiered lookback and rate-limit pacing, against the simulator over HTTP."""

from __future__ import annotations

import json
import logging
import shutil
from datetime import timedelta

import duckdb
import pytest

from pipelines.config import ConfigError, load_config, pipeline_dir
from pipelines.extract import run_extract
from pipelines.extract.dodo.client import format_timestamp
from pipelines.extract.dodo.pacing import Pacer
from pipelines.job import RunOptions, run_job
from pipelines.sandbox.ratelimit import RateLimit, TokenBuckets
from tests.conftest import Sandbox, run_cli
from tests.test_extract import assert_matches_truth, warehouse_ids


def passes(db: str) -> list[tuple[bool, dict]]:
    with duckdb.connect(db, read_only=True) as con:
        rows = con.execute(
            "select deep, found from dodo_raw.lookback_passes order by as_of, recorded_at"
        ).fetchall()
    return [(deep, json.loads(found)) for deep, found in rows]


@pytest.mark.slow  # heavy: several job runs in process (over 2.5 s on the 2-core box)
def test_a_late_visible_object_is_caught_by_the_next_deep_pass_and_counted(
    sandbox: Sandbox,
) -> None:
    biz = sandbox.business
    first = run_extract(sandbox.config())
    assert first.deep  # the first sync is the deep pass too
    # created five hours before the cursor, listed by the API only now (a late write)
    late = biz.add_payments(1, "succeeded", at=biz.now - timedelta(hours=5))[0]
    sandbox.simulator.reset_counts()
    short = run_extract(sandbox.config())
    assert not short.deep and short.lookback_seconds == 3600
    window_start = format_timestamp(biz.now.replace(microsecond=0) - timedelta(hours=1))
    for path, query in sandbox.simulator.requests:  # the walk behind the cursor: one hour
        by_status = query.get("status") or query.get("dispute_status")
        exact = query.get("created_at_gte") == query.get("created_at_lte")
        if path != "/products" and not by_status and not exact:
            assert query["created_at_gte"] >= window_start, (path, query)
    assert late["payment_id"] not in warehouse_ids(sandbox.db, "payments")
    deep = run_extract(sandbox.config(), deep=True)
    assert deep.deep and deep.lookback_seconds == 3 * 86400
    assert late["payment_id"] in warehouse_ids(sandbox.db, "payments")
    assert deep.deep_found["payments"] == {"new": 1, "changed": 0}
    assert deep.deep_found["balance_ledger"]["new"] >= 1  # the payment's ledger rows
    assert deep.deep_found["refunds"] == {"new": 0, "changed": 0}
    assert_matches_truth(sandbox)
    assert [deep for deep, _ in passes(sandbox.db)] == [True, False, True]
    assert passes(sandbox.db)[-1][1]["payments"] == {"new": 1, "changed": 0}


def test_a_status_change_of_an_old_open_object_is_caught_by_a_short_run(sandbox: Sandbox) -> None:
    biz = sandbox.business
    processing = biz.add_payments(1, "processing", at=biz.now - timedelta(days=2))[0]
    run_extract(sandbox.config())  # knows it as processing
    biz.set_payment_status(processing["payment_id"], "succeeded")
    short = run_extract(sandbox.config())
    assert not short.deep
    with duckdb.connect(sandbox.db, read_only=True) as con:
        status = con.execute(
            "select status from dodo_raw.payments where payment_id = ?", [processing["payment_id"]]
        ).fetchone()
    assert status == ("succeeded",)
    assert_matches_truth(sandbox)


@pytest.mark.slow  # heavy: several job runs in process (over 2.5 s on the 2-core box)
def test_the_deep_pass_schedule_survives_losing_the_pipeline_folder(sandbox: Sandbox) -> None:
    biz = sandbox.business
    config = sandbox.config(**{"sources.dodo.deep_lookback_hours": 24})
    assert run_extract(config).deep
    biz.advance_time(days=2 / 24)
    assert not run_extract(sandbox.config()).deep
    shutil.rmtree(pipeline_dir(config.warehouse_path))
    biz.advance_time(days=2 / 24)
    lost = run_extract(sandbox.config())
    assert not lost.deep and lost.lookback_seconds == 3600  # the schedule is in the warehouse
    biz.advance_time(days=21 / 24)  # 25 hours after the last deep pass
    assert run_extract(sandbox.config()).deep
    assert [deep for deep, _ in passes(sandbox.db)] == [True, False, False, True]
    assert_matches_truth(sandbox)


@pytest.mark.slow
def test_run_deep_and_status_show_the_deep_pass_and_requests_per_resource(
    sandbox: Sandbox,
) -> None:
    env = sandbox.env()
    assert run_cli("run", "--skip-emit", env=env).returncode == 0
    late = sandbox.business.add_payments(
        1, "succeeded", at=sandbox.business.now - timedelta(hours=6)
    )[0]
    assert run_cli("run", "--skip-emit", env=env).returncode == 0
    deep = run_cli("run", "--skip-emit", "--deep", env=env)
    assert deep.returncode == 0, deep.stderr
    assert "the deep pass found rows the short lookback window missed: payments 1 new" in (
        deep.stderr
    )
    assert late["payment_id"] in warehouse_ids(sandbox.db, "payments")
    document = json.loads(run_cli("status", "--json", env=env).stdout)
    lookback = document["lookback"]
    runs = document["runs"]
    kinds = [lookback["runs"][run["run_id"]]["deep"] for run in runs]
    assert kinds == [True, False, True]  # newest first
    last = lookback["last_deep_pass"]
    assert last["run_id"] == runs[0]["run_id"]
    assert last["found"]["payments"] == {"new": 1, "changed": 0}
    assert last["api_requests"] == sum(runs[0]["api_requests"].values())
    text = run_cli("status", env=env).stdout
    assert "Last deep pass:" in text and "payments 1 new, 0 changed" in text
    short_line = [line for line in text.splitlines() if line.startswith("  ") and " short " in line]
    assert len(short_line) == 1
    assert f"payments {runs[1]['api_requests']['payments']}" in short_line[0]


# --- pacing -----------------------------------------------------------------------------------


@pytest.mark.slow  # heavy: several job runs in process (over 2.5 s on the 2-core box)
def test_pacing_by_headers_gets_no_429_from_the_servers_limiter(sandbox: Sandbox) -> None:
    limit = RateLimit(per_minute=1200, burst=20)
    sandbox.simulator.limiter = TokenBuckets(limit)
    # no ceiling of the user's own: the server's headers alone pace the run
    result = run_extract(sandbox.config(**{"sources.dodo.requests_per_minute": None}))
    requests = sum(result.api_requests.values())
    assert requests > 3 * limit.burst  # far more than one burst: pacing had work to do
    assert result.pacing["headers_seen"] and result.pacing["waits"] > 0
    assert result.pacing["throttled"] == 0 and sandbox.simulator.limiter.refused == 0
    assert not result.api_retries
    # never held back longer than the limit requires for the requests made
    assert result.pacing["gated_seconds"] <= requests / (limit.per_minute / 60)
    assert_matches_truth(sandbox)


@pytest.mark.slow  # heavy: several job runs in process (over 2.5 s on the 2-core box)
def test_a_429_with_retry_after_is_still_honoured(sandbox: Sandbox) -> None:
    # a server that sends no rate-limit headers, and no ceiling on the client: 429s happen
    sandbox.simulator.limiter = TokenBuckets(RateLimit(per_minute=1200, burst=20, headers=False))
    result = run_extract(
        sandbox.config(**{"sources.dodo.requests_per_minute": 0, "sources.dodo.max_retries": 8})
    )
    assert result.pacing["throttled"] == sandbox.simulator.limiter.refused > 0
    assert not result.pacing["headers_seen"]
    assert sum(result.api_retries.values()) == result.pacing["throttled"]
    assert result.pacing["gated_seconds"] >= 1  # Retry-After: 1 held every thread back
    assert_matches_truth(sandbox)


def test_the_pacer_waits_for_the_reset_only_when_the_allowance_is_spent() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(round(seconds, 6))
        now[0] += seconds

    pacer = Pacer(None, 100, clock=lambda: now[0], sleep=sleep)
    pacer.acquire()  # no headers yet: the fallback spaces requests (the first goes at once)
    pacer.observe(200, {"X-RateLimit-Remaining": "3", "X-RateLimit-Reset": "2.5"})
    for _ in range(2):  # 3 left: two go at once, one stays in reserve
        pacer.acquire()
        pacer.observe(200, {})
    assert slept == []
    pacer.acquire()  # the allowance is down to the reserve: wait exactly until the reset
    assert slept == [2.5]
    pacer.observe(429, {"Retry-After": "4"})
    pacer.hold(4)
    pacer.acquire()
    assert slept == [2.5, 4.0]
    figures = pacer.figures()
    assert figures.throttled == 1 and figures.waits == 2 and figures.gated_seconds == 6.5


def test_the_users_ceiling_applies_with_headers_too() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(round(seconds, 6))
        now[0] += seconds

    pacer = Pacer(60, 60, clock=lambda: now[0], sleep=sleep)
    pacer.acquire()
    pacer.observe(200, {"X-RateLimit-Remaining": "200", "X-RateLimit-Reset": "60"})
    pacer.acquire()  # plenty of allowance, but the user allows one request a second
    pacer.observe(200, {"X-RateLimit-Remaining": "199", "X-RateLimit-Reset": "60"})
    assert slept == [1.0]


@pytest.mark.slow  # heavy: several job runs in process (over 2.5 s on the 2-core box)
def test_a_no_change_run_keeps_the_models_although_it_records_its_pass(
    sandbox: Sandbox, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dodo_segment")
    config = sandbox.config()
    assert run_job(config, RunOptions(skip_emit=True)).exit_code == 0
    caplog.clear()
    assert run_job(config, RunOptions(skip_emit=True)).exit_code == 0
    assert "models: inputs unchanged" in caplog.text
    assert [deep for deep, _ in passes(sandbox.db)] == [True, False]


def test_the_lookback_and_ceiling_settings() -> None:
    defaults = load_config({}).extract
    assert (defaults.lookback_minutes, defaults.deep_lookback_hours) == (60, 24)
    assert defaults.requests_per_minute is None  # the server's headers pace the job
    assert load_config({"sources.dodo.requests_per_minute": "90"}).extract.requests_per_minute == 90
    with pytest.raises(ConfigError, match="lookback_minutes must be a number above 0"):
        load_config({"sources.dodo.lookback_minutes": 0})
