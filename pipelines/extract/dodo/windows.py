"""Walk a created_at range in windows small enough that no query reaches the server's paging cap."""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pipelines.dodo_contract import PRIMARY_KEYS
from pipelines.extract.dodo.client import DodoClient, WindowOverflow, format_timestamp

log = logging.getLogger(__name__)

MIN_WINDOW = timedelta(seconds=1)
READS_PER_WINDOW = 3
MAX_WINDOW = timedelta(days=366)
ONE_MICROSECOND = timedelta(microseconds=1)
PLANNED_FILL = 0.8
"""Share of the per-query row limit a planned window holds of the rows the warehouse knows: the
rest is room for rows that arrived or moved into the listing since."""


@dataclass
class Window:
    """One fully read created_at window [start, end] and its items."""

    start: datetime
    end: datetime
    items: list[dict[str, Any]]


def walk_windows(
    client: DodoClient,
    resource: str,
    start: datetime,
    end: datetime,
    filters: Mapping[str, Any] | None = None,
    first_window: timedelta | None = None,
    planned_ends: Sequence[datetime] = (),
) -> Iterator[Window]:
    """Yield consecutive windows covering [start, end] in created_at order, each read completely.

    Windows end at `planned_ends` (from `plan_window_ends`) while there are any; after them the
    size adapts to the density seen so far, aiming at half of the rows one query may page
    through. A window that overflows is split in half and read again, so no query ever pages
    past the per-query limit. The caller can commit progress after each yielded window.
    """
    filters = dict(filters or {})
    target_rows = max(1, client.settings.page_size * client.settings.max_pages_per_query // 2)
    size = first_window or (end - start + ONE_MICROSECOND)
    ends = sorted({e for e in planned_ends if start <= e <= end})
    split = False  # a planned window overflowed: adaptive windows until its planned end
    cursor = start
    while cursor <= end:
        limit = ends[0] if ends else end
        if ends and not split:
            window_end = limit
        else:
            window_end = min(limit, cursor + size - ONE_MICROSECOND)
        try:
            items = _read_window(client, resource, cursor, window_end, filters)
        except WindowOverflow:
            if window_end - cursor < MIN_WINDOW:
                # Over a page-cap's worth of rows created within one second: read what the
                # cap allows rather than loop forever; the lookback of later runs re-reads it.
                items = _read_window(client, resource, cursor, window_end, filters, True)
            else:
                size = max(MIN_WINDOW, (window_end - cursor) / 2)
                split = bool(ends)
                continue
        if ends and window_end == ends[0]:
            ends.pop(0)
            split = False
        yield Window(cursor, window_end, items)
        span = window_end - cursor + ONE_MICROSECOND
        if items:
            size = span * target_rows / len(items)
        else:
            size = span * 4
        size = min(max(size, MIN_WINDOW), MAX_WINDOW)
        cursor = window_end + ONE_MICROSECOND


def plan_window_ends(
    known: Sequence[datetime],
    start: datetime,
    end: datetime,
    client: DodoClient,
) -> list[datetime]:
    """Window ends for walking [start, end] when the warehouse already knows the rows there.

    `known` are the sorted created_at values the warehouse holds for the same listing. Each
    window holds PLANNED_FILL of a query's row limit, so no query overflows (an overflow wastes
    a whole query's pages), and one row short of whole pages: a window's last page is then
    nearly full, so many windows cost hardly more requests than one query could. The last
    window runs to `end` unless the rows expected after the newest known one (at the density of
    the known ones) would not fit; then it ends there and the walk adapts after it. No known
    rows: no plan (the walk adapts from the start).
    """
    lo, hi = bisect.bisect_left(known, start), bisect.bisect_right(known, end)
    rows = hi - lo
    if rows == 0:
        return []
    page = client.settings.page_size
    whole_pages = max(1, int(client.settings.max_pages_per_query * PLANNED_FILL))
    per_window = max(1, whole_pages * page - 1)
    # rows created at the same instant as the first of the next window go with it
    ends = [known[i] - ONE_MICROSECOND for i in range(lo + per_window, hi, per_window)]
    newest = known[hi - 1]
    last_start = ends[-1] + ONE_MICROSECOND if ends else start
    last_rows = hi - bisect.bisect_left(known, last_start)
    span = (newest - last_start).total_seconds()
    expected = last_rows / span * (end - newest).total_seconds() if span > 0 else 0.0
    ends.append(newest if last_rows + expected > per_window else end)
    return sorted({e for e in ends if start <= e <= end})


def _read_window(
    client: DodoClient,
    resource: str,
    start: datetime,
    end: datetime,
    filters: Mapping[str, Any],
    allow_overflow: bool = False,
) -> list[dict[str, Any]]:
    """Every item of one window; read again when rows moved while paging.

    Offset paging has no snapshot: a row inserted, deleted or re-sorted during the walk shifts
    the pages, which shows as an id repeated across pages, and then another item was pushed
    off a page unseen. Such a window is read again (up to READS_PER_WINDOW times) and the reads
    are united by primary key.
    """
    query = {
        **filters,
        "created_at_gte": format_timestamp(start),
        "created_at_lte": format_timestamp(end),
    }
    key = PRIMARY_KEYS[resource]
    union: dict[str, dict[str, Any]] = {}
    keyless: list[dict[str, Any]] = []
    for _ in range(READS_PER_WINDOW):
        seen: set[Any] = set()
        shifted = False
        keyless = []
        for page in client.list_query(resource, query, allow_overflow=allow_overflow):
            for item in page:
                item_key = item.get(key) if isinstance(item, dict) else None
                if not isinstance(item_key, str):
                    keyless.append(item)  # set aside later, with a reason
                    continue
                shifted |= item_key in seen
                seen.add(item_key)
                union[item_key] = item
        if not shifted:
            break
        log.info("%s: rows moved while paging a window; reading it again", resource)
    return [*union.values(), *keyless]
