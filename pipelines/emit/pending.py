"""What the next run would send, counted by the emitter's own rules without writing anything."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

import duckdb

from pipelines.emit.ledger import (
    count_tracks,
    is_first_sync,
    iter_identify_rows,
    list_tables,
    rejected_identify_ids,
)
from pipelines.emit.messages import Rejects, identify_messages


def pending_counts(
    con: duckdb.DuckDBPyConnection, excluded_fields: Sequence[str] = ()
) -> dict[str, int | None]:
    """What the next run would send now, by the emitter's own rules; reads only, never writes.

    `tracks`: outbox events neither in the ledger nor rejected (on a first sync the outbox is
    backlog, recorded as skipped rather than sent, so 0); `identifies`: customers whose traits,
    as they would be sent, differ from the ones Segment last received; `skipped_backlog`:
    events recorded as skipped (sent only with --events-since); `rejected_total`. A figure is
    None when the table it needs does not exist yet.
    """
    tables = list_tables(con)
    synced = {
        ("segment_sync", t) for t in ("delivered_events", "identify_state", "rejected_messages")
    }
    has_state = synced <= tables
    counts: dict[str, int | None] = dict.fromkeys(
        ("tracks", "identifies", "skipped_backlog", "rejected_total")
    )
    cur = con.cursor()
    if has_state:
        counts["rejected_total"] = cur.execute(
            "SELECT count(*) FROM segment_sync.rejected_messages"
        ).fetchone()[0]
        counts["skipped_backlog"] = cur.execute(
            "SELECT count(*) FROM segment_sync.delivered_events WHERE status = 'skipped'"
        ).fetchone()[0]
    first = not has_state or is_first_sync(con)
    if ("analytics", "track_outbox") in tables:
        counts["tracks"] = 0 if first else count_tracks(con, None)
    if ("analytics", "identify_outbox") in tables:
        if has_state:
            rows: Iterator[tuple[Any, ...]] = iter_identify_rows(con, with_group=True)
            rejected_before = rejected_identify_ids(con)
        else:
            cur.execute(
                "SELECT user_id, traits::VARCHAR, NULL FROM analytics.identify_outbox "
                "WHERE user_id IS NOT NULL"
            )
            rows, rejected_before = iter(cur.fetchall()), set()
        messages = identify_messages(
            rows,
            tuple(excluded_fields),
            Rejects(),
            datetime.now(),
            rejected_before=rejected_before,
        )
        counts["identifies"] = sum(1 for _ in messages)
    return counts


def pending_identify_ids(
    con: duckdb.DuckDBPyConnection, excluded_fields: Sequence[str] = ()
) -> list[str]:
    """Customers the next run would identify, in outbox order (needs `segment_sync` to exist)."""
    messages = identify_messages(
        iter_identify_rows(con, with_group=True),
        tuple(excluded_fields),
        Rejects(),
        datetime.now(),
        rejected_before=rejected_identify_ids(con),
    )
    return [message.call["user_id"] for message in messages]
