"""Walk a created_at range in windows small enough that no query reaches the server's paging cap."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pipelines.dodo.client import DodoClient, WindowOverflow, format_timestamp
from pipelines.settings import PRIMARY_KEYS

log = logging.getLogger(__name__)

MIN_WINDOW = timedelta(seconds=1)
READS_PER_WINDOW = 3
MAX_WINDOW = timedelta(days=366)
ONE_MICROSECOND = timedelta(microseconds=1)


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
) -> Iterator[Window]:
    """Yield consecutive windows covering [start, end] in created_at order, each read completely.

    The window size adapts to the density seen so far, aiming at half of the rows one query may
    page through; a window that overflows is split in half and read again, so no query ever
    pages past the per-query limit. The caller can commit progress after each yielded window.
    """
    filters = dict(filters or {})
    target_rows = max(1, client.settings.page_size * client.settings.max_pages_per_query // 2)
    size = first_window or (end - start + ONE_MICROSECOND)
    cursor = start
    while cursor <= end:
        window_end = min(end, cursor + size - ONE_MICROSECOND)
        try:
            items = _read_window(client, resource, cursor, window_end, filters)
        except WindowOverflow:
            if window_end - cursor < MIN_WINDOW:
                # Over a page-cap's worth of rows created within one second: read what the
                # cap allows rather than loop forever; the lookback of later runs re-reads it.
                items = _read_window(client, resource, cursor, window_end, filters, True)
            else:
                size = max(MIN_WINDOW, (window_end - cursor) / 2)
                continue
        yield Window(cursor, window_end, items)
        span = window_end - cursor + ONE_MICROSECOND
        if items:
            size = span * target_rows / len(items)
        else:
            size = span * 4
        size = min(max(size, MIN_WINDOW), MAX_WINDOW)
        cursor = window_end + ONE_MICROSECOND


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
