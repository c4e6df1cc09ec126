"""Touched keys: which raw rows changed since the last build, and which customers they concern.

The last build leaves a snapshot of the raw data in two bookkeeping tables:

- `analytics._delta_rows` (tbl, id, k): one row per raw row, a hash of its table, entity id and
  every column but `_synced_at` and dlt's own (a re-read finding the same content is no change);
- `analytics._delta_owners` (tbl, id, ref, owner): the customer(s) each raw entity concerns, and
  the entity it reaches them through (refund and dispute -> payment -> customer; ledger entry ->
  its `reference_object_id`; subscription history -> subscription -> customer; a payment also
  concerns the customers of the subscriptions it pays).

A run compares the raw tables with `_delta_rows` (whatever loaded them: API pages, webhook merges,
history rows, forgets, settled-ledger re-reads, deletions); the touched customers are the old and
new owners of every changed entity and of the entities that reach a customer through it. Keys
that disappear are covered because the old owners come from the snapshot, never from the new
output. The owner NULL stands for "no known customer" and is matched NULL-safely.
"""

from __future__ import annotations

import duckdb

from pipelines import dodo_contract

SCHEMA = dodo_contract.ANALYTICS_SCHEMA
RAW = dodo_contract.RAW_DATASET
ROWS_TABLE = f"{SCHEMA}._delta_rows"
OWNERS_TABLE = f"{SCHEMA}._delta_owners"
TOUCHED = "delta_touched"
"""Temp table (customer_id) of this run's touched customers; NULL = rows without a customer."""
CHANGED = "delta_changed"
"""Temp table (tbl, id) of the raw entities whose rows changed since the last build."""

SNAPSHOT_FORMAT = 2
"""Part of the delta state's fingerprint: a snapshot of another format is never compared."""

ENTITY_KEYS: dict[str, str] = {
    **dodo_contract.PRIMARY_KEYS,
    dodo_contract.SUBSCRIPTION_HISTORY_TABLE: "subscription_id",
    dodo_contract.DISPUTE_HISTORY_TABLE: "dispute_id",
    dodo_contract.FORGOTTEN_CUSTOMERS_TABLE: "customer_id",
}
"""The entity each raw table's rows describe (a history row describes its subscription/dispute)."""


def in_touched(expr: str) -> str:
    """SQL: `expr` is a touched customer key (NULL-safe: a NULL key matches a touched NULL)."""
    return (
        f"({expr} in (select customer_id from {TOUCHED} where customer_id is not null)"
        f" or ({expr} is null and exists (select 1 from {TOUCHED} where customer_id is null)))"
    )


def in_scope(expr: str, scoped: str, column: str, every: str) -> str:
    """SQL: `expr` is an id of the scoped relation, or (when NULL is touched) an id unknown to
    the whole relation `every` (an orphan reaches no customer: its owner is NULL)."""
    return (
        f"({expr} in (select {column} from {scoped} where {column} is not null)"
        f" or (exists (select 1 from {TOUCHED} where customer_id is null) and ({expr} is null"
        f" or {expr} not in (select {column} from {every} where {column} is not null))))"
    )


def _owner_branches(where: str) -> str:
    """The owners of the current raw entities (tbl, id, ref, owner); `where` filters each
    branch on its columns `tbl`, `id` and `owner`."""
    a = SCHEMA
    branches = [
        f"select 'customers' as tbl, customer_id as id, null::varchar as ref, customer_id as owner"
        f" from {a}.stg_customers",
        f"select 'forgotten_customers', customer_id, null, customer_id"
        f" from {a}.source_forgotten_customers()",
        f"select 'payments', payment_id, null, customer_id from {a}.stg_payments",
        f"select 'payments', p.payment_id, s.subscription_id, s.customer_id from ("
        f"select payment_id, unnest(list_distinct(list_filter("
        f"coalesce(subscription_ids, []) || [subscription_id], lambda x: x is not null))) as sid"
        f" from {a}.stg_payments) as p"
        f" join {a}.stg_subscriptions as s on s.subscription_id = p.sid",
        f"select 'subscriptions', subscription_id, null, customer_id from {a}.stg_subscriptions",
        f"select 'refunds', r.refund_id, r.payment_id, p.customer_id from {a}.stg_refunds as r"
        f" left join {a}.stg_payments as p on p.payment_id = r.payment_id",
        f"select 'disputes', d.dispute_id, d.payment_id, p.customer_id from {a}.stg_disputes as d"
        f" left join {a}.stg_payments as p on p.payment_id = d.payment_id",
        f"select distinct 'dispute_history', h.dispute_id, h.dispute_id, p.customer_id"
        f" from {a}.stg_dispute_history as h"
        f" left join {a}.stg_disputes as d on d.dispute_id = h.dispute_id"
        f" left join {a}.stg_payments as p on p.payment_id = d.payment_id",
        f"select distinct 'subscription_history', h.subscription_id, h.subscription_id,"
        f" s.customer_id from {a}.stg_subscription_history as h"
        f" left join {a}.stg_subscriptions as s on s.subscription_id = h.subscription_id",
        f"select 'balance_ledger', l.ledger_entry_id, l.reference_object_id,"
        f" coalesce(p.customer_id, rp.customer_id) from {a}.stg_balance_ledger as l"
        f" left join {a}.stg_payments as p on p.payment_id = l.reference_object_id"
        f" left join {a}.stg_refunds as r on r.refund_id = l.reference_object_id"
        f" left join {a}.stg_payments as rp on rp.payment_id = r.payment_id",
    ]
    return "\nunion all\n".join(
        f"select * from ({b}) as branch(tbl, id, ref, owner) where {where}" for b in branches
    )


