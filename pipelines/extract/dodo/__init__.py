"""dlt source for the Dodo Payments API: one resource per list endpoint, incremental on created_at."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, NamedTuple

import dlt
import pyarrow as pa
import pyarrow.compute as pc
from dlt.extract.items import DataItemWithMeta
from dlt.extract.resource import DltResource

from pipelines.dodo_contract import (
    NON_TERMINAL_STATUSES,
    PRIMARY_KEYS,
    RESOURCES,
    STATUS_FILTER_PARAMS,
)
from pipelines.extract.dodo.client import DodoClient, WindowOverflow, format_timestamp
from pipelines.extract.dodo.readers import Reader
from pipelines.extract.dodo.records import dlt_column_hints, fold_colliding_columns, to_arrow
from pipelines.extract.dodo.windows import ONE_MICROSECOND, Window, plan_window_ends, walk_windows
from pipelines.extract.forgotten import scrub_table

ItemFormat = Literal["arrow", "dicts"]
"""How pages reach dlt: typed Arrow tables (the job), or the same rows as Python dicts for dlt's
own normaliser (the baseline `make bench` compares the job against)."""


class OpenObject(NamedTuple):
    """An object the warehouse holds in a status that can still change."""

    key: str
    created_at: datetime
    status: str


@dataclass(frozen=True)
class KnownRows:
    """created_at of every row the warehouse holds for a resource from `since` on, sorted."""

    since: datetime
    created_at: list[datetime]


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
    item_format: ItemFormat = "arrow"
    """Arrow for the job; "dicts" only for the benchmark's dlt-normaliser baselines."""
    prefetch_windows: int = 4
    """Windows a resource's reader thread may read ahead of what dlt has consumed."""
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    """Tells a backfill this run stopped at its row budget (its next load goes on right after the
    cursor) from one an earlier or crashed run left (that one re-reads its lookback)."""
    newest_loaded: dict[str, datetime] = field(default_factory=dict)
    """created_at of each raw table's newest row (absent: no rows), read before every load."""
    known_recent: dict[str, KnownRows] = field(default_factory=dict)
    """The warehouse's recent rows per resource: the lookback walk plans its windows on them."""
    known_non_terminal: dict[str, list[OpenObject]] = field(default_factory=dict)
    """Objects the warehouse holds in a non-terminal status."""
    rejected: list[dict[str, Any]] = field(default_factory=list)
    """Items set aside during extraction; the extract step stores them before loading."""
    forgotten: frozenset[str] = frozenset()
    """Customers recorded as forgotten: their personal fields are dropped before dlt sees a page."""
    deep: bool = False
    """This run is the deep pass: `lookback` is the whole lookback_days window."""
    cursors_at_start: dict[str, datetime] = field(default_factory=dict)
    """Each incremental resource's saved cursor when this run first read it (what a deep pass
    found is counted behind it)."""


