"""Erase customers' personal data from every table of the warehouse, then from the file's bytes."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import orjson

from pipelines.dodo_contract import (
    CUSTOMER_KEY_COLUMNS,
    FORGOTTEN_CUSTOMERS_TABLE,
    PERSONAL_FIELDS,
    RAW_COLUMNS,
    RAW_DATASET,
    SYNCED_AT_COLUMN,
    key_hash_columns,
)
from pipelines.extract import scrub_json

TEXT_TYPES = ("VARCHAR", "JSON")
HASHED_TEXT = {"record_json": "record_hash"}
"""A text column whose sha256 is kept beside it (dodo_raw.rejected_records): rehashed."""
_RAW_SCHEMAS = (RAW_DATASET, f"{RAW_DATASET}_staging")


@dataclass
class PersonalValues:
    """What the warehouse holds about the customers being forgotten, to find and verify."""

    ids: set[str]
    emails: set[str] = field(default_factory=set)
    phones: set[str] = field(default_factory=set)
    names: set[str] = field(default_factory=set)

    @property
    def distinctive(self) -> set[str]:
        """Values that name nobody else (ids, emails, phones): safe to look for in any text."""
        return {v for v in self.ids | self.emails | self.phones if v and len(v) >= 6}


@dataclass(frozen=True)
class Change:
    """One kind of change to one table: how many rows, which columns."""

    table: str
    action: str  # "emptied", "deleted", "scrubbed"
    columns: tuple[str, ...]
    rows: int

    def line(self) -> str:
        """The change as one line for people."""
        what = ", ".join(self.columns)
        if self.action == "deleted":
            return f"{self.table}: {self.rows} row(s) deleted (they hold {what})"
        if self.action == "scrubbed":
            return f"{self.table}: personal keys removed from {what} in {self.rows} row(s)"
        return f"{self.table}: {what} emptied in {self.rows} row(s)"


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _tables(con: duckdb.DuckDBPyConnection) -> dict[tuple[str, str], dict[str, tuple[str, bool]]]:
    """Every base table of the warehouse: column -> (type, nullable)."""
    rows = con.execute(
        "select schema_name, table_name, column_name, data_type, is_nullable "
        "from duckdb_columns() where database_name = current_database() "
        "and not internal and table_oid in (select table_oid from duckdb_tables()) "
        "order by schema_name, table_name, column_index"
    ).fetchall()
    tables: dict[tuple[str, str], dict[str, tuple[str, bool]]] = {}
    for schema, table, column, kind, nullable in rows:
        tables.setdefault((schema, table), {})[column] = (kind, bool(nullable))
    return tables


def _personal_columns(schema: str, table: str, columns: Iterable[str]) -> list[str]:
    """The columns emptied in a forgotten customer's rows: personal ones, and in raw tables
    the API fields the contract does not know (they may be personal too)."""
    known = RAW_COLUMNS.get(table) if schema in _RAW_SCHEMAS else None
    hashes = key_hash_columns(table)  # the models step's look-up keys, not API fields
    return [
        c
        for c in columns
        if c in PERSONAL_FIELDS
        or (
            known is not None
            and c not in known
            and c != SYNCED_AT_COLUMN
            and not c.startswith("_dlt")
            and c not in hashes
        )
    ]


def personal_values(con: duckdb.DuckDBPyConnection, ids: set[str]) -> PersonalValues:
    """The emails, phones and names the warehouse holds for these customer ids."""
    values = PersonalValues(ids=set(ids))
    for (schema, table), columns in _tables(con).items():
        key = next((c for c in CUSTOMER_KEY_COLUMNS if c in columns), None)
        if key is None:
            continue
        for column, (kind, _) in columns.items():
            if kind != "VARCHAR" or column not in PERSONAL_FIELDS:
                continue
            bucket = (
                values.emails
                if column.endswith("email")
                else values.phones
                if "phone" in column
                else values.names
                if column.endswith("name")
                else None
            )
            if bucket is None:
                continue
            found = con.execute(
                f"select distinct {_q(column)} from {_q(schema)}.{_q(table)} "
                f"where {_q(key)} in (select unnest(?::varchar[])) and {_q(column)} is not null",
                [sorted(ids)],
            ).fetchall()
            bucket.update(str(r[0]) for r in found if r[0])
    return values


def erase(
    con: duckdb.DuckDBPyConnection, values: PersonalValues, apply: bool = True
) -> list[Change]:
    """Empty the customers' personal fields in every table (or, with apply=False, only count).

    Rows with a customer key lose their personal columns (a row whose personal column may not be
    null is deleted: it only exists for that data, e.g. the hash of traits sent); JSON columns
    of those rows lose their personal keys; rows without a key (rejected records, logs) that
    name the customer or their email or phone lose them too. Ids, amounts, currencies, dates
    and statuses stay.
    """
    changes: list[Change] = []
    ids = sorted(values.ids)
    for (schema, table), columns in _tables(con).items():
        if (schema, table) == (RAW_DATASET, FORGOTTEN_CUSTOMERS_TABLE):
            continue
        name = f"{schema}.{table}"
        qualified = f"{_q(schema)}.{_q(table)}"
        key = next((c for c in CUSTOMER_KEY_COLUMNS if c in columns), None)
        if key is not None:
            where = f"{_q(key)} in (select unnest(?::varchar[]))"
            personal = _personal_columns(schema, table, columns)
            if any(not columns[c][1] for c in personal):
                count = _count(con, f"select count(*) from {qualified} where {where}", [ids])
                if count and apply:
                    con.execute(f"delete from {qualified} where {where}", [ids])
                if count:
                    changes.append(Change(name, "deleted", tuple(personal), count))
                continue
            if personal:
                held = " or ".join(f"{_q(c)} is not null" for c in personal)
                count = _count(
                    con, f"select count(*) from {qualified} where {where} and ({held})", [ids]
                )
                if count and apply:
                    sets = ", ".join(f"{_q(c)} = null" for c in personal)
                    con.execute(f"update {qualified} set {sets} where {where}", [ids])
                if count:
                    changes.append(Change(name, "emptied", tuple(personal), count))
            json_columns = [c for c, (k, _) in columns.items() if k == "JSON" and c not in personal]
            for column in json_columns:
                rows = con.execute(
                    f"select rowid, {_q(column)}::varchar from {qualified} "
                    f"where {where} and {_q(column)} is not null",
                    [ids],
                ).fetchall()
                count = _scrub_rows(con, qualified, column, rows, None, apply)
                if count:
                    changes.append(Change(name, "scrubbed", (column,), count))
        else:
            for column, (kind, _) in columns.items():
                if kind not in TEXT_TYPES or column in HASHED_TEXT.values():
                    continue
                rows = _rows_naming(con, qualified, column, values.distinctive)
                hashed = HASHED_TEXT.get(column) if HASHED_TEXT.get(column) in columns else None
                count = _scrub_rows(con, qualified, column, rows, hashed, apply, values)
                if count:
                    changes.append(Change(name, "scrubbed", (column,), count))
    return changes


def _count(con: duckdb.DuckDBPyConnection, sql: str, params: list[object]) -> int:
    row = con.execute(sql, params).fetchone()
    return int(row[0]) if row else 0


def _rows_naming(
    con: duckdb.DuckDBPyConnection, qualified: str, column: str, needles: set[str]
) -> list[tuple[int, str]]:
    if not needles:
        return []
    return con.execute(
        f"select rowid, {_q(column)}::varchar from {qualified} where {_q(column)} is not null "
        f"and list_bool_or([contains({_q(column)}::varchar, n) for n in ?::varchar[]])",
        [sorted(needles)],
    ).fetchall()


def _scrubbed_text(text: str, values: PersonalValues | None) -> str:
    """JSON without personal keys; any other text without the customer's email or phone."""
    try:
        cleaned = orjson.dumps(scrub_json(orjson.loads(text))).decode()
    except orjson.JSONDecodeError:
        cleaned = text
    if values is not None:  # values that survive outside a personal key (free text)
        for needle in sorted(values.emails | values.phones, key=len, reverse=True):
            if needle:
                cleaned = cleaned.replace(needle, "")
    return cleaned


