"""The `dodo-segment` command: parses arguments and calls the library's steps."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from pipelines import lock
from pipelines.dodo_contract import RESOURCES
from pipelines.logs import complain, log_write_failures, register_secrets, say, setup_logging

# The job, its configuration (dlt) and the steps are imported once the arguments are valid:
# `--help` and argument errors answer at once.
if TYPE_CHECKING:
    from pipelines.config import AppConfig
    from pipelines.job import RunOptions

log = logging.getLogger("dodo_segment")

DESCRIPTION = """\
Sync Dodo Payments to Segment through a DuckDB warehouse.

  dodo-segment run        extract -> load -> models -> data tests -> emit (the cron entry)
  dodo-segment demo       the whole job against an embedded sandbox (no keys needed)
  dodo-segment status     the last runs and what is pending
  dodo-segment doctor     check keys, hosts, warehouse and lock without changing anything
  dodo-segment preview    what the next run would send, without sending
  dodo-segment resend     send events again with their original messageIds
  dodo-segment traits recompute   send identify again after a trait definition changed
  dodo-segment transform  build the SQL models and run the data tests only
  dodo-segment init       create a project folder with settings and your own models
  dodo-segment alerts test        send one test alert to [alerts] webhook_url
  dodo-segment forget     erase customers (by id or email) here and in Segment

Configuration comes from flags, then environment variables (DODO_PAYMENTS_API_KEY,
DODO_PAYMENTS_ENVIRONMENT, DODO_PAYMENTS_BASE_URL, DODO_SEGMENT_DB, SEGMENT_WRITE_KEY,
SEGMENT_HOST), then .dlt/config.toml and .dlt/secrets.toml.

Exit codes: 0 success (or skipped because another run is in progress), 1 failure (what was
delivered stays delivered, the rest is pending), 2 usage or configuration error, 3 finished
with newly rejected messages or quarantined rows (see status), 4 an error data test failed so
nothing was emitted.

Start with: dodo-segment doctor, then dodo-segment run, then dodo-segment status.
"""

RUN_EPILOG = """\
examples:
  dodo-segment run                              the scheduled job (cron: every 30 minutes)
  dodo-segment run --skip-emit                  load and model only (no SEGMENT_WRITE_KEY needed)
  dodo-segment run --events-since 2025-01-01    also send historical events from that date
  dodo-segment run --full-refresh customers     re-read all customers
  dodo-segment run --deep                       the deep pass now (re-read lookback_days)
  dodo-segment run --log-format json >> sync.log 2>&1

A second run while one is in progress exits 0 at once with one line (--wait queues it).
Exit codes: 0 success or skipped overlap, 1 failure, 2 usage/configuration, 3 rejected
messages or quarantined rows, 4 an error data test blocked emission.
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
        help="warehouse path, or md:NAME for MotherDuck (default: $DODO_SEGMENT_DB or "
        "dodo_segment.duckdb)",
    )
    parser.add_argument(
        "--log-format", choices=("text", "json"), default="text",
        help="text for people (default) or one JSON object per line for log shippers",
    )  # fmt: skip
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _add_wait(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--wait",
        action="store_true",
        help="wait for a run in progress to finish instead of skipping (exit 0) at once",
    )


