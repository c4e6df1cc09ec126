"""Touched keys: which raw rows changed since the last build, and which customers they concern.

The last build leaves a snapshot of the raw data in two bookkeeping tables:

- `analytics._delta_rows` (tbl, id, k, id_key): one row per raw row, a hash of its table, entity
  id and every column but `_synced_at` and dlt's own (a re-read finding the same content is no
  change);
- `analytics._delta_owners` (tbl, id, ref, owner, day, id_key, ref_key): the customer(s) each
  raw entity concerns, and the entity it reaches them through (refund and dispute -> payment ->
  customer; ledger entry -> its `reference_object_id`; subscription history -> subscription ->
  customer; a payment also concerns the customers of the subscriptions it pays); for a payment
  or a refund, the UTC day it counts on in `revenue_daily` (the days a delta build rebuilds are
  read there).

A run compares the raw tables with `_delta_rows` (whatever loaded them: API pages, webhook merges,
history rows, forgets, settled-ledger re-reads, deletions); the touched customers are the old and
new owners of every changed entity and of the entities that reach a customer through it. Keys
that disappear are covered because the old owners come from the snapshot, never from the new
output. The owner NULL stands for "no known customer" and is matched NULL-safely.

Both tables grow with the raw data (a row per raw row; per entity and owner), so a look-up of a
few ids in them must not read every id:
`id_key` and `ref_key` are 32-bit hashes of `id` and `ref` (`lookup_key`), which a lookup scans
to find the row ids of the candidate rows before it reads those rows and compares the ids
themselves (at 1M payments, 3.6M rows: the hashes' scan costs 6-8 ms, the ids' 45 ms, reading
every column of every row 100 ms). The large raw tables' look-up keys are hashed the same way,
in columns beside them (`hash_raw_keys`), for the staging scopes to find the touched rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import duckdb

from pipelines import dodo_contract
from pipelines.dodo_contract import HASHED_RAW_KEYS, key_hash_column, key_hash_columns

SCHEMA = dodo_contract.ANALYTICS_SCHEMA
RAW = dodo_contract.RAW_DATASET
ROWS_TABLE = f"{SCHEMA}._delta_rows"
OWNERS_TABLE = f"{SCHEMA}._delta_owners"
MARKS_TABLE = f"{SCHEMA}._delta_marks"
"""Per raw table: the newest load time at the snapshot (`mark`), its row count, and when the
snapshot was taken (`built_at`)."""
LOAD_TIME_COLUMNS = (dodo_contract.SYNCED_AT_COLUMN, "observed_at", "forgotten_at")
"""The column telling when a raw row was written, by preference (history rows: observed_at)."""
TOUCHED = "delta_touched"
"""Temp table (customer_id) of this run's touched customers; NULL = rows without a customer."""
CHANGED = "delta_changed"
"""Temp table (tbl, id) of the raw entities whose rows changed since the last build."""

SNAPSHOT_FORMAT = 6
"""Part of the delta state's fingerprint: a snapshot of another format is never compared."""


def lookup_key(expr: str) -> str:
    """SQL: the 32-bit lookup hash of an id (NULL for NULL) that the snapshot keeps beside it.
    Two ids may share one: a lookup by it always compares the ids after. DuckDB's `hash` may
    change between its versions: the delta fingerprint holds DuckDB's version."""
    return f"case when {expr} is not null then cast(hash({expr}) >> 32 as uinteger) end"


ROWS_COLUMNS = "tbl, id, k"
OWNERS_COLUMNS = "tbl, id, ref, owner, day"
"""The snapshot tables' columns before their lookup keys (those of the temp tables that feed
them and of the rows read from them)."""
_SNAPSHOT_COLUMNS = {
    ROWS_TABLE: (ROWS_COLUMNS, ("id",)),
    OWNERS_TABLE: (OWNERS_COLUMNS, ("id", "ref")),
}
"""Per snapshot table: its columns before the lookup keys, and the columns those hash
(`<column>_key`)."""


def _with_keys(table: str, query: str) -> str:
    """SQL: `query`'s rows as the snapshot `table` holds them, with their lookup keys."""
    columns, hashed = _SNAPSHOT_COLUMNS[table]
    keys = ", ".join(f"{lookup_key(column)} as {column}_key" for column in hashed)
    return f"select {columns}, {keys} from ({query})"


def _by_key(table: str, key: str, ids: str, exact: str) -> str:
    """SQL predicate over the snapshot `table`: the row's `key` (id_key or ref_key) is the lookup
    key of an id `ids` (a query of one column) returns, and `exact` holds (the ids compared
    themselves). The rows are found by scanning the keys only, then read by row id."""
    return (
        f"rowid in (select rowid from {table} where {key} in "
        f"(select {lookup_key('i')} from ({ids}) as ids(i) where i is not null)) and {exact}"
    )


def _rows_by_key(table: str, key: str, ids: str, exact: str) -> str:
    """SQL: the rows (without their lookup keys) of the snapshot `table` that `_by_key` finds."""
    columns = _SNAPSHOT_COLUMNS[table][0]
    return f"select {columns} from {table} where {_by_key(table, key, ids, exact)}"


ENTITY_KEYS: dict[str, str] = {
    **dodo_contract.PRIMARY_KEYS,
    dodo_contract.SUBSCRIPTION_HISTORY_TABLE: "subscription_id",
    dodo_contract.DISPUTE_HISTORY_TABLE: "dispute_id",
    dodo_contract.FORGOTTEN_CUSTOMERS_TABLE: "customer_id",
}
"""The entity each raw table's rows describe (a history row describes its subscription/dispute)."""


TOUCHED_IDS = "delta_touched_ids"
TOUCHED_NULL = "delta_touched_null"
"""Session variables holding `delta_touched` as a list of the ids and whether NULL is touched:
a filter on them is a constant the scan applies before it reads the other columns (a
semi-join on the temp table reads every row of every column first), so narrowing a table to
the touched customers' rows costs little more than reading its key column."""


