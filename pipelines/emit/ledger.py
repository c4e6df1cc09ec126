"""The emitter's state in the warehouse (`segment_sync`): delivery ledger, identify hashes, rejects."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

import duckdb
import pyarrow as pa

_SCHEMA = (
    "CREATE SCHEMA IF NOT EXISTS segment_sync",
    """CREATE TABLE IF NOT EXISTS segment_sync.delivered_events (
        event_id VARCHAR PRIMARY KEY,
        run_id VARCHAR NOT NULL,
        status VARCHAR NOT NULL CHECK (status IN ('delivered', 'skipped')),
        delivered_at TIMESTAMPTZ NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS segment_sync.identify_state (
        user_id VARCHAR PRIMARY KEY,
        traits_hash VARCHAR NOT NULL,
        sent_at TIMESTAMPTZ NOT NULL,
        run_id VARCHAR NOT NULL,
        outbox_hash VARCHAR
    )""",
    """CREATE TABLE IF NOT EXISTS segment_sync.tracks_in_flight (
        event_id VARCHAR PRIMARY KEY,
        call VARCHAR NOT NULL,
        run_id VARCHAR NOT NULL,
        journaled_at TIMESTAMPTZ NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS segment_sync.rejected_messages (
        message_id VARCHAR,
        kind VARCHAR NOT NULL,
        user_id VARCHAR,
        reason VARCHAR NOT NULL,
        payload JSON,
        rejected_at TIMESTAMPTZ NOT NULL,
        run_id VARCHAR NOT NULL
    )""",
)

# Tracks a normal run sends: never delivered nor rejected, plus (with events_since) skipped
# backlog from that date. Parameters: since, since.
_RUN_TRACKS = """
    FROM analytics.track_outbox o
    LEFT JOIN segment_sync.delivered_events d ON d.event_id = o.event_id
    WHERE o.event_id IS NOT NULL
      AND (d.event_id IS NULL
           OR (d.status = 'skipped' AND $since::TIMESTAMPTZ IS NOT NULL AND o.occurred_at >= $since))
      AND NOT EXISTS (SELECT 1 FROM segment_sync.rejected_messages r
                      WHERE r.kind = 'track' AND r.message_id = o.event_id)
"""
# Tracks a resend sends: everything from `since` (optionally one event name), whatever its state.
_RESEND_TRACKS = """
    FROM analytics.track_outbox o
    WHERE o.event_id IS NOT NULL AND o.occurred_at >= $since
      AND ($event::VARCHAR IS NULL OR o.event = $event)
"""
_TRACK_COLUMNS = (
    "SELECT o.event_id, o.user_id, o.event, epoch_us(o.occurred_at), o.properties::VARCHAR"
)
TRACK_CONTEXT_COLUMNS = ("customer_id", "group_id", "plan", "product_id")
"""Columns of track_outbox added to each track when present: the property dodo_customer_id,
context.groupId, and the plan/product_id properties (an outbox without them sends without)."""


def outbox_columns(con: duckdb.DuckDBPyConnection, table: str) -> set[str]:
    """The column names of `analytics.<table>` (empty when it does not exist)."""
    rows = (
        con.cursor()
        .execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = 'analytics' AND table_name = ?",
            [table],
        )
        .fetchall()
    )
    return {r[0] for r in rows}


def _track_select(con: duckdb.DuckDBPyConnection) -> str:
    present = outbox_columns(con, "track_outbox")
    extra = ", ".join(
        f"o.{name}::VARCHAR" if name in present else "NULL" for name in TRACK_CONTEXT_COLUMNS
    )
    return f"{_TRACK_COLUMNS}, {extra}"


def ensure_sync_schema(con: duckdb.DuckDBPyConnection) -> None:
    """Create the `segment_sync` tables the emitter owns (not `runs`, which the CLI owns)."""
    cur = con.cursor()
    for statement in _SCHEMA:
        cur.execute(statement)


def is_first_sync(con: duckdb.DuckDBPyConnection) -> bool:
    """True when nothing was ever recorded: no ledger row (delivered or skipped), no identify."""
    row = (
        con.cursor()
        .execute(
            """SELECT NOT EXISTS (SELECT 1 FROM segment_sync.delivered_events)
              AND NOT EXISTS (SELECT 1 FROM segment_sync.identify_state)"""
        )
        .fetchone()
    )
    return bool(row and row[0])


def record_skipped_backlog(
    con: duckdb.DuckDBPyConnection, run_id: str, before: datetime | None
) -> int:
    """Record the outbox backlog (all of it, or what occurred before `before`) as skipped."""
    cur = con.cursor()
    cur.execute(
        """INSERT INTO segment_sync.delivered_events
           SELECT DISTINCT o.event_id, $run_id, 'skipped', current_timestamp
           FROM analytics.track_outbox o
           WHERE o.event_id IS NOT NULL
             AND ($before::TIMESTAMPTZ IS NULL OR o.occurred_at < $before)
           ON CONFLICT DO NOTHING""",
        {"run_id": run_id, "before": before},
    )
    row = cur.fetchone()
    return int(row[0]) if row else 0


def count_tracks(
    con: duckdb.DuckDBPyConnection,
    since: datetime | None,
    resend_event: str | None = None,
    resend: bool = False,
) -> int:
    """How many tracks a run (or a resend) would send."""
    if resend:
        sql, params = "SELECT count(*)" + _RESEND_TRACKS, {"since": since, "event": resend_event}
    else:
        sql, params = "SELECT count(*)" + _RUN_TRACKS, {"since": since}
    row = con.cursor().execute(sql, params).fetchone()
    return int(row[0]) if row else 0


PENDING_TRACKS = "emit_pending_tracks"
"""Temp table (event_id) of the tracks a run sends, on `iter_tracks`'s own cursor."""
_PENDING_ROWS = f"""
    FROM analytics.track_outbox o
    WHERE o.event_id IN (SELECT event_id FROM {PENDING_TRACKS})
    ORDER BY o.occurred_at, o.event_id
"""


SCOPED_TRACKS = "emit_scoped_tracks"
"""Temp table of the scope's track outbox rows (every column, and `_emit_pending`), on the cursor
`scoped_tracks` returns: read once, the outbox's whole rows of a few customers are small."""
SCOPE_CUSTOMERS = "emit_scope_customers"
"""Session variable of that cursor: the customers whose track outbox rows are read (a constant
list the outbox's scan filters on before it joins anything)."""
_IN_SCOPE = f"list_contains(getvariable('{SCOPE_CUSTOMERS}'), o.customer_id)"
FEW_SCOPE_EVENTS = 2000
"""Up to this many changed tracks, their ledger rows are found by a constant list of ids."""


def scoped_tracks(
    con: duckdb.DuckDBPyConnection, customer_ids: Sequence[str], table: str | None = None
) -> tuple[duckdb.DuckDBPyConnection, int, datetime | None]:
    """The track outbox rows of these customers only (`SCOPED_TRACKS`, on a cursor of its own
    for `iter_tracks(scoped=...)`), read from `table` when the models step kept exactly those
    rows there, else from the outbox: the cursor, how many a run sends (as `count_tracks`
    without `since` counts them) and the latest time of any of their rows."""
    cur = con.cursor()
    cur.execute(f"SET VARIABLE {SCOPE_CUSTOMERS} = ?::VARCHAR[]", [list(customer_ids)])
    if table is None:
        rows = f"SELECT * FROM analytics.track_outbox o WHERE {_IN_SCOPE}"
    else:
        rows = f"SELECT * FROM {table}"
    cur.execute(f"CREATE OR REPLACE TEMP TABLE emit_scope_rows AS {rows}")
    count = cur.execute("SELECT count(*) FROM emit_scope_rows").fetchone()
    # Their ledger rows: by a constant list of the ids when they are few (the scan skips the
    # other ids before it hashes anything); a join when they are many (a constant list's
    # look-up costs more per row as it grows).
    few = "list_contains(getvariable('emit_scope_events'), {})"
    many = "{} IN (SELECT event_id FROM emit_scope_rows)"
    match = few if count and count[0] <= FEW_SCOPE_EVENTS else many
    cur.execute(
        "SET VARIABLE emit_scope_events = (SELECT coalesce(list(event_id), []::VARCHAR[]) "
        "FROM emit_scope_rows WHERE event_id IS NOT NULL)"
    )
    cur.execute(
        f"""CREATE OR REPLACE TEMP TABLE {SCOPED_TRACKS} AS
        WITH settled AS (
            SELECT event_id FROM segment_sync.delivered_events
            WHERE {match.format("event_id")}
            UNION ALL
            SELECT message_id FROM segment_sync.rejected_messages
            WHERE kind = 'track' AND {match.format("message_id")}
        )
        SELECT o.*, NOT EXISTS (SELECT 1 FROM settled s WHERE s.event_id = o.event_id)
            AS _emit_pending
        FROM emit_scope_rows o
        WHERE o.event_id IS NOT NULL"""
    )
    row = cur.execute(
        f"SELECT count(*) FILTER (WHERE _emit_pending), max(occurred_at) FROM {SCOPED_TRACKS}"
    ).fetchone()
    return cur, int(row[0]) if row else 0, row[1] if row else None


def iter_tracks(
    con: duckdb.DuckDBPyConnection,
    since: datetime | None,
    resend_event: str | None = None,
    resend: bool = False,
    chunk: int = 5000,
    scoped: duckdb.DuckDBPyConnection | None = None,
) -> Iterator[tuple[Any, ...]]:
    """Stream (event_id, user_id, event, occurred_at_us, properties_json, customer_id,
    group_id, plan, product_id) rows, oldest first.

    Runs on its own cursor so ledger writes on other cursors do not discard the result. A run
    finds the event ids to send first (`PENDING_TRACKS`, a temp table of that cursor), then
    reads only their rows: the ledger joined to the outbox's whole rows had DuckDB hash every
    outbox row with its properties (1.3M rows, ~900 MB at 1M payments), past the 1 GB
    memory_limit, whatever few were to be sent. `scoped`: the cursor of `scoped_tracks`, whose
    pending rows are read.
    """
    cur = con.cursor() if scoped is None else scoped
    if scoped is not None:
        sql = (
            f"{_track_select(con)} FROM {SCOPED_TRACKS} o "
            "WHERE o._emit_pending ORDER BY o.occurred_at, o.event_id"
        )
        params: dict[str, Any] = {}
    elif resend:
        sql = _track_select(con) + _RESEND_TRACKS + " ORDER BY o.occurred_at, o.event_id"
        params = {"since": since, "event": resend_event}
    else:
        cur.execute(
            f"CREATE OR REPLACE TEMP TABLE {PENDING_TRACKS} AS SELECT o.event_id{_RUN_TRACKS}",
            {"since": since},
        )
        sql = _track_select(con) + _PENDING_ROWS
        params = {}
    cur.execute(sql, params)
    while rows := cur.fetchmany(chunk):
        yield from rows


def outbox_hash(
    traits_json: str | None, excluded: Sequence[str], group_id: str | None = None
) -> str:
    """md5 of an identify_outbox row's traits text, its group and the excluded fields: equal to
    the SQL `md5(traits::VARCHAR || group || <key>)` below, so unchanged users are skipped in SQL.
    Without a group it is the hash of the releases before groups existed."""
    group = "" if group_id is None else "\x1e" + group_id
    return hashlib.md5(
        ((traits_json or "") + group + _exclusion_key(excluded)).encode()
    ).hexdigest()


def _exclusion_key(excluded: Sequence[str]) -> str:
    return "\x1f" + ",".join(sorted(excluded))


def iter_identify_rows(
    con: duckdb.DuckDBPyConnection,
    customer_ids: Sequence[str] | None = None,
    chunk: int = 5000,
    skip_unchanged_for: Sequence[str] | None = None,
    with_group: bool = False,
    only_users: Sequence[str] | None = None,
) -> Iterator[tuple[Any, ...]]:
    """Stream (user_id, traits_json, last_sent_hash) for every (or the named) user, and the
    user's group_id (context.groupId) as a fourth item `with_group`.

    With `skip_unchanged_for` (the excluded fields of this run), customers whose outbox traits
    are exactly the ones Segment last acknowledged under the same exclusions are left out: they
    would be skipped anyway, and a no-change run then reads no customer at all. `only_users`:
    only these user ids' rows (the others are known to be settled).
    """
    params: dict[str, Any] = {"ids": list(customer_ids) if customer_ids is not None else None}
    group_id = ""
    if with_group:
        present = "group_id" in outbox_columns(con, "identify_outbox")
        group_id = ", o.group_id" if present else ", NULL"
    changed_only = ""  # the column exists from warehouse version 2: only the emitter asks
    if skip_unchanged_for is not None:
        group = "|| coalesce(chr(30) || o.group_id, '')" if group_id == ", o.group_id" else ""
        changed_only = (
            "AND s.outbox_hash IS DISTINCT FROM "
            f"md5(coalesce(o.traits::VARCHAR, '') {group} || $key)"
        )
        params["key"] = _exclusion_key(skip_unchanged_for)
    if only_users is not None:  # a semi-join: the list may hold thousands of ids
        changed_only += " AND o.user_id IN (SELECT unnest($only::VARCHAR[]))"
        params["only"] = list(only_users)
    cur = con.cursor()
    cur.execute(
        f"""SELECT o.user_id, o.traits::VARCHAR, s.traits_hash{group_id}
           FROM analytics.identify_outbox o
           LEFT JOIN segment_sync.identify_state s ON s.user_id = o.user_id
           WHERE o.user_id IS NOT NULL
             AND ($ids::VARCHAR[] IS NULL OR list_contains($ids::VARCHAR[], o.user_id))
             {changed_only}
           ORDER BY o.user_id""",
        params,
    )
    while rows := cur.fetchmany(chunk):
        yield from rows


def rejected_identify_ids(con: duckdb.DuckDBPyConnection) -> set[str]:
    """messageIds of identifies rejected before (the same traits are not retried automatically)."""
    rows = (
        con.cursor()
        .execute(
            "SELECT message_id FROM segment_sync.rejected_messages WHERE kind IN ('identify', 'group')"
        )
        .fetchall()
    )
    return {r[0] for r in rows if r[0] is not None}


def journal_tracks(
    con: duckdb.DuckDBPyConnection,
    run_id: str,
    calls: Sequence[tuple[str, str]],
    look_up: bool = True,
) -> dict[str, str]:
    """Write down tracks before the client gets them: (event_id, call as JSON). A track already
    written down was handed out by an earlier run that stopped before its ledger write (Segment
    may hold it): that first call is kept and, `look_up`, returned ({event_id: call_json}) to go
    out again as it went then."""
    if not calls:
        return {}
    batch = pa.table(
        {
            "event_id": pa.array([c[0] for c in calls], pa.string()),
            "call": pa.array([c[1] for c in calls], pa.string()),
        }
    )
    cur = con.cursor()
    cur.register("journal_batch", batch)
    try:
        earlier = []
        if look_up:
            earlier = cur.execute(
                """SELECT j.event_id, j.call FROM segment_sync.tracks_in_flight j
                   WHERE j.event_id IN (SELECT event_id FROM journal_batch)"""
            ).fetchall()
        cur.execute(
            """INSERT INTO segment_sync.tracks_in_flight
               SELECT event_id, call, $run_id, current_timestamp FROM journal_batch
               ON CONFLICT DO NOTHING""",
            {"run_id": run_id},
        )
    finally:
        cur.unregister("journal_batch")
    return dict(earlier)


def prune_journal(con: duckdb.DuckDBPyConnection) -> int:
    """Drop written-down tracks that no run will send again: delivered (a run stopped between
    its two writes), or gone from the outbox. Reads the outbox only when any are there; returns
    how many are left to send again."""
    cur = con.cursor()
    count = "SELECT count(*) FROM segment_sync.tracks_in_flight"
    left = cur.execute(count).fetchone()
    if not left or not left[0]:
        return 0
    cur.execute(
        """DELETE FROM segment_sync.tracks_in_flight j
           WHERE j.event_id IN (SELECT event_id FROM segment_sync.delivered_events
                                WHERE status = 'delivered')
              OR j.event_id NOT IN (SELECT event_id FROM analytics.track_outbox
                                    WHERE event_id IS NOT NULL)"""
    )
    left = cur.execute(count).fetchone()
    return int(left[0]) if left else 0


def mark_delivered(con: duckdb.DuckDBPyConnection, run_id: str, event_ids: Sequence[str]) -> None:
    """Record tracks Segment accepted (skipped rows become delivered) and drop them from the
    tracks in flight, in one transaction."""
    if not event_ids:
        return
    batch = pa.table({"event_id": list(dict.fromkeys(event_ids))})
    _insert_from(
        con,
        "delivered_batch",
        batch,
        # OR REPLACE (every column of a skipped row is replaced): half the cost of
        # ON CONFLICT DO UPDATE when the rows exist, as in a backfill of the skipped history.
        """INSERT OR REPLACE INTO segment_sync.delivered_events
           SELECT event_id, $run_id, 'delivered', current_timestamp FROM delivered_batch""",
        {"run_id": run_id},
        """DELETE FROM segment_sync.tracks_in_flight
           WHERE event_id IN (SELECT event_id FROM delivered_batch)""",
    )


def save_identify_state(
    con: duckdb.DuckDBPyConnection, run_id: str, sent: Sequence[tuple[str, str, str | None]]
) -> None:
    """Record what Segment accepted, per customer: (user_id, traits_hash of the traits as sent,
    outbox_hash of the outbox row they came from)."""
    if not sent:
        return
    latest = {user_id: (traits, outbox) for user_id, traits, outbox in sent}
    batch = pa.table(
        {
            "user_id": list(latest),
            "traits_hash": [traits for traits, _ in latest.values()],
            "outbox_hash": pa.array([outbox for _, outbox in latest.values()], pa.string()),
            "run_id": [run_id] * len(latest),
        }
    )
    # Replaced rows are deleted and inserted again in one transaction, not updated: DuckDB
    # writes an updated column's whole segment again at the next checkpoint (~0.2 s for 13
    # users of 100,000 on the 2-core box; deleted and appended rows: ~0.03 s).
    _insert_from(
        con,
        "identify_batch",
        batch,
        """DELETE FROM segment_sync.identify_state
           WHERE user_id IN (SELECT user_id FROM identify_batch)""",
        {},
        """INSERT INTO segment_sync.identify_state
               (user_id, traits_hash, sent_at, run_id, outbox_hash)
           SELECT user_id, traits_hash, current_timestamp, run_id, outbox_hash
           FROM identify_batch""",
    )


def record_rejected(
    con: duckdb.DuckDBPyConnection,
    run_id: str,
    rejected: Sequence[tuple[str | None, str, str | None, str, str]],
) -> None:
    """Append rejected messages: (message_id, kind, user_id, reason, payload_json)."""
    if not rejected:
        return
    cols = list(zip(*rejected, strict=True))
    batch = pa.table(
        {
            "message_id": pa.array(cols[0], pa.string()),
            "kind": pa.array(cols[1], pa.string()),
            "user_id": pa.array(cols[2], pa.string()),
            "reason": pa.array(cols[3], pa.string()),
            "payload": pa.array(cols[4], pa.string()),
        }
    )
    _insert_from(
        con,
        "rejected_batch",
        batch,
        """INSERT INTO segment_sync.rejected_messages
           SELECT message_id, kind, user_id, reason, payload::JSON, current_timestamp, $run_id
           FROM rejected_batch""",
        {"run_id": run_id},
        """DELETE FROM segment_sync.tracks_in_flight
           WHERE event_id IN (SELECT message_id FROM rejected_batch WHERE kind = 'track')""",
    )


def _insert_from(
    con: duckdb.DuckDBPyConnection,
    name: str,
    batch: pa.Table,
    sql: str,
    params: dict[str, Any],
    then: str | None = None,
) -> None:
    """Run one INSERT ... SELECT over an Arrow table registered under `name`, and `then` (a
    statement over the same table) in the same transaction."""
    cur = con.cursor()
    cur.register(name, batch)
    try:
        if then is None:
            cur.execute(sql, params)
            return
        cur.execute("BEGIN TRANSACTION")
        try:
            cur.execute(sql, params)
            cur.execute(then)
            cur.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(duckdb.Error):  # a full disk may refuse that too
                cur.execute("ROLLBACK")
            raise
    finally:
        cur.unregister(name)


# --- read-only views for `status` (never create or write anything) ---------------------------


def list_tables(con: duckdb.DuckDBPyConnection) -> set[tuple[str, str]]:
    """Every (schema, table) of the warehouse, views included."""
    rows = (
        con.cursor()
        .execute("SELECT table_schema, table_name FROM information_schema.tables")
        .fetchall()
    )
    return {(r[0], r[1]) for r in rows}
