"""`dodo-segment doctor`: check configuration and reachability without changing anything."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

import requests

from pipelines import lock, warehouse
from pipelines.commands.common import Subcommands, add_command, add_common, load_command_config
from pipelines.config import AppConfig, lookup, webhook_key
from pipelines.dodo_contract import ENDPOINTS, WAREHOUSE_SCHEMA_VERSION
from pipelines.job import ExitCode
from pipelines.logs import say
from pipelines.webhook_store import WebhookStore, store_folder

DESCRIPTION = (
    "Check, one line each: the API key is accepted by Dodo, the Segment host answers, the "
    "warehouse opens (and its schema version fits this release), the run lock is free. Exit 0 "
    "when every check passes, 1 otherwise."
)

Check = Callable[[AppConfig], tuple[bool, str] | None]
"""A check: (passed, one line), or None when it does not apply to this setup."""


def check_dodo(config: AppConfig) -> tuple[bool, str]:
    """The API key is accepted by Dodo (one GET of one customer)."""
    xc = config.extract
    if not xc.api_key:
        return False, "DODO_PAYMENTS_API_KEY is not set (export it or set [sources.dodo] api_key)"
    url = xc.base_url.rstrip("/") + ENDPOINTS["customers"]
    try:
        response = requests.get(
            url,
            params={"page_size": 1, "page_number": 0},
            headers={"Authorization": f"Bearer {xc.api_key}"},
            timeout=min(xc.timeout_seconds, 15),
        )
    except requests.RequestException as exc:
        return (
            False,
            f"cannot reach {xc.base_url}: {type(exc).__name__} (check the URL and network)",
        )
    if response.status_code in (401, 403):
        return False, (
            f"{xc.base_url} refused the key (HTTP {response.status_code}): check "
            f"DODO_PAYMENTS_API_KEY for {xc.environment}"
        )
    if response.status_code != 200:
        return False, f"{xc.base_url} answered HTTP {response.status_code}"
    return True, f"Dodo API at {xc.base_url} ({xc.environment}) accepts the key"


def check_segment(config: AppConfig) -> tuple[bool, str]:
    """The Segment host answers (Segment accepts any key with 200, so this checks the host only)."""
    sc = config.segment
    if not sc.write_key:
        return False, "SEGMENT_WRITE_KEY is not set (needed to emit; --skip-emit runs without it)"
    try:
        response = requests.post(
            sc.host.rstrip("/") + "/v1/batch",
            json={"batch": []},
            auth=(sc.write_key, ""),
            timeout=min(sc.timeout_seconds, 15),
        )
    except requests.RequestException as exc:
        return False, f"cannot reach Segment host {sc.host}: {type(exc).__name__}"
    if response.status_code >= 500:
        return False, f"Segment host {sc.host} answered HTTP {response.status_code}"
    return True, (
        f"Segment host {sc.host} reachable (HTTP {response.status_code}); Segment accepts any "
        "write key, so confirm delivery in the source's debugger"
    )


def check_warehouse(config: AppConfig) -> tuple[bool, str]:
    """The warehouse opens and every table reads back whole (or its folder is writable for a
    new one), and its version fits."""
    path = config.warehouse_path
    if path.startswith("md:"):
        return True, f"warehouse {path} is a MotherDuck database (not checked offline)"
    if not os.path.exists(path):
        folder = Path(path).expanduser().resolve().parent
        if os.access(folder, os.W_OK):
            return True, f"warehouse {path} does not exist yet; {folder} is writable"
        return False, f"warehouse folder {folder} is not writable"
    if not os.access(path, os.W_OK):
        return False, f"warehouse {path} is not writable"
    if lock.is_locked(path) is not None:
        # Even a read-only open would make the run's next write fail.
        return True, f"warehouse {path} exists; not opened while a run holds it"
    try:
        with warehouse.connect(path, read_only=True) as con:
            found = warehouse.schema_version(con)
            tables, rows = warehouse.read_every_table(con)
    except warehouse.WarehouseError as exc:
        return False, str(exc)
    if found > WAREHOUSE_SCHEMA_VERSION:
        return False, (
            f"warehouse {path} has schema version {found}, newer than this release "
            f"(schema {WAREHOUSE_SCHEMA_VERSION}): upgrade dodo-segment"
        )
    return True, (
        f"warehouse {path} opens (schema version {found or 'new'}); its {tables} tables read "
        f"back whole ({rows} rows)"
    )


def check_lock(config: AppConfig) -> tuple[bool, str]:
    """No run holds the lock (or say which one does)."""
    holder = lock.is_locked(config.warehouse_path)
    if holder is None:
        return True, "run lock is free"
    held = f" for {holder.held_seconds:.0f}s" if holder.held_seconds is not None else ""
    return False, (
        f"a run holds the lock{held} (pid {holder.pid}, {holder.command}); a new run would "
        "skip until it ends"
    )


def check_webhooks(config: AppConfig) -> tuple[bool, str] | None:
    """When the listener is in use: its signing secret is set and well-formed (else no line)."""
    from standardwebhooks.webhooks import Webhook

    store = WebhookStore(store_folder(config.warehouse_path))
    key = webhook_key()
    in_use = store.read_counters() is not None or lookup("listen.port") is not None
    if not in_use and not key:
        return None
    if not key:
        return False, (
            "the webhook listener is configured but DODO_PAYMENTS_WEBHOOK_KEY is not set: copy "
            "the endpoint's signing secret (whsec_...) from Dodo's dashboard"
        )
    try:
        Webhook(key)
    except Exception:  # binascii.Error, or an empty secret: never echo the value
        return False, "DODO_PAYMENTS_WEBHOOK_KEY is not a signing secret (expected whsec_<base64>)"
    return True, (
        f"webhook signing secret is set; {store.pending_count()} delivery(ies) wait for a run"
    )


def check_checkpoint(config: AppConfig) -> tuple[bool, str] | None:
    """The warehouse is not missing nor older than the delivery checkpoint (no line when there
    is no checkpoint yet: it is written after the first emit)."""
    from pipelines.emit import read_checkpoint, warehouse_knows_run

    path = config.warehouse_path
    found = None if path.startswith("md:") else read_checkpoint(path)
    if found is None:
        return None
    since = found.resend_from.isoformat() if found.resend_from else "the start"
    resumes = (
        f"the next run sends the events since {since} (the checkpoint of run {found.run_id}, "
        "minus a safety margin) instead of skipping them; restore a backup first if you have one"
    )
    if not os.path.exists(path):
        return False, f"warehouse {path} is missing: {resumes}"
    if lock.is_locked(path) is not None:
        return True, f"checkpoint of run {found.run_id} (not compared while a run holds the lock)"
    try:
        with warehouse.connect(path, read_only=True) as con:
            has_run = warehouse_knows_run(con, found.run_id)
    except warehouse.WarehouseError as exc:
        return False, str(exc)
    if not has_run:
        return False, (
            f"warehouse {path} is older than the delivery checkpoint (it has no record of run "
            f"{found.run_id}, written {found.written_at.isoformat()}): restored from an old copy? "
            "Its ledger resends what it does not know of, under the same messageIds"
        )
    up_to = found.delivered_up_to.isoformat() if found.delivered_up_to else "-"
    return True, f"checkpoint of run {found.run_id}: every event up to {up_to} settled"


CHECKS: tuple[tuple[str, Check], ...] = (
    ("dodo", check_dodo),
    ("segment", check_segment),
    ("warehouse", check_warehouse),
    ("checkpoint", check_checkpoint),
    ("lock", check_lock),
    ("webhooks", check_webhooks),
)


def run_doctor(config: AppConfig) -> int:
    """Run every check, print one line each; exit 0 when all pass, else 1."""
    ok_all = True
    for name, check in CHECKS:
        outcome = check(config)
        if outcome is None:  # not in use: nothing to check
            continue
        ok, message = outcome
        ok_all &= ok
        say(f"{'ok  ' if ok else 'FAIL'} {name:<9} {message}", check=name, ok=ok)
    return int(ExitCode.OK if ok_all else ExitCode.FAILED)


def add_arguments(commands: Subcommands, summary: str) -> None:
    """`doctor` and its flags."""
    add_common(add_command(commands, "doctor", summary, DESCRIPTION, handle))


def handle(args: argparse.Namespace) -> int:
    """Run the checks with the job's configuration."""
    return run_doctor(load_command_config(args))
