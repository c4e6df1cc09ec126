"""The tiered lookback: a short window every run, a deep pass once a day, kept in the warehouse.

Every run re-reads `lookback_minutes` behind each cursor plus the open objects (their status
changes are caught by the status re-reads, whatever their age). One run per
`deep_lookback_hours` re-reads the whole `lookback_days` window: it catches objects that became
visible late and terminal objects whose fields changed. When it ran and what it found that the
short runs had missed live in `dodo_raw.lookback_passes`, so the schedule survives a lost
pipeline folder and the operator can see whether the short window is long enough.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import pyarrow as pa

from pipelines import warehouse
from pipelines.dodo_contract import (
    LOOKBACK_PASSES_TABLE,
    NON_TERMINAL_STATUSES,
    PRIMARY_KEYS,
    RAW_DATASET,
    STATUS_FIELDS,
    key_hash_columns,
)
from pipelines.extract.dodo import ExtractPlan

log = logging.getLogger(__name__)

LOOKBACK_PASSES_SQL = f"""
create table if not exists {RAW_DATASET}.{LOOKBACK_PASSES_TABLE} (
    run_id varchar primary key, as_of timestamptz not null, deep boolean not null,
    window_seconds double not null, found json, api_requests json, recorded_at timestamptz
)
"""
LOAD_COLUMNS = ("_synced_at", "_dlt_load_id", "_dlt_id")
"""Columns that say when and how a row was loaded, not what the API said."""


@dataclass(frozen=True)
class LookbackPass:
    """One extract's lookback: deep or short, its window, and what a deep one found."""

    run_id: str
    as_of: datetime
    deep: bool
    window_seconds: float
    found: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per resource: rows the deep pass brought that the short runs had not ("new": a key the
    warehouse did not hold; "changed": a terminal row whose fields differ)."""
    api_requests: dict[str, int] = field(default_factory=dict)


def _has_table(con: duckdb.DuckDBPyConnection) -> bool:
    row = con.execute(
        "select count(*) from information_schema.tables where table_schema = ? and table_name = ?",
        [RAW_DATASET, LOOKBACK_PASSES_TABLE],
    ).fetchone()
    return bool(row and row[0])


def recent_passes(con: duckdb.DuckDBPyConnection, limit: int = 10) -> list[LookbackPass]:
    """The last lookback passes, newest first (none before the first recorded run)."""
    if not _has_table(con):
        return []
    rows = con.execute(
        f"select run_id, as_of, deep, window_seconds, found, api_requests "
        f"from {RAW_DATASET}.{LOOKBACK_PASSES_TABLE} order by as_of desc, recorded_at desc limit ?",
        [limit],
    ).fetchall()
    return [_as_pass(row) for row in rows]


def last_deep_pass(con: duckdb.DuckDBPyConnection) -> LookbackPass | None:
    """The newest deep pass the warehouse recorded, if any."""
    if not _has_table(con):
        return None
    row = con.execute(
        f"select run_id, as_of, deep, window_seconds, found, api_requests "
        f"from {RAW_DATASET}.{LOOKBACK_PASSES_TABLE} where deep "
        "order by as_of desc, recorded_at desc limit 1"
    ).fetchone()
    return _as_pass(row) if row else None


def _as_pass(row: tuple[Any, ...]) -> LookbackPass:
    run_id, as_of, deep, seconds, found, requests = row
    return LookbackPass(
        run_id, as_of, bool(deep), float(seconds),
        json.loads(found) if found else {}, json.loads(requests) if requests else {},
    )  # fmt: skip


def deep_pass_due(con: duckdb.DuckDBPyConnection, now: datetime, every: timedelta) -> bool:
    """Whether this run is the deep pass: none recorded yet, or the last one is `every` old."""
    last = last_deep_pass(con)
    return last is None or now - last.as_of >= every


def record_pass(warehouse_path: str, recorded: LookbackPass) -> None:
    """Store one extract's lookback pass (the deep pass schedule reads it back)."""
    with warehouse.connect(warehouse_path) as con:
        con.execute(f"create schema if not exists {RAW_DATASET}")
        con.execute(LOOKBACK_PASSES_SQL)
        con.execute(
            f"insert or replace into {RAW_DATASET}.{LOOKBACK_PASSES_TABLE} "
            "values (?, ?, ?, ?, ?, ?, ?)",
            [
                recorded.run_id, recorded.as_of, recorded.deep, recorded.window_seconds,
                json.dumps(recorded.found), json.dumps(recorded.api_requests), datetime.now(UTC),
            ],
        )  # fmt: skip


@dataclass
class DeepSnapshot:
    """Before a deep pass: key, content hash and openness of the rows it may change."""

    rows: dict[str, pa.Table] = field(default_factory=dict)
    columns: dict[str, list[str]] = field(default_factory=dict)