def _scrub_rows(
    con: duckdb.DuckDBPyConnection,
    qualified: str,
    column: str,
    rows: list[tuple[int, str]],
    hashed: str | None,
    apply: bool,
    values: PersonalValues | None = None,
) -> int:
    changed = 0
    for rowid, text in rows:
        cleaned = _scrubbed_text(text, values)
        if cleaned == text:
            continue
        changed += 1
        if not apply:
            continue
        if hashed is None:
            con.execute(
                f"update {qualified} set {_q(column)} = ? where rowid = ?", [cleaned, rowid]
            )
            continue
        digest = hashlib.sha256(cleaned.encode()).hexdigest()
        try:
            con.execute(
                f"update {qualified} set {_q(column)} = ?, {_q(hashed)} = ? where rowid = ?",
                [cleaned, digest, rowid],
            )
        except duckdb.ConstraintException:  # the same record, already kept without the person
            con.execute(f"delete from {qualified} where rowid = ?", [rowid])
    return changed


def leftovers(con: duckdb.DuckDBPyConnection, values: PersonalValues) -> list[str]:
    """Columns (schema.table.column) where an erased email or phone can still be read."""
    needles = {v for v in values.emails | values.phones if v}
    found = []
    for (schema, table), columns in _tables(con).items():
        for column, (kind, _) in columns.items():
            if kind in TEXT_TYPES and _rows_naming(
                con, f"{_q(schema)}.{_q(table)}", column, needles
            ):
                found.append(f"{schema}.{table}.{column}")
    return found


def rewrite_file(path: str) -> None:
    """Rewrite the warehouse file so that erased values are gone from its bytes too.

    DuckDB reuses freed blocks but does not wipe them: after a CHECKPOINT the live data is
    copied into a new file (ATTACH + COPY FROM DATABASE), which then replaces the old one
    (owner-only, atomically). The caller holds the run lock, so nothing else has it open.
    """
    target = Path(path)
    fresh = target.with_name(target.name + ".rewrite")
    for stale in (fresh, fresh.with_name(fresh.name + ".wal")):
        stale.unlink(missing_ok=True)
    con = duckdb.connect(str(target))
    try:
        con.execute("checkpoint")
        current = con.execute("select current_database()").fetchone()
        source = _q(current[0] if current else target.stem)
        con.execute(f"attach {_literal(str(fresh))} as dodo_segment_rewrite")
        con.execute(f"copy from database {source} to dodo_segment_rewrite")
        con.execute("detach dodo_segment_rewrite")
    except BaseException:  # a full disk, say: the old file stays as it is, nothing half-made
        con.close()
        for partial in (fresh, fresh.with_name(fresh.name + ".wal")):
            partial.unlink(missing_ok=True)
        raise
    con.close()
    os.chmod(fresh, 0o600)
    wal = target.with_name(target.name + ".wal")
    if wal.exists():  # checkpointed and closed: an empty log, never to replay onto the new file
        wal.unlink()
    os.replace(fresh, target)


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