def in_key_list(expr: str, ids: str, null: str) -> str:
    """SQL: `expr` is in the id list of session variable `ids` (NULL-safe: a NULL matches when
    the variable `null` says a NULL key is in the set)."""
    return (
        f"(list_contains(getvariable('{ids}'), {expr})"
        f" or ({expr} is null and getvariable('{null}')))"
    )


def sync_key_list(
    con: duckdb.DuckDBPyConnection, table: str, column: str, ids: str, null: str
) -> None:
    """Copy the keys of temp table `table` into the session variables `in_key_list` reads."""
    con.execute(
        f"set variable {ids} = (select coalesce(list({column} order by {column}), "
        f"[]::varchar[]) from {table} where {column} is not null)"
    )
    con.execute(f"set variable {null} = (select count(*) > 0 from {table} where {column} is null)")


def in_touched(expr: str) -> str:
    """SQL: `expr` is a touched customer key (NULL-safe: a NULL key matches a touched NULL)."""
    return in_key_list(expr, TOUCHED_IDS, TOUCHED_NULL)


class KeyList(NamedTuple):
    """The keys a key predicate accepts, as `staging_rows` finds their raw rows by hash: those
    in the SQL list `ids`, and others too when the SQL condition `more` holds (NULL or orphan
    keys, when NULL is touched)."""

    ids: str
    more: str = "false"


def touched_keys() -> KeyList:
    """The keys `in_touched` accepts."""
    return KeyList(f"getvariable('{TOUCHED_IDS}')", f"getvariable('{TOUCHED_NULL}')")


def sync_touched(con: duckdb.DuckDBPyConnection) -> None:
    """Copy `delta_touched` into the session variables `in_touched` reads (after each change)."""
    sync_key_list(con, TOUCHED, "customer_id", TOUCHED_IDS, TOUCHED_NULL)


def scope_ids(scoped: str, column: str) -> str:
    """The session variable holding the ids of column `column` of the scoped relation."""
    return f"{scoped}_{column}s"


def sync_scope_ids(con: duckdb.DuckDBPyConnection, scoped: str, column: str) -> None:
    """Copy the ids of a scoped relation into the session variable `in_scope` reads (after
    each time the relation is filled)."""
    con.execute(
        f"set variable {scope_ids(scoped, column)} = (select coalesce(list({column}), "
        f"[]::varchar[]) from {scoped} where {column} is not null)"
    )


def rows_where(relation: str, predicate: str, table: bool = True) -> str:
    """SQL: the rows of `relation` where `predicate` holds. From a table (`table`), the rows are
    found by the columns the predicate reads, then fetched by row id: a filtered `select *`
    decodes every column of every segment the few matching rows are spread over (at 1M
    payments, 394 rows of lifecycle_events: 0.33 s that way, 0.12 s by row id)."""
    if not table:
        return f"select * from {relation} where {predicate}"
    return (
        f"select * from {relation} where rowid in (select rowid from {relation} where {predicate})"
    )


_RAW_KEYS: dict[tuple[str, str], tuple[str, str]] = {
    ("stg_payments", "customer_id"): ("payments", "customer__customer_id"),
    ("stg_payments", "payment_id"): ("payments", "payment_id"),
    ("stg_balance_ledger", "reference_object_id"): ("balance_ledger", "reference_object_id"),
    ("stg_balance_ledger", "ledger_entry_id"): ("balance_ledger", "id"),
}
"""Key columns of the product's large staging views (one row per raw row) that are a raw
column renamed (or cast to the type it has): (view, column) -> (raw table, column)."""


def _key_hash(expr: str) -> str:
    """SQL: the hash `hash_raw_keys` keeps of a key."""
    return f"hash(cast({expr} as varchar))"


def add_key_hash_columns(con: duckdb.DuckDBPyConnection) -> set[tuple[str, str]]:
    """Add the (empty) hash column of each key of `HASHED_RAW_KEYS` its raw table has; every
    raw table's columns then, as (table, column)."""
    present = _raw_columns_present(con)
    for table, column in HASHED_RAW_KEYS:
        hashed = key_hash_column(column)
        if (table, column) in present and (table, hashed) not in present:
            con.execute(f'alter table "{RAW}"."{table}" add column "{hashed}" ubigint')
            present.add((table, hashed))
    return present


def hash_raw_keys(
    con: duckdb.DuckDBPyConnection, written_since: Mapping[str, tuple[str, object, str]]
) -> None:
    """Keep DuckDB's hash of each raw key of `HASHED_RAW_KEYS` in its column `_<key>_hash`: a
    look-up of a few keys in a large raw table then scans 8-byte hashes, not text ids, and
    compares the ids of the rows found (at 1M payments, 2.5M ledger rows: 6-12 ms, against 45
    for the ids).

    `written_since`: per raw table, the rows written since the snapshot as `find_changes` finds
    them (load-time column, mark, comparison). Those are hashed again whatever they hold (a row
    copied under another key carries the old key's hash), and rows without a hash are hashed
    (the writers leave the column empty: dlt and the webhook merge name their columns). Every
    row of a table not in it is checked: no snapshot, a full build, a table without a load time
    or mark, or one `find_changes` compared whole. A look-up takes a row without a hash as a
    candidate: a hash not yet written costs time, never a row."""
    present = _raw_columns_present(con)
    for table in sorted({t for t, _ in HASHED_RAW_KEYS}):
        hashed = {
            key_hash_column(column): _key_hash(f'"{column}"')
            for t, column in HASHED_RAW_KEYS
            if t == table and (t, key_hash_column(column)) in present
        }
        if not hashed:
            continue
        raw = f'"{RAW}"."{table}"'
        assign = ", ".join(f'"{column}" = {key}' for column, key in hashed.items())
        stale = " or ".join(f'"{column}" is distinct from {key}' for column, key in hashed.items())
        if table not in written_since:
            con.execute(f"update {raw} set {assign} where {stale}")
            continue
        load, mark, compare = written_since[table]
        con.execute(f'update {raw} set {assign} where "{load}" {compare} ? and ({stale})', [mark])
        for column, key in hashed.items():
            con.execute(f'update {raw} set "{column}" = {key} where "{column}" is null')


