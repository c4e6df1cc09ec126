"""`dodo-segment run`: the scheduled job (extract -> models -> data tests -> emit), one summary line."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from pipelines import lock
from pipelines.commands.common import (
    Subcommands,
    add_command,
    add_common,
    add_wait,
    load_command_config,
    parse_date,
    with_lock,
)
from pipelines.dodo_contract import RESOURCES
from pipelines.logs import complain, say

# The job (dlt and the steps) is imported once the arguments are valid: `run --help` and argument
# errors answer at once.
if TYPE_CHECKING:
    from pipelines.config import AppConfig
    from pipelines.job import RunOptions

DESCRIPTION = (
    "Extract the Dodo Payments API into the warehouse, build the SQL models, run the data tests "
    "and send new events and changed traits to Segment. Prints one summary line on stdout when "
    "it ends; progress and details go to stderr."
)

EPILOG = """\
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


def add_arguments(commands: Subcommands, summary: str) -> None:
    """`run` and its flags."""
    run = add_command(commands, "run", summary, DESCRIPTION, handle, EPILOG)
    add_common(run)
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="extract and model, then show what would be sent without sending",
    )
    run.add_argument(
        "--events-since",
        type=parse_date,
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
    add_wait(run)


def handle(args: argparse.Namespace) -> int:
    """Check the options, then run the job under the lock (or serve runs to the listener)."""
    from pipelines.config import ConfigError
    from pipelines.job import RunOptions, check_ready

    config = load_command_config(args)
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
    return with_lock(config, "run", args.wait, lambda: run_and_report(config, options))


def run_and_report(config: AppConfig, options: RunOptions) -> int:
    """One run of the job, its summary line on stdout, its exit code."""
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
            code = with_lock(config, "run", True, lambda: run_and_report(config, options))
        except Exception as exc:  # the next delivery gets a fresh try; the listener logs this
            complain(
                f"run failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            )
            code = 1
        print(f"exit {code}", flush=True)
    return 0
