"""The warehouse file: opening it safely, its schema version, and the run history table."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from typing import Any

import duckdb

from pipelines.dodo_contract import (
    ANALYTICS_SCHEMA,
    OUTBOX_BUILD_TABLE,
    RAW_COLUMNS,
    RAW_DATASET,
    SYNC_SCHEMA,
    WAREHOUSE_SCHEMA_VERSION,
)


class WarehouseError(RuntimeError):
    """The warehouse cannot be used as it is; the message says why and what to do."""


class WarehouseBusy(WarehouseError):
    """Another process holds the warehouse file."""


class WarehouseTooNew(WarehouseError):
    """The warehouse was written by a newer release; it is left untouched."""


RUNS_COLUMNS: tuple[tuple[str, str], ...] = (
    ("run_id", "varchar primary key"),
    ("command", "varchar"),
    ("started_at", "timestamptz"),
    ("finished_at", "timestamptz"),
    ("duration_seconds", "double"),
    ("outcome", "varchar"),
    ("exit_code", "integer"),
    ("rows_loaded", "json"),
    ("api_requests", "json"),
    ("identifies_sent", "bigint"),
    ("tracks_sent", "bigint"),
    ("skipped_backlog", "bigint"),
    ("rejected", "bigint"),
    ("quarantined", "bigint"),
    ("pending", "bigint"),
    ("error", "varchar"),
)

# Version 1 is the first versioned release. A pre-versioning warehouse (version 0) may hold a
# runs table with fewer columns: the missing ones are added, the rows kept.
RUNS_DDL = (
    f"create schema if not exists {SYNC_SCHEMA};\n"
    f"create table if not exists {SYNC_SCHEMA}.runs "
    f"({', '.join(f'{name} {kind}' for name, kind in RUNS_COLUMNS)});\n"
    + "".join(
        f"alter table {SYNC_SCHEMA}.runs add column if not exists {name} {kind};\n"
        for name, kind in RUNS_COLUMNS[1:]
    )
    + f"""create table if not exists {SYNC_SCHEMA}.warehouse_meta (
    schema_version integer not null,
    written_by varchar,
    updated_at timestamptz
);
"""
)

# Version 2: identify_state remembers the outbox text it last had acknowledged (outbox_hash),
# so an unchanged customer is skipped in SQL. Older releases cannot write that table.
OUTBOX_HASH_DDL = (
    f"alter table if exists {SYNC_SCHEMA}.identify_state "
    "add column if not exists outbox_hash varchar;\n"
)

RAW_DUCKDB_TYPES: dict[str, str] = {
    "bigint": "BIGINT",
    "bool": "BOOLEAN",
    "timestamp": "TIMESTAMPTZ",
    "json": "JSON",
}
"""DuckDB types of the typed (non-text) raw contract columns."""


def type_raw_columns(con: duckdb.DuckDBPyConnection) -> None:
    """Version 3 (Dodo API 1.123): the fields a release before it did not know (charge types,
    subscription_ids, service_periods, retry_attempt, has_payment_method, cancelled_by,
    payout_id, ...) were kept as text columns; they become the contract's typed columns in place
    (a value that does not convert becomes NULL; the next read of the row brings it back)."""
    rows = con.execute(
        "select table_name, column_name, data_type from information_schema.columns "
        "where table_schema = ?",
        [RAW_DATASET],
    ).fetchall()
    found = {(table, column): kind for table, column, kind in rows}
    for table, columns in RAW_COLUMNS.items():
        for column, kind in columns.items():
            wanted = RAW_DUCKDB_TYPES.get(kind)
            if wanted is None or found.get((table, column)) != "VARCHAR":
                continue
            con.execute(
                f'alter table {RAW_DATASET}."{table}" alter column "{column}" '
                f'set data type {wanted} using try_cast("{column}" as {wanted})'
            )


MIGRATIONS: dict[int, str | Callable[[duckdb.DuckDBPyConnection], None]] = {
    1: RUNS_DDL,
    2: OUTBOX_HASH_DDL,
    3: type_raw_columns,
}
"""Each migration brings a warehouse from version N-1 to N, in one transaction."""


DAMAGE_SIGNS = ("not a valid DuckDB database", "Could not read enough bytes")
"""DuckDB's words for a damaged or truncated file: at open, or when a query reaches the part
that is missing."""


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
"""No space left, a quota, or a file-size limit: the write failed for lack of room."""

DISK_FULL_SIGNS = ("No space left on device", "Disk quota exceeded", "File too large")
"""How DuckDB, dlt and pyarrow word the same errors when they wrap them in their own types."""


def disk_full(exc: BaseException) -> bool:
    """Whether an error (or one it wraps: dlt's step failures, DuckDB's IO errors) is a write that
    failed for lack of space."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return True
        if any(sign in str(current) for sign in DISK_FULL_SIGNS):
            return True
        inner = getattr(current, "exception", None) or current.__cause__ or current.__context__
        current = inner if isinstance(inner, BaseException) else None
    return False