def _raw_columns_present(con: duckdb.DuckDBPyConnection) -> set[tuple[str, str]]:
    """(table, column) of every raw table's columns."""
    rows = con.execute(
        "select table_name, column_name from information_schema.columns where table_schema = ?",
        [RAW],
    ).fetchall()
    return {(table, column) for table, column in rows}


def narrowable_staging(con: duckdb.DuckDBPyConnection, sqls: Mapping[str, str]) -> dict[str, str]:
    """The staging views of `sqls` (view -> the SQL of the product's own model) whose raw rows
    `staging_rows` can narrow: the raw key columns of `_RAW_KEYS` and their hash columns exist
    (the source macro stands in NULL for a missing one) and the SQL calls its source macro
    once."""
    present = _raw_columns_present(con)
    raw_keys: dict[str, list[tuple[str, str]]] = {}
    for (view, _), raw_key in _RAW_KEYS.items():
        raw_keys.setdefault(view, []).append(raw_key)
    return {
        view: sql
        for view, sql in sqls.items()
        if view in raw_keys
        and all(
            (table, column) in present
            and (table, key_hash_column(column)) in present
            and sql.count(f"{SCHEMA}.source_{table}()") == 1
            for table, column in raw_keys[view]
        )
    }


def staging_rows(
    staging: Mapping[str, str],
    view: str,
    column: str,
    predicate_of: Callable[[str], str],
    columns: str = "*",
    keys: KeyList | None = None,
) -> str:
    """SQL: `columns` of the rows of the staging view `view` whose key `column` satisfies the
    predicate `predicate_of(column)`, which accepts the keys `keys`. For a key in `_RAW_KEYS`
    of a view in `staging` (view -> its SQL, `narrowable_staging`), the view's SQL reads only
    the raw rows the predicate accepts, fetched by row id: filtered through the view, the scan
    decodes every column of every raw row before the filter (at 1M payments, 14 customers'
    rows: 93 ms that way, 60 ms by row id). Their row ids are found by the key's hash column
    (`hash_raw_keys`), a scan of 8-byte integers, and the predicate is then applied to the
    rows found."""
    plain = f"select {columns} from {SCHEMA}.{view} where {predicate_of(column)}"
    key = _RAW_KEYS.get((view, column))
    view_sql = staging.get(view)
    if key is None or view_sql is None or keys is None:
        return plain
    table, raw_column = key
    source_call = f"{SCHEMA}.source_{table}()"
    raw = f'"{RAW}"."{table}"'
    hashed = key_hash_column(raw_column)
    candidates = (
        f'"{hashed}" is null or {keys.more} or "{hashed}" in '
        f"(select {_key_hash('k')} from unnest({keys.ids}) as keys(k))"
    )
    matching = (
        f"rowid in (select rowid from {raw} where {candidates}) and {predicate_of(raw_column)}"
    )
    excluded = ", ".join(f'"{c}"' for c in key_hash_columns(table))
    # the source macro's columns and types (no rows), then the matching raw rows
    narrowed = (
        f"(select * from {source_call} where false union all by name "
        f"select * exclude ({excluded}) from {raw} where {matching})"
    )
    lines = view_sql.strip().splitlines()
    while lines and lines[-1].lstrip().startswith("--"):  # a statement end before them
        lines.pop()
    view_sql = "\n".join(lines).rstrip().rstrip(";").replace(source_call, narrowed)
    return f"select {columns} from (\n{view_sql}\n) as {view} where {predicate_of(column)}"


def in_scope(expr: str, scoped: str, column: str, every: str) -> str:
    """SQL: `expr` is an id of the scoped relation (its ids in a session variable,
    `sync_scope_ids`: a constant filter the scan applies, where a semi-join on the relation
    read every column of every row first), or (when NULL is touched) an id unknown to the
    whole relation `every` (an orphan reaches no customer: its owner is NULL)."""
    keys = scope_keys(scoped, column)
    return (
        f"(list_contains({keys.ids}, {expr})"
        f" or ({keys.more} and ({expr} is null"
        f" or {expr} not in (select {column} from {every} where {column} is not null))))"
    )


def scope_keys(scoped: str, column: str) -> KeyList:
    """The keys `in_scope(_, scoped, column, _)` accepts."""
    return KeyList(f"getvariable('{scope_ids(scoped, column)}')", f"getvariable('{TOUCHED_NULL}')")


_IDS = "delta_ids_"
"""Session variables `delta_ids_<table>`: the ids of one raw table an owners query is about
(`set_ids`), a constant the scan filters by before computing the other columns (of the raw
table, for the views `staging_rows` narrows)."""


def set_entity_ids(con: duckdb.DuckDBPyConnection, relation: str) -> None:
    """Keep the ids of each raw table in `relation` (tbl, id) in `delta_ids_<table>`."""
    found = dict(
        con.execute(f"select tbl, list(distinct id) from {relation} group by tbl").fetchall()
    )
    for table in ENTITY_KEYS:
        con.execute(f"set variable {_IDS}{table} = ?::varchar[]", [found.get(table) or []])


