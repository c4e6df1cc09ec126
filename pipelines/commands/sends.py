"""Operator commands around emission: preview, resend and traits recompute."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from pipelines import warehouse
from pipelines.commands.common import (
    Subcommands,
    add_command,
    add_common,
    add_wait,
    load_command_config,
    parse_date,
    with_lock,
)
from pipelines.config import AppConfig, ConfigError
from pipelines.job import ExitCode, RunReport, emit_settings, new_run_id, package_version
from pipelines.logs import complain, json_mode, say, scrub

log = logging.getLogger("dodo_segment")


def add_preview_arguments(commands: Subcommands, summary: str) -> None:
    """`preview` and its flags."""
    parser = add_command(
        commands, "preview", summary,
        "Count the identify and track calls the next run would send from what the warehouse "
        "holds now, and print a sample of each exactly as it would be sent. Sends nothing.",
        lambda args: _locked(args, "preview", lambda config: show_preview(
            config, args.events_since, args.sample
        )),
    )  # fmt: skip
    add_common(parser)
    parser.add_argument(
        "--events-since", type=parse_date, metavar="DATE", help="as `run --events-since DATE` would"
    )
    parser.add_argument(
        "--sample", type=int, default=3, help="sample messages of each kind (default 3)"
    )
    add_wait(parser)


def add_resend_arguments(commands: Subcommands, summary: str) -> None:
    """`resend` and its flags."""
    parser = add_command(
        commands, "resend", summary,
        "Re-send the events that occurred on or after --since, with their original messageIds, "
        "whether delivered, skipped or rejected before. Segment answers 200 to a wrong write key "
        "or region, so this is how to repair a sync that went nowhere.",
        lambda args: _locked(args, "resend", lambda config: resend(
            config, args.since, args.event
        )),
        "example:\n  dodo-segment resend --since 2025-06-01 --event 'Payment Completed'",
    )  # fmt: skip
    add_common(parser)
    parser.add_argument("--since", type=parse_date, required=True, metavar="DATE")
    parser.add_argument(
        "--event", metavar="NAME", help="only this event name, e.g. 'Payment Completed'"
    )
    add_wait(parser)


def add_traits_arguments(commands: Subcommands, summary: str) -> None:
    """`traits recompute` and its flags."""
    traits = add_command(
        commands, "traits", summary, "Commands about customer traits (identify calls).",
        epilog="example:\n  dodo-segment traits recompute --customer cus_123",
    )  # fmt: skip
    traits.set_defaults(handler=lambda args: _usage(traits))
    subcommands = traits.add_subparsers(dest="traits_command", metavar="SUBCOMMAND")
    parser = add_command(
        subcommands, "recompute", "send identify again for all or some customers",
        "Re-send identify calls regardless of the stored trait hash: after changing a trait "
        "definition or reconnecting a destination.",
        lambda args: _locked(args, "traits recompute", lambda config: recompute_traits(
            config, args.customer
        )),
    )  # fmt: skip
    add_common(parser)
    parser.add_argument(
        "--customer", action="append", metavar="ID", help="only this customer (repeatable)"
    )
    add_wait(parser)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return int(ExitCode.USAGE)


def _locked(args: argparse.Namespace, command: str, body: Any) -> int:
    config = load_command_config(args)
    return with_lock(config, command, args.wait, lambda: body(config))


def print_preview(preview: Any) -> None:
    """Print the counts and sample messages of a preview, exactly as they would be sent."""
    headline = f"Would send {preview.identifies} identify and {preview.tracks} track call(s)" + (
        f"; {preview.skipped_backlog} historical event(s) would be recorded as skipped"
        if preview.skipped_backlog
        else ""
    )
    if json_mode():
        say(
            headline,
            identifies=preview.identifies,
            tracks=preview.tracks,
            skipped_backlog=preview.skipped_backlog,
            identify_samples=preview.identify_samples,
            track_samples=preview.track_samples,
        )
        return
    say(headline)
    for title, samples in (
        ("identify", preview.identify_samples),
        ("track", preview.track_samples),
    ):
        for message in samples:
            say(f"  {title}: {json.dumps(message, default=str, ensure_ascii=False)}")


def show_preview(config: AppConfig, events_since: datetime | None, sample: int) -> int:
    """`dodo-segment preview`: what the next run would send; sends and records nothing.

    Runs under the run lock: the emitter's preview creates its (empty) ledger tables on a
    warehouse that never emitted, which needs the write connection.
    """
    from pipelines.emit import EmitSettings, preview

    _require_outboxes(config)
    warehouse.prepare(config.warehouse_path, package_version())
    settings = (
        emit_settings(config) if config.segment.write_key else EmitSettings(write_key="preview")
    )  # nothing is sent: a preview needs no key
    with warehouse.connect(config.warehouse_path) as con:
        print_preview(preview(con, settings, events_since=events_since, sample=sample))
    return int(ExitCode.OK)


def _require_outboxes(config: AppConfig) -> None:
    """Refuse, in one line, an operation on a warehouse that has no outboxes to read yet."""
    with warehouse.connect(config.warehouse_path, read_only=True) as con:
        found = con.execute(
            "select count(*) from information_schema.tables where table_schema = 'analytics' "
            "and table_name in ('track_outbox', 'identify_outbox')"
        ).fetchone()
    if not found or found[0] < 2:
        raise warehouse.WarehouseError(
            f"{config.warehouse_path} has no outboxes yet: run 'dodo-segment run --skip-emit' "
            "(or 'dodo-segment transform') first"
        )


def _require_key(config: AppConfig) -> None:
    if not config.segment.write_key:
        raise ConfigError("SEGMENT_WRITE_KEY is not set: export your Segment source's write key")


def _finish(config: AppConfig, report: RunReport, result: Any) -> int:
    report.identifies_sent = result.identifies_sent
    report.tracks_sent = result.tracks_sent
    report.rejected = result.rejected
    report.pending = result.pending
    if result.failed:
        report.outcome, report.exit_code = "failed", ExitCode.FAILED
        report.error = scrub(result.error or "Segment did not accept the messages")
    elif result.rejected:
        report.outcome, report.exit_code = (
            "finished_with_rejections",
            ExitCode.REJECTED_OR_QUARANTINED,
        )
    else:
        report.outcome, report.exit_code = "success", ExitCode.OK
    with warehouse.connect(config.warehouse_path) as con:
        warehouse.record_run(con, report.as_row())
    if report.error:
        complain(report.error)
    say(
        f"{report.command}: {result.identifies_sent} identify and {result.tracks_sent} track "
        f"call(s) delivered, {result.rejected} rejected (exit {int(report.exit_code)})",
        **{k: v for k, v in report.as_row().items() if k not in ("started_at", "finished_at")},
    )
    return int(report.exit_code)


def resend(config: AppConfig, since: datetime, event: str | None) -> int:
    """`dodo-segment resend`: send events from a date again, with their original messageIds."""
    from pipelines.emit import resend as resend_events

    _require_key(config)
    _require_outboxes(config)
    warehouse.prepare(config.warehouse_path, package_version())
    now = datetime.now(UTC)
    report = RunReport(run_id=new_run_id(now), started_at=now, command="resend")
    with warehouse.connect(config.warehouse_path) as con:
        result = resend_events(con, emit_settings(config), report.run_id, since=since, event=event)
    return _finish(config, report, result)


def recompute_traits(config: AppConfig, customer_ids: list[str] | None) -> int:
    """`dodo-segment traits recompute`: identify again regardless of the stored trait hash."""
    from pipelines.emit import recompute_traits as send_identifies

    _require_key(config)
    _require_outboxes(config)
    warehouse.prepare(config.warehouse_path, package_version())
    now = datetime.now(UTC)
    report = RunReport(run_id=new_run_id(now), started_at=now, command="traits recompute")
    with warehouse.connect(config.warehouse_path) as con:
        result = send_identifies(con, emit_settings(config), report.run_id, customer_ids)
    return _finish(config, report, result)
