"""What every command shares: the subcommand parser, the common flags, the configuration and the
run lock around a command's body."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from pipelines import lock
from pipelines.logs import complain, register_secrets, say

if TYPE_CHECKING:
    from pipelines.config import AppConfig


class Subcommands(Protocol):
    """The object `ArgumentParser.add_subparsers` returns (argparse keeps its class private)."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser: ...


Handler = Callable[[argparse.Namespace], int]


def add_command(
    commands: Subcommands,
    name: str,
    summary: str,
    description: str,
    handler: Handler | None = None,
    epilog: str | None = None,
) -> argparse.ArgumentParser:
    """A subcommand with its one-line summary, its own description and the function it runs."""
    parser = commands.add_parser(
        name,
        help=summary,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if handler is not None:
        parser.set_defaults(handler=handler)
    return parser


def parse_date(value: str) -> datetime:
    """An argparse type: an ISO date or time, UTC when it names no zone."""
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date: {value!r} (use YYYY-MM-DD)") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def add_common(parser: argparse.ArgumentParser) -> None:
    """--db, --log-format and --verbose: every command that opens the warehouse has them."""
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


def add_wait(parser: argparse.ArgumentParser) -> None:
    """--wait: queue behind a run in progress instead of skipping."""
    parser.add_argument(
        "--wait",
        action="store_true",
        help="wait for a run in progress to finish instead of skipping (exit 0) at once",
    )


def flags(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags, by their dlt path (None where a flag was not given)."""
    return {
        "warehouse.path": getattr(args, "db", None),
        "listen.host": getattr(args, "host", None),
        "listen.port": getattr(args, "port", None),
        "listen.path": getattr(args, "path", None),
    }


def load_command_config(args: argparse.Namespace) -> AppConfig:
    """The job's configuration for this command; its secrets are scrubbed from every log line."""
    from pipelines.config import load_config, webhook_key

    config = load_config(flags(args))
    register_secrets((*config.secrets, webhook_key(flags(args))))
    return config


def fail(message: str, code: int) -> int:
    """Say one line on stderr and return the exit code."""
    complain(message)
    return int(code)


def _busy_line(holder: lock.LockHolder) -> str:
    held = holder.held_seconds
    since = f" for {held:.0f}s" if held is not None else ""
    what = ", ".join(str(x) for x in (holder.command, holder.step and f"step {holder.step}") if x)
    return f"another run is in progress{since} (pid {holder.pid}{', ' if what else ''}{what})"


def with_lock(config: AppConfig, command: str, wait: bool, body: Callable[[], int]) -> int:
    """Run `body` holding the run lock; a busy lock skips (exit 0) unless `wait` queues."""
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

    facts = {"pid": holder.pid, "command": holder.command, "step": holder.step}
    facts["run_id"] = holder.run_id
    alerts.lock_held(config, holder.held_seconds, lock.long_run_threshold(holder), facts)