DISK_FULL_ADVICE = (
    "the disk is full (a write failed for lack of space): the warehouse keeps what the last "
    "completed step wrote, what was delivered stays delivered; free some space and the next run "
    "delivers the rest"
)


def _damaged(exc: Exception) -> bool:
    return any(sign in str(exc) for sign in DAMAGE_SIGNS)


def _classify(exc: Exception, path: str) -> WarehouseError:
    text = str(exc)
    if _damaged(exc):
        return WarehouseError(
            f"{path} is not a DuckDB database (damaged, truncated or another kind of file); it "
            "was not changed: restore it from a backup or point DODO_SEGMENT_DB at a new path"
        )
    if "Could not set lock" in text or "Conflicting lock" in text:
        return WarehouseBusy(
            f"the warehouse {path} is in use by another process; wait for it or run "
            "'dodo-segment status' to see the run in progress"
        )
    if "newer version" in text or "older version" in text:
        return WarehouseError(
            f"{path} was written by a different DuckDB storage version: upgrade dodo-segment "
            "(and its duckdb) to open it"
        )
    return WarehouseError(
        f"cannot open the warehouse {path}: {text.splitlines()[0][:200]} (if the file is "
        "damaged, restore it from a backup or point DODO_SEGMENT_DB at a new path; the job "
        "never overwrites it)"
    )


_HELD: dict[str, duckdb.DuckDBPyConnection] = {}
"""Warehouses this process keeps open for the length of a run (`held`), by path."""


@contextmanager
def held(path: str) -> Iterator[None]:
    """Keep the warehouse open while the block runs: every `connect` to it in between is a
    cursor on this one open database, instead of opening the file again (~20 opens a run, each
    reading the catalog and checkpointing on close). Other processes see the file locked until
    the block ends, as they did during each step; the last close checkpoints it."""
    if path in _HELD or not _is_local(path):
        yield
        return
    try:
        con = duckdb.connect(path)
    except (duckdb.Error, OSError) as exc:
        raise _classify(exc, path) from None
    _HELD[path] = con
    try:
        yield
    finally:
        current = _HELD.pop(path, None)  # `let_go` may have opened it again in the block
        if current is not None and current is not con:
            current.close()
        con.close()


@contextmanager
def let_go(path: str) -> Iterator[None]:
    """Close a held warehouse for the block (a byte copy of the file, another database
    instance attaching it), then hold it again."""
    con = _HELD.pop(path, None)
    if con is None:
        yield
        return
    con.close()
    try:
        yield
    finally:
        try:
            _HELD[path] = duckdb.connect(path)
        except (duckdb.Error, OSError) as exc:
            raise _classify(exc, path) from None


def open_connection(path: str, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """A connection to the warehouse for the caller to close: a cursor on it when held, else
    DuckDB's own connect (its errors unchanged; `connect` turns them into one line)."""
    holder = _HELD.get(path)
    return holder.cursor() if holder is not None else duckdb.connect(path, read_only=read_only)


@contextmanager
def connect(
    path: str, read_only: bool = False, memory_limit: str | None = None
) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open the warehouse, turning DuckDB's errors into one clear line; `memory_limit` (e.g.
    "1GB") caps DuckDB's memory, which spills to disk beyond it. Inside `held(path)` this is a
    cursor on the held database (`read_only` then only says the caller writes nothing)."""
    if read_only and not path.startswith("md:") and not os.path.exists(path):
        raise WarehouseError(f"no warehouse at {path} yet: run 'dodo-segment run' first")
    try:
        con = open_connection(path, read_only)
    except (duckdb.Error, OSError) as exc:
        raise _classify(exc, path) from None
    try:
        if memory_limit:  # a size load_config validated
            con.execute("set memory_limit = ?", [memory_limit])
        yield con
    except duckdb.Error as exc:
        if _damaged(exc):  # a truncated file opens, and fails where its data is missing
            raise _classify(exc, path) from None
        raise
    finally:
        con.close()


def outbox_build_id(con: duckdb.DuckDBPyConnection) -> str | None:
    """The id of the models build the outboxes are now (None: none recorded). Queries nothing
    that can fail: it runs inside a delta build's transaction too."""
    exists = con.execute(
        "select count(*) from information_schema.tables where table_schema = ? and table_name = ?",
        [ANALYTICS_SCHEMA, OUTBOX_BUILD_TABLE],
    ).fetchone()
    if not exists or not exists[0]:
        return None
    row = con.execute(f"select build_id from {ANALYTICS_SCHEMA}.{OUTBOX_BUILD_TABLE}").fetchone()
    return str(row[0]) if row else None


