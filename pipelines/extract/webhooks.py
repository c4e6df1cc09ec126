"""Merge the objects carried by stored Dodo webhooks into dodo_raw, as if the API had listed them.

A webhook's `data` is the object's state at the event's `timestamp`. Deliveries arrive late, twice
and out of order, so per object only the newest event counts, and it is merged only when the
warehouse holds nothing newer: a row read from the API carries `_synced_at` = the start of the
sync that read it, a row merged from a webhook carries its event's timestamp, and an event older
than the row's `_synced_at` is left out. The scheduled API runs remain the reconciliation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime
from itertools import chain
from typing import Any

import dlt
import duckdb
import orjson
import pyarrow as pa
from dlt.extract.resource import DltResource

from pipelines import warehouse
from pipelines.config import AppConfig
from pipelines.dodo_contract import (
    PRIMARY_KEYS,
    RAW_DATASET,
    SYNCED_AT_COLUMN,
    WEBHOOK_MERGES_TABLE,
)
from pipelines.extract.dodo.records import dlt_column_hints, item_fields, to_arrow
from pipelines.extract.forgotten import forgotten_ids, scrub_rejected, scrub_table
from pipelines.extract.load import make_pipeline, record_history_on, store_rejected_on
from pipelines.webhook_store import StoredDelivery, WebhookStore, store_folder

log = logging.getLogger(__name__)

WEBHOOK_MERGES_KEPT_DAYS = 30
"""How long `dodo_raw.webhook_merges` keeps an entry (the models' delta build reads the entries
since its last build)."""

WEBHOOK_RESOURCES: dict[str, str] = {
    "payment": "payments",
    "subscription": "subscriptions",
    "refund": "refunds",
    "dispute": "disputes",
}
"""Event families whose `data` is an object of a raw table (`payment.succeeded` -> payments)."""


@dataclass
class WebhookMerge:
    """What one merge of stored deliveries did."""

    deliveries: int = 0
    merged: dict[str, int] = field(default_factory=dict)
    """Objects written per raw table."""
    older_than_warehouse: int = 0
    """Objects left out because the warehouse already held a newer state."""
    superseded: int = 0
    """Events of an object followed by a newer event of the same object in the same merge."""
    other_events: int = 0
    """Events of families without a raw table (payout, credit, license_key, ...)."""
    rejected: int = 0
    """Deliveries set aside in dodo_raw.rejected_records (not an object the warehouse can hold)."""
    marking: list[Future[int]] = field(default_factory=list, repr=False, compare=False)
    """The markings of the merged batches, done in the background (see `wait_marked`)."""

    def wait_marked(self) -> None:
        """Return once every merged delivery is marked merged; re-raise a marking's failure
        (a full disk: those deliveries stay pending, and merging them again changes nothing)."""
        t0 = time.monotonic()
        for done in self.marking:
            done.result()
        if self.marking:
            log.info("webhooks: %d deliveries marked merged (%.1fs after the merge)",
                     self.deliveries, time.monotonic() - t0)  # fmt: skip
        self.marking = []


def _timestamp(payload: dict[str, Any]) -> datetime | None:
    try:
        return datetime.fromisoformat(str(payload["timestamp"]).replace("Z", "+00:00"))
    except (KeyError, ValueError):
        return None


def _newest_events(
    deliveries: list[StoredDelivery], result: WebhookMerge, rejected: list[dict[str, Any]]
) -> dict[str, dict[str, tuple[datetime, dict[str, Any]]]]:
    """Per raw table and key, the newest event's (timestamp, object)."""
    newest: dict[str, dict[str, tuple[datetime, dict[str, Any]]]] = {}
    for delivery in deliveries:
        payload = delivery.payload
        family = str(payload.get("type", "")).split(".", 1)[0]
        resource = WEBHOOK_RESOURCES.get(family)
        if resource is None:
            result.other_events += 1
            continue
        data, at = payload.get("data"), _timestamp(payload)
        key = data.get(PRIMARY_KEYS[resource]) if isinstance(data, dict) else None
        if at is None or not isinstance(key, str) or not key:
            reason = "webhook without a timestamp" if at is None else "webhook data without its id"
            record_json = orjson.dumps(payload, default=str).decode()
            rejected.append({"resource": resource, "reason": reason, "record_json": record_json,
                             "rejected_at": delivery.received_at})  # fmt: skip
            continue
        known = newest.setdefault(resource, {})
        if key in known and known[key][0] >= at:
            result.superseded += 1
            continue
        if key in known:
            result.superseded += 1
        known[key] = (at, data)
    return newest