def _parse(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _page_out(resource: str, items: list[dict[str, Any]], plan: ExtractPlan, **overrides: Any):
    table, rejected = to_arrow(resource, items, plan.run_started_at, overrides or None)
    if table is not None:
        yield scrub_table(resource, table, plan.forgotten)
    plan.rejected.extend(rejected)


@dataclass
class _ReadWindow:
    """A window read (and converted) by a resource's reader thread."""

    window: Window
    items: int
    table: pa.Table | None
    rejected: list[dict[str, Any]]
    keys: set[Any] | None = None
    in_range: bool = True
    """Every row's created_at lies inside the window (the API honoured the filter)."""


def _created_at_in(table: pa.Table | None, window: Window) -> bool:
    """Whether the API answered the window only with rows created inside it."""
    if table is None or table.num_rows == 0:
        return True
    bounds = pc.min_max(table["created_at"]).as_py()
    return window.start <= bounds["min"] and bounds["max"] <= window.end


def _read_windows(
    resource: str,
    plan: ExtractPlan,
    start: datetime,
    end: datetime,
    filters: dict[str, Any] | None = None,
    first: timedelta | None = None,
    row_budget: int | None = None,
    planned_ends: list[datetime] | None = None,
) -> Iterator[_ReadWindow]:
    """walk_windows + to_arrow; stops by itself at the load's row budget (the rule the caller
    applies too), so a reader running ahead never reads a page twice across loads."""
    rows = 0
    windows = walk_windows(
        plan.client, resource, start, end, filters, first, planned_ends=planned_ends or ()
    )
    for window in windows:
        table, rejected = to_arrow(resource, window.items, plan.run_started_at)
        if table is not None:
            table = scrub_table(resource, table, plan.forgotten)
        count = len(window.items)
        rows += count
        keys = None
        if filters:  # the non-terminal re-read needs the keys it saw
            key = PRIMARY_KEYS[resource]
            keys = {i.get(key) for i in window.items if isinstance(i, dict)}
        window.items = []  # the Arrow table holds them now
        yield _ReadWindow(window, count, table, rejected, keys, _created_at_in(table, window))
        if row_budget is not None and rows >= row_budget and window.end < end:
            return


def _batched(resource: str, tables: list[pa.Table]) -> pa.Table:
    if len(tables) == 1:
        return tables[0]
    return fold_colliding_columns(resource, pa.concat_tables(tables, promote_options="default"))


@dataclass(frozen=True)
class _ReadRange:
    """The created_at range one load of a resource walks, and what else it owes."""

    start: datetime
    cursor: datetime | None
    sweeping: bool
    continuing: bool
    """The next load of a walk this run stopped at its row budget: it goes on right after it."""
    reread_before: datetime
    """Open objects created before this are re-read by status (backfill_start: none are)."""


def _read_range(resource: str, plan: ExtractPlan, state: dict[str, Any]) -> _ReadRange:
    """Where this load of the resource starts, from its saved state and the plan."""
    cursor = _parse(state.get("cursor"))
    last_sweep = _parse(state.get("last_full_sweep_at"))
    sweep_age = plan.full_sweep_max_age.get(resource)
    sweeping = bool(state.get("sweep_in_progress"))
    stopped_at = _parse(state.get("stopped_at"))
    if state.get("more") and state.get("more_run") == plan.run_id and stopped_at is not None:
        before = _parse(state.get("reread_before")) or plan.backfill_start
        return _ReadRange(stopped_at + ONE_MICROSECOND, cursor, sweeping, True, before)
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
    return _ReadRange(start, cursor, sweeping, False, start)


def _planned_ends(resource: str, plan: ExtractPlan, reading: _ReadRange) -> list[datetime]:
    """Window ends for the lookback walk from the rows the warehouse already holds there."""
    known = plan.known_recent.get(resource)
    if reading.continuing or reading.cursor is None or known is None:
        return []
    if reading.start < known.since:  # the walk starts before what the plan knows
        return []
    return plan_window_ends(known.created_at, reading.start, plan.run_started_at, plan.client)


def _created_at_rows(resource: str, plan: ExtractPlan) -> Iterator[Any]:
    """Rows of an incremental resource: a backfill or the lookback window, then re-reads.

    Rows of a range the warehouse holds nothing of yet (a first sync, the next load of a
    backfill) are appended, which costs the load a fraction of a merge; they cannot repeat a
    key: windows are disjoint in created_at, each is united by key, and the warehouse's newest
    row is older than the range. A window answered with a row from outside it, or a load that
    re-reads older objects, turns the load back into a merge on the primary key.
    """
    state = dlt.current.resource_state()
    saved = _parse(state.get("cursor"))
    if saved is not None and not (state.get("more") and state.get("more_run") == plan.run_id):
        plan.cursors_at_start.setdefault(resource, saved)
    reading = _read_range(resource, plan, state)
    start, cursor, end = reading.start, reading.cursor, plan.run_started_at
    first = timedelta(seconds=state["window_seconds"]) if state.get("window_seconds") else None
    re_read = resource in NON_TERMINAL_STATUSES and reading.reread_before > plan.backfill_start
    newest = plan.newest_loaded.get(resource)
    appending = not re_read and (newest is None or newest < start)
    declared = "merge"  # the resource's write disposition

    def handed(table: pa.Table) -> Any:
        nonlocal declared
        wanted = "append" if appending else "merge"
        if wanted == declared:
            return table
        declared = wanted  # applies to every file of this table in the load package
        return dlt.mark.with_hints(table, dlt.mark.make_hints(write_disposition=wanted))

    rows = 0
    pending: list[pa.Table] = []
    pending_rows = 0
    non_terminal = None
    if re_read and not state.get("more"):
        # an incremental run: the re-reads do not depend on the lookback walk, read them now
        # (a resumed backfill may stop at its row budget again: it re-reads at its end)
        non_terminal = _NonTerminalRows(resource, plan, before=reading.reread_before)
    windows = _read_windows(
        resource,
        plan,
        start,
        end,
        first=first or timedelta(days=7),
        row_budget=plan.rows_per_load,
        planned_ends=_planned_ends(resource, plan, reading),
    )
    reads = Reader(f"dodo-{resource}", windows, plan.prefetch_windows)
    try:
        for read in reads:
            window = read.window
            appending = appending and read.in_range
            plan.rejected.extend(read.rejected)
            if read.table is not None:
                pending.append(read.table)
                pending_rows += read.table.num_rows
            if pending_rows >= plan.rows_per_batch:
                yield handed(_batched(resource, pending))
                pending, pending_rows = [], 0
            rows += read.items
            if cursor is None or window.end > cursor:
                state["cursor"] = window.end.isoformat()
            # the span of [start, end] inclusive: a walk of the same length next time is one
            # window, not one and a query for its last microsecond (short windows repeat it)
            state["window_seconds"] = (window.end - window.start + ONE_MICROSECOND).total_seconds()
            if rows >= plan.rows_per_load and window.end < end:
                # Commit this load and let the extract step start another one (resumable backfill).
                if pending:
                    yield handed(_batched(resource, pending))
                state["sweep_in_progress"] = reading.sweeping
                state["more"] = True
                # where the next load of this run goes on (the cursor stays the newest row
                # read, which a lookback walk stopped half-way has not reached yet)
                state["more_run"] = plan.run_id
                state["stopped_at"] = window.end.isoformat()
                state["reread_before"] = reading.reread_before.isoformat()
                return
        if pending:
            yield handed(_batched(resource, pending))
        state["more"] = False
        state["sweep_in_progress"] = False
        for key in ("more_run", "stopped_at", "reread_before"):
            state.pop(key, None)
        if reading.sweeping:
            state["last_full_sweep_at"] = plan.run_started_at.isoformat()
        if re_read:
            non_terminal = non_terminal or _NonTerminalRows(
                resource, plan, before=reading.reread_before
            )
            yield from non_terminal.rows()
    finally:  # an error or an early end must not leave the reader threads running
        reads.close()
        if non_terminal is not None:
            non_terminal.close()


class _NonTerminalRows:
    """Re-reads of objects created before the lookback window that can still change status:
    one reader thread per status, started at once (they run while the lookback walk runs).

    Each status is walked in windows planned on the warehouse's own open objects of that status,
    so no query overflows the per-query page limit (an overflow wastes its 50 pages)."""

    def __init__(self, resource: str, plan: ExtractPlan, before: datetime) -> None:
        self.resource, self.plan, self.before = resource, plan, before
        stop = before - ONE_MICROSECOND
        known: dict[str, list[datetime]] = {s: [] for s in NON_TERMINAL_STATUSES[resource]}
        for item in plan.known_non_terminal.get(resource, []):
            if item.created_at < before and item.status in known:
                known[item.status].append(item.created_at)
        self._readers = [
            Reader(
                f"dodo-{resource}-{status}",
                _read_windows(
                    resource,
                    plan,
                    plan.backfill_start,
                    stop,
                    {STATUS_FILTER_PARAMS[resource]: status},
                    planned_ends=plan_window_ends(
                        sorted(created), plan.backfill_start, stop, plan.client
                    ),
                ),
                plan.prefetch_windows,
            )  # fmt: skip
            for status, created in known.items()
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
        for object_id, created_at, _status in plan.known_non_terminal.get(resource, []):
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


def _as_dicts(rows: Iterator[Any]) -> Iterator[Any]:
    """The same rows as lists of Python dicts, hints kept: what dlt's Python normaliser takes."""
    for item in rows:
        if isinstance(item, DataItemWithMeta):
            yield DataItemWithMeta(item.meta, item.data.to_pylist())
        else:
            yield item.to_pylist()


def _resource(name: str, plan: ExtractPlan) -> DltResource:
    rows = _product_rows(plan) if name == "products" else _created_at_rows(name, plan)
    if plan.item_format == "dicts":
        rows = _as_dicts(rows)
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
    products and the balance ledger, as typed Arrow pages merged on their primary keys (or
    appended where the warehouse holds nothing of their range yet)."""
    return [_resource(name, plan) for name in resources]
