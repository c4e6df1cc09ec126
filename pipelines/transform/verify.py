"""Proof that the warehouse's models equal a full build: rebuild a scratch copy in full and diff.

Every table of `analytics` (not the views, which only read those tables, and not the `_`
bookkeeping tables) is compared with `EXCEPT ALL` both ways; a table differs when either side
has a row the other lacks. The build-time columns of the data test tables are left out.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from pipelines import dodo_contract

SCHEMA = dodo_contract.ANALYTICS_SCHEMA
SAMPLE_KEYS = 10
_KEY_COLUMNS = ("customer_id", "user_id", "event_id", "subscription_id", "dispute_id", "object_id")
_BUILD_TIME_COLUMNS = {"quarantined_rows": "detected_at", "data_test_results": "run_at"}


@dataclass
class TableDrift:
    """One table that differs from a full build: rows only in the warehouse, rows only in the
    full build, and a sample of the keys of those rows."""

    table: str
    only_here: int
    only_in_full: int
    keys: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        keys = f" (keys: {', '.join(self.keys)})" if self.keys else ""
        return (
            f"{self.table}: {self.only_here} row(s) not in a full build, "
            f"{self.only_in_full} row(s) missing{keys}"
        )


def compared_tables(con: duckdb.DuckDBPyConnection, catalog: str) -> list[str]:
    """The analytics base tables compared (bookkeeping `_` tables left out)."""
    rows = con.execute(
        "select table_name from information_schema.tables where table_catalog = ? "
        "and table_schema = ? and table_type = 'BASE TABLE' order by table_name",
        [catalog, SCHEMA],
    ).fetchall()
    return [r[0] for r in rows if not r[0].startswith("_")]


def diff_warehouses(con: duckdb.DuckDBPyConnection, here: str, full: str) -> list[TableDrift]:
    """Compare the analytics tables of two attached catalogs; the drifted ones."""
    drifts: list[TableDrift] = []
    mine, theirs = set(compared_tables(con, here)), set(compared_tables(con, full))
    for table in sorted(mine ^ theirs):
        drifts.append(TableDrift(table, int(table in mine), int(table in theirs)))
    for table in sorted(mine & theirs):
        columns = [
            r[0]
            for r in con.execute(
                "select column_name from information_schema.columns where table_catalog = ? "
                "and table_schema = ? and table_name = ? order by ordinal_position",
                [full, SCHEMA, table],
            ).fetchall()
            if r[0] != _BUILD_TIME_COLUMNS.get(table)
        ]
        select = ", ".join(f'"{c}"' for c in columns)
        a = f'select {select} from "{here}".{SCHEMA}."{table}"'
        b = f'select {select} from "{full}".{SCHEMA}."{table}"'
        try:
            counts = con.execute(
                f"select (select count(*) from ({a} except all {b})), "
                f"(select count(*) from ({b} except all {a}))"
            ).fetchone()
        except duckdb.Error:  # columns differ in type or name: the table drifted as a whole
            drifts.append(TableDrift(table, -1, -1))
            continue
        assert counts is not None
        if counts[0] or counts[1]:
            key = next((c for c in _KEY_COLUMNS if c in columns), columns[0])
            keys = con.execute(
                f'select distinct cast("{key}" as varchar) from ('
                f"({a} except all {b}) union all ({b} except all {a})) order by 1 limit ?",
                [SAMPLE_KEYS],
            ).fetchall()
            drift = TableDrift(table, int(counts[0]), int(counts[1]))
            drift.keys = [f"{key}={k[0]}" for k in keys]
            drifts.append(drift)
    return drifts


def scratch_folder(warehouse: str | Path) -> Path:
    """Where a verification builds its full copy: beside the warehouse (the warehouse's disk and
    owner), under a fixed name. The copy holds customers' personal data, so one left by a
    verification killed midway must not outlive it: the next verification, the next run and
    `forget` remove it (`clear_scratch`)."""
    return Path(f"{warehouse}.verify")


def clear_scratch(warehouse: str | Path) -> bool:
    """Remove a verification's leftover copy of the warehouse; True when there was one."""
    folder = scratch_folder(warehouse)
    if not folder.exists():
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True


def verify_against_full_build(
    warehouse: str | Path, build_full: Callable[[duckdb.DuckDBPyConnection], None]
) -> list[TableDrift]:
    """Copy the warehouse to a scratch file, rebuild the copy in full with `build_full`, and
    return the tables where the warehouse differs from it (empty: no drift)."""
    clear_scratch(warehouse)
    scratch = scratch_folder(warehouse)
    scratch.mkdir(mode=0o700)
    try:
        copy = scratch / "full.duckdb"
        shutil.copyfile(warehouse, copy)
        with duckdb.connect(str(copy)) as con:
            build_full(con)
        with duckdb.connect() as con:
            for path, name in ((Path(warehouse), "here"), (copy, "full_build")):
                quoted = str(path).replace("'", "''")
                con.execute(f"attach '{quoted}' as {name} (read_only)")
            return diff_warehouses(con, "here", "full_build")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


CHECKS_TABLE = f"{dodo_contract.SYNC_SCHEMA}.model_checks"
"""One row per verification by the deep pass: when, which run, the drifted tables, repaired."""


def record_check(
    con: duckdb.DuckDBPyConnection, run_id: str, drifts: list[TableDrift], repaired: bool
) -> None:
    """Keep a verification's outcome (shown by `status` and the metrics)."""
    con.execute(f"create schema if not exists {dodo_contract.SYNC_SCHEMA}")
    con.execute(
        f"create table if not exists {CHECKS_TABLE} (checked_at timestamptz, run_id varchar, "
        "drifted_tables bigint, detail varchar, repaired boolean)"
    )
    con.execute(
        f"insert into {CHECKS_TABLE} values (now(), ?, ?, ?, ?)",
        [run_id, len(drifts), "; ".join(str(d) for d in drifts) or None, repaired],
    )


def last_check(con: duckdb.DuckDBPyConnection) -> dict[str, object] | None:
    """The latest verification (None when none was recorded)."""
    exists = con.execute(
        "select count(*) from information_schema.tables where table_schema = ? "
        "and table_name = 'model_checks'",
        [dodo_contract.SYNC_SCHEMA],
    ).fetchone()
    if not exists or not exists[0]:
        return None
    row = con.execute(
        f"select checked_at, run_id, drifted_tables, detail, repaired from {CHECKS_TABLE} "
        "order by checked_at desc limit 1"
    ).fetchone()
    if not row:
        return None
    keys = ("checked_at", "run_id", "drifted_tables", "detail", "repaired")
    return dict(zip(keys, row, strict=True))