def _command(
    commands: Any, name: str, summary: str, description: str, epilog: str | None = None
) -> argparse.ArgumentParser:
    return commands.add_parser(
        name,
        help=summary,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand and its help."""
    parser = argparse.ArgumentParser(
        prog="dodo-segment",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dodo-segment {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = _command(
        commands, "run", "extract, model and emit (the scheduled job)",
        "Extract the Dodo Payments API into the warehouse, build the SQL models, run the data "
        "tests and send new events and changed traits to Segment. Prints one summary line on "
        "stdout when it ends; progress and details go to stderr.",
        RUN_EPILOG,
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
        "--deep",
        action="store_true",
        help="make this run the deep pass: re-read the whole lookback_days window behind each "
        "cursor (otherwise one run per deep_lookback_hours does)",
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
        "--webhook-only",
        action="store_true",
        help="do not read the API: merge the stored webhook deliveries, model and send "
        "(what `listen` starts)",
    )
    run.add_argument("--serve-stdin", action="store_true", help=argparse.SUPPRESS)
    _add_wait(run)

    ls = _command(
        commands, "listen", "accept Dodo webhooks and trigger short runs",
        "Serve one HTTP endpoint for Dodo's webhooks (loopback by default: put it behind your "
        "TLS reverse proxy). Each delivery is verified with DODO_PAYMENTS_WEBHOOK_KEY (Standard "
        "Webhooks), stored durably beside the warehouse and answered 2xx; a burst of deliveries "
        "then starts one `run --webhook-only`, which waits for a scheduled run to finish.",
        "example:\n  DODO_PAYMENTS_WEBHOOK_KEY=whsec_... dodo-segment listen --port 8787",
    )  # fmt: skip
    _add_common(ls)
    ls.add_argument("--host", help="address to listen on (default 127.0.0.1; [listen] host)")
    ls.add_argument("--port", type=int, help="port (default 8787; [listen] port)")
    ls.add_argument("--path", help="the endpoint's path (default /webhooks/dodo; [listen] path)")

    demo = _command(
        commands, "demo", "run the whole job against the embedded sandbox",
        "Start a Dodo API simulator and a Segment-compatible collector on loopback, run the job "
        "into a fresh demo warehouse, advance the simulator's clock a week, run again, and "
        "summarise what was loaded and sent. Needs no keys; never touches your warehouse.",
    )  # fmt: skip
    demo.add_argument(
        "--db",
        metavar="PATH",
        default="demo.duckdb",
        help="demo warehouse path, recreated on every demo (default: demo.duckdb)",
    )
    demo.add_argument("--log-format", choices=("text", "json"), default="text")
    demo.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    st = _command(
        commands, "status", "the last runs and what is pending",
        "Show the last runs (start, duration, outcome, rows loaded, API requests, identifies "
        "and events sent, rejected, quarantined, pending) and what the next run would send. "
        "Never writes. While a run holds the warehouse, answers from the lock file: which "
        "command, which step, for how long, and whether that is unusually long.",
    )  # fmt: skip
    _add_common(st)
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument(
        "--format",
        choices=("text", "json", "prometheus"),
        default="text",
        help="text (default), json (as --json) or prometheus (metrics in Prometheus' text format)",
    )
    st.add_argument(
        "-n", "--limit", type=int, default=10, help="how many runs to show (default 10)"
    )

    tr = _command(
        commands, "transform", "build the SQL models and run the data tests only",
        "Rebuild analytics.* from the raw tables and run the data tests; nothing is read from "
        "the API and nothing is sent. Exit 3 when rows were quarantined, 4 when an error test "
        "failed.",
    )  # fmt: skip
    _add_common(tr)
    _add_wait(tr)
    tr.add_argument(
        "--list",
        action="store_true",
        help="list the models in build order, the user's (`[models] paths`) marked, and exit",
    )

    pv = _command(
        commands, "preview", "show what the next run would send, without sending",
        "Count the identify and track calls the next run would send from what the warehouse "
        "holds now, and print a sample of each exactly as it would be sent. Sends nothing.",
    )  # fmt: skip
    _add_common(pv)
    pv.add_argument(
        "--events-since", type=_date, metavar="DATE", help="as `run --events-since DATE` would"
    )
    pv.add_argument(
        "--sample", type=int, default=3, help="sample messages of each kind (default 3)"
    )
    _add_wait(pv)

    rs = _command(
        commands, "resend", "send events again (after a wrong write key or region)",
        "Re-send the events that occurred on or after --since, with their original messageIds, "
        "whether delivered, skipped or rejected before. Segment answers 200 to a wrong write key "
        "or region, so this is how to repair a sync that went nowhere.",
        "example:\n  dodo-segment resend --since 2025-06-01 --event 'Payment Completed'",
    )  # fmt: skip
    _add_common(rs)
    rs.add_argument("--since", type=_date, required=True, metavar="DATE")
    rs.add_argument(
        "--event", metavar="NAME", help="only this event name, e.g. 'Payment Completed'"
    )
    _add_wait(rs)

    traits = _command(
        commands, "traits", "customer traits commands",
        "Commands about customer traits (identify calls).",
        "example:\n  dodo-segment traits recompute --customer cus_123",
    )  # fmt: skip
    traits_commands = traits.add_subparsers(dest="traits_command", metavar="SUBCOMMAND")
    rc = _command(
        traits_commands, "recompute", "send identify again for all or some customers",
        "Re-send identify calls regardless of the stored trait hash: after changing a trait "
        "definition or reconnecting a destination.",
    )  # fmt: skip
    _add_common(rc)
    rc.add_argument(
        "--customer", action="append", metavar="ID", help="only this customer (repeatable)"
    )
    _add_wait(rc)

    ini = _command(
        commands, "init", "create a project folder: settings, keys, your own models",
        "Create DIR (default: the current folder) with .dlt/config.toml (every setting, "
        "commented), .dlt/secrets.toml (key placeholders, owner-only), .gitignore, models/ with "
        "an example custom trait and custom event, and a README. Run dodo-segment from that "
        "folder to use them. Existing files are never overwritten without --force (exit 2).",
        "example:\n  dodo-segment init my-sync && cd my-sync && dodo-segment demo",
    )  # fmt: skip
    ini.add_argument("dir", nargs="?", default=".", metavar="DIR", help="the project folder")
    ini.add_argument("--force", action="store_true", help="overwrite existing files")

    bk = _command(
        commands, "backup", "copy the warehouse consistently (owner-only) to PATH",
        "Take the run lock, checkpoint DuckDB and copy the warehouse file to PATH (replaced "
        "atomically, mode 0600), then read every table of the copy back. `run --db PATH` "
        "continues from the copy; copy it over the warehouse to restore. Exit 1 when a run "
        "holds the lock (unless --wait) or the copy cannot be written.",
        "example:\n  dodo-segment backup /backups/dodo_segment-$(date +%%F).duckdb",
    )  # fmt: skip
    _add_common(bk)
    bk.add_argument("path", metavar="PATH", help="the backup file to write")
    bk.add_argument(
        "--wait", action="store_true", help="wait for a run in progress instead of giving up"
    )

    doc = _command(
        commands, "doctor", "check configuration and reachability without changing anything",
        "Check, one line each: the API key is accepted by Dodo, the Segment host answers, the "
        "warehouse opens (and its schema version fits this release), the run lock is free. "
        "Exit 0 when every check passes, 1 otherwise.",
    )  # fmt: skip
    _add_common(doc)

    al = _command(
        commands, "alerts", "alert webhook commands",
        "Alerts go to [alerts] webhook_url (DODO_SEGMENT_ALERT_WEBHOOK_URL): one POST when a "
        "condition opens (failed run, outage, blocked emission, rejections above "
        "[alerts] reject_threshold, a lock held unusually long) and one when it clears.",
        "example:\n  dodo-segment alerts test",
    )  # fmt: skip
    al_commands = al.add_subparsers(dest="alerts_command", metavar="SUBCOMMAND", required=True)
    at = _command(
        al_commands, "test", "send one test alert",
        "POST one test alert to the webhook and say whether it was accepted (exit 0) or not "
        "(exit 1). The URL is never printed.",
    )  # fmt: skip
    _add_common(at)

    fg = _command(
        commands, "forget", "erase customers' personal data (erasure requests)",
        "Remove the customers' personal data (email, name, phone, metadata, billing address, "
        "...) from every table of the warehouse and from the dlt load files beside it, keep "
        "what accounting needs without the person (ids, amounts, currencies, dates), record a "
        "tombstone so later syncs neither store nor send them again, rewrite the warehouse "
        "file so the erased values leave its bytes, and file a SUPPRESS_WITH_DELETE regulation "
        "with Segment (SEGMENT_PUBLIC_API_TOKEN) or print the Privacy Portal steps.",
        "examples:\n  dodo-segment forget cus_123 --dry-run\n  dodo-segment forget ana@example.com\n\n"
        "Exit codes: 0 forgotten, 1 failure, 2 usage, 5 unknown customer (nothing changed), "
        "6 erased here but Segment did not take the request (run it again).",
    )  # fmt: skip
    _add_common(fg)
    fg.add_argument("customer", nargs="+", metavar="CUSTOMER_ID_OR_EMAIL")
    fg.add_argument(
        "--dry-run", action="store_true", help="list what would be removed; change nothing"
    )
    _add_wait(fg)
    return parser


def _version() -> str:
    try:
        return version("dodo-segment")
    except PackageNotFoundError:
        return "dev"


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "warehouse.path": getattr(args, "db", None),
        "listen.host": getattr(args, "host", None),
        "listen.port": getattr(args, "port", None),
        "listen.path": getattr(args, "path", None),
    }


def _fail(message: str, code: int) -> int:
    complain(message)
    return int(code)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # systemd and cron stop jobs with SIGTERM: end like Ctrl-C


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    os.umask(0o077)  # the warehouse and pipeline folder hold customers' personal data
    os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    from pipelines import warehouse
    from pipelines.config import ConfigError, load_config, webhook_key
    from pipelines.job import ExitCode

    if not args.command or (args.command == "traits" and not args.traits_command):
        parser.print_help(sys.stderr)
        return int(ExitCode.USAGE)
    setup_logging(getattr(args, "log_format", "text"), getattr(args, "verbose", False))
    signal.signal(signal.SIGTERM, _terminate)
    # A file-size limit (ulimit -f) then fails the write with EFBIG, reported like a full disk,
    # instead of killing the run mid-write.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        if args.command == "init":
            from pipelines.commands.init import init_project

            return init_project(args.dir, force=args.force)
        if args.command == "demo":
            from pipelines.commands.demo import run_demo

            return run_demo(args.db)
        config = load_config(_flags(args))
        register_secrets((*config.secrets, webhook_key(_flags(args))))
        return _logs_written(_dispatch(args, config))
    except ConfigError as exc:
        return _fail(str(exc), ExitCode.USAGE)
    except warehouse.WarehouseError as exc:
        return _fail(str(exc), ExitCode.FAILED)
    except KeyboardInterrupt:
        return _fail("interrupted", ExitCode.FAILED)
    except Exception as exc:
        if warehouse.disk_full(exc):  # backup, forget's rewrite, resend...: one line, exit 1
            first = str(exc).strip().splitlines()
            return _fail(
                f"{args.command} stopped: the disk is full ({first[0][:200] if first else exc!r}); "
                "what it finished stays done: free some space and run it again",
                ExitCode.FAILED,
            )
        if isinstance(exc, OSError):  # e.g. DODO_SEGMENT_DB under a file, a read-only folder
            return _fail(f"cannot use the warehouse path: {exc}", ExitCode.FAILED)
        raise


def _logs_written(code: int) -> int:
    """A command whose log lines could not be written (stderr on a full disk) fails: exit 1."""
    lost = log_write_failures()
    if not lost or code != 0:
        return code
    say(
        f"dodo-segment: {lost} log line(s) could not be written (is the log's disk full?); "
        "the command itself completed",
        log_lines_lost=lost,
    )
    return 1


def _dispatch(args: argparse.Namespace, config: AppConfig) -> int:
    from pipelines.config import ConfigError
    from pipelines.job import RunOptions

    if args.command == "status" and args.format == "prometheus":
        from pipelines import metrics

        sys.stdout.write(metrics.render(config.warehouse_path).decode())
        return 0
    if args.command == "alerts":
        return _alerts_test(config)
    if args.command == "status":
        from pipelines.commands import status

        return status.show(
            config.warehouse_path,
            limit=args.limit,
            as_json=args.json or args.format == "json",
            excluded_fields=config.segment.excluded_fields,
            deep_every_hours=config.extract.deep_lookback_hours,
        )
    if args.command == "listen":
        from pipelines.commands.listen import serve
        from pipelines.config import load_listen_config

        return serve(load_listen_config(config, _flags(args)))
    if args.command == "backup":
        from pipelines.commands.backup import backup

        return backup(config, args.path, wait=args.wait)
    if args.command == "doctor":
        from pipelines.commands.doctor import run_doctor

        return run_doctor(config)
    if args.command == "run":
        from pipelines.job import check_ready

        full = args.full_refresh
        options = RunOptions(
            dry_run=args.dry_run,
            events_since=args.events_since,
            full_refresh=frozenset(RESOURCES if full == [] else (full or ())),
            skip_emit=args.skip_emit,
            only_emit=args.only_emit,
            webhook_only=args.webhook_only,
            deep=args.deep,
        )
        if options.skip_emit and options.only_emit:
            raise ConfigError("--skip-emit and --only-emit exclude each other")
        if options.webhook_only and (options.only_emit or options.full_refresh or options.deep):
            raise ConfigError("--webhook-only excludes --only-emit, --full-refresh and --deep")
        check_ready(config, options)
        if args.serve_stdin:
            return _serve_runs(config, options)
        return _with_lock(config, "run", args.wait, lambda: _run(config, options))
    if args.command == "transform" and args.list:
        from pipelines.commands.models import show_models

        return show_models(config)
    if args.command == "forget":
        from pipelines.commands.forget import forget_customers

        return _with_lock(
            config, "forget", args.wait,
            lambda: forget_customers(config, args.customer, dry_run=args.dry_run),
        )  # fmt: skip
    if args.command == "transform":
        options = RunOptions(only_emit=True, skip_emit=True, command="transform")
        return _with_lock(config, "transform", args.wait, lambda: _run(config, options))
    from pipelines.commands import sends

    if args.command == "preview":
        return _with_lock(
            config, "preview", args.wait,
            lambda: sends.show_preview(config, args.events_since, args.sample),
        )  # fmt: skip
    if args.command == "resend":
        return _with_lock(
            config, "resend", args.wait, lambda: sends.resend(config, args.since, args.event)
        )
    if args.command == "traits":
        return _with_lock(
            config, "traits recompute", args.wait,
            lambda: sends.recompute_traits(config, args.customer),
        )  # fmt: skip
    raise ConfigError(f"unknown command {args.command}")


def _busy_line(holder: lock.LockHolder) -> str:
    held = holder.held_seconds
    since = f" for {held:.0f}s" if held is not None else ""
    what = ", ".join(str(x) for x in (holder.command, holder.step and f"step {holder.step}") if x)
    return f"another run is in progress{since} (pid {holder.pid}{', ' if what else ''}{what})"


def _with_lock(config: AppConfig, command: str, wait: bool, body: Callable[[], int]) -> int:
    from pipelines.job import ExitCode

    path = config.warehouse_path
    try:
        with lock.run_lock(path, command):
            return int(body())
    except lock.LockBusy as busy:
        _alert_lock_held(config, busy.holder)
        if not wait:
            say(
                f"dodo-segment: {_busy_line(busy.holder)}; skipping this one (--wait queues it)",
                outcome="skipped",
                exit_code=0,
                held_seconds=busy.holder.held_seconds,
                pid=busy.holder.pid,
            )
            return int(ExitCode.OK)
        logging.getLogger("dodo_segment").info(
            "%s; waiting for it to finish", _busy_line(busy.holder)
        )
    with lock.run_lock(path, command, wait=True):
        return int(body())


def _alert_lock_held(config: AppConfig, holder: lock.LockHolder) -> None:
    """A run that meets the lock tells the webhook when it has been held unusually long."""
    from pipelines import alerts
    from pipelines.commands.status import long_run_threshold

    facts = {"pid": holder.pid, "command": holder.command, "step": holder.step}
    facts["run_id"] = holder.run_id
    alerts.lock_held(config, holder.held_seconds, long_run_threshold(holder), facts)


def _alerts_test(config: AppConfig) -> int:
    from pipelines import alerts
    from pipelines.config import ConfigError
    from pipelines.job import ExitCode

    if not config.alerts.webhook_url:
        raise ConfigError(
            "no alert webhook: set DODO_SEGMENT_ALERT_WEBHOOK_URL, or webhook_url under [alerts] "
            "in .dlt/secrets.toml"
        )
    reason = alerts.send_test(config)
    if reason:
        return _fail(f"alerts test: not delivered: {reason}", ExitCode.FAILED)
    say("alerts test: delivered; check the channel", outcome="delivered")
    return int(ExitCode.OK)


def _run(config: AppConfig, options: RunOptions) -> int:
    from pipelines.job import ExitCode, run_job, summary_figures, summary_line

    def note_step(**facts: Any) -> None:
        lock.annotate(config.warehouse_path, **facts)

    report = run_job(config, options, on_step=note_step)
    if report.preview is not None:
        from pipelines.commands.sends import print_preview

        print_preview(report.preview)
    if report.error:
        complain(f"{report.outcome}: {report.error}")
    say(summary_line(report), **summary_figures(report))
    return int(report.exit_code if report.exit_code is not None else ExitCode.FAILED)


def _serve_runs(config: AppConfig, options: RunOptions) -> int:
    """One run per line read on stdin, each answered `exit N` on stdout: the listener's worker,
    which pays the imports once. It holds the lock and the warehouse only while a run lasts."""
    for _request in sys.stdin:
        try:
            code = _with_lock(config, "run", True, lambda: _run(config, options))
        except Exception as exc:  # the next delivery gets a fresh try; the listener logs this
            complain(
                f"run failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            )
            code = 1
        print(f"exit {code}", flush=True)
    return 0


def entry() -> None:
    """Console-script entry: exit without interpreter teardown noise from native extensions."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    entry()
