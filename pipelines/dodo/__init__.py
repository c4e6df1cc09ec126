"""dlt source for the Dodo Payments API: one resource per list endpoint, incremental on created_at."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import dlt
from dlt.extract.resource import DltResource

from pipelines.dodo.client import DodoClient, WindowOverflow, format_timestamp
from pipelines.dodo.records import dlt_column_hints, to_arrow
from pipelines.dodo.windows import ONE_MICROSECOND, walk_windows
from pipelines.settings import (
    NON_TERMINAL_STATUSES,
    PRIMARY_KEYS,
    RESOURCES,
    STATUS_FILTER_PARAMS,
)


@dataclass
class ExtractPlan:
    """What one load of the source reads, decided by the extract step before it starts."""

    client: DodoClient
    run_started_at: datetime
    backfill_start: datetime
    lookback: timedelta
    full_sweep_max_age: dict[str, timedelta]
    full_refresh: frozenset[str] = frozenset()
    rows_per_load: int = 250_000
    known_non_terminal: dict[str, list[tuple[str, datetime]]] = field(default_factory=dict)
    """Objects the warehouse holds in a non-terminal status: (primary key, created_at)."""
    rejected: list[dict[str, Any]] = field(default_factory=list)
    """Items set aside during extraction; the extract step stores them before loading."""


def _parse(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _page_out(resource: str, items: list[dict[str, Any]], plan: ExtractPlan, **overrides: Any):
    table, rejected = to_arrow(resource, items, plan.run_started_at, overrides or None)
    if table is not None:
        yield table
    plan.rejected.extend(rejected)


def _created_at_rows(resource: str, plan: ExtractPlan) -> Iterator[Any]:
    """Rows of an incremental resource: a backfill or the lookback window, then re-reads."""
    state = dlt.current.resource_state()
    cursor = _parse(state.get("cursor"))
    last_sweep = _parse(state.get("last_full_sweep_at"))
    sweep_age = plan.full_sweep_max_age.get(resource)
    sweeping = bool(state.get("sweep_in_progress"))
    if resource in plan.full_refresh and not sweeping:
        sweeping, cursor = True, None
    elif sweep_age is not None and not sweeping and cursor is not None:
        if last_sweep is None or plan.run_started_at - last_sweep >= sweep_age:
            sweeping, cursor = True, None
    if cursor is None:  # backfill or full sweep from the beginning of history
        start = plan.backfill_start
        sweeping = sweeping or sweep_age is not None
    else:
        start = cursor - plan.lookback if not sweeping else cursor
    end = plan.run_started_at
    first = timedelta(seconds=state["window_seconds"]) if state.get("window_seconds") else None
    rows = 0
    for window in walk_windows(
        plan.client, resource, start, end, first_window=first or timedelta(days=7)
    ):
        yield from _page_out(resource, window.items, plan)
        rows += len(window.items)
        if cursor is None or window.end > cursor:
            state["cursor"] = window.end.isoformat()
        state["window_seconds"] = (window.end - window.start).total_seconds()
        if rows >= plan.rows_per_load and window.end < end:
            # Commit this load and let the extract step start another one (resumable backfill).
            state["sweep_in_progress"] = sweeping
            state["more"] = True
            return
    state["more"] = False
    state["sweep_in_progress"] = False
    if sweeping:
        state["last_full_sweep_at"] = plan.run_started_at.isoformat()
    if resource in NON_TERMINAL_STATUSES and start > plan.backfill_start:
        yield from _non_terminal_rows(resource, plan, before=start)


def _non_terminal_rows(resource: str, plan: ExtractPlan, before: datetime) -> Iterator[Any]:
    """Re-read objects created before the lookback window that can still change status."""
    seen: set[str] = set()
    key = PRIMARY_KEYS[resource]
    stop = before - ONE_MICROSECOND
    for status in NON_TERMINAL_STATUSES[resource]:
        filters = {STATUS_FILTER_PARAMS[resource]: status}
        for window in walk_windows(plan.client, resource, plan.backfill_start, stop, filters):
            seen.update(i.get(key) for i in window.items if isinstance(i, dict))
            yield from _page_out(resource, window.items, plan)
    # What the warehouse holds as non-terminal but no status listing returned has moved on
    # (e.g. processing -> succeeded): read it again at its exact creation time.
    for object_id, created_at in plan.known_non_terminal.get(resource, []):
        if object_id in seen or created_at >= before:
            continue
        stamp = format_timestamp(created_at)
        items: list[dict[str, Any]] = []
        try:
            for page in plan.client.list_query(
                resource, {"created_at_gte": stamp, "created_at_lte": stamp}
            ):
                items.extend(page)
        except WindowOverflow:
            pass
        yield from _page_out(resource, items, plan)


def _product_rows(plan: ExtractPlan) -> Iterator[Any]:
    """Every product, archived ones included (products are few: a full sweep each run)."""
    for archived in (False, True):
        filters = {"archived": "true" if archived else "false"}
        for page in plan.client.list_query("products", filters):
            yield from _page_out("products", page, plan, is_archived=archived)


def _resource(name: str, plan: ExtractPlan) -> DltResource:
    rows = _product_rows(plan) if name == "products" else _created_at_rows(name, plan)
    return dlt.resource(
        rows,
        name=name,
        primary_key=PRIMARY_KEYS[name],
        write_disposition="merge",
        columns=dlt_column_hints(name),
    )


@dlt.source(name="dodo", max_table_nesting=0)
def dodo_source(plan: ExtractPlan, resources: tuple[str, ...] = RESOURCES) -> list[DltResource]:
    """The Dodo Payments source: payments, subscriptions, customers, refunds, disputes,
    products and the balance ledger, as typed Arrow pages merged on their primary keys."""
    return [_resource(name, plan) for name in resources]
