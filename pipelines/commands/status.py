"""What `dodo-segment status` shows: the last runs, what is pending, and a run in progress."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from pipelines import lock, warehouse
from pipelines.commands.common import Subcommands, add_command, add_common, load_command_config
from pipelines.dodo_contract import WAREHOUSE_SCHEMA_VERSION
from pipelines.emit import pending_counts
from pipelines.metrics import identity_figures
from pipelines.transform import last_check
from pipelines.webhook_store import WebhookStore, store_folder

BUSY_NOTE = (
    "the warehouse belongs to the run in progress until it ends (DuckDB allows one writer and no "
    "readers beside it); run history and pending figures appear when it finishes"
)

DESCRIPTION = (
    "Show the last runs (start, duration, outcome, rows loaded, API requests, identifies and "
    "events sent, rejected, quarantined, pending) and what the next run would send. Never "
    "writes. While a run holds the warehouse, answers from the lock file: which command, which "
    "step, for how long, and whether that is unusually long."
)


def add_arguments(commands: Subcommands, summary: str) -> None:
    """`status` and its flags."""
    parser = add_command(commands, "status", summary, DESCRIPTION, handle)
    add_common(parser)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        "--format",
        choices=("text", "json", "prometheus"),
        default="text",
        help="text (default), json (as --json) or prometheus (metrics in Prometheus' text format)",
    )
    parser.add_argument(
        "-n", "--limit", type=int, default=10, help="how many runs to show (default 10)"
    )


def handle(args: argparse.Namespace) -> int:
    """Print the status as text, JSON or Prometheus metrics."""
    config = load_command_config(args)
    if args.format == "prometheus":
        from pipelines import metrics

        sys.stdout.write(metrics.render(config.warehouse_path).decode())
        return 0
    return show(
        config.warehouse_path,
        limit=args.limit,
        as_json=args.json or args.format == "json",
        excluded_fields=config.segment.excluded_fields,
        deep_every_hours=config.extract.deep_lookback_hours,
    )


def _in_progress(holder: lock.LockHolder) -> dict[str, Any]:
    held = holder.held_seconds
    threshold = lock.long_run_threshold(holder)
    return {
        "pid": holder.pid,
        "command": holder.command,
        "run_id": holder.run_id,
        "step": holder.step,
        "held_seconds": round(held, 1) if held is not None else None,
        "typical_seconds": holder.typical_seconds,
        "unusually_long": bool(held is not None and held > threshold),
        "long_after_seconds": round(threshold),
    }


def _webhooks(warehouse_path: str) -> dict[str, Any] | None:
    """The listener's counters and the deliveries waiting for a run (None: never listened)."""
    store = WebhookStore(store_folder(warehouse_path))
    counters = store.read_counters()
    pending = store.pending_count()
    if counters is None and not pending:
        return None
    counters = counters or {}
    return {
        "received": counters.get("received", 0),
        "duplicates": counters.get("duplicates", 0),
        "rejected": counters.get("rejected", 0),
        "rejected_by_reason": counters.get("rejected_by_reason", {}),
        "pending": pending,
        "last_delivery_at": counters.get("last_delivery_at"),
        "listener_started_at": counters.get("started_at"),
    }


def _checkpoint(warehouse_path: str) -> dict[str, Any] | None:
    """The delivery checkpoint beside the warehouse (None: none written yet)."""
    from pipelines.emit import read_checkpoint

    found = None if warehouse_path.startswith("md:") else read_checkpoint(warehouse_path)
    return found.summary() if found else None


def _show_checkpoint(found: dict[str, Any] | None) -> None:
    if not found:
        return
    counts = found.get("counts") or {}
    print(
        f"checkpoint: every event up to {found.get('delivered_up_to') or '-'} settled "
        f"(run {found['run_id']}, written {found['written_at']}; "
        f"{counts.get('delivered', 0)} delivered, {counts.get('pending', 0)} pending)"
    )
    restored = found.get("restored")
    if restored:
        print(
            f"  the warehouse was rebuilt: run {restored['run_id']} continued from the checkpoint "
            f"of run {restored['checkpoint_run_id']}, sending the events since "
            f"{restored.get('resend_from') or 'the start'} instead of skipping the backlog"
        )


