"""`dodo-segment alerts test`: one test alert to the configured webhook."""

from __future__ import annotations

import argparse

from pipelines.commands.common import (
    Subcommands,
    add_command,
    add_common,
    fail,
    load_command_config,
)
from pipelines.logs import say

DESCRIPTION = (
    "Alerts go to [alerts] webhook_url (DODO_SEGMENT_ALERT_WEBHOOK_URL): one POST when a "
    "condition opens (failed run, outage, blocked emission, rejections above [alerts] "
    "reject_threshold, a lock held unusually long) and one when it clears."
)


def add_arguments(commands: Subcommands, summary: str) -> None:
    """`alerts test`."""
    alerts = add_command(
        commands, "alerts", summary, DESCRIPTION, epilog="example:\n  dodo-segment alerts test"
    )
    subcommands = alerts.add_subparsers(dest="alerts_command", metavar="SUBCOMMAND", required=True)
    test = add_command(
        subcommands, "test", "send one test alert",
        "POST one test alert to the webhook and say whether it was accepted (exit 0) or not "
        "(exit 1). The URL is never printed.",
        handle_test,
    )  # fmt: skip
    add_common(test)


def handle_test(args: argparse.Namespace) -> int:
    """Send the test alert; exit 0 when the webhook took it, 1 otherwise."""
    from pipelines import alerts
    from pipelines.config import ConfigError
    from pipelines.job import ExitCode

    config = load_command_config(args)
    if not config.alerts.webhook_url:
        raise ConfigError(
            "no alert webhook: set DODO_SEGMENT_ALERT_WEBHOOK_URL, or webhook_url under [alerts] "
            "in .dlt/secrets.toml"
        )
    reason = alerts.send_test(config)
    if reason:
        return fail(f"alerts test: not delivered: {reason}", ExitCode.FAILED)
    say("alerts test: delivered; check the channel", outcome="delivered")
    return int(ExitCode.OK)
