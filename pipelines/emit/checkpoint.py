"""The delivery checkpoint: what a rebuilt warehouse needs in order not to skip or resend events.

The ledger (`segment_sync.delivered_events`) lives in the warehouse; when the warehouse is lost,
deleted or restored from an old copy, the next run is a first sync and would record the whole
backlog as skipped. So after every emit the job also writes, outside the warehouse and beside
its lock and alert state (`<warehouse>.checkpoint.json`, owner-only, replaced atomically):

- `delivered_up_to`: every outbox track that occurred before it was delivered, skipped or
  rejected (the oldest pending event's time, or the newest event's when nothing is pending);
- `settled`: the event ids delivered or skipped that occurred at or after `delivered_up_to`
  minus SETTLED_WINDOW (so a rebuilt or restored ledger does not resend them), unless too many;
- the run id and the ledger's counts, for `status` and `doctor`.

A first sync that finds a checkpoint records the events before `delivered_up_to - margin` as
skipped and the `settled` ids with their status, then sends the rest with their usual stable
messageIds. The margin (well inside Segment's ~24 h messageId de-duplication window) catches
events that arrived late, with a time before the checkpoint's; a resend inside it is absorbed
by Segment's de-duplication.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from pipelines.durable import replace_file
from pipelines.emit import ledger
from pipelines.emit.settled import LedgerState
from pipelines.lock import lock_path

SAFETY_MARGIN = timedelta(hours=6)
"""Resend this much before the checkpoint after a lost warehouse: late events are caught, and
a repeat is well inside Segment's ~24 h messageId de-duplication window."""

SETTLED_WINDOW = timedelta(days=3)
"""The checkpoint names the settled events of this window before `delivered_up_to`: a warehouse
restored from a backup up to this old resends none of them."""

MAX_SETTLED_IDS = 200_000
"""Above this many settled ids after the margin, the checkpoint keeps none of them (its file
stays small); a rebuilt ledger then resends the margin's delivered events (de-duplicated)."""

VERSION = 1


@dataclass
class Checkpoint:
    """One checkpoint file's content."""

    run_id: str
    written_at: datetime
    delivered_up_to: datetime | None
    """Every outbox track that occurred before this was delivered, skipped or rejected."""
    counts: dict[str, int] = field(default_factory=dict)
    settled: dict[str, str] | None = None
    """event_id -> 'delivered' | 'skipped' for the events of SETTLED_WINDOW before
    `delivered_up_to` and after it; None: too many."""
    margin_seconds: float = SAFETY_MARGIN.total_seconds()
    restored: dict[str, Any] | None = None
    """The last time a rebuilt warehouse continued from a checkpoint (run id, from, counts)."""

    @property
    def resend_from(self) -> datetime | None:
        """Where a first sync on a rebuilt warehouse starts sending (None: from the start)."""
        if self.delivered_up_to is None:
            return None
        return self.delivered_up_to - timedelta(seconds=self.margin_seconds)

    def as_json(self) -> dict[str, Any]:
        """The file's JSON document."""
        return {
            "version": VERSION,
            "run_id": self.run_id,
            "written_at": self.written_at.isoformat(),
            "delivered_up_to": self.delivered_up_to.isoformat() if self.delivered_up_to else None,
            "margin_seconds": self.margin_seconds,
            "counts": self.counts,
            "restored": self.restored,
            "settled": self.settled,
        }

    def summary(self) -> dict[str, Any]:
        """What `status` shows (everything but the settled ids)."""
        document = self.as_json()
        document.pop("settled")
        document["settled_ids"] = None if self.settled is None else len(self.settled)
        return document


def checkpoint_path(warehouse_path: str) -> Path:
    """The checkpoint file, beside the lock and the alert state (`<warehouse>.checkpoint.json`)."""
    return lock_path(warehouse_path).with_suffix(".checkpoint.json")