def set_ids(con: duckdb.DuckDBPyConnection, relation: str, staging: Mapping[str, str]) -> None:
    """Keep the ids of each raw table in `relation` (tbl, id) in `delta_ids_<table>`, the rows
    of those ids that the owners read (temp tables `delta_owner_rows_<name>`), and the keys
    they reference in `delta_ref_<table>` (payments, refunds, subscriptions, disputes): the
    owners' lookups read those by constant filters. The payments are read in one scan for
    their own ids and the referenced ones, the ledger in one for its ids."""
    set_entity_ids(con, relation)
    for name, spec in OWNER_RELATIONS.items():
        if name != "payments":  # read once the keys the other rows reference are known
            _keep_owner_rows(con, name, f"getvariable('{_IDS}{spec.raw_table}')", staging)
    rel = _filtered_relations(True)
    a = SCHEMA
    _set_refs(con, "refunds", f"select reference_object_id from {rel['ledger']}")
    _set_refs(con, "disputes", f"select dispute_id from {rel['dispute_history']}")
    _set_refs(
        con,
        "payments",
        f"select payment_id from {rel['refunds']} "
        f"union all select payment_id from {rel['disputes']} "
        f"union all select reference_object_id from {rel['ledger']} "
        f"union all select payment_id from {a}.stg_disputes "
        f"where list_contains(getvariable('{_REFS}disputes'), dispute_id) "
        f"union all select payment_id from {a}.stg_refunds "
        f"where list_contains(getvariable('{_REFS}refunds'), refund_id)",
    )
    # one list: a filter the scan applies (two lists OR-ed are evaluated row by row)
    con.execute(
        f"set variable {_OWNER_PAYMENT_IDS} = list_distinct("
        f"getvariable('{_IDS}payments') || getvariable('{_REFS}payments'))"
    )
    _keep_owner_rows(con, "payments", f"getvariable('{_OWNER_PAYMENT_IDS}')", staging)
    _set_refs(
        con,
        "subscriptions",
        f"select sid from {rel['paid']} union all select subscription_id from {rel['history']}",
    )


def _keep_owner_rows(
    con: duckdb.DuckDBPyConnection, owner_relation: str, ids: str, staging: Mapping[str, str]
) -> None:
    """Keep the rows of the owners' relation `owner_relation` whose id is in the list `ids`
    (SQL), with the columns the owners read, in the temp table
    `delta_owner_rows_<owner_relation>` (`staging`: view -> its model's SQL)."""
    spec = OWNER_RELATIONS[owner_relation]
    owner_rows = staging_rows(
        staging, spec.staging, spec.id_column, lambda key: f"list_contains({ids}, {key})",
        spec.columns, KeyList(ids),
    )  # fmt: skip
    con.execute(f"create or replace temp table {_OWNER_ROWS}{owner_relation} as {owner_rows}")


def _set_refs(con: duckdb.DuckDBPyConnection, table: str, keys: str) -> None:
    """Keep the keys of `table` that the query `keys` (one column) returns in
    `delta_ref_<table>`."""
    con.execute(
        f"set variable {_REFS}{table} = (select coalesce(list(distinct key), []::varchar[]) "
        f"from ({keys}) as keys(key) where key is not null)"
    )


_REFS = "delta_ref_"
_OWNER_ROWS = "delta_owner_rows_"
_OWNER_PAYMENT_IDS = "delta_owner_payment_ids"
"""Session variable: the changed payments' ids and the referenced payments', one list."""


class OwnerRelation(NamedTuple):
    """A staging relation an owners query starts from."""

    staging: str
    """The relation in `analytics`."""
    raw_table: str
    """The raw table whose ids select its rows (`delta_ids_<raw_table>`)."""
    id_column: str
    columns: str
    """The columns the owners read."""


OWNER_RELATIONS: dict[str, OwnerRelation] = {
    "customers": OwnerRelation("stg_customers", "customers", "customer_id", "customer_id"),
    "forgotten": OwnerRelation(
        "source_forgotten_customers()", "forgotten_customers", "customer_id", "customer_id"
    ),
    "payments": OwnerRelation(
        "stg_payments",
        "payments",
        "payment_id",
        "payment_id, customer_id, created_at, subscription_id, subscription_ids",
    ),
    "subscriptions": OwnerRelation(
        "stg_subscriptions", "subscriptions", "subscription_id", "subscription_id, customer_id"
    ),
    "refunds": OwnerRelation(
        "stg_refunds", "refunds", "refund_id", "refund_id, payment_id, created_at"
    ),
    "disputes": OwnerRelation("stg_disputes", "disputes", "dispute_id", "dispute_id, payment_id"),
    "dispute_history": OwnerRelation(
        "stg_dispute_history", "dispute_history", "dispute_id", "dispute_id"
    ),
    "history": OwnerRelation(
        "stg_subscription_history", "subscription_history", "subscription_id", "subscription_id"
    ),
    "ledger": OwnerRelation(
        "stg_balance_ledger",
        "balance_ledger",
        "ledger_entry_id",
        "ledger_entry_id, reference_object_id",
    ),
}
"""The staging relations an owners query starts from, by the name the owners' SQL uses."""


def _filtered_relations(by_ids: bool) -> dict[str, str]:
    """The staging relations an owners query starts from: whole, or (`by_ids`) only the rows
    of the ids in `delta_ids_<table>`, as `set_ids` kept them."""
    a = SCHEMA
    rel = {
        name: f"{_OWNER_ROWS}{name}" if by_ids else f"(select * from {a}.{spec.staging})"
        for name, spec in OWNER_RELATIONS.items()
    }
    if by_ids:  # their rows hold the referenced payments' too
        rel["payments"] = (
            f"(select * from {_OWNER_ROWS}payments "
            f"where list_contains(getvariable('{_IDS}payments'), payment_id))"
        )
    rel["paid"] = (
        "(select payment_id, unnest(list_distinct(list_filter("
        "coalesce(subscription_ids, []) || [subscription_id], lambda x: x is not null))) as sid"
        f" from {rel['payments']})"
    )
    return rel