def _content_columns(con: duckdb.DuckDBPyConnection, resource: str) -> list[str]:
    rows = con.execute(
        "select column_name from information_schema.columns where table_schema = ? "
        "and table_name = ? order by ordinal_position",
        [RAW_DATASET, resource],
    ).fetchall()
    hashes = key_hash_columns(resource)  # the models step's look-up keys, not content
    return [name for (name,) in rows if name not in LOAD_COLUMNS and name not in hashes]


def _hashed(con: duckdb.DuckDBPyConnection, resource: str, columns: list[str]) -> str:
    """select key, row_hash, is_open from the resource's raw table (where clause appended)."""
    key = PRIMARY_KEYS[resource]
    content = ", ".join(f'"{c}"' for c in columns)
    statuses = NON_TERMINAL_STATUSES.get(resource)
    is_open = (
        f'"{STATUS_FIELDS[resource]}" in ({", ".join(repr(s) for s in statuses)})'
        if statuses
        else "false"
    )
    return (
        f'select "{key}" as key, hash({content}) as row_hash, coalesce({is_open}, false) as is_open '
        f'from "{RAW_DATASET}"."{resource}"'
    )


def snapshot(con: duckdb.DuckDBPyConnection, since: dict[str, datetime]) -> DeepSnapshot:
    """The rows created from `since` (per resource) on, as the warehouse holds them now."""
    taken = DeepSnapshot()
    for resource, start in since.items():
        columns = _content_columns(con, resource)
        if not columns:
            continue
        query = _hashed(con, resource, columns) + " where created_at >= ?"
        taken.rows[resource] = con.sql(query, params=[start]).to_arrow_table()
        taken.columns[resource] = columns
    return taken


def found_by_deep_pass(
    warehouse_path: str,
    before: DeepSnapshot,
    ranges: dict[str, tuple[datetime, datetime]],
) -> dict[str, dict[str, int]]:
    """Per resource, rows created in [start, end) that the deep pass added or changed.

    Only the range no short window covered counts, and a row that was open before is left out
    (the short runs' status re-reads catch those): what remains is what only the deep pass saw.
    """
    found: dict[str, dict[str, int]] = {}
    with warehouse.connect(warehouse_path, read_only=True) as con:
        for resource, (start, end) in ranges.items():
            if resource not in before.rows:
                continue
            con.register("before_rows", before.rows[resource])
            now = _hashed(con, resource, before.columns[resource])
            ((new, changed),) = con.execute(
                f"with after_rows as ({now} where created_at >= ? and created_at < ?) "
                "select count(*) filter (where b.key is null), "
                "count(*) filter (where b.key is not null and not b.is_open "
                "and a.row_hash <> b.row_hash) "
                "from after_rows as a left join before_rows as b using (key)",
                [start, end],
            ).fetchall()
            con.unregister("before_rows")
            found[resource] = {"new": int(new), "changed": int(changed)}
    return found


def before_deep_pass(warehouse_path: str, plan: ExtractPlan) -> DeepSnapshot | None:
    """The rows a deep pass may change, as the warehouse holds them before it (None: not the
    deep pass, or nothing loaded yet)."""
    if not plan.deep or not plan.newest_loaded:
        return None
    if not warehouse_path.startswith("md:") and not os.path.exists(warehouse_path):
        return None
    since = {r: newest - plan.lookback for r, newest in plan.newest_loaded.items()}
    with warehouse.connect(warehouse_path, read_only=True) as con:
        return snapshot(con, since)


def close_pass(
    warehouse_path: str,
    plan: ExtractPlan,
    before: DeepSnapshot | None,
    short: timedelta,
    api_requests: dict[str, int],
    run_id: str,
) -> dict[str, dict[str, int]]:
    """Count what the deep pass found behind the short window, and record this run's pass.

    Called after every load of the run succeeded: a failed deep pass is not recorded, so the
    next run is the deep pass again."""
    found: dict[str, dict[str, int]] = {}
    if before is not None and plan.lookback > short:
        ranges = {r: (c - plan.lookback, c - short) for r, c in plan.cursors_at_start.items()}
        found = found_by_deep_pass(warehouse_path, before, ranges)
        missed = {r: f for r, f in found.items() if f["new"] or f["changed"]}
        if missed:
            log.warning(
                "extract: the deep pass found rows the short lookback window missed: %s "
                "(if this recurs, raise sources.dodo.lookback_minutes)",
                ", ".join(f"{r} {f['new']} new, {f['changed']} changed" for r, f in missed.items()),
            )
    recorded = LookbackPass(
        run_id, plan.run_started_at, plan.deep, plan.lookback.total_seconds(), found, api_requests
    )
    record_pass(warehouse_path, recorded)
    return found
