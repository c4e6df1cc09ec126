"""Bookkeeping retention: per-run rows that say nothing new are folded away after a while.

A 5-minute cron makes 8,640 runs a month, most of which change nothing. Each leaves a row in
`segment_sync.runs`, step durations in `segment_sync.run_steps`, a load and a state version in
dlt's `_dlt_loads` / `_dlt_pipeline_state`, and a short pass in `dodo_raw.lookback_passes`.
Without retention the warehouse would grow with the number of runs; with it, it grows with the
business's changes. Kept whole: the newest KEEP_RECENT_RUNS runs, every run that failed, sent,
rejected, quarantined or left something pending, every deep lookback pass, the newest dlt state
versions. A pruned run's figures are folded into `segment_sync.pruned_runs` / `pruned_steps`,
so the Prometheus counters (`metrics.py`) never go down. Step durations are kept for the newest
KEEP_RECENT_RUNS runs only: an older run that is kept for what it did (it sent, say) keeps its
row, and its steps are folded into `pruned_steps` like a pruned run's (in a business that
changes every five minutes every run sends, and 4-5 step rows a run would grow with the runs).
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import duckdb

KEEP_RECENT_RUNS = 288
"""A day of 5-minute runs kept in full (status, typical durations, the last deep pass)."""

KEEP_STATE_VERSIONS = 10
"""dlt restores only the newest state; a few older versions are kept for inspection."""

PRUNED_DDL = (
    """CREATE TABLE IF NOT EXISTS segment_sync.pruned_runs (
        command VARCHAR, outcome VARCHAR, runs BIGINT, rows_loaded JSON, api_requests JSON,
        PRIMARY KEY (command, outcome))""",
    """CREATE TABLE IF NOT EXISTS segment_sync.pruned_steps (
        step VARCHAR PRIMARY KEY, seconds DOUBLE)""",
)

_PRUNABLE_RUNS = """
    SELECT run_id, command, outcome, rows_loaded::VARCHAR, api_requests::VARCHAR FROM (
        SELECT *, row_number() OVER (ORDER BY started_at DESC) AS newest
        FROM segment_sync.runs)
    WHERE newest > $keep AND outcome = 'success'
      AND coalesce(identifies_sent, 0) = 0 AND coalesce(tracks_sent, 0) = 0
      AND coalesce(rejected, 0) = 0 AND coalesce(quarantined, 0) = 0
      AND coalesce(pending, 0) = 0 AND coalesce(skipped_backlog, 0) = 0
"""

_DLT_STATE = """
    DELETE FROM dodo_raw._dlt_pipeline_state s
    WHERE s.version <= (SELECT max(version) FROM dodo_raw._dlt_pipeline_state m
                       WHERE m.pipeline_name = s.pipeline_name) - $keep
"""

_DLT_LOADS = """
    DELETE FROM dodo_raw._dlt_loads
    WHERE load_id NOT IN (SELECT _dlt_load_id FROM dodo_raw._dlt_pipeline_state)
      AND load_id < (SELECT min(load_id) FROM (
          SELECT load_id FROM dodo_raw._dlt_loads ORDER BY load_id DESC LIMIT $keep))
"""

_SHORT_PASSES = """
    DELETE FROM dodo_raw.lookback_passes
    WHERE NOT deep AND run_id NOT IN (
        SELECT run_id FROM dodo_raw.lookback_passes ORDER BY as_of DESC LIMIT $keep)
"""


def _tables(con: duckdb.DuckDBPyConnection) -> set[str]:
    rows = con.execute("SELECT schema_name || '.' || table_name FROM duckdb_tables()").fetchall()
    return {r[0] for r in rows}


def _add_json(into: dict[str, float], text: str | None) -> None:
    for key, value in (json.loads(text) if text else {}).items():
        into[key] = into.get(key, 0) + float(value or 0)


def _fold_runs(cur: duckdb.DuckDBPyConnection, prunable: list[tuple[Any, ...]]) -> None:
    """Add the pruned runs' counts, rows and requests to pruned_runs."""
    groups: dict[tuple[str, str], list[Any]] = defaultdict(lambda: [0, {}, {}])
    for _run_id, command, outcome, rows_loaded, api_requests in prunable:
        group = groups[(command, outcome)]
        group[0] += 1
        _add_json(group[1], rows_loaded)
        _add_json(group[2], api_requests)
    for (command, outcome), (runs, rows_loaded, api_requests) in groups.items():
        found = cur.execute(
            "SELECT runs, rows_loaded::VARCHAR, api_requests::VARCHAR FROM segment_sync.pruned_runs "
            "WHERE command IS NOT DISTINCT FROM ? AND outcome IS NOT DISTINCT FROM ?",
            [command, outcome],
        ).fetchone()
        if found:
            runs += found[0]
            _add_json(rows_loaded, found[1])
            _add_json(api_requests, found[2])
        cur.execute(
            "INSERT OR REPLACE INTO segment_sync.pruned_runs VALUES (?, ?, ?, ?, ?)",
            [command, outcome, runs, json.dumps(rows_loaded), json.dumps(api_requests)],
        )


