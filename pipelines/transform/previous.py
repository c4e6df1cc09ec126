"""The analytics tables as the last build left them, read while a delta build changes them.

A delta build changes the tables inside one transaction. `PreviousState` is a second
connection whose transaction began before that one, so it still reads the tables as they were
(DuckDB's MVCC). The delta build asks it what the touched keys held before:

- the Segment user ids the touched customers resolved to (`touch_users`): a user whose set of
  customers changes is rebuilt, under the old id and the new one;
- the outbox rows the tracking plan's counts drop before the new rows' counts are added
  (`rebuild_counts`): the plan counts every row of the outboxes, so a delta build updates it
  from the touched customers' and users' rows instead of reading every outbox row again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import duckdb

from pipelines import dodo_contract
from pipelines.transform import touched
from pipelines.transform.touched import TOUCHED, in_touched

SCHEMA = dodo_contract.ANALYTICS_SCHEMA
TRACK_INPUTS = ("lifecycle_events", "custom_events", "customer_identity", "event_context")
"""The customer-keyed tables the track outbox reads (through `outbound_events`); its other
inputs (quarantined rows, forgotten customers, event rules) are small and read whole."""
TOUCHED_USERS = "delta_touched_users"
"""Temp table (user_id) of the Segment user ids a delta build rebuilds (grain `user`)."""
IDENTITY_MODEL = "customer_identity"
"""The model that resolves each customer to a Segment user id."""


TOUCHED_USER_IDS = "delta_touched_user_ids"
TOUCHED_USER_NULL = "delta_touched_user_null"
"""Session variables holding `delta_touched_users` (as `touched.TOUCHED_IDS` does)."""


def in_touched_users(expr: str) -> str:
    """SQL: `expr` is a touched user id (NULL-safe)."""
    return touched.in_key_list(expr, TOUCHED_USER_IDS, TOUCHED_USER_NULL)


def _sync_users(con: duckdb.DuckDBPyConnection) -> None:
    """Copy `delta_touched_users` into the session variables `in_touched_users` reads."""
    touched.sync_key_list(con, TOUCHED_USERS, "user_id", TOUCHED_USER_IDS, TOUCHED_USER_NULL)


class PreviousState:
    """A read-only view of the database as it was before the delta build's first change."""

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self.cursor = con.cursor()
        self.cursor.execute("begin transaction")
        # the snapshot is taken now, before the build's transaction writes anything
        self.cursor.execute("select 1").fetchall()

    def close(self) -> None:
        """End the read transaction."""
        try:
            self.cursor.execute("rollback")
        finally:
            self.cursor.close()

    def copy(
        self,
        con: duckdb.DuckDBPyConnection,
        target: str,
        query: str,
        params: Sequence[Any] | dict[str, Any] = (),
    ) -> None:
        """Run `query` over the previous state and keep its rows as the temp table `target`
        of `con` (the build's connection)."""
        bound = params if isinstance(params, dict) else list(params)
        rows = self.cursor.sql(query, params=bound).to_arrow_table()
        # registering needs the connection's last result consumed: a statement of our own
        con.execute("select 1").fetchall()
        con.register("delta_previous_rows", rows)
        try:
            con.execute(
                f"create or replace temp table {target} as select * from delta_previous_rows"
            )
        finally:
            con.unregister("delta_previous_rows")


def _touched_customers(con: duckdb.DuckDBPyConnection) -> tuple[list[str], bool]:
    """The touched customer ids, and whether NULL (no known customer) is touched."""
    rows = con.execute(f"select customer_id from {TOUCHED}").fetchall()
    return [r[0] for r in rows if r[0] is not None], any(r[0] is None for r in rows)


_IN_IDS = "(customer_id in (select unnest(?::varchar[])) or (customer_id is null and ?))"
"""SQL over the previous state: the row's customer is one of the touched (parameters: ids, and
whether NULL is touched)."""


def create_touched_users(con: duckdb.DuckDBPyConnection) -> None:
    """An empty `delta_touched_users` (the user grain's scopes read it)."""
    con.execute(f"create or replace temp table {TOUCHED_USERS} (user_id varchar)")
    _sync_users(con)