def _owner_branches(ids: str | None) -> str:
    """The owners (tbl, id, ref, owner, day) of the current raw entities: all of them, or
    those whose (tbl, id) is in the relation `ids`, whose ids and the keys they reference
    `set_ids` has put in session variables (the rows filtered before the joins, and the
    relations they join narrowed to the referenced keys, so the cost follows `ids`). `day`: the
    UTC day a payment or refund counts on in the revenue per day (NULL for other entities)."""
    a = SCHEMA
    rel = _filtered_relations(ids is not None)

    def lookup(relation: str, key: str, columns: str, table: str) -> str:
        """`relation`'s rows (key and columns) whose key the filtered rows reference."""
        if ids is None:
            return f"{a}.{relation}"
        return (
            f"(select {key}, {columns} from {a}.{relation} "
            f"where list_contains(getvariable('{_REFS}{table}'), {key}))"
        )

    payments = (  # set_ids kept the referenced payments' rows
        f"(select payment_id, customer_id from {_OWNER_ROWS}payments "
        f"where list_contains(getvariable('{_REFS}payments'), payment_id))"
        if ids is not None
        else lookup("stg_payments", "payment_id", "customer_id", "payments")
    )
    subscriptions = lookup("stg_subscriptions", "subscription_id", "customer_id", "subscriptions")
    history_disputes = lookup("stg_disputes", "dispute_id", "payment_id", "disputes")
    ledger_refunds = lookup("stg_refunds", "refund_id", "payment_id", "refunds")
    day = "cast(timezone('UTC', created_at) as date)"
    branches = [
        f"select 'customers' as tbl, customer_id as id, null::varchar as ref, customer_id as owner,"
        f" null::date as day from {rel['customers']}",
        f"select 'forgotten_customers', customer_id, null, customer_id, null"
        f" from {rel['forgotten']}",
        f"select 'payments', payment_id, null, customer_id, {day} from {rel['payments']}",
        f"select 'payments', p.payment_id, s.subscription_id, s.customer_id, null"
        f" from {rel['paid']} as p join {subscriptions} as s on s.subscription_id = p.sid",
        f"select 'subscriptions', subscription_id, null, customer_id, null"
        f" from {rel['subscriptions']}",
        f"select 'refunds', r.refund_id, r.payment_id, p.customer_id,"
        f" cast(timezone('UTC', r.created_at) as date) from {rel['refunds']} as r"
        f" left join {payments} as p on p.payment_id = r.payment_id",
        f"select 'disputes', d.dispute_id, d.payment_id, p.customer_id, null"
        f" from {rel['disputes']} as d left join {payments} as p on p.payment_id = d.payment_id",
        f"select distinct 'dispute_history', h.dispute_id, h.dispute_id, p.customer_id, null"
        f" from {rel['dispute_history']} as h left join {history_disputes} as d"
        f" on d.dispute_id = h.dispute_id"
        f" left join {payments} as p on p.payment_id = d.payment_id",
        f"select distinct 'subscription_history', h.subscription_id, h.subscription_id,"
        f" s.customer_id, null from {rel['history']} as h"
        f" left join {subscriptions} as s on s.subscription_id = h.subscription_id",
        f"select 'balance_ledger', l.ledger_entry_id, l.reference_object_id,"
        f" coalesce(p.customer_id, rp.customer_id), null from {rel['ledger']} as l"
        f" left join {payments} as p on p.payment_id = l.reference_object_id"
        f" left join {ledger_refunds} as r on r.refund_id = l.reference_object_id"
        f" left join {payments} as rp on rp.payment_id = r.payment_id",
    ]
    return "\nunion all\n".join(
        f"select * from ({b}) as branch(tbl, id, ref, owner, day)" for b in branches
    )


def raw_columns(con: duckdb.DuckDBPyConnection) -> dict[str, list[str]]:
    """The hashed columns of each raw table the snapshot covers (name order): its content, not
    `_synced_at`, dlt's columns or the key hashes (`hash_raw_keys`)."""
    columns: dict[str, list[str]] = {}
    for table, column in con.execute(
        "select table_name, column_name from information_schema.columns "
        "where table_schema = ? order by table_name, column_name",
        [RAW],
    ).fetchall():
        if table in ENTITY_KEYS and column != dodo_contract.SYNCED_AT_COLUMN:
            if not column.startswith("_dlt") and column not in key_hash_columns(table):
                columns.setdefault(table, []).append(column)
    return columns


def _rows_sql(table: str, names: list[str], where: str = "") -> str:
    """(tbl, id, k) of a raw table's rows: k hashes the table, the entity id and the row's
    content (one 64-bit key per row, so comparing two snapshots compares integers)."""
    content = ", ".join(f'"{n}"' for n in names)
    return (
        f"select '{table}' as tbl, cast(\"{ENTITY_KEYS[table]}\" as varchar) as id, "
        f'hash(\'{table}\', {content}) as k from "{RAW}"."{table}"{where}'
    )


def _current_rows_sql(columns: dict[str, list[str]]) -> str:
    """(tbl, id, k) of every raw row."""
    return "\nunion all\n".join(_rows_sql(t, n) for t, n in sorted(columns.items()))


def _load_time_columns(con: duckdb.DuckDBPyConnection) -> dict[str, str]:
    """Per raw table, the column telling when a row was written (LOAD_TIME_COLUMNS)."""
    found: dict[str, set[str]] = {}
    for table, column in con.execute(
        "select table_name, column_name from information_schema.columns where table_schema = ?",
        [RAW],
    ).fetchall():
        found.setdefault(table, set()).add(column)
    return {
        table: next(c for c in LOAD_TIME_COLUMNS if c in names)
        for table, names in found.items()
        if any(c in names for c in LOAD_TIME_COLUMNS)
    }


def _newest_sync(con: duckdb.DuckDBPyConnection) -> str:
    """SQL: the start of the newest API sync (`lookback_passes.as_of`, NULL without one). A row
    an API read wrote carries its sync's start as `_synced_at`; a row a webhook merged carries
    the event's time on Dodo's clock, which may be ahead of ours, so the newest load time a
    delta build compares with is never later than the newest sync's start."""
    table = dodo_contract.LOOKBACK_PASSES_TABLE
    row = con.execute(
        "select count(*) from information_schema.tables where table_schema = ? and table_name = ?",
        [RAW, table],
    ).fetchone()
    if not row or not row[0]:
        return "null::timestamptz"
    return f"(select max(as_of) from {RAW}.{table})"


def _newest_load(column: str | None, newest_sync: str) -> str:
    """SQL (an aggregate over a raw table): the newest load time a delta build compares with."""
    if not column:
        return "null::timestamptz"
    return f'least(max("{column}"), coalesce({newest_sync}, max("{column}")))'


