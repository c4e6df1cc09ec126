"""The emitter's state for accounts and changed ids (`segment_sync`): group hashes, user id map."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import duckdb
import pyarrow as pa

from pipelines.emit.ledger import outbox_columns

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS segment_sync.group_state (
        group_id VARCHAR PRIMARY KEY,
        traits_hash VARCHAR NOT NULL,
        sent_at TIMESTAMPTZ NOT NULL,
        run_id VARCHAR NOT NULL
    )""",
    # the user id each customer was last identified under (alias calls start from it)
    """CREATE TABLE IF NOT EXISTS segment_sync.customer_user_ids (
        customer_id VARCHAR PRIMARY KEY,
        user_id VARCHAR NOT NULL,
        recorded_at TIMESTAMPTZ NOT NULL,
        run_id VARCHAR NOT NULL
    )""",
)


def ensure_account_schema(con: duckdb.DuckDBPyConnection) -> None:
    """Create `group_state` and `customer_user_ids` (the schema exists: ledger created it)."""
    cur = con.cursor()
    for statement in _SCHEMA:
        cur.execute(statement)


def iter_group_rows(con: duckdb.DuckDBPyConnection) -> Iterator[tuple[Any, ...]]:
    """Stream (group_id, traits_json, last_sent_hash, member user_id) of every account."""
    if "group_id" not in outbox_columns(con, "group_outbox"):
        return
    cur = con.cursor()
    cur.execute(
        """SELECT o.group_id, o.traits::VARCHAR, s.traits_hash, o.user_id
           FROM analytics.group_outbox o
           LEFT JOIN segment_sync.group_state s ON s.group_id = o.group_id
           WHERE o.group_id IS NOT NULL
           ORDER BY o.group_id"""
    )
    while rows := cur.fetchmany(5000):
        yield from rows


def save_group_state(
    con: duckdb.DuckDBPyConnection, run_id: str, sent: Sequence[tuple[str, str]]
) -> None:
    """Record the traits hash Segment acknowledged per account: (group_id, traits_hash)."""
    if not sent:
        return
    latest = dict(sent)
    batch = pa.table({"group_id": list(latest), "traits_hash": list(latest.values())})
    cur = con.cursor()
    cur.register("group_batch", batch)
    try:
        cur.execute(
            """INSERT INTO segment_sync.group_state (group_id, traits_hash, sent_at, run_id)
               SELECT group_id, traits_hash, current_timestamp, $run_id FROM group_batch
               ON CONFLICT (group_id) DO UPDATE SET traits_hash = excluded.traits_hash,
                   sent_at = excluded.sent_at, run_id = excluded.run_id""",
            {"run_id": run_id},
        )
    finally:
        cur.unregister("group_batch")


def changed_user_ids(con: duckdb.DuckDBPyConnection) -> list[tuple[str, str, str]]:
    """(customer_id, previous user id, current user id) of customers identified before under
    another id than the one `customer_identity` resolves now."""
    if "user_id" not in outbox_columns(con, "customer_identity"):
        return []
    return (
        con.cursor()
        .execute(
            """SELECT c.customer_id, m.user_id, c.user_id
               FROM analytics.customer_identity c
               INNER JOIN segment_sync.customer_user_ids m ON m.customer_id = c.customer_id
               WHERE m.user_id <> c.user_id
               ORDER BY c.customer_id"""
        )
        .fetchall()
    )


def record_user_ids(
    con: duckdb.DuckDBPyConnection,
    run_id: str,
    keep_changed: bool = False,
    only_customers: Sequence[str] | None = None,
) -> None:
    """Remember the user id each customer is now identified under (customers whose user has an
    acknowledged identify); `keep_changed` leaves customers whose id changed as they are (their
    alias is still due: `record_aliased` moves them once it is acknowledged). `only_customers`:
    only these (every other customer's id and identify are as the last run recorded them)."""
    if "user_id" not in outbox_columns(con, "customer_identity"):
        return
    only = ""
    params: dict[str, Any] = {"run_id": run_id, "keep": keep_changed}
    if only_customers is not None:
        only = "AND c.customer_id IN (SELECT unnest($only::VARCHAR[]))"
        params["only"] = list(only_customers)
    con.cursor().execute(
        f"""INSERT INTO segment_sync.customer_user_ids
           SELECT c.customer_id, c.user_id, current_timestamp, $run_id
           FROM analytics.customer_identity c
           INNER JOIN segment_sync.identify_state s ON s.user_id = c.user_id
           LEFT JOIN segment_sync.customer_user_ids m ON m.customer_id = c.customer_id
           WHERE (m.customer_id IS NULL OR (m.user_id <> c.user_id AND NOT $keep)) {only}
           ON CONFLICT (customer_id) DO UPDATE SET user_id = excluded.user_id,
               recorded_at = excluded.recorded_at, run_id = excluded.run_id""",
        params,
    )


def record_aliased(
    con: duckdb.DuckDBPyConnection, run_id: str, aliased: Sequence[tuple[str, str]]
) -> None:
    """Customers whose alias Segment acknowledged: (customer_id, new user id)."""
    if aliased:
        con.cursor().executemany(
            """INSERT INTO segment_sync.customer_user_ids VALUES (?, ?, current_timestamp, ?)
               ON CONFLICT (customer_id) DO UPDATE SET user_id = excluded.user_id,
                   recorded_at = excluded.recorded_at, run_id = excluded.run_id""",
            [(customer_id, user_id, run_id) for customer_id, user_id in aliased],
        )