def touch_users(con: duckdb.DuckDBPyConnection, previous: PreviousState) -> None:
    """Fill `delta_touched_users` with the user ids the touched customers resolve to, before
    and now, and touch every customer resolving to one of them (a user's traits combine all
    its customers). Run once `customer_identity` is rebuilt, and again when more customers
    are touched."""
    while True:
        ids, null = _touched_customers(con)
        previous.copy(
            con,
            "delta_previous_users",
            f"select distinct user_id from {SCHEMA}.{IDENTITY_MODEL} where {_IN_IDS}",
            [ids, null],
        )
        con.execute(
            f"""create or replace temp table {TOUCHED_USERS} as
            select user_id from delta_previous_users
            union select user_id from {SCHEMA}.{IDENTITY_MODEL} where {in_touched("customer_id")}"""
        )
        _sync_users(con)
        added = touched.add_touched(
            con,
            f"select customer_id from {SCHEMA}.{IDENTITY_MODEL} "
            f"where {in_touched_users('user_id')}",
        )
        if not added:
            return


COUNTED_INPUTS: dict[str, str] = {
    "track_outbox": "customer",
    "identify_outbox": "user",
    "group_outbox": "global",
}
"""What the tracking plan counts, and by which key their changed rows are found: a track's
customer, an identify's user id; the group outbox (one row per account) is compared whole."""


def rebuild_counts(
    con: duckdb.DuckDBPyConnection,
    previous: PreviousState,
    name: str,
    counted_sql: Callable[[dict[str, str]], str],
    track_sql: Callable[[dict[str, str]], str],
    new_track: str,
) -> None:
    """Update a model of row counts over the outboxes (the tracking plan): subtract the counts
    of the changed outbox rows as they were, add those of the rows now, and recompute its
    `built_from` row (a fingerprint of the whole identify outbox, not a count).

    `counted_sql(relations)` is the model's SQL reading the given relations in place of the
    outboxes (outbox name -> relation); `track_sql(inputs)` the track outbox's reading the
    given relations in place of its customer-keyed inputs; `new_track` the relation of the
    touched customers' track outbox rows now. The track outbox's inputs must be tables: a view
    keeps no rows as the last build left them."""
    ids, _ = _touched_customers(con)  # a track's customer is never NULL
    users = [r[0] for r in con.execute(f"select user_id from {TOUCHED_USERS}").fetchall()]
    track, identify, group = (f"{SCHEMA}.{n}" for n in COUNTED_INPUTS)
    in_users = "user_id in (select unnest(?::varchar[]))"
    in_ids = "customer_id in (select unnest($ids::varchar[]))"
    # by row id: a filtered `select *` would decode every segment's event properties
    old_track = track_sql(
        {name: f"({touched.rows_where(f'{SCHEMA}.{name}', in_ids)})" for name in TRACK_INPUTS}
    )
    previous.copy(con, "delta_old_track", old_track, {"ids": ids})
    previous.copy(con, "delta_old_identify", touched.rows_where(identify, in_users), [users])
    previous.copy(con, "delta_old_group", f"select * from {group}")
    con.execute(f"create or replace temp table delta_new_track as select * from {new_track}")
    con.execute(
        "create or replace temp table delta_new_identify as "
        f"{touched.rows_where(identify, in_touched_users('user_id'))}"
    )
    # an account's row changes with any member: the rows that differ, both ways
    con.execute(
        "create or replace temp table delta_changed_group as "
        f"select -1 as sign, * from (select * from delta_old_group except all select * from {group}) "
        f"union all select 1, * from (select * from {group} except all select * from delta_old_group)"
    )
    old = counted_sql({
        "track_outbox": "delta_old_track",
        "identify_outbox": "delta_old_identify",
        "group_outbox": "(select * exclude (sign) from delta_changed_group where sign = -1)",
    })  # fmt: skip
    new = counted_sql({
        "track_outbox": "delta_new_track",
        "identify_outbox": "delta_new_identify",
        "group_outbox": "(select * exclude (sign) from delta_changed_group where sign = 1)",
    })  # fmt: skip
    # the fingerprint reads every identify row's traits hash, none of its traits
    fingerprint = counted_sql({
        "track_outbox": f"(select * from {track} where false)",
        "identify_outbox": f"(select * replace ('{{}}'::json as traits) from {identify})",
        "group_outbox": f"(select * from {group} where false)",
    })  # fmt: skip
    table = f"{SCHEMA}.{name}"
    keys = "call, event, key, json_type"
    con.execute(
        f"""create or replace temp table delta_counts as
        select {keys}, cast(sum(rows) as bigint) as rows from (
            select {keys}, rows from {table} where call <> 'built_from'
            union all select {keys}, -rows from ({old}) where call <> 'built_from'
            union all select {keys}, rows from ({new}) where call <> 'built_from'
        ) group by all having sum(rows) <> 0
        union all
        select {keys}, rows from ({fingerprint}) where call = 'built_from'"""
    )
    con.execute(f"delete from {table}")
    con.execute(f"insert into {table} by name select * from delta_counts order by {keys}")