def _write_marks(con: duckdb.DuckDBPyConnection, columns: dict[str, list[str]]) -> None:
    """Per raw table: the newest load time and the row count of the snapshot, and when it was
    taken (webhook merges logged since then are read by the next delta build)."""
    con.execute(
        f"create or replace table {MARKS_TABLE} "
        "(tbl varchar, mark timestamptz, rows bigint, built_at timestamptz)"
    )
    load_times = _load_time_columns(con)
    newest_sync = _newest_sync(con)
    for table in sorted(columns):
        mark = _newest_load(load_times.get(table), newest_sync)
        con.execute(
            f'insert into {MARKS_TABLE} select ?, {mark}, count(*), now() from "{RAW}"."{table}"',
            [table],
        )


def has_snapshot(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether the last build left a snapshot to compare with."""
    found = con.execute(
        "select count(*) from information_schema.tables where table_schema = ? "
        "and table_name in ('_delta_rows', '_delta_owners', '_delta_marks')",
        [SCHEMA],
    ).fetchone()
    return bool(found and found[0] == 3)


def drop_snapshot(con: duckdb.DuckDBPyConnection) -> None:
    """Forget the snapshot (the next run then builds in full)."""
    con.execute(f"drop table if exists {ROWS_TABLE}")
    con.execute(f"drop table if exists {OWNERS_TABLE}")
    con.execute(f"drop table if exists {MARKS_TABLE}")


def snapshot_sql(con: duckdb.DuckDBPyConnection) -> dict[str, str]:
    """The snapshot tables' rows as the raw data gives them now (table -> query): what a full
    build writes, and what a delta build's updates must leave."""
    return {
        ROWS_TABLE: _with_keys(ROWS_TABLE, _current_rows_sql(raw_columns(con))),
        OWNERS_TABLE: _with_keys(OWNERS_TABLE, _owner_branches(None)),
    }


def write_snapshot(con: duckdb.DuckDBPyConnection) -> None:
    """Snapshot every raw row (hash) and every entity's owners, after a full build."""
    for table, query in snapshot_sql(con).items():
        con.execute(f"create or replace table {table} as {query}")
    _write_marks(con, raw_columns(con))


PARENTS = {
    dodo_contract.SUBSCRIPTION_HISTORY_TABLE: "subscriptions",
    dodo_contract.DISPUTE_HISTORY_TABLE: "disputes",
}
"""History tables and the table whose rows they record: a history row is appended (with the
parent row's `_synced_at`, which a webhook can set in the past) only when the parent's row
was written with other content, so the parent's written rows name the history's too."""


def _has_raw_table(con: duckdb.DuckDBPyConnection, table: str) -> bool:
    row = con.execute(
        "select count(*) from information_schema.tables where table_schema = ? and table_name = ?",
        [RAW, table],
    ).fetchone()
    return bool(row and row[0])


def _merged_since(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether the webhook merge log exists (a warehouse that never merged one has none)."""
    return _has_raw_table(con, dodo_contract.WEBHOOK_MERGES_TABLE)


def _later_syncs(con: duckdb.DuckDBPyConnection) -> list[object] | None:
    """The starts of the API syncs recorded since the snapshot; None when no sync had been
    recorded before it (then a load time equal to the snapshot's may be a later write)."""
    if not _has_raw_table(con, dodo_contract.LOOKBACK_PASSES_TABLE):
        return None
    passes = f"{RAW}.{dodo_contract.LOOKBACK_PASSES_TABLE}"
    since = f"(select min(built_at) from {MARKS_TABLE})"
    row = con.execute(f"select count(*) from {passes} where recorded_at < {since}").fetchone()
    if not row or not row[0]:
        return None
    rows = con.execute(f"select as_of from {passes} where not recorded_at < {since}").fetchall()
    return [r[0] for r in rows]


def _candidate_sources(
    table: str, column: str | None, mark: object, merges: bool, compare: str
) -> list[tuple[str, list[object], bool]]:
    """Queries (with parameters) of the ids of a raw table whose rows may have been written
    since the snapshot, and whether the query is by load time: newer than its newest load time,
    or equal when a sync since may have stamped that same instant (a clock that did not move:
    the sandbox's); merged from a webhook since; (history) of a parent row written since.

    The rows an API sync wrote carry its start, recorded in `lookback_passes`: when every sync
    since the snapshot started after the mark, the rows stamped with the mark itself are the
    last build's, already in the snapshot (re-read open objects are otherwise hashed twice)."""
    key = ENTITY_KEYS[table]
    raw = f'"{RAW}"."{table}"'
    if column is None or mark is None:  # no load time known: every row is a candidate
        return [(f'select cast("{key}" as varchar) from {raw}', [], True)]
    sources: list[tuple[str, list[object], bool]] = [
        (f'select cast("{key}" as varchar) from {raw} where "{column}" {compare} ?', [mark], True)
    ]
    if merges:
        sources.append(
            (
                f"select id from {RAW}.{dodo_contract.WEBHOOK_MERGES_TABLE} "
                "where resource = ? and merged_at >= (select min(built_at) from "
                f"{MARKS_TABLE})",
                [table],
                False,
            )
        )
    if table in PARENTS:
        sources.append(("select id from delta_candidates where tbl = ?", [PARENTS[table]], False))
    return sources


def _comparison(
    table: str, marks: dict[str, tuple[object, ...]], later_syncs: list[object] | None
) -> str:
    """How a row's load time compares with the mark for the row to be a candidate: `>` when
    every sync since the snapshot started after the mark, else `>=` (`_candidate_sources`)."""
    mark = marks[table][0]
    strict = later_syncs is not None and all(
        start is not None and mark is not None and start > mark  # type: ignore[operator]
        for start in later_syncs
    )
    return ">" if strict else ">="


def _current_candidates_sql(
    table: str, names: list[str], column: str | None, mark: object, compare: str, by_ids: bool
) -> tuple[str, list[object]]:
    """(tbl, id, k) of a table's candidate rows: those loaded since `mark` (a scan whose row
    groups of older loads DuckDB skips by their min/max), and the older rows of the ids that
    came from elsewhere (a webhook merge, a parent row), and of a history's every candidate (a
    history holds several rows per id: its older ones are in the snapshot's rows of the id);
    `by_ids`: whether there are such ids."""
    if column is None or mark is None:
        return _rows_sql(table, names), []
    parts = [(_rows_sql(table, names, f' where "{column}" {compare} ?'), [mark])]
    by_id = "" if table in PARENTS else " and not by_time"
    ids = f"(select id from delta_candidates where tbl = '{table}'{by_id})"
    where = (
        f' where not coalesce("{column}" {compare} ?, false) '
        f'and cast("{ENTITY_KEYS[table]}" as varchar) in {ids}'
    )
    if by_ids:
        parts.append((_rows_sql(table, names, where), [mark]))
    return _union(parts)


def _union(parts: list[tuple[str, list[object]]]) -> tuple[str, list[object]]:
    """One query (and its parameters) of the union of several (query, parameters)."""
    params: list[object] = []
    for _, more in parts:
        params.extend(more)
    return "\nunion all\n".join(query for query, _ in parts), params


def find_changes(con: duckdb.DuckDBPyConnection) -> int:
    """Fill the temp table `delta_changed` (tbl, id) with the raw entities whose rows differ
    from the snapshot (added, changed or deleted rows); return how many there are.

    Per table, the candidates are the rows written since the snapshot (`_candidate_sources`);
    only their hashes are computed and compared with the snapshot's rows of the same ids. When
    the table's row count says rows went missing outside them (a deletion), or the snapshot has
    no count of it, the whole table is compared instead. Every table in the same few statements
    (each statement has a fixed cost)."""
    columns = raw_columns(con)
    tables = sorted(columns)
    marks = {
        r[0]: r[1:] for r in con.execute(f"select tbl, mark, rows from {MARKS_TABLE}").fetchall()
    }
    merges = _merged_since(con)
    later_syncs = _later_syncs(con)
    load_times = _load_time_columns(con)
    newest_sync = _newest_sync(con)
    totals = " union all ".join(
        f"select '{t}' as tbl, {_newest_load(load_times.get(t), newest_sync)} as mark, "
        f'count(*) as rows from "{RAW}"."{t}"'
        for t in tables
    )
    con.execute(
        "create or replace temp table delta_new_marks as "
        f"select tbl, mark, rows, now() as built_at from ({totals})"
    )
    counts = dict(con.execute("select tbl, rows from delta_new_marks").fetchall())
    known = [t for t in tables if marks.get(t, (None, None))[1] is not None]
    con.execute(
        "create or replace temp table delta_candidates (tbl varchar, id varchar, by_time boolean)"
    )
    for group in ([t for t in known if t not in PARENTS], [t for t in known if t in PARENTS]):
        parts = [
            (f"select '{t}', id, {by_time} from ({query}) as c(id)", params)
            for t in group
            for query, params, by_time in _candidate_sources(
                t, load_times.get(t), marks[t][0], merges, _comparison(t, marks, later_syncs)
            )
        ]
        if parts:  # history tables after their parents: they read the parents' candidates
            query, params = _union(parts)
            con.execute(f"insert into delta_candidates {query}", params)

    by_ids = {
        r[0]
        for r in con.execute(
            "select distinct tbl from delta_candidates where not by_time or tbl in "
            "(select unnest(?::varchar[]))",
            [list(PARENTS)],
        ).fetchall()
    }
    current, params = _union(
        [
            _current_candidates_sql(
                t,
                columns[t],
                load_times.get(t),
                marks[t][0],
                _comparison(t, marks, later_syncs),
                t in by_ids,
            )  # fmt: skip
            for t in known
        ]
    )
    con.execute("create or replace temp table delta_current (tbl varchar, id varchar, k ubigint)")
    if current:
        con.execute("insert into delta_current " + current, params)
    now_part = dict(con.execute("select tbl, count(*) from delta_current group by tbl").fetchall())
    # the snapshot's rows of the candidates, found by their ids' lookup keys
    exact = "(tbl, id) in (select tbl, id from delta_candidates)"
    found = _rows_by_key(ROWS_TABLE, "id_key", "select id from delta_candidates", exact)
    con.execute(f"create or replace temp table delta_old as {found}")
    old_part = dict(con.execute("select tbl, count(*) from delta_old group by tbl").fetchall())
    # the rows outside the candidates are the snapshot's rows of other ids, untouched
    whole = [
        t
        for t in tables
        if t not in known or counts[t] - now_part.get(t, 0) != marks[t][1] - old_part.get(t, 0)
    ]
    hash_raw_keys(
        con,
        {
            t: (load_times[t], marks[t][0], _comparison(t, marks, later_syncs))
            for t in known
            if t not in whole and load_times.get(t) and marks[t][0] is not None
        },
    )
    if whole:
        for table in ("delta_current", "delta_old"):
            con.execute(f"delete from {table} where tbl in (select unnest(?::varchar[]))", [whole])
        con.execute(
            "insert into delta_current "
            + "\nunion all\n".join(_rows_sql(t, columns[t]) for t in whole)
        )
        con.execute(
            f"insert into delta_old select {ROWS_COLUMNS} from {ROWS_TABLE} "
            "where tbl in (select unnest(?::varchar[]))",
            [whole],
        )
    con.execute(
        """create or replace temp table delta_changed_keys as
        (select tbl, k from delta_current except all select tbl, k from delta_old)
        union all (select tbl, k from delta_old except all select tbl, k from delta_current)"""
    )
    con.execute(
        f"""create or replace temp table {CHANGED} as
        select tbl, id from delta_current where (tbl, k) in (select tbl, k from delta_changed_keys)
        union select tbl, id from delta_old where (tbl, k) in (select tbl, k from delta_changed_keys)"""
    )
    row = con.execute(f"select count(*) from {CHANGED}").fetchone()
    return int(row[0]) if row else 0


def _in_pairs(relation: str) -> str:
    """SQL: the row's (tbl, id) is one of `relation`'s; a one-column semi-join on the id first
    (DuckDB's semi-join on a pair of columns costs several times more per row scanned)."""
    return f"(id in (select id from {relation}) and (tbl, id) in (select tbl, id from {relation}))"


REACHED = "delta_reached"
"""Temp table (tbl, id): the changed entities and those reached through them, two hops down
the snapshot's references (a refund or dispute through its payment, a ledger entry through
its payment or refund, a history row through its subscription or dispute, a payment through
its subscription). An entity's owners move only with its own row or a parent's, so these are
the only entities whose owners a build can have moved."""
OLD_OWNERS = "delta_old_owners"
"""Temp table: the snapshot's rows (`_delta_owners`' columns) of the changed entities and of
those one and two hops down their references (the reached entities are found by them); a row
may be there twice."""
NEW_OWNERS = "delta_new_owners"
"""Temp table: the owners of the reached entities now (`_delta_owners`' columns), read once
for the touched customers and kept for the touched days and the snapshot's update."""


def touch_changed(con: duckdb.DuckDBPyConnection, staging: Mapping[str, str]) -> None:
    """Fill the temp table `delta_touched` with the customers the changed entities concern:
    the old owners (from the snapshot) and the new owners of the changed entities and of
    those reached through them, and the customers of subscriptions of a changed product."""
    # the snapshot's rows of the changed entities and of those one hop down, then two
    changed = f"select id from {CHANGED}"
    by_ref = _rows_by_key(OWNERS_TABLE, "ref_key", changed, f"ref in ({changed})")
    by_id = _rows_by_key(
        OWNERS_TABLE, "id_key", changed, f"(tbl, id) in (select tbl, id from {CHANGED})"
    )
    hop2 = _rows_by_key(
        OWNERS_TABLE, "ref_key", "select id from hop1", "ref in (select id from hop1)"
    )
    con.execute(
        f"""create or replace temp table {OLD_OWNERS} as
        with hop1 as materialized ({by_ref} union {by_id})
        select * from hop1
        union all {hop2}"""
    )
    con.execute(
        f"""create or replace temp table {REACHED} as
        select tbl, id from {CHANGED} union select tbl, id from {OLD_OWNERS}"""
    )
    set_ids(con, REACHED, staging)
    con.execute(f"create or replace temp table {NEW_OWNERS} as {_owner_branches(REACHED)}")
    con.execute(
        f"""create or replace temp table {TOUCHED} as
        select owner as customer_id from {OLD_OWNERS}
        union select owner from {NEW_OWNERS}
        union select customer_id from {SCHEMA}.stg_subscriptions
            where product_id in (select id from {CHANGED} where tbl = 'products')"""
    )
    con.execute(f"set variable {_CLOSED} = null")
    sync_touched(con)


def add_touched(con: duckdb.DuckDBPyConnection, query: str, params: list | None = None) -> int:
    """Add the customers `query` returns (one column) to `delta_touched`; return how many were
    new."""
    inserted = con.execute(
        f"insert into {TOUCHED} select * from ({query}) except select customer_id from {TOUCHED}",
        params or [],
    ).fetchone()
    added = int(inserted[0]) if inserted else 0
    if added:
        sync_touched(con)
    return added


def count_touched(con: duckdb.DuckDBPyConnection) -> int:
    """How many customer keys are touched (NULL counts as one)."""
    row = con.execute(f"select count(*) from {TOUCHED}").fetchone()
    return int(row[0]) if row else 0


_CLOSED = "delta_closed_touched"
"""Session variable: how many customers were touched when `close_over_subscriptions` last
found none to add (the set only grows within a build, so the same count is the same set)."""


def close_over_subscriptions(con: duckdb.DuckDBPyConnection, links_moved: bool = False) -> None:
    """Add every customer who shares a subscription with a touched one (a payment of one
    customer for another's subscription): a subscription's facts read all its payments, and a
    renewal's number reads all the payments of its subscription. Nothing to do when no
    customer was touched since the last closure, unless the links between payments and
    subscriptions were rebuilt since (`links_moved`)."""
    row = con.execute(f"select getvariable('{_CLOSED}')").fetchone()
    if not links_moved and row and row[0] == count_touched(con):
        return
    a = SCHEMA
    while add_touched(
        con,
        f"""with subscriptions as (
            select subscription_id from {a}.stg_subscriptions where {in_touched("customer_id")}
            union select subscription_id from {a}.stg_payment_subscriptions
                where {in_touched("customer_id")}
            union select subscription_id from {a}.stg_payments
                where {in_touched("customer_id")} and subscription_id is not null
        )
        select customer_id from {a}.stg_subscriptions
            where subscription_id in (select subscription_id from subscriptions)
        union select customer_id from {a}.stg_payment_subscriptions
            where subscription_id in (select subscription_id from subscriptions)
        union select customer_id from {a}.stg_payments
            where subscription_id in (select subscription_id from subscriptions)""",
    ):
        pass
    con.execute(f"set variable {_CLOSED} = {count_touched(con)}")


def update_snapshot(con: duckdb.DuckDBPyConnection) -> None:
    """After a delta build: the changed rows' hashes, and the owners of the entities
    `touch_changed` reached (read by it, before the build)."""
    for table, entities in ((ROWS_TABLE, CHANGED), (OWNERS_TABLE, REACHED)):
        ids = f"select id from {entities}"
        exact = f"(tbl, id) in (select tbl, id from {entities})"
        con.execute(f"delete from {table} where {_by_key(table, 'id_key', ids, exact)}")
    changed = _in_pairs(CHANGED)
    rows = f"select * from delta_current where {changed}"
    con.execute(f"insert into {ROWS_TABLE} {_with_keys(ROWS_TABLE, rows)}")
    con.execute(
        f"insert into {OWNERS_TABLE} {_with_keys(OWNERS_TABLE, f'select * from {NEW_OWNERS}')}"
    )
    # the snapshot now holds exactly the current raw rows: their totals, taken by find_changes
    con.execute(f"create or replace table {MARKS_TABLE} as select * from delta_new_marks")
