"""The `dodo-segment` command: parses arguments and calls the library's steps."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from pipelines import lock, status, warehouse
from pipelines.config import ConfigError, load_config
from pipelines.job import ExitCode, RunOptions, check_ready, package_version, run_job
from pipelines.logs import register_secrets, scrub, setup_logging
from pipelines.settings import RESOURCES

log = logging.getLogger("dodo_segment")

DESCRIPTION = """\
Sync Dodo Payments to Segment through a DuckDB warehouse.

  dodo-segment run        extract -> load -> models -> data tests -> emit (the cron entry)
  dodo-segment demo       the whole job against an embedded sandbox (no keys needed)
  dodo-segment status     the last runs and what is pending
  dodo-segment doctor     check keys, hosts, warehouse and lock without changing anything

Configuration comes from flags, then environment variables (DODO_PAYMENTS_API_KEY,
DODO_PAYMENTS_ENVIRONMENT, DODO_PAYMENTS_BASE_URL, DODO_SEGMENT_DB, SEGMENT_WRITE_KEY,
SEGMENT_HOST), then .dlt/config.toml and .dlt/secrets.toml. Exit codes: 0 success (or a skipped
overlapping run), 1 failure, 2 usage or configuration error, 3 finished with rejected messages
or quarantined rows, 4 an error data test failed so nothing was emitted.
"""


def _date(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date: {value!r} (use YYYY-MM-DD)") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db",
        metavar="PATH",
        help="warehouse path (default: $DODO_SEGMENT_DB or dodo_segment.duckdb)",
    )
    parser.add_argument(
        "--log-format", choices=("text", "json"), default="text",
        help="text for people (default) or one JSON object per line for log shippers",
    )  # fmt: skip
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand and its help."""
    parser = argparse.ArgumentParser(
        prog="dodo-segment",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dodo-segment {package_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser(
        "run", help="extract, model and emit (the scheduled job)",
        description="Extract the Dodo Payments API into the warehouse, build the SQL models, "
        "run the data tests and send new events and changed traits to Segment. A second run "
        "while one is in progress exits 0 at once (use --wait to queue instead).",
    )  # fmt: skip
    _add_common(run)
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="extract and model, then show what would be sent without sending",
    )
    run.add_argument(
        "--events-since",
        type=_date,
        metavar="DATE",
        help="also send historical (skipped) events that occurred on or after DATE",
    )
    run.add_argument(
        "--full-refresh",
        nargs="*",
        metavar="RESOURCE",
        choices=(*RESOURCES, []),
        help=f"re-read all history of these resources (all when none named): {', '.join(RESOURCES)}",
    )
    run.add_argument(
        "--skip-emit", action="store_true", help="extract and model only; do not send to Segment"
    )
    run.add_argument(
        "--only-emit",
        action="store_true",
        help="skip the extract; model and send what the warehouse holds",
    )
    run.add_argument(
        "--wait", action="store_true", help="wait for a run in progress instead of skipping"
    )

    demo = commands.add_parser(
        "demo",
        help="run the whole job against the embedded sandbox",
        description="Start a Dodo API simulator and a Segment-compatible collector on loopback, run the job into demo.duckdb, advance time, run again, and summarise.",
    )
    demo.add_argument(
        "--db",
        metavar="PATH",
        default="demo.duckdb",
        help="demo warehouse path (default: demo.duckdb)",
    )
    demo.add_argument("--log-format", choices=("text", "json"), default="text")
    demo.add_argument("-v", "--verbose", action="store_true")

    st = commands.add_parser(
        "status",
        help="the last runs and what is pending",
        description="Show the last runs (duration, outcome, rows loaded, API requests, events and identifies sent, rejected, pending) and what is pending now. Answers from the lock file while a run holds the warehouse.",
    )
    _add_common(st)
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument(
        "-n", "--limit", type=int, default=10, help="how many runs to show (default 10)"
    )

    tr = commands.add_parser("transform", help="build the SQL models and run the data tests only")
    _add_common(tr)
    tr.add_argument("--wait", action="store_true", help="wait for a run in progress")

    pv = commands.add_parser("preview", help="show what the next run would send, without sending")
    _add_common(pv)
    pv.add_argument("--events-since", type=_date, metavar="DATE")
    pv.add_argument(
        "--sample", type=int, default=3, help="sample messages of each kind (default 3)"
    )

    rs = commands.add_parser(
        "resend",
        help="send delivered events again (after a wrong write key or region)",
        description="Re-send events that occurred on or after --since, with their original messageIds, whether delivered, skipped or rejected before.",
    )
    _add_common(rs)
    rs.add_argument("--since", type=_date, required=True, metavar="DATE")
    rs.add_argument(
        "--event", metavar="NAME", help="only this event name, e.g. 'Payment Completed'"
    )
    rs.add_argument("--wait", action="store_true")

    traits = commands.add_parser("traits", help="customer traits commands")
    traits_commands = traits.add_subparsers(dest="traits_command", metavar="SUBCOMMAND")
    rc = traits_commands.add_parser(
        "recompute",
        help="send identify again for all or some customers",
        description="Re-send identify calls regardless of the stored trait hash: after changing a trait definition or reconnecting a destination.",
    )
    _add_common(rc)
    rc.add_argument(
        "--customer", action="append", metavar="ID", help="only this customer (repeatable)"
    )
    rc.add_argument("--wait", action="store_true")

    doc = commands.add_parser(
        "doctor", help="check configuration and reachability without changing anything"
    )
    _add_common(doc)
    return parser


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    return {"warehouse.path": getattr(args, "db", None)}


def _fail(message: str, code: ExitCode) -> int:
    print(f"dodo-segment: {scrub(message)}", file=sys.stderr)
    return int(code)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    os.umask(0o077)  # the warehouse and pipeline folder hold customers' personal data
    os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command or (args.command == "traits" and not args.traits_command):
        parser.print_help()
        return int(ExitCode.USAGE)
    setup_logging(getattr(args, "log_format", "text"), getattr(args, "verbose", False))
    try:
        if args.command == "demo":
            from pipelines.demo import run_demo

            return run_demo(args.db)
        config = load_config(_flags(args))
    except ConfigError as exc:
        return _fail(str(exc), ExitCode.USAGE)
    register_secrets(config.secrets)
    try:
        return _dispatch(args, config)
    except ConfigError as exc:
        return _fail(str(exc), ExitCode.USAGE)
    except warehouse.WarehouseError as exc:
        return _fail(str(exc), ExitCode.FAILED)
    except KeyboardInterrupt:
        return _fail("interrupted", ExitCode.FAILED)


def _dispatch(args: argparse.Namespace, config: Any) -> int:
    if args.command == "status":
        return status.show(config.warehouse_path, limit=args.limit, as_json=args.json)
    if args.command == "doctor":
        from pipelines.doctor import run_doctor

        return run_doctor(config)
    if args.command == "run":
        full = args.full_refresh
        options = RunOptions(
            dry_run=args.dry_run,
            events_since=args.events_since,
            full_refresh=frozenset(RESOURCES if full == [] else (full or ())),
            skip_emit=args.skip_emit,
            only_emit=args.only_emit,
        )
        if options.skip_emit and options.only_emit:
            raise ConfigError("--skip-emit and --only-emit exclude each other")
        check_ready(config, options)
        return _with_lock(config, "run", args.wait, lambda: _run(config, options))
    if args.command == "transform":
        options = RunOptions(only_emit=True, skip_emit=True, command="transform")
        return _with_lock(config, "transform", args.wait, lambda: _run(config, options))
    from pipelines import operations

    if args.command == "preview":
        return operations.show_preview(config, args.events_since, args.sample)
    if args.command == "resend":
        return _with_lock(
            config, "resend", args.wait, lambda: operations.resend(config, args.since, args.event)
        )
    if args.command == "traits":
        return _with_lock(
            config, "traits recompute", args.wait,
            lambda: operations.recompute_traits(config, args.customer),
        )  # fmt: skip
    raise ConfigError(f"unknown command {args.command}")


def _with_lock(config: Any, command: str, wait: bool, body: Any) -> int:
    try:
        with lock.run_lock(config.warehouse_path, command, wait=wait):
            return int(body())
    except lock.LockBusy as busy:
        held = busy.holder.held_seconds
        since = f" for {held:.0f}s" if held is not None else ""
        print(
            f"dodo-segment: another run is in progress{since} (pid {busy.holder.pid}); "
            "skipping this one (use --wait to queue)"
        )
        return int(ExitCode.OK)


def _run(config: Any, options: RunOptions) -> int:
    report = run_job(config, options)
    if report.preview is not None:
        from pipelines.operations import print_preview

        print_preview(report.preview)
    if report.error:
        print(f"dodo-segment: {report.outcome}: {scrub(report.error)}", file=sys.stderr)
    summary = {
        "run_id": report.run_id,
        "outcome": report.outcome,
        "rows_loaded": report.extract.total_rows if report.extract else 0,
        "identifies_sent": report.identifies_sent,
        "tracks_sent": report.tracks_sent,
        "rejected": report.rejected,
        "quarantined": report.quarantined,
    }
    log.info("run %s", json.dumps(summary))
    return int(report.exit_code if report.exit_code is not None else ExitCode.FAILED)


def entry() -> None:
    """Console-script entry: exit without interpreter teardown noise from native extensions."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    entry()