def collect(
    warehouse_path: str,
    limit: int = 10,
    excluded_fields: Sequence[str] = (),
    deep_every_hours: float | None = None,
) -> dict[str, Any]:
    """Everything status shows, as one JSON-ready document. Never writes to the warehouse.

    While a run holds the lock the warehouse is not opened at all: even a read-only open
    would make the run's next write fail, so the answer comes from the lock file.
    """
    holder = lock.is_locked(warehouse_path)
    document: dict[str, Any] = {
        "warehouse": warehouse_path,
        "run_in_progress": _in_progress(holder) if holder else None,
        "runs": None,
        "pending": None,
        "webhooks": _webhooks(warehouse_path),
        "checkpoint": _checkpoint(warehouse_path),
    }
    if holder is not None:
        document["note"] = BUSY_NOTE
        return document
    if not warehouse_path.startswith("md:") and not os.path.exists(warehouse_path):
        document.update(runs=[], pending={})
        return document
    try:
        with warehouse.connect(warehouse_path, read_only=True) as con:
            version = warehouse.schema_version(con)
            if version > WAREHOUSE_SCHEMA_VERSION:
                raise warehouse.WarehouseTooNew(
                    f"{warehouse_path} has warehouse schema version {version}, newer than this "
                    f"dodo-segment (schema {WAREHOUSE_SCHEMA_VERSION}) understands: upgrade "
                    "dodo-segment"
                )
            document["schema_version"] = version
            document["runs"] = warehouse.recent_runs(con, limit) if version else []
            document["pending"] = pending_counts(con, excluded_fields)
            document["lookback"] = _lookback(con, deep_every_hours)
            document["identity"] = identity_figures(con)
            document["rejected"] = _rejected_by_reason(con)
            document["model_check"] = last_check(con)
    except warehouse.WarehouseBusy:
        # Held by a process that does not take the run lock (a notebook, the duckdb shell).
        document["note"] = (
            "the warehouse is open in another process (a notebook or the duckdb shell?); "
            "close it to see the figures"
        )
    return document


def _rejected_by_reason(con: Any, limit: int = 10) -> list[dict[str, Any]]:
    """The rejected messages, grouped by kind and reason, most frequent first (an example id)."""
    present = con.execute(
        "select count(*) from information_schema.tables "
        "where table_schema = 'segment_sync' and table_name = 'rejected_messages'"
    ).fetchone()
    if not present or not present[0]:
        return []
    rows = con.execute(
        """select kind, reason, count(*), min(message_id) from segment_sync.rejected_messages
           group by kind, reason order by count(*) desc, kind, reason limit ?""",
        [limit],
    ).fetchall()
    return [{"kind": k, "reason": r, "count": n, "example": m} for k, r, n, m in rows]


def _show_identity(identity: dict[str, Any] | None) -> None:
    """How customers became Segment users ([identity] user_id) and their accounts ([group] id)."""
    if not identity:
        return
    sources = ", ".join(f"{s} {n}" for s, n in identity["by_source"].items())
    claimed = identity["claimed_by_different_emails"]
    print(
        f"Identity: {identity['customers']} customers -> {identity['user_ids']} user ids "
        f"({sources}); fell back {identity['fell_back']}, unusable metadata values "
        f"{identity['invalid_values']}; user ids claimed by customers with different emails: "
        f"{len(claimed)}{' (' + ', '.join(claimed[:5]) + ')' if claimed else ''}; "
        f"accounts {identity['groups']}"
    )


def _lookback(con: Any, deep_every_hours: float | None) -> dict[str, Any]:
    """Which recent runs were the deep pass, the last deep pass, what it found, when the next."""
    from pipelines.extract import last_deep_pass, recent_passes  # the extract loads dlt

    deep = last_deep_pass(con)
    due = deep.as_of + timedelta(hours=deep_every_hours) if deep and deep_every_hours else None
    return {
        "runs": {p.run_id: {"deep": p.deep, "window_seconds": p.window_seconds}
                 for p in recent_passes(con, 50)},
        "last_deep_pass": None if deep is None else {
            "run_id": deep.run_id,
            "as_of": deep.as_of,
            "window_seconds": deep.window_seconds,
            "api_requests": sum(deep.api_requests.values()),
            "found": deep.found,
        },
        "next_deep_pass_from": due,
    }  # fmt: skip


def _window(seconds: float) -> str:
    if seconds >= 86_400 and seconds % 86_400 == 0:
        return f"{seconds / 86_400:g}-day"
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g}-hour"
    return f"{seconds / 60:g}-minute"