def _customers_of(
    newest: dict[str, dict[str, tuple[datetime, dict[str, Any]]]],
) -> dict[str, tuple[datetime, dict[str, Any]]]:
    """Customer rows from the `customer` nested in payments and subscriptions.

    Dodo sends no customer webhooks, and an event of a customer the warehouse does not know is
    held back by the data tests; the nested customer (id, email, name, phone) fills in until
    the next API read brings the real row. Its `created_at` is the object's, so an upper bound
    of the real one; it is only written for a customer the warehouse does not hold at all.
    """
    found: dict[str, tuple[datetime, dict[str, Any]]] = {}
    for resource in ("payments", "subscriptions"):
        for at, data in newest.get(resource, {}).values():
            customer = data.get("customer")
            if not isinstance(customer, dict) or not isinstance(customer.get("customer_id"), str):
                continue
            row = {k: customer.get(k) for k in ("customer_id", "email", "name", "phone_number")}
            row["business_id"], row["created_at"] = data.get("business_id"), data.get("created_at")
            known = found.get(row["customer_id"])
            if known is None or str(known[1]["created_at"]) > str(row["created_at"]):
                found[row["customer_id"]] = (at, row)
    return found


def _warehouse_synced_at(
    con: duckdb.DuckDBPyConnection, resource: str, keys: list[str]
) -> dict[str, datetime]:
    """`_synced_at` of the rows the warehouse holds for these keys."""
    exists = con.execute(
        "select count(*) from information_schema.tables where table_schema = ? and table_name = ?",
        [RAW_DATASET, resource],
    ).fetchone()
    if not exists or not exists[0]:
        return {}
    key = PRIMARY_KEYS[resource]
    rows = con.execute(
        f'select "{key}", "{SYNCED_AT_COLUMN}" from {RAW_DATASET}."{resource}" '
        f'where "{key}" in (select unnest(?::varchar[]))',
        [keys],
    ).fetchall()
    return {k: at for k, at in rows}


def _tables(
    con: duckdb.DuckDBPyConnection,
    newest: dict[str, dict[str, tuple[datetime, dict[str, Any]]]],
    result: WebhookMerge,
    rejected: list[dict[str, Any]],
) -> dict[str, pa.Table]:
    """Arrow tables of the objects to merge, `_synced_at` set to each one's event time."""
    tables: dict[str, pa.Table] = {}
    forgotten = forgotten_ids(con)
    for resource, events in newest.items():
        held = _warehouse_synced_at(con, resource, list(events))
        known_customers = set(held) if resource == "customers" else set()
        fields = item_fields(resource)
        items, times = [], []
        for key, (at, data) in events.items():
            if key in known_customers:  # only customers the warehouse does not hold at all
                continue
            if key in held and held[key] is not None and held[key] >= at:
                result.older_than_warehouse += 1
                continue
            items.append({k: v for k, v in data.items() if k in fields})
            times.append(at)
        if not items:
            continue
        by_key = {item[PRIMARY_KEYS[resource]]: t for item, t in zip(items, times, strict=True)}
        table, bad = to_arrow(resource, items, times[0])
        rejected.extend(bad)
        if table is None:
            continue
        keys = table[PRIMARY_KEYS[resource]].to_pylist()
        synced = pa.array([by_key[k] for k in keys], pa.timestamp("us", tz="UTC"))
        index = table.schema.get_field_index(SYNCED_AT_COLUMN)
        table = table.set_column(index, SYNCED_AT_COLUMN, synced)
        # a forgotten customer's personal fields are never stored again, by any path
        tables[resource] = scrub_table(resource, table, forgotten)
    scrub_rejected(rejected, forgotten)
    return tables


@dlt.source(name="dodo", max_table_nesting=0)
def webhook_source(tables: dict[str, pa.Table]) -> Iterator[DltResource]:
    """The merged objects as resources of the same `dodo` source (same schema, same tables)."""
    for resource, table in tables.items():
        yield dlt.resource(
            [table],
            name=resource,
            primary_key=PRIMARY_KEYS[resource],
            write_disposition="merge",
            columns=dlt_column_hints(resource),
        )


def _merge_into_warehouse(
    con: duckdb.DuckDBPyConnection, tables: dict[str, pa.Table]
) -> dict[str, pa.Table]:
    """Replace the rows of these keys in the raw tables, in one transaction; returns the tables
    the warehouse does not have yet (dlt creates those)."""
    left: dict[str, pa.Table] = {}
    con.execute("begin transaction")
    con.execute(f"create schema if not exists {RAW_DATASET}")  # webhooks before a first sync
    con.execute(
        f"create table if not exists {RAW_DATASET}.{WEBHOOK_MERGES_TABLE} "
        "(resource varchar, id varchar, merged_at timestamptz)"
    )
    for resource, table in tables.items():
        columns = {
            name: kind
            for name, kind in con.execute(
                "select column_name, data_type from information_schema.columns "
                "where table_schema = ? and table_name = ?",
                [RAW_DATASET, resource],
            ).fetchall()
        }
        if not columns:
            left[resource] = table
            continue
        con.register("incoming", table)
        described = con.execute("describe select * from incoming").fetchall()
        for name, kind, *_ in described:
            if name not in columns:  # a field the API added: a column, as dlt would add it
                con.execute(f'alter table {RAW_DATASET}."{resource}" add column "{name}" {kind}')
        key = PRIMARY_KEYS[resource]
        names = ", ".join(f'"{name}"' for name, *_ in described)
        con.execute(
            f'delete from {RAW_DATASET}."{resource}" where "{key}" in (select "{key}" from incoming)'
        )
        con.execute(
            f'insert into {RAW_DATASET}."{resource}" ({names}) select {names} from incoming'
        )
        # what a delta build of the models reads as written since its last build
        con.execute(
            f"insert into {RAW_DATASET}.{WEBHOOK_MERGES_TABLE} "
            f'select ?, "{key}", now() from incoming',
            [resource],
        )
        con.unregister("incoming")
    con.execute(  # a month back is many builds back (a build reads the log since its last)
        f"delete from {RAW_DATASET}.{WEBHOOK_MERGES_TABLE} "
        f"where merged_at < now() - interval {WEBHOOK_MERGES_KEPT_DAYS} day"
    )
    con.execute("commit")
    return left