def schema_version(con: duckdb.DuckDBPyConnection) -> int:
    """The schema version recorded in the warehouse (0 for a new or pre-versioning file)."""
    exists = con.execute(
        "select count(*) from information_schema.tables where table_schema = ? and table_name = ?",
        [SYNC_SCHEMA, "warehouse_meta"],
    ).fetchone()
    if not exists or not exists[0]:
        return 0
    row = con.execute(f"select max(schema_version) from {SYNC_SCHEMA}.warehouse_meta").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def read_every_table(con: duckdb.DuckDBPyConnection) -> tuple[int, int]:
    """Read every column of every table (DuckDB checks each block as it reads it), so a
    truncated or damaged file shows here and not half-way through a run. Tables and rows read;
    ~1 s for a 1M-payment warehouse."""
    tables = con.execute(
        "select schema_name, table_name from duckdb_tables() "
        "where database_name = current_database() order by 1, 2"
    ).fetchall()
    rows = 0
    for names in tables:
        qualified = ".".join('"' + name.replace('"', '""') + '"' for name in names)
        count, _ = con.execute(
            f"select count(*), sum(hash(t)) from {qualified} as t"
        ).fetchone() or (0, None)
        rows += count
    return len(tables), rows


def _is_local(path: str) -> bool:
    return not path.startswith("md:")


def prepare(path: str, version: str, hold: ExitStack | None = None) -> int:
    """Check the warehouse's schema version and migrate an older one in place.

    A warehouse written by a newer release is refused untouched: it is only ever opened
    read-only to find out. Runs left `running` by a killed process are marked `interrupted`
    (the caller holds the run lock, so no other run can be in progress). Returns the version
    found. With `hold`, the warehouse is `held` in it once the version check has passed, and
    the migration is the held database's first use.
    """
    if _is_local(path) and os.path.exists(path):
        with connect(path, read_only=True) as con:
            _refuse_newer(path, schema_version(con), version)
    if hold is not None:
        hold.enter_context(held(path))
    with connect(path) as con:
        found = schema_version(con)
        _refuse_newer(path, found, version)
        for target in range(found + 1, WAREHOUSE_SCHEMA_VERSION + 1):
            con.execute("begin")
            migration = MIGRATIONS[target]
            if callable(migration):
                migration(con)
            else:
                con.execute(migration)
            con.execute(
                f"insert into {SYNC_SCHEMA}.warehouse_meta values (?, ?, ?)",
                [target, f"dodo-segment {version}", datetime.now(UTC)],
            )
            con.execute("commit")
        close_abandoned_runs(con)
        return found


def _refuse_newer(path: str, found: int, version: str) -> None:
    if found > WAREHOUSE_SCHEMA_VERSION:
        raise WarehouseTooNew(
            f"{path} has warehouse schema version {found}, newer than this dodo-segment "
            f"({version}, schema {WAREHOUSE_SCHEMA_VERSION}) understands: upgrade "
            "dodo-segment; the file was not changed"
        )


ABANDONED_ERROR = (
    "the process ended without finishing (killed, crashed or the machine stopped); what it "
    "delivered stays delivered and the rest was picked up by the next run"
)


def close_abandoned_runs(con: duckdb.DuckDBPyConnection) -> int:
    """Mark runs still `running` as `interrupted`; only call while holding the run lock."""
    row = con.execute(
        f"update {SYNC_SCHEMA}.runs set outcome = 'interrupted', exit_code = null, error = ? "
        "where outcome = 'running' returning run_id",
        [ABANDONED_ERROR],
    ).fetchall()
    return len(row)


def typical_run_seconds(con: duckdb.DuckDBPyConnection, command: str = "run") -> float | None:
    """Median duration of the last ten successful runs of a command, if any."""
    row = con.execute(
        f"select median(duration_seconds) from (select duration_seconds from {SYNC_SCHEMA}.runs "
        "where command = ? and outcome = 'success' and duration_seconds is not null "
        "order by started_at desc limit 10)",
        [command],
    ).fetchone()
    return float(row[0]) if row and row[0] is not None else None


def record_run(con: duckdb.DuckDBPyConnection, run: dict[str, Any]) -> None:
    """Insert or update one row of segment_sync.runs."""
    columns = [name for name, _ in RUNS_COLUMNS]
    values = [
        json.dumps(run.get(c)) if c in ("rows_loaded", "api_requests") else run.get(c)
        for c in columns
    ]
    placeholders = ", ".join("?" for _ in columns)
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns[1:])
    con.execute(
        f"insert into {SYNC_SCHEMA}.runs ({', '.join(columns)}) values ({placeholders}) "
        f"on conflict (run_id) do update set {updates}",
        values,
    )


def recent_runs(con: duckdb.DuckDBPyConnection, limit: int = 10) -> list[dict[str, Any]]:
    """The last runs, newest first, as plain dicts."""
    cursor = con.execute(
        f"select * from {SYNC_SCHEMA}.runs order by started_at desc limit ?",
        [limit],
    )
    names = [d[0] for d in cursor.description]
    rows = []
    for row in cursor.fetchall():
        item = dict(zip(names, row, strict=True))
        for key in ("rows_loaded", "api_requests"):
            item[key] = json.loads(item[key]) if item[key] else {}
        rows.append(item)
    return rows