def _show_lookback(runs: list[dict[str, Any]], lookback: dict[str, Any] | None) -> None:
    """API requests per run and per resource, and the last deep pass with what it found."""
    if not lookback or not runs:
        return
    passes = lookback["runs"]
    print("API requests per run and resource (deep: the run re-read the whole lookback window):")
    for run in runs:
        requests = run["api_requests"] or {}
        if not requests:
            continue
        kind = passes.get(run["run_id"])
        label = "-" if kind is None else ("deep" if kind["deep"] else "short")
        parts = ", ".join(f"{name} {n}" for name, n in sorted(requests.items()))
        print(f"  {_when(run['started_at']):<20} {label:<5} {sum(requests.values()):>6}: {parts}")
    deep = lookback["last_deep_pass"]
    if deep is None:
        print("Last deep pass: none recorded yet (the next run is the deep pass)")
        return
    found = deep["found"]
    missed = [f"{r} {f['new']} new, {f['changed']} changed" for r, f in sorted(found.items())
              if f["new"] or f["changed"]]  # fmt: skip
    what = (
        "found what the short runs missed: " + "; ".join(missed)
        if missed
        else "found nothing the short runs had missed"
        if found
        else "first sync, nothing to compare"
    )
    due = lookback["next_deep_pass_from"]
    print(
        f"Last deep pass: {_when(deep['as_of'])} ({_window(deep['window_seconds'])} window, "
        f"{deep['api_requests']} API requests), {what}"
        + (f"; next from {_when(due)}" if due else "")
    )


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if isinstance(value, datetime) else str(value or "-")


def _short(command: str | None) -> str:
    return {"traits recompute": "recompute", "run --dry-run": "dry-run"}.get(
        command or "-", command or "-"
    )


def _figure(value: Any) -> str:
    return "-" if value is None else str(value)


def show(
    warehouse_path: str,
    limit: int = 10,
    as_json: bool = False,
    excluded_fields: Sequence[str] = (),
    deep_every_hours: float | None = None,
) -> int:
    """Print the status; exit code 0 (status itself never fails a cron)."""
    document = collect(warehouse_path, limit, excluded_fields, deep_every_hours)
    if as_json:
        print(json.dumps(document, default=str, indent=2))
        return 0
    running = document["run_in_progress"]
    if running:
        held = running["held_seconds"]
        step = f", step {running['step']}" if running["step"] else ""
        flag = (
            f"  <- unusually long (over {running['long_after_seconds']}s): check pid "
            f"{running['pid']} and its log"
            if running["unusually_long"]
            else ""
        )
        print(
            f"A run is in progress: {running['command']} (pid {running['pid']}{step}) for "
            f"{_figure(None if held is None else round(held))}s{flag}"
        )
    if document.get("note"):
        print(document["note"])
    hooks = document.get("webhooks")
    if hooks:
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(hooks["rejected_by_reason"].items()))
        print(
            f"webhooks: received {hooks['received']} (+{hooks['duplicates']} duplicates), "
            f"rejected {hooks['rejected']}{f' ({reasons})' if reasons else ''}, "
            f"pending {hooks['pending']}; last delivery {hooks['last_delivery_at'] or '-'}"
        )
    runs = document.get("runs")
    if runs is None:
        return 0
    if not runs:
        print(f"No runs recorded in {warehouse_path} yet. Start with: dodo-segment run")
    else:
        print(
            f"{'started (UTC)':<20} {'command':<9} {'secs':>6} {'outcome':<24} {'rows':>7} {'api':>5} "
            f"{'identify':>8} {'track':>6} {'rejected':>8} {'quarant.':>8} {'pending':>7}"
        )
    for run in runs:
        rows = sum((run["rows_loaded"] or {}).values())
        api = sum((run["api_requests"] or {}).values())
        duration = f"{run['duration_seconds']:.1f}" if run["duration_seconds"] is not None else "-"
        print(
            f"{_when(run['started_at']):<20} {_short(run['command']):<9} {duration:>6} "
            f"{run['outcome'] or '-':<24} "
            f"{rows:>7} {api:>5} {run['identifies_sent'] or 0:>8} {run['tracks_sent'] or 0:>6} "
            f"{run['rejected'] or 0:>8} {run['quarantined'] or 0:>8} {_figure(run['pending']):>7}"
        )
        if run["error"]:
            print(f"{'':<20} error: {run['error']}")
    _show_lookback(runs, document.get("lookback"))
    _show_identity(document.get("identity"))
    for rejected in document.get("rejected") or []:
        print(
            f"Rejected {rejected['kind']}: {rejected['count']} x {rejected['reason']} "
            f"(e.g. {rejected['example']})"
        )
    check = document.get("model_check")
    if check:
        verdict = (
            "equal to a full build"
            if not check["drifted_tables"]
            else f"DRIFTED ({check['detail']}); repaired by a full build"
        )
        print(f"Models last verified {_when(check['checked_at'])} (deep pass): {verdict}")
    _show_checkpoint(document.get("checkpoint"))
    pending = document.get("pending") or {}
    if pending:
        backlog = pending.get("skipped_backlog")
        print(
            f"Pending now: {_figure(pending.get('tracks'))} track, "
            f"{_figure(pending.get('identifies'))} identify; "
            f"rejected messages in total: {pending.get('rejected_total') or 0}"
            + (
                f"; {backlog} historical events skipped (--events-since sends them)"
                if backlog
                else ""
            )
        )
    return 0