_OLD_STEPS = """
    CREATE TEMP TABLE old_step_runs AS
    WITH newest AS (
        SELECT run_id FROM segment_sync.runs ORDER BY started_at DESC LIMIT $keep)
    SELECT DISTINCT run_id FROM segment_sync.run_steps AS steps
    WHERE NOT EXISTS (SELECT 1 FROM newest WHERE newest.run_id = steps.run_id)
"""


def _fold_steps(cur: duckdb.DuckDBPyConnection, keep_runs: int) -> int:
    """Fold the step durations of every run but the newest `keep_runs` into pruned_steps;
    return how many step rows went."""
    cur.execute(_OLD_STEPS, {"keep": keep_runs})
    cur.execute(
        """INSERT INTO segment_sync.pruned_steps
           SELECT step, sum(seconds) FROM segment_sync.run_steps
           WHERE run_id IN (SELECT run_id FROM old_step_runs) GROUP BY step
           ON CONFLICT (step) DO UPDATE SET seconds = pruned_steps.seconds + excluded.seconds"""
    )
    row = cur.execute(
        "DELETE FROM segment_sync.run_steps WHERE run_id IN (SELECT run_id FROM old_step_runs)"
    ).fetchone()
    cur.execute("DROP TABLE old_step_runs")
    return int(row[0]) if row else 0


def prune(
    con: duckdb.DuckDBPyConnection,
    keep_runs: int | None = None,
    keep_state_versions: int | None = None,
) -> dict[str, int]:
    """Fold away the per-run rows that say nothing new; how many rows each table lost.

    One transaction: a kill leaves all of it or none. Never touches what a run still needs
    (the newest runs, the newest dlt state and its load, the deep lookback passes).
    """
    keep_runs = KEEP_RECENT_RUNS if keep_runs is None else keep_runs
    keep_state_versions = (
        KEEP_STATE_VERSIONS if keep_state_versions is None else keep_state_versions
    )
    tables = _tables(con)
    removed: dict[str, int] = {}
    cur = con.cursor()
    cur.execute("BEGIN TRANSACTION")
    try:
        if "segment_sync.runs" in tables:
            for statement in PRUNED_DDL:
                cur.execute(statement)
            prunable = cur.execute(_PRUNABLE_RUNS, {"keep": keep_runs}).fetchall()
            if prunable:
                cur.execute("CREATE TEMP TABLE prunable_runs (run_id VARCHAR)")
                cur.executemany("INSERT INTO prunable_runs VALUES (?)", [[r[0]] for r in prunable])
                _fold_runs(cur, prunable)
                row = cur.execute(
                    "DELETE FROM segment_sync.runs WHERE run_id IN (SELECT run_id FROM prunable_runs)"
                ).fetchone()
                removed["segment_sync.runs"] = int(row[0]) if row else 0
                cur.execute("DROP TABLE prunable_runs")
            if "segment_sync.run_steps" in tables:
                removed["segment_sync.run_steps"] = _fold_steps(cur, keep_runs)
        for table, sql, keep in (
            ("dodo_raw._dlt_pipeline_state", _DLT_STATE, keep_state_versions),
            ("dodo_raw._dlt_loads", _DLT_LOADS, keep_runs),
            ("dodo_raw.lookback_passes", _SHORT_PASSES, keep_runs),
        ):
            if table in tables and (table != "dodo_raw._dlt_loads" or
                                    "dodo_raw._dlt_pipeline_state" in tables):  # fmt: skip
                row = cur.execute(sql, {"keep": keep}).fetchone()
                removed[table] = int(row[0]) if row else 0
        cur.execute("COMMIT")
    except BaseException:
        cur.execute("ROLLBACK")
        raise
    return {k: v for k, v in removed.items() if v}