def _moment(value: Any) -> datetime | None:
    if value is None:
        return None
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def read_checkpoint(warehouse_path: str) -> Checkpoint | None:
    """The checkpoint of this warehouse, or None when there is none (or it cannot be read)."""
    try:
        data = json.loads(checkpoint_path(warehouse_path).read_text())
        return Checkpoint(
            run_id=str(data["run_id"]),
            written_at=_moment(data["written_at"]) or datetime.now(UTC),
            delivered_up_to=_moment(data.get("delivered_up_to")),
            counts={k: int(v) for k, v in (data.get("counts") or {}).items()},
            settled=data.get("settled"),
            margin_seconds=float(data.get("margin_seconds", SAFETY_MARGIN.total_seconds())),
            restored=data.get("restored"),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


_STATE = """
    WITH tracks AS (
        SELECT o.event_id, o.occurred_at, d.status,
               r.message_id IS NOT NULL AS rejected
        FROM analytics.track_outbox o
        LEFT JOIN segment_sync.delivered_events d ON d.event_id = o.event_id
        LEFT JOIN (SELECT DISTINCT message_id FROM segment_sync.rejected_messages
                   WHERE kind = 'track') r ON r.message_id = o.event_id
        WHERE o.event_id IS NOT NULL
    )
    SELECT count(*) FILTER (WHERE status = 'delivered'),
           count(*) FILTER (WHERE status = 'skipped'),
           count(*) FILTER (WHERE status IS NULL AND rejected),
           count(*) FILTER (WHERE status IS NULL AND NOT rejected),
           min(occurred_at) FILTER (WHERE status IS NULL AND NOT rejected),
           max(occurred_at)
    FROM tracks
"""

_SETTLED_AFTER = """
    SELECT o.event_id, d.status
    FROM analytics.track_outbox o
    JOIN segment_sync.delivered_events d ON d.event_id = o.event_id
    WHERE o.occurred_at >= $start
    LIMIT $cap
"""


def ledger_state(con: duckdb.DuckDBPyConnection) -> LedgerState:
    """The ledger over the whole track outbox: counts, the oldest pending and newest times."""
    row = con.cursor().execute(_STATE).fetchone()
    assert row is not None
    delivered, skipped, rejected, pending, oldest_pending, newest = row
    return LedgerState(
        int(delivered), int(skipped), int(rejected), int(pending), oldest_pending, newest
    )


def take_checkpoint(
    con: duckdb.DuckDBPyConnection,
    run_id: str,
    previous: Checkpoint | None = None,
    state: LedgerState | None = None,
) -> Checkpoint:
    """Read the ledger's state after an emit (the warehouse is not written); `state`: the one
    the emit worked out (`EmitResult.ledger_state`), else it is read over the whole outbox."""
    cur = con.cursor()
    if state is None:
        state = ledger_state(con)
    delivered, skipped, rejected = state.delivered, state.skipped, state.rejected
    pending, oldest_pending, newest = state.pending, state.oldest_pending, state.newest
    up_to = _moment(oldest_pending if pending else newest)
    identified = cur.execute("SELECT count(*) FROM segment_sync.identify_state").fetchone()
    cp = Checkpoint(
        run_id=run_id,
        written_at=datetime.now(UTC),
        delivered_up_to=up_to,
        counts={
            "delivered": int(delivered),
            "skipped": int(skipped),
            "rejected": int(rejected),
            "pending": int(pending),
            "identified": int(identified[0]) if identified else 0,
        },
        restored=previous.restored if previous else None,
    )
    if up_to is not None:
        start = up_to - SETTLED_WINDOW
        rows = cur.execute(_SETTLED_AFTER, {"start": start, "cap": MAX_SETTLED_IDS + 1}).fetchall()
        cp.settled = None if len(rows) > MAX_SETTLED_IDS else dict(rows)
    return cp


def write_checkpoint(warehouse_path: str, checkpoint: Checkpoint) -> None:
    """Replace the checkpoint file atomically (tmp, fsync, rename, fsync of the folder), 0600.

    Raises OSError (a full disk, say): the previous checkpoint is then left whole.
    """
    path = checkpoint_path(warehouse_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(checkpoint.as_json(), separators=(",", ":")).encode()
    replace_file(path, lambda out: out.write(text))


def ledger_is_empty(con: duckdb.DuckDBPyConnection) -> bool:
    """True when the warehouse holds no delivery ledger (a first sync, or a lost warehouse)."""
    ledger.ensure_sync_schema(con)
    return ledger.is_first_sync(con)


@dataclass(frozen=True)
class Restore:
    """What a first sync on a rebuilt warehouse took from the checkpoint."""

    checkpoint_run_id: str
    resend_from: datetime | None
    skipped_before: int
    settled: int

    def as_json(self, run_id: str) -> dict[str, Any]:
        """The `restored` entry kept in later checkpoints (for `status`)."""
        return {
            "run_id": run_id,
            "at": datetime.now(UTC).isoformat(),
            "checkpoint_run_id": self.checkpoint_run_id,
            "resend_from": self.resend_from.isoformat() if self.resend_from else None,
            "skipped_before": self.skipped_before,
            "settled_from_checkpoint": self.settled,
        }


_SETTLED_ROWS = """ INTO segment_sync.delivered_events
    SELECT s.event_id, $run_id, s.status, current_timestamp FROM checkpoint_settled s
    WHERE s.status IN ('delivered', 'skipped')"""
_SETTLED_REPLACE = "INSERT OR REPLACE" + _SETTLED_ROWS
_SETTLED_IGNORE = "INSERT OR IGNORE" + _SETTLED_ROWS


def _record_settled(cur: duckdb.DuckDBPyConnection, checkpoint: Checkpoint, replace: bool) -> int:
    """Record the checkpoint's settled ids with their status (in the caller's transaction)."""
    settled = checkpoint.settled or {}
    if not settled:
        return 0
    batch = pa.table({"event_id": list(settled), "status": list(settled.values())})
    cur.register("checkpoint_settled", batch)
    try:
        cur.execute(_SETTLED_REPLACE if replace else _SETTLED_IGNORE, {"run_id": checkpoint.run_id})
    finally:
        cur.unregister("checkpoint_settled")
    return len(settled)


def _in_transaction(con: duckdb.DuckDBPyConnection, work: Any) -> Any:
    cur = con.cursor()  # one cursor, one transaction: a kill leaves all of it or none
    cur.execute("BEGIN TRANSACTION")
    try:
        done = work(cur)
        cur.execute("COMMIT")
    except BaseException:
        cur.execute("ROLLBACK")
        raise
    return done


def restore_ledger(
    con: duckdb.DuckDBPyConnection, checkpoint: Checkpoint, run_id: str
) -> tuple[Restore, datetime | None]:
    """On a first sync: rebuild the ledger from the checkpoint instead of skipping the backlog.

    Records as skipped what occurred before `resend_from` and the checkpoint's settled ids with
    their status. Returns what it did, and the `events_since` the emitter must then be given
    (`resend_from` while the ledger is still empty, so its first-sync rule skips nothing after
    it; None once rows exist, so the settled-as-skipped ids are not sent).
    """
    ledger.ensure_sync_schema(con)
    start = checkpoint.resend_from

    def work(cur: duckdb.DuckDBPyConnection) -> tuple[int, int]:
        skipped = 0
        if start is not None:
            row = cur.execute(
                """INSERT INTO segment_sync.delivered_events
                   SELECT DISTINCT o.event_id, $run_id, 'skipped', current_timestamp
                   FROM analytics.track_outbox o
                   WHERE o.event_id IS NOT NULL AND o.occurred_at < $before
                   ON CONFLICT DO NOTHING""",
                {"run_id": run_id, "before": start},
            ).fetchone()
            skipped = int(row[0]) if row else 0
        return skipped, _record_settled(cur, checkpoint, replace=True)

    skipped, settled = _in_transaction(con, work)
    since: datetime | None = None
    if ledger.is_first_sync(con):  # nothing recorded: the emitter's first-sync rule applies
        since = start or datetime(1970, 1, 1, tzinfo=UTC)
    return Restore(checkpoint.run_id, start, skipped, settled), since


def warehouse_knows_run(con: duckdb.DuckDBPyConnection, run_id: str) -> bool:
    """Whether segment_sync.runs holds this run (False: the warehouse is older than it)."""
    cur = con.cursor()
    exists = cur.execute(
        "SELECT count(*) FROM information_schema.tables "
        "WHERE table_schema = 'segment_sync' AND table_name = 'runs'"
    ).fetchone()
    if not (exists and exists[0]):
        return False
    row = cur.execute(
        "SELECT count(*) FROM segment_sync.runs WHERE run_id = ?", [run_id]
    ).fetchone()
    return bool(row and row[0])


def catch_up_ledger(con: duckdb.DuckDBPyConnection, checkpoint: Checkpoint) -> Restore:
    """A warehouse older than the checkpoint (restored from a backup): the events the checkpoint
    names as settled are recorded with their status, so they are not sent again.

    Events it does not name are sent as usual: an event settled before the checkpoint's window
    (a backup older than SETTLED_WINDOW) is repeated under its messageId, never lost.
    """
    ledger.ensure_sync_schema(con)
    settled = _in_transaction(con, lambda cur: _record_settled(cur, checkpoint, replace=True))
    return Restore(checkpoint.run_id, checkpoint.resend_from, 0, settled)
