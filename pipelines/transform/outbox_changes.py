"""Which outbox rows a build may have changed: an id per build, and a delta build's touched keys.

Every build that rewrites models gets a new id in `analytics._outbox_build`, written before its
first model (a delta build's inside its transaction, so a rolled-back delta keeps the old one); a
kept build keeps it. The emitter settles the outboxes of one build id and, on the next run, reads
only the rows of the keys a delta build from that very id touched (`pipelines/emit/settled.py`).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import duckdb

from pipelines import dodo_contract, warehouse
from pipelines.transform import previous, touched

SCHEMA = dodo_contract.ANALYTICS_SCHEMA
BUILD_TABLE = f"{SCHEMA}.{dodo_contract.OUTBOX_BUILD_TABLE}"
"""One row: the id of the build the outboxes are now, and the build a delta started from."""
CHANGED_TRACKS = f"{SCHEMA}._track_outbox_changes"
"""The track outbox's rows of the customers the last delta build touched, as it left them
(read from the touched rows of the outbox's inputs, as its scoped data tests read them)."""


@dataclass(frozen=True)
class OutboxChanges:
    """What a build may have changed in the outboxes since the build `since_build`.

    `since_build` None: anything (a full build). Otherwise only the track outbox rows of
    `customer_ids` and the identify outbox rows of `user_ids` may differ from that build's (a
    kept build: none)."""

    build_id: str
    since_build: str | None
    customer_ids: tuple[str, ...] = ()
    user_ids: tuple[str, ...] = ()
    tracks_table: str | None = None
    """A table holding the track outbox's rows of `customer_ids` (None: read the outbox)."""


def current_build(con: duckdb.DuckDBPyConnection) -> str | None:
    """The id of the build the outboxes are now (None: built before builds had ids)."""
    return warehouse.outbox_build_id(con)


def _write(con: duckdb.DuckDBPyConnection, build_id: str, since: str | None) -> None:
    con.execute(
        f"create table if not exists {BUILD_TABLE} "
        "(build_id varchar not null, since_build varchar, started_at timestamptz)"
    )
    con.execute(f"delete from {BUILD_TABLE}")
    con.execute(f"insert into {BUILD_TABLE} values (?, ?, now())", [build_id, since])


def start_build(con: duckdb.DuckDBPyConnection, delta: bool) -> tuple[str, str | None]:
    """Give the build about to run a new id, before any model changes; return it and, for a
    delta build, the id of the build it starts from (None for a full build)."""
    since = current_build(con) if delta else None
    build_id = uuid.uuid4().hex
    _write(con, build_id, since)
    con.execute(f"drop table if exists {CHANGED_TRACKS}")
    return build_id, since


def kept(con: duckdb.DuckDBPyConnection) -> OutboxChanges:
    """A kept build: the outboxes are the last build's (an id is given to a build made before
    builds had ids; nothing settled refers to it, so the emitter reads everything once)."""
    build_id = current_build(con)
    if build_id is None:
        build_id = uuid.uuid4().hex
        _write(con, build_id, None)
    return OutboxChanges(build_id, build_id)


def _has(con: duckdb.DuckDBPyConnection, table: str, temporary: bool) -> bool:
    # never a failing query: it would abort the delta build's transaction
    row = con.execute(
        "select count(*) from duckdb_tables() where table_name = ? and temporary = ? "
        "and (temporary or schema_name = ?)",
        [table, temporary, SCHEMA],
    ).fetchone()
    return bool(row and row[0])


_QUARANTINED_EVENTS = f"select key from {SCHEMA}.quarantined_rows where key_kind = 'event_id'"


def lifted_event_quarantine(
    con: duckdb.DuckDBPyConnection, last: previous.PreviousState, track_rows: str
) -> bool:
    """Whether an event the last build quarantined is no longer, outside the touched
    customers' track outbox rows (`track_rows`): a data test that reads whole tables (a
    user's) may let out an event of a customer the build did not touch."""
    try:
        last.copy(con, "outbox_old_quarantined_events", _QUARANTINED_EVENTS)
    except duckdb.Error:  # (on the previous state's cursor: the build's transaction stands)
        return True
    row = con.execute(
        f"select count(*) from (select key from outbox_old_quarantined_events "
        f"except {_QUARANTINED_EVENTS} except select event_id from {track_rows})"
    ).fetchone()
    return bool(row and row[0])


def delta_changes(
    con: duckdb.DuckDBPyConnection,
    build_id: str,
    since: str | None,
    track_rows: str,
    whole: bool,
) -> OutboxChanges:
    """A delta build's changes, read at its end (after every data test), before its temp tables
    go: the touched customers, with their track outbox rows (`track_rows`, a relation) kept in
    `CHANGED_TRACKS`, and the user ids they resolve to now with those the build rebuilt
    (`delta_touched_users`). `whole`: a model was rebuilt whose changes cannot be told by
    customer, or an event's quarantine was lifted; then, or without those tables, anything may
    have changed."""
    if (
        whole
        or since is None
        or not (
            _has(con, touched.TOUCHED, True)
            and _has(con, previous.TOUCHED_USERS, True)
            and _has(con, previous.IDENTITY_MODEL, False)
        )
    ):
        return OutboxChanges(build_id, None)
    customers = con.execute(
        f"select distinct customer_id from {touched.TOUCHED} where customer_id is not null"
    ).fetchall()
    users = con.execute(
        f"""select user_id from {SCHEMA}.{previous.IDENTITY_MODEL}
            where customer_id in (select customer_id from {touched.TOUCHED})
              and user_id is not null
            union select user_id from {previous.TOUCHED_USERS} where user_id is not null"""
    ).fetchall()
    con.execute(f"create or replace table {CHANGED_TRACKS} as select * from {track_rows}")
    return OutboxChanges(
        build_id,
        since,
        tuple(sorted(r[0] for r in customers)),
        tuple(sorted(r[0] for r in users)),
        CHANGED_TRACKS,
    )
