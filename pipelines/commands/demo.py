"""`dodo-segment demo`: the whole job against the embedded sandbox, twice, with a summary."""

from __future__ import annotations

import base64
import logging
import os
import shutil
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pipelines.commands.common import Subcommands, add_command
from pipelines.commands.listen import Listener
from pipelines.commands.report import write_report
from pipelines.config import ListenConfig, load_config, lookup, pipeline_dir
from pipelines.job import ExitCode, RunOptions, RunReport, run_job
from pipelines.lock import lock_path
from pipelines.sandbox import (
    Business,
    DodoSimulator,
    SegmentCollector,
    WebhookSender,
    changes_since,
    generate_business,
    snapshot,
)
from pipelines.webhook_store import store_folder

log = logging.getLogger("dodo_segment")

DEMO_API_KEY = "sandbox_api_key"
DEMO_WRITE_KEY = "sandbox_write_key"
DEMO_WEBHOOK_KEY = "whsec_" + base64.b64encode(b"dodo-segment demo webhook secret").decode()


DESCRIPTION = (
    "Start a Dodo API simulator and a Segment-compatible collector on loopback, run the job into "
    "a fresh demo warehouse, advance the simulator's clock a week, run again, and summarise what "
    "was loaded and sent. Needs no keys; never touches your warehouse."
)


def add_arguments(commands: Subcommands, summary: str) -> None:
    """`demo` and its flags (no --db default of the job's: the demo has a warehouse of its own)."""
    parser = add_command(commands, "demo", summary, DESCRIPTION, lambda args: run_demo(args.db))
    parser.add_argument(
        "--db",
        metavar="PATH",
        default="demo.duckdb",
        help="demo warehouse path, recreated on every demo (default: demo.duckdb)",
    )
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _fresh(path: str) -> None:
    """The demo always starts from an empty warehouse (it is demo data, never a user's file)."""
    for candidate in (Path(path), Path(path + ".wal"), lock_path(path)):
        candidate.unlink(missing_ok=True)
    shutil.rmtree(pipeline_dir(path), ignore_errors=True)
    # the last demo's webhook deliveries: the same ids again would be taken for duplicates
    shutil.rmtree(store_folder(path), ignore_errors=True)


def _print_run(title: str, report: RunReport, collector: SegmentCollector, before: int) -> None:
    extract = report.extract
    print(f"\n== {title} ({report.outcome}, exit code {report.exit_code})")
    if extract:
        loaded = ", ".join(f"{k} {v}" for k, v in sorted(extract.rows_loaded.items()) if v)
        print(f"   loaded {extract.total_rows} rows: {loaded}")
        print(
            f"   API requests: {sum(extract.api_requests.values())} "
            f"({', '.join(f'{k} {v}' for k, v in sorted(extract.api_requests.items()))})"
        )
    print(
        f"   sent to Segment: {report.identifies_sent} identify, {report.tracks_sent} track"
        + (
            f"; {report.skipped_backlog} older events recorded as skipped"
            if report.skipped_backlog
            else ""
        )
    )
    received = collector.tracks()[before:]
    by_event: dict[str, int] = {}
    for message in received:
        by_event[message["event"]] = by_event.get(message["event"], 0) + 1
    if by_event:
        print("   events: " + ", ".join(f"{n} {e}" for e, n in sorted(by_event.items())))
    if report.error:
        print(f"   error: {report.error}")


def _webhook_run(
    business: Business, collector: SegmentCollector, simulator: DodoSimulator, db_path: str
) -> None:
    """Run 3: six more hours pass; their webhooks reach `listen`, and Segment within seconds."""
    environment = {**os.environ, "SEGMENT_WRITE_KEY": DEMO_WRITE_KEY,
                   "SEGMENT_HOST": collector.base_url, "DODO_SEGMENT_DB": db_path}  # fmt: skip
    for name in ("DODO_PAYMENTS_API_KEY", "DODO_PAYMENTS_BASE_URL", "SOURCES__DODO__AS_OF"):
        environment.pop(name, None)  # a webhook-only run reads no API
    for path, value in _demo_identity().items():  # the same users and accounts as runs 1 and 2
        environment[path.replace(".", "__").upper()] = value
    settings = ListenConfig(webhook_key=DEMO_WEBHOOK_KEY, warehouse_path=db_path, port=0)
    listener = Listener(settings, worker_env=environment).start()
    try:
        before_state, tracks_before = snapshot(business), len(collector.tracks())
        business.advance_time(days=0.25, seed=3)
        payloads = changes_since(before_state, business)
        simulator.reset_counts()
        sender = WebhookSender(listener.address, DEMO_WEBHOOK_KEY, seed=1, duplicate_share=0.2,
                               shuffle=True)  # fmt: skip
        report = sender.deliver(payloads)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (
            listener.store.pending_count() or not sum(listener.runs.values())
        ):
            time.sleep(0.1)
        received = collector.tracks()[tracks_before:]
        arrivals = [collector.first_received_at[m["messageId"]] for m in received]
        first_ack = min(report.sent_at.values(), default=time.time())
        print(
            f"\n== Run 3: six hours later, through webhooks: {len(payloads)} signed deliveries "
            f"(+{report.duplicates} duplicates, out of order) to dodo-segment listen at "
            f"{listener.address}"
        )
        print(
            f"   {len(received)} track calls reached Segment "
            + (f"{max(arrivals) - first_ack:.1f}s after the first delivery" if arrivals else "")
            + f"; {sum(simulator.request_counts_by_endpoint().values())} API requests"
        )
    finally:
        listener.stop()