def raw_columns(con: duckdb.DuckDBPyConnection) -> dict[str, list[str]]:
    """The hashed columns of each raw table the snapshot covers (name order)."""
    columns: dict[str, list[str]] = {}
    for table, column in con.execute(
        "select table_name, column_name from information_schema.columns "
        "where table_schema = ? order by table_name, column_name",
        [RAW],
    ).fetchall():
        if table in ENTITY_KEYS and column != dodo_contract.SYNCED_AT_COLUMN:
            if not column.startswith("_dlt"):
                columns.setdefault(table, []).append(column)
    return columns


def _current_rows_sql(columns: dict[str, list[str]]) -> str:
    """(tbl, id, k) of every raw row: k hashes the table, the entity id and the row's content
    (one 64-bit key per row, so comparing two snapshots compares integers)."""
    parts = []
    for table, names in sorted(columns.items()):
        content = ", ".join(f'"{n}"' for n in names)
        parts.append(
            f"select '{table}' as tbl, cast(\"{ENTITY_KEYS[table]}\" as varchar) as id, "
            f'hash(\'{table}\', {content}) as k from "{RAW}"."{table}"'
        )
    return "\nunion all\n".join(parts)


def has_snapshot(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether the last build left a snapshot to compare with."""
    found = con.execute(
        "select count(*) from information_schema.tables where table_schema = ? "
        "and table_name in ('_delta_rows', '_delta_owners')",
        [SCHEMA],
    ).fetchone()
    return bool(found and found[0] == 2)


def drop_snapshot(con: duckdb.DuckDBPyConnection) -> None:
    """Forget the snapshot (the next run then builds in full)."""
    con.execute(f"drop table if exists {ROWS_TABLE}")
    con.execute(f"drop table if exists {OWNERS_TABLE}")


def write_snapshot(con: duckdb.DuckDBPyConnection) -> None:
    """Snapshot every raw row (hash) and every entity's owners, after a full build."""
    columns = raw_columns(con)
    con.execute(f"create or replace table {ROWS_TABLE} as {_current_rows_sql(columns)}")
    con.execute(f"create or replace table {OWNERS_TABLE} as {_owner_branches('true')}")


def find_changes(con: duckdb.DuckDBPyConnection) -> int:
    """Fill the temp table `delta_changed` (tbl, id) with the raw entities whose rows differ
    from the snapshot (added, changed or deleted rows); return how many there are."""
    columns = raw_columns(con)
    con.execute(f"create or replace temp table delta_current as {_current_rows_sql(columns)}")
    con.execute(
        f"""create or replace temp table delta_changed_keys as
        (select k from delta_current except all select k from {ROWS_TABLE})
        union all
        (select k from {ROWS_TABLE} except all select k from delta_current)"""
    )
    con.execute(
        f"""create or replace temp table {CHANGED} as
        select tbl, id from delta_current where k in (select k from delta_changed_keys)
        union select tbl, id from {ROWS_TABLE} where k in (select k from delta_changed_keys)"""
    )
    row = con.execute(f"select count(*) from {CHANGED}").fetchone()
    return int(row[0]) if row else 0


def touch_changed(con: duckdb.DuckDBPyConnection) -> None:
    """Fill the temp table `delta_touched` with the customers the changed entities concern:
    their old owners and those of entities reached through them (two hops, from the snapshot),
    their new owners, and the customers of subscriptions of a changed product."""
    changed = f"(tbl, id) in (select tbl, id from {CHANGED})"
    con.execute(
        f"""create or replace temp table {TOUCHED} as
        with old_direct as (
            select id, owner from {OWNERS_TABLE} where {changed}
        ),
        hop1 as (
            select id, owner from {OWNERS_TABLE}
            where ref in (select id from {CHANGED})
        ),
        hop2 as (
            select id, owner from {OWNERS_TABLE}
            where ref in (select id from hop1)
        ),
        new_direct as (
            {_owner_branches(changed)}
        ),
        products as (
            select customer_id as owner from {SCHEMA}.stg_subscriptions
            where product_id in (select id from {CHANGED} where tbl = 'products')
        )
        select owner as customer_id from old_direct
        union select owner from hop1
        union select owner from hop2
        union select owner from new_direct
        union select owner from products"""
    )


def add_touched(con: duckdb.DuckDBPyConnection, query: str, params: list | None = None) -> int:
    """Add the customers `query` returns (one column) to `delta_touched`; return how many were
    new."""
    before = count_touched(con)
    con.execute(
        f"insert into {TOUCHED} select * from ({query}) except select customer_id from {TOUCHED}",
        params or [],
    )
    return count_touched(con) - before


def count_touched(con: duckdb.DuckDBPyConnection) -> int:
    """How many customer keys are touched (NULL counts as one)."""
    row = con.execute(f"select count(*) from {TOUCHED}").fetchone()
    return int(row[0]) if row else 0


def close_over_subscriptions(con: duckdb.DuckDBPyConnection) -> None:
    """Add every customer who shares a subscription with a touched one (a payment of one
    customer for another's subscription): a subscription's facts read all its payments, and a
    renewal's number reads all the payments of its subscription."""
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


def update_snapshot(con: duckdb.DuckDBPyConnection) -> None:
    """After a delta build: the changed rows' hashes, and the owners of the changed entities and
    of every entity of a touched customer (an owner may have moved with a parent)."""
    changed = f"(tbl, id) in (select tbl, id from {CHANGED})"
    con.execute(f"delete from {ROWS_TABLE} where {changed}")
    con.execute(f"insert into {ROWS_TABLE} select * from delta_current where {changed}")
    con.execute(f"delete from {OWNERS_TABLE} where {changed} or {in_touched('owner')}")
    con.execute(
        f"insert into {OWNERS_TABLE} select * from ({_owner_branches('true')}) "
        f"where {changed} or {in_touched('owner')}"
    )
