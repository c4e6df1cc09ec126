"""dlt source for the Dodo Payments API: one resource per list endpoint, incremental on created_at."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import dlt
import pyarrow as pa
from dlt.extract.resource import DltResource

from pipelines.dodo.client import DodoClient, WindowOverflow, format_timestamp
from pipelines.dodo.records import dlt_column_hints, to_arrow
from pipelines.dodo.windows import ONE_MICROSECOND, Window, walk_windows
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
    rows_per_batch: int = 50_000
    """Rows accumulated into one Arrow table before it is handed to dlt (fewer, larger writes)."""
    prefetch_windows: int = 4
    """Windows a resource's reader thread may read ahead of what dlt has consumed."""
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


@dataclass
class _ReadWindow:
    """A window read (and converted) by a resource's reader thread."""

    window: Window
    items: int
    table: pa.Table | None
    rejected: list[dict[str, Any]]
    keys: set[Any] | None = None


_DONE = object()


class _Reader:
    """Runs an iterator in its own thread, at most `depth` items ahead of the consumer.

    The HTTP wait and the JSON/Arrow conversion of the next windows overlap with dlt writing the
    previous ones, and the resources of one load read concurrently (each has its own thread;
    dlt's round-robin pulls from all of them). Items still arrive strictly in order, so the
    caller commits its cursor exactly as before. The thread starts at once; `close()` (or the
    end of iteration) stops it.
    """

    def __init__(self, name: str, produce: Iterator[Any], depth: int) -> None:
        self._slots: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._produce = produce
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._produce:
                if not self._put(item):
                    return
            self._put(_DONE)
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(exc)

    def __iter__(self) -> Iterator[Any]:
        try:
            while True:
                item = self._slots.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def close(self) -> None:
        """Stop the thread (it finishes the request in flight)."""
        self._stop.set()
        self._thread.join(timeout=5)


def _read_windows(
    resource: str,
    plan: ExtractPlan,
    start: datetime,
    end: datetime,
    filters: dict[str, Any] | None = None,
    first: timedelta | None = None,
    row_budget: int | None = None,
) -> Iterator[_ReadWindow]:
    """walk_windows + to_arrow; stops by itself at the load's row budget (the rule the caller
    applies too), so a reader running ahead never reads a page twice across loads."""
    rows = 0
    for window in walk_windows(plan.client, resource, start, end, filters, first_window=first):
        table, rejected = to_arrow(resource, window.items, plan.run_started_at)
        count = len(window.items)
        rows += count
        keys = None
        if filters:  # the non-terminal re-read needs the keys it saw
            key = PRIMARY_KEYS[resource]
            keys = {i.get(key) for i in window.items if isinstance(i, dict)}
        window.items = []  # the Arrow table holds them now
        yield _ReadWindow(window, count, table, rejected, keys)
        if row_budget is not None and rows >= row_budget and window.end < end:
            return


def _batched(tables: list[pa.Table]) -> pa.Table:
    if len(tables) == 1:
        return tables[0]
    return pa.concat_tables(tables, promote_options="default")


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
    pending: list[pa.Table] = []
    pending_rows = 0
    non_terminal = None
    re_read = resource in NON_TERMINAL_STATUSES and start > plan.backfill_start
    if re_read and not state.get("more"):
        # an incremental run: the re-reads do not depend on the lookback walk, read them now
        # (a resumed backfill may stop at its row budget again: it re-reads at its end)
        non_terminal = _NonTerminalRows(resource, plan, before=start)
    windows = _read_windows(
        resource,
        plan,
        start,
        end,
        first=first or timedelta(days=7),
        row_budget=plan.rows_per_load,
    )
    reads = _Reader(f"dodo-{resource}", windows, plan.prefetch_windows)
    try:
        for read in reads:
            window = read.window
            plan.rejected.extend(read.rejected)
            if read.table is not None:
                pending.append(read.table)
                pending_rows += read.table.num_rows
            if pending_rows >= plan.rows_per_batch:
                yield _batched(pending)
                pending, pending_rows = [], 0
            rows += read.items
            if cursor is None or window.end > cursor:
                state["cursor"] = window.end.isoformat()
            state["window_seconds"] = (window.end - window.start).total_seconds()
            if rows >= plan.rows_per_load and window.end < end:
                # Commit this load and let the extract step start another one (resumable backfill).
                if pending:
                    yield _batched(pending)
                state["sweep_in_progress"] = sweeping
                state["more"] = True
                return
        if pending:
            yield _batched(pending)
        state["more"] = False
        state["sweep_in_progress"] = False
        if sweeping:
            state["last_full_sweep_at"] = plan.run_started_at.isoformat()
        if re_read:
            non_terminal = non_terminal or _NonTerminalRows(resource, plan, before=start)
            yield from non_terminal.rows()
    finally:  # an error or an early end must not leave the reader threads running
        reads.close()
        if non_terminal is not None:
            non_terminal.close()


class _NonTerminalRows:
    """Re-reads of objects created before the lookback window that can still change status:
    one reader thread per status, started at once (they run while the lookback walk runs)."""

    def __init__(self, resource: str, plan: ExtractPlan, before: datetime) -> None:
        self.resource, self.plan, self.before = resource, plan, before
        stop = before - ONE_MICROSECOND
        self._readers = [
            _Reader(
                f"dodo-{resource}-{status}",
                _read_windows(
                    resource,
                    plan,
                    plan.backfill_start,
                    stop,
                    {STATUS_FILTER_PARAMS[resource]: status},
                ),
                plan.prefetch_windows,
            )  # fmt: skip
            for status in NON_TERMINAL_STATUSES[resource]
        ]

    def close(self) -> None:
        """Stop the readers (the load ends before this resource's re-reads)."""
        for reader in self._readers:
            reader.close()

    def rows(self) -> Iterator[Any]:
        """The re-read rows, status by status, then the objects that left every listing."""
        resource, plan, before = self.resource, self.plan, self.before
        seen: set[str] = set()
        for reader in self._readers:
            for read in reader:
                seen.update(read.keys or ())
                plan.rejected.extend(read.rejected)
                if read.table is not None:
                    yield read.table
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
