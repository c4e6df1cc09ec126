"""What `dodo-segment status` shows: the last runs, what is pending, and a run in progress."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from pipelines import lock, warehouse
from pipelines.settings import ANALYTICS_SCHEMA, SYNC_SCHEMA

LONG_RUN_SECONDS = 2 * 3600
"""A run holding the lock longer than this is flagged (cron runs usually take minutes)."""


def pending_now(con: Any) -> dict[str, int | None]:
    """Outbox rows not yet delivered and identifies whose traits changed, if the tables exist."""
    tables = {
        (r[0], r[1])
        for r in con.execute(
            "select table_schema, table_name from information_schema.tables"
        ).fetchall()
    }
    pending: dict[str, int | None] = {"tracks": None, "identifies": None, "rejected_total": None}
    if (ANALYTICS_SCHEMA, "track_outbox") in tables and (SYNC_SCHEMA, "delivered_events") in tables:
        pending["tracks"] = con.execute(
            f"select count(*) from {ANALYTICS_SCHEMA}.track_outbox o "
            f"anti join {SYNC_SCHEMA}.delivered_events d using (event_id)"
        ).fetchone()[0]
    if (ANALYTICS_SCHEMA, "identify_outbox") in tables and (
        SYNC_SCHEMA,
        "identify_state",
    ) in tables:
        pending["identifies"] = con.execute(
            f"select count(*) from {ANALYTICS_SCHEMA}.identify_outbox o "
            f"left join {SYNC_SCHEMA}.identify_state s using (user_id) "
            "where s.traits_hash is distinct from o.traits_hash"
        ).fetchone()[0]
    if (SYNC_SCHEMA, "rejected_messages") in tables:
        pending["rejected_total"] = con.execute(
            f"select count(*) from {SYNC_SCHEMA}.rejected_messages"
        ).fetchone()[0]
    return pending


def collect(warehouse_path: str, limit: int = 10) -> dict[str, Any]:
    """Everything status shows, as one JSON-ready document."""
    holder = lock.is_locked(warehouse_path)
    in_progress = None
    if holder is not None:
        held = holder.held_seconds
        in_progress = {
            "pid": holder.pid,
            "command": holder.command,
            "held_seconds": round(held, 1) if held is not None else None,
            "unusually_long": bool(held and held > LONG_RUN_SECONDS),
        }
    document: dict[str, Any] = {"warehouse": warehouse_path, "run_in_progress": in_progress}
    try:
        with warehouse.connect(warehouse_path, read_only=True) as con:
            if warehouse.schema_version(con) == 0:
                document.update(runs=[], pending={})
                return document
            document["runs"] = warehouse.recent_runs(con, limit)
            document["pending"] = pending_now(con)
    except warehouse.WarehouseBusy:
        document["runs"] = None
        document["note"] = (
            "the warehouse is held by the run in progress; figures appear when it ends"
        )
    return document


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if isinstance(value, datetime) else str(value or "-")


def show(warehouse_path: str, limit: int = 10, as_json: bool = False) -> int:
    """Print the status; exit code 0 (status itself never fails a cron)."""
    document = collect(warehouse_path, limit)
    if as_json:
        print(json.dumps(document, default=str, indent=2))
        return 0
    running = document["run_in_progress"]
    if running:
        flag = "  <- unusually long, check the process" if running["unusually_long"] else ""
        print(
            f"A run is in progress: {running['command']} (pid {running['pid']}) for "
            f"{running['held_seconds']:.0f}s{flag}"
        )
    if document.get("note"):
        print(document["note"])
    runs = document.get("runs") or []
    if not runs and not running:
        print(f"No runs recorded in {warehouse_path} yet. Start with: dodo-segment run")
        return 0
    if runs:
        print(
            f"{'started (UTC)':<20} {'secs':>6} {'outcome':<26} {'rows':>8} {'api':>6} {'identify':>9} {'track':>7} {'rejected':>8} {'pending':>8}"
        )
    for run in runs:
        rows = sum((run["rows_loaded"] or {}).values())
        api = sum((run["api_requests"] or {}).values())
        duration = f"{run['duration_seconds']:.1f}" if run["duration_seconds"] is not None else "-"
        pending = run["pending"] if run["pending"] is not None else "-"
        print(
            f"{_when(run['started_at']):<20} {duration:>6} {run['outcome']:<26} {rows:>8} {api:>6} "
            f"{run['identifies_sent'] or 0:>9} {run['tracks_sent'] or 0:>7} {run['rejected'] or 0:>8} {pending:>8}"
        )
        if run["error"]:
            print(f"{'':<20} error: {run['error']}")
    pending = document.get("pending") or {}
    if pending:
        print(
            f"Pending now: {pending.get('tracks') if pending.get('tracks') is not None else '-'} track, "
            f"{pending.get('identifies') if pending.get('identifies') is not None else '-'} identify; "
            f"rejected messages in total: {pending.get('rejected_total') or 0}"
        )
    return 0
