"""Forgotten customers at load: the tombstone table, personal fields dropped before dlt sees them."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.config import pipeline_dir
from pipelines.dodo_contract import (
    CUSTOMER_KEY_COLUMNS,
    FORGOTTEN_CUSTOMERS_COLUMNS,
    FORGOTTEN_CUSTOMERS_TABLE,
    PERSONAL_FIELDS,
    RAW_COLUMNS,
    RAW_DATASET,
    SYNCED_AT_COLUMN,
)

_TYPES = {"text": "varchar", "timestamp": "timestamptz"}
TOMBSTONE = f"{RAW_DATASET}.{FORGOTTEN_CUSTOMERS_TABLE}"
TOMBSTONE_DDL = (
    f"create schema if not exists {RAW_DATASET};\n"
    f"create table if not exists {TOMBSTONE} ("
    + ", ".join(f"{name} {_TYPES[kind]}" for name, kind in FORGOTTEN_CUSTOMERS_COLUMNS.items())
    + ")"
)
"""Idempotent: the models create the same table (from the same contract) when it is absent."""


def ensure_tombstone(con: duckdb.DuckDBPyConnection) -> None:
    """Create dodo_raw.forgotten_customers if it does not exist yet."""
    con.execute(TOMBSTONE_DDL)


def forgotten_ids(con: duckdb.DuckDBPyConnection) -> frozenset[str]:
    """Ids of the customers recorded as forgotten (none when the table does not exist yet)."""
    exists = con.execute(
        "select count(*) from information_schema.tables where table_schema = ? and table_name = ?",
        [RAW_DATASET, FORGOTTEN_CUSTOMERS_TABLE],
    ).fetchone()
    if not exists or not exists[0]:
        return frozenset()
    rows = con.execute(f"select distinct customer_id from {TOMBSTONE}").fetchall()
    return frozenset(r[0] for r in rows if r[0])


def record_forgotten(
    con: duckdb.DuckDBPyConnection, customer_id: str, at: datetime, regulation_id: str | None
) -> None:
    """Write (or update) one tombstone; a later regulation id replaces an empty one."""
    ensure_tombstone(con)
    updated = con.execute(
        f"update {TOMBSTONE} set regulation_id = coalesce(?, regulation_id) "
        "where customer_id = ? returning customer_id",
        [regulation_id, customer_id],
    ).fetchall()
    if not updated:
        con.execute(f"insert into {TOMBSTONE} values (?, ?, ?)", [customer_id, at, regulation_id])


def tombstones(con: duckdb.DuckDBPyConnection) -> dict[str, str | None]:
    """customer_id -> Segment regulation id (None when none was filed yet)."""
    if not forgotten_ids(con):
        return {}
    rows = con.execute(f"select customer_id, max(regulation_id) from {TOMBSTONE} group by 1")
    return {r[0]: r[1] for r in rows.fetchall()}


def _key_column(table: pa.Table) -> str | None:
    return next((c for c in CUSTOMER_KEY_COLUMNS if c in table.column_names), None)


def scrub_table(resource: str, table: pa.Table, forgotten: frozenset[str]) -> pa.Table:
    """The page with the personal fields of forgotten customers set to null.

    Personal columns, and API fields unknown to the contract (they may be personal too), are
    emptied in the rows of a forgotten customer; ids, amounts, dates and statuses stay.
    """
    key = _key_column(table) if forgotten else None
    if key is None:
        return table
    mask = pc.fill_null(pc.is_in(table[key], pa.array(sorted(forgotten), pa.string())), False)
    if not pc.any(mask).as_py():
        return table
    known = RAW_COLUMNS.get(resource, {})
    for index, name in enumerate(table.column_names):
        if name in PERSONAL_FIELDS or (name not in known and name != SYNCED_AT_COLUMN):
            column = table[name]
            empty = pa.nulls(len(column), column.type)
            table = table.set_column(index, name, pc.if_else(mask, empty, column))
    return table


def scrub_json(value: Any) -> Any:
    """A JSON document without any personal key, at any depth."""
    if isinstance(value, dict):
        return {k: scrub_json(v) for k, v in value.items() if k not in PERSONAL_FIELDS}
    if isinstance(value, list):
        return [scrub_json(v) for v in value]
    return value


def mentions(text: str, needles: Iterable[str]) -> bool:
    """Whether a record's JSON text names any of the ids or values."""
    return any(n and n in text for n in needles)


def scrub_rejected(rejected: list[dict[str, Any]], forgotten: frozenset[str]) -> None:
    """Drop the personal keys of set-aside items that name a forgotten customer (in place)."""
    if not forgotten:
        return
    for item in rejected:
        text = item["record_json"]
        if mentions(text, forgotten):
            try:
                item["record_json"] = orjson.dumps(scrub_json(orjson.loads(text))).decode()
            except orjson.JSONDecodeError:
                item["record_json"] = "null"  # unparsable: keep the fact of it, not the text


def load_files(warehouse_path: str) -> list[Path]:
    """Every dlt load package file still beside the warehouse (rows of earlier loads)."""
    folder = pipeline_dir(warehouse_path)
    roots = [folder / n / part for n in _pipeline_names(folder) for part in ("load", "normalize")]
    return sorted(
        p
        for root in roots
        if root.exists()
        for p in root.rglob("*")
        if p.is_file() and p.name != ".version"
    )


def _pipeline_names(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.is_dir()] if folder.exists() else []


def remove_completed_packages(working_dir: str) -> int:
    """Delete the packages dlt keeps after a committed load (their files hold every raw row)."""
    loaded = Path(working_dir) / "load" / "loaded"
    removed = 0
    if loaded.exists():
        for package in loaded.iterdir():
            shutil.rmtree(package, ignore_errors=True)
            removed += 1
    return removed


def remove_load_files(warehouse_path: str) -> int:
    """Delete every load package beside the warehouse, completed or not; returns the files.

    The pipeline's local folder goes with them, as after a crashed run: the warehouse is the
    truth, so the next run restores the state from it and reads (and scrubs) the rows again.
    """
    files = load_files(warehouse_path)
    folder = pipeline_dir(warehouse_path)
    for name in {p.relative_to(folder).parts[0] for p in files}:
        shutil.rmtree(folder / name, ignore_errors=True)
    return len(files)