MERGE_BATCH = 2000
"""Deliveries read and merged at a time: a backlog of any size is merged in bounded memory
(each batch in one transaction, then marked merged; the newest state wins across batches as it
does across runs, by the event time against the row's `_synced_at`; the subscription and
dispute history keeps the state each batch left)."""


def merge_webhooks(
    config: AppConfig, batch_size: int = MERGE_BATCH, mark_later: bool = False
) -> WebhookMerge:
    """Merge every pending delivery of this warehouse, a batch at a time; each batch is marked
    merged once its transaction has committed, so a crash loses nothing and merges nothing twice
    (a batch merged but not yet marked is merged again next time, which changes nothing).

    The marking (a file-system call or two per delivery) runs in the background, overlapping the
    next batch's merge; `mark_later` returns before it has ended (the webhook-only run lets it
    overlap the models and the emit, and calls `wait_marked` before it ends)."""
    store = WebhookStore(store_folder(config.warehouse_path))
    result = WebhookMerge()
    seconds = {"read": 0.0, "merge": 0.0}
    batches = store.pending_batches(batch_size)
    started = time.monotonic()
    first = next(batches, None)
    if first is None:
        return result
    # one connection for every batch: a connection's open and close cost more than a batch
    marker = ThreadPoolExecutor(1, thread_name_prefix="mark-merged")
    try:
        with closing(_Merge(config.warehouse_path)) as merge:
            for deliveries in chain([first], batches):
                seconds["read"] += time.monotonic() - started
                result.deliveries += len(deliveries)
                t0 = time.monotonic()
                merge.batch(deliveries, result)
                seconds["merge"] += time.monotonic() - t0
                result.marking.append(marker.submit(store.mark_merged, deliveries))
                started = time.monotonic()
        result.marking.append(marker.submit(_purge, store))
    finally:
        marker.shutdown(wait=False)  # what was submitted still runs to its end
    log.info(
        "webhooks: merged %s from %d deliveries (%d older than the warehouse, %d superseded, "
        "%d of other kinds) in %.1fs (read %.1fs, merge %.1fs)",
        ", ".join(f"{n} {r}" for r, n in sorted(result.merged.items())) or "nothing",
        result.deliveries, result.older_than_warehouse, result.superseded, result.other_events,
        sum(seconds.values()), seconds["read"], seconds["merge"],
    )  # fmt: skip
    if not mark_later:
        result.wait_marked()
    return result


def _purge(store: WebhookStore) -> int:
    store.purge_old_markers()
    return 0


class _Merge:
    """The warehouse connection the batches of one merge share."""

    def __init__(self, warehouse_path: str) -> None:
        self.warehouse_path = warehouse_path
        self.con = warehouse.open_connection(warehouse_path)

    def close(self) -> None:
        """Close the connection (an uncommitted batch is rolled back)."""
        self.con.close()

    def batch(self, deliveries: list[StoredDelivery], result: WebhookMerge) -> None:
        """Merge one batch into the raw tables (one transaction); counts into `result`."""
        rejected: list[dict[str, Any]] = []
        newest = _newest_events(deliveries, result, rejected)
        customers = _customers_of(newest)
        if customers:
            newest["customers"] = customers
        tables = _tables(self.con, newest, result, rejected)
        result.rejected += store_rejected_on(self.con, rejected)
        if not tables:
            return
        # straight into DuckDB: a dlt pipeline run costs seconds, the latency this path is for
        new = _merge_into_warehouse(self.con, tables)
        if new:  # webhooks before the first sync created the table: dlt creates it
            self.con.close()  # dlt opens the file itself (a cursor on it, when the run holds it)
            pipeline = make_pipeline(self.warehouse_path)
            pipeline.sync_destination()
            pipeline.run(webhook_source(new), loader_file_format="parquet")
            self.con = warehouse.open_connection(self.warehouse_path)
        record_history_on(self.con)  # before the batch is marked merged, as its merge
        for resource, table in tables.items():
            result.merged[resource] = result.merged.get(resource, 0) + table.num_rows
