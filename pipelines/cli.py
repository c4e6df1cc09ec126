"""The `dodo-segment` command: wires the subcommands of `pipelines/commands/`, each of which adds its
own arguments and runs its own code."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from pipelines.commands.common import fail
from pipelines.logs import log_write_failures, say, setup_logging

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
  dodo-segment report     one HTML page of MRR, revenue, dunning and sync health (offline)
  dodo-segment tracking-plan      write the JSON Schemas of every event, identify and group
  dodo-segment backup PATH        a consistent, owner-only copy of the warehouse

Configuration comes from flags, then environment variables (DODO_PAYMENTS_API_KEY,
DODO_PAYMENTS_ENVIRONMENT, DODO_PAYMENTS_BASE_URL, DODO_SEGMENT_DB, SEGMENT_WRITE_KEY,
SEGMENT_HOST), then .dlt/config.toml and .dlt/secrets.toml.

Exit codes: 0 success (or skipped because another run is in progress), 1 failure (what was
delivered stays delivered, the rest is pending), 2 usage or configuration error, 3 finished
with newly rejected messages or quarantined rows (see status), 4 an error data test failed so
nothing was emitted.

Start with: dodo-segment doctor, then dodo-segment run, then dodo-segment status.
"""

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (where its arguments are added, "module:function"), its one-line summary
    "run": ("pipelines.commands.run:add_arguments", "extract, model and emit (the scheduled job)"),
    "listen": (
        "pipelines.commands.listen:add_arguments",
        "accept Dodo webhooks and trigger short runs",
    ),
    "demo": (
        "pipelines.commands.demo:add_arguments",
        "run the whole job against the embedded sandbox",
    ),
    "status": ("pipelines.commands.status:add_arguments", "the last runs and what is pending"),
    "transform": (
        "pipelines.commands.transform:add_arguments",
        "build the SQL models and run the data tests only",
    ),
    "preview": (
        "pipelines.commands.sends:add_preview_arguments",
        "show what the next run would send, without sending",
    ),
    "resend": (
        "pipelines.commands.sends:add_resend_arguments",
        "send events again (after a wrong write key or region)",
    ),
    "traits": ("pipelines.commands.sends:add_traits_arguments", "customer traits commands"),
    "init": (
        "pipelines.commands.init:add_arguments",
        "create a project folder: settings, keys, your own models",
    ),
    "doctor": (
        "pipelines.commands.doctor:add_arguments",
        "check configuration and reachability without changing anything",
    ),
    "alerts": ("pipelines.commands.alerts:add_arguments", "alert webhook commands"),
    "report": (
        "pipelines.commands.report:add_arguments",
        "write one self-contained HTML report of the warehouse",
    ),
    "tracking-plan": (
        "pipelines.commands.tracking_plan:add_arguments",
        "write the tracking plan (JSON Schema per event and traits)",
    ),
    "backup": (
        "pipelines.commands.backup:add_arguments",
        "copy the warehouse consistently (owner-only) to PATH",
    ),
    "forget": (
        "pipelines.commands.forget:add_arguments",
        "erase customers' personal data (erasure requests)",
    ),
}
"""Every subcommand. Only the one named on the command line is imported: its module brings the
job, dlt and the steps, so `dodo-segment --help` answers at once."""


def chosen_command(argv: Sequence[str]) -> str | None:
    """The subcommand named on the command line (its first word that is not an option)."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; `command` gets its full arguments, the others their summary only."""
    parser = argparse.ArgumentParser(
        prog="dodo-segment",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dodo-segment {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (where, summary) in COMMANDS.items():
        if name == command:
            module, function = where.split(":")
            getattr(importlib.import_module(module), function)(commands, summary)
        else:
            commands.add_parser(name, help=summary)
    return parser


def _version() -> str:
    try:
        return version("dodo-segment")
    except PackageNotFoundError:
        return "dev"


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # systemd and cron stop jobs with SIGTERM: end like Ctrl-C


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script: parse, then hand the arguments to the command."""
    os.umask(0o077)  # the warehouse and pipeline folder hold customers' personal data
    os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(chosen_command(argv))
    args = parser.parse_args(argv)
    from pipelines import warehouse
    from pipelines.config import ConfigError
    from pipelines.job import ExitCode

    if not args.command:
        parser.print_help(sys.stderr)
        return int(ExitCode.USAGE)
    setup_logging(getattr(args, "log_format", "text"), getattr(args, "verbose", False))
    signal.signal(signal.SIGTERM, _terminate)
    # A file-size limit (ulimit -f) then fails the write with EFBIG, reported like a full disk,
    # instead of killing the run mid-write.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        return _logs_written(int(args.handler(args)))
    except ConfigError as exc:
        return fail(str(exc), ExitCode.USAGE)
    except warehouse.WarehouseError as exc:
        return fail(str(exc), ExitCode.FAILED)
    except KeyboardInterrupt:
        return fail("interrupted", ExitCode.FAILED)
    except Exception as exc:
        if warehouse.disk_full(exc):  # backup, forget's rewrite, resend...: one line, exit 1
            first = str(exc).strip().splitlines()
            return fail(
                f"{args.command} stopped: the disk is full ({first[0][:200] if first else exc!r}); "
                "what it finished stays done: free some space and run it again",
                ExitCode.FAILED,
            )
        if isinstance(exc, OSError):  # e.g. DODO_SEGMENT_DB under a file, a read-only folder
            return fail(f"cannot use the warehouse path: {exc}", ExitCode.FAILED)
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


def entry() -> None:
    """Console-script entry: exit without interpreter teardown noise from native extensions."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    entry()