def report_path(db_path: str) -> Path:
    """Where the demo writes its report: beside the warehouse, `demo.duckdb` -> `demo-report.html`."""
    path = Path(db_path).expanduser()
    return path.with_name(f"{path.stem}-report.html")


DEMO_USER_ID_SOURCES = (
    '["customer.metadata.app_user_id", "payment.metadata.app_user_id", "customer_id"]'
)
"""The sandbox merchant keeps its app's user id in metadata (pipelines/sandbox/identities.py)."""


def _demo_identity() -> dict[str, str]:
    """The demo's `[identity]` and `[group]` unless the project sets its own."""
    settings = {}
    if lookup("identity.user_id") is None:
        settings["identity.user_id"] = DEMO_USER_ID_SOURCES
    if lookup("group.id") is None:
        settings["group.id"] = "tax_id"
    return settings


def _print_identity(db_path: str) -> None:
    """How the customers became Segment users and accounts (the figures `status` shows)."""
    from pipelines import warehouse
    from pipelines.metrics import identity_figures

    with warehouse.connect(db_path, read_only=True) as con:
        found = identity_figures(con)
    if found:
        sources = ", ".join(f"{n} by {s}" for s, n in found["by_source"].items())
        print(
            f"   identity: {found['customers']} customers -> {found['user_ids']} user ids "
            f"({sources}); {found['invalid_values']} unusable metadata value(s) fell through; "
            f"{len(found['claimed_by_different_emails'])} user id(s) shared by customers with "
            f"different emails; {found['groups']} accounts by tax id"
        )


def run_demo(db_path: str = "demo.duckdb", days_of_events: int = 30) -> int:
    """Start the sandbox, run the job, advance time, run again; print what happened."""
    started = time.monotonic()
    _fresh(db_path)
    Path(db_path).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
    wall = datetime.now(UTC).replace(microsecond=0)
    business = generate_business(seed=7, now=wall - timedelta(days=7))
    with (
        DodoSimulator(business, api_key=DEMO_API_KEY) as simulator,
        SegmentCollector(write_key=DEMO_WRITE_KEY) as collector,
    ):
        config = load_config(
            {
                "warehouse.path": db_path,
                "sources.dodo.api_key": DEMO_API_KEY,
                "sources.dodo.base_url": simulator.base_url,
                "sources.dodo.environment": "test_mode",
                "sources.dodo.requests_per_minute": 0,
                "segment.write_key": DEMO_WRITE_KEY,
                "segment.host": collector.base_url,
                **_demo_identity(),
            }
        )
        print(
            f"Sandbox: Dodo API simulator at {simulator.base_url} "
            f"({', '.join(f'{n} {k}' for k, n in business.counts().items())})"
        )
        print(f"         Segment collector at {collector.base_url}; warehouse {db_path}")
        since = business.now - timedelta(days=days_of_events)
        # The sandbox's business ends a week ago: the first sync reads it as of then.
        first = run_job(
            replace(config, extract=replace(config.extract, as_of=business.now)),
            RunOptions(events_since=since, command="demo"),
        )
        _print_run(
            f"Run 1: first sync, sending events of the last {days_of_events} days",
            first,
            collector,
            0,
        )
        _print_identity(db_path)
        changes = business.advance_time(until=wall)
        print(
            f"\n-- a week passes in the simulator: {len(changes['new_payments'])} new payments, "
            f"{len(changes['renewals'])} renewals, {len(changes['cancelled'])} cancellations, "
            f"{len(changes['on_hold'])} holds, {len(changes['plan_changed'])} plan changes"
        )
        before = len(collector.tracks())
        second = run_job(config, RunOptions(command="demo"))
        _print_run("Run 2: incremental sync, only what changed", second, collector, before)
        _webhook_run(business, collector, simulator, db_path)
        stats = collector.stats()
    print(
        f"\nThe collector received {len(collector.identifies())} identify, "
        f"{len(collector.groups())} group and "
        f"{len(collector.tracks())} track calls in {stats.get('requests', '?')} requests "
        f"({time.monotonic() - started:.1f}s in all)."
    )
    report = write_report(db_path, report_path(db_path))
    print(
        f"\nReport: {report.path} ({report.bytes / 1024:,.0f} KiB, built in "
        f"{report.seconds:.1f}s): MRR, revenue, customers, dunning and sync health on one "
        "page; open it in any browser (it needs no network)."
    )
    # from a checkout the commands are in .venv/bin; from a pipx or pip install, on the PATH
    exe = ".venv/bin/dodo-segment" if Path(".venv/bin/dodo-segment").exists() else "dodo-segment"
    python = ".venv/bin/python" if Path(".venv/bin/python").exists() else "python"
    print("\nNext, try:")
    print(f"  {exe} status --db {db_path}")
    print(f"  {exe} preview --db {db_path}")
    print(f"  {exe} report --db {db_path} --out report.html")
    print(
        "  " + python + f" -c \"import duckdb; print(duckdb.connect('{db_path}', read_only=True)"
        ".sql('select * from analytics.customer_traits order by total_spent_usd desc nulls last limit 5'))\""
    )
    print(
        "  make notebooks    (revenue, MRR, cohorts, sync health and dunning on this warehouse)\n"
        "  make test"
    )
    worst = max(int(first.exit_code or 0), int(second.exit_code or 0))
    return ExitCode.OK if worst == ExitCode.REJECTED_OR_QUARANTINED else worst
