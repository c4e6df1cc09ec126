"""Ledger entries of objects that settled late: read by `reference_object_id`, not by time.

The ledger is append-only, but nothing promises that an entry's `created_at` is when it was
written: a payment that sat in `processing` for two weeks can book its entries at its own,
old, creation time, before the window the ledger's lookback re-reads. When such a payment or
refund reaches a terminal status in a run, its entries are read by the object's id.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

import dlt
import duckdb
from dlt.extract.resource import DltResource

from pipelines.dodo_contract import NON_TERMINAL_STATUSES, PRIMARY_KEYS, RAW_DATASET, STATUS_FIELDS
from pipelines.extract.dodo.records import dlt_column_hints, to_arrow

SETTLING_RESOURCES = ("payments", "refunds")
"""The objects the ledger references whose entries are booked when they settle."""


def settled_before(
    con: duckdb.DuckDBPyConnection,
    open_before_run: dict[str, list[Any]],
    created_before: datetime,
) -> list[str]:
    """Ids of payments and refunds the warehouse held in a non-terminal status before this run,
    created before `created_before` (the ledger's lookback), and terminal now."""
    settled: list[str] = []
    for resource in SETTLING_RESOURCES:
        old = [o.key for o in open_before_run.get(resource, []) if o.created_at < created_before]
        if not old:
            continue
        key, status = PRIMARY_KEYS[resource], STATUS_FIELDS[resource]
        rows = con.execute(
            f'select "{key}" from "{RAW_DATASET}"."{resource}" '
            f'where "{key}" in (select unnest(?::varchar[])) '
            f'and "{status}" not in (select unnest(?::varchar[]))',
            [old, list(NON_TERMINAL_STATUSES[resource])],
        ).fetchall()
        settled.extend(r[0] for r in rows)
    return sorted(settled)


def settled_ledger_rows(
    client: Any, object_ids: Iterable[str], synced_at: datetime, rejected: list[dict[str, Any]]
) -> Iterator[Any]:
    """The ledger entries of each object, one `reference_object_id` query each."""
    for object_id in object_ids:
        items: list[dict[str, Any]] = []
        for page in client.list_query(
            "balance_ledger", {"reference_object_id": object_id}, allow_overflow=True
        ):
            items.extend(page)
        table, set_aside = to_arrow("balance_ledger", items, synced_at)
        rejected.extend(set_aside)
        if table is not None:
            yield table


@dlt.source(name="dodo", max_table_nesting=0)
def settled_ledger_source(
    client: Any, object_ids: list[str], synced_at: datetime, rejected: list[dict[str, Any]]
) -> list[DltResource]:
    """The balance_ledger table, merged on `id`, fed only by the settled objects' entries (the
    ledger resource's own state and cursor are not touched)."""
    rows = settled_ledger_rows(client, object_ids, synced_at, rejected)
    return [
        dlt.resource(
            rows,
            name="balance_ledger",
            primary_key=PRIMARY_KEYS["balance_ledger"],
            write_disposition="merge",
            columns=dlt_column_hints("balance_ledger"),
        )
    ]
