"""dodo-segment forget: erase customers on request, in the warehouse and in Segment."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from datetime import UTC, datetime

import duckdb
import orjson

from pipelines import warehouse
from pipelines.commands.common import (
    Subcommands,
    add_command,
    add_common,
    add_wait,
    load_command_config,
    with_lock,
)
from pipelines.commands.erasure import (
    Change,
    PersonalValues,
    erase,
    leftovers,
    personal_values,
    rewrite_file,
)
from pipelines.config import AppConfig, ModelsConfig, pipeline_dir
from pipelines.dodo_contract import RAW_DATASET
from pipelines.extract import (
    ensure_tombstone,
    forgotten_ids,
    load_files,
    mentions,
    record_forgotten,
    remove_load_files,
    scrub_json,
    tombstones,
)
from pipelines.job import ExitCode, package_version
from pipelines.logs import complain, say
from pipelines.transform import ModelError, clear_scratch, run_models, scratch_folder
from pipelines.webhook_store import WebhookStore, store_folder

log = logging.getLogger("dodo_segment")

UNKNOWN_CUSTOMER = 5
"""Exit code: a CUSTOMER_ID or email names no customer in the warehouse; nothing was changed."""
SEGMENT_NOT_FILED = 6
"""Exit code: the warehouse was erased but Segment refused or could not take the request."""

_LOOKUPS = (
    # (table, id column, email column): where a customer can be found by id or email
    (f"{RAW_DATASET}.customers", "customer_id", "email"),
    (f"{RAW_DATASET}.payments", "customer__customer_id", "customer__email"),
    (f"{RAW_DATASET}.subscriptions", "customer__customer_id", "customer__email"),
    ("analytics.customer_traits", "customer_id", "email"),
)


DESCRIPTION = (
    "Remove the customers' personal data (email, name, phone, metadata, billing address, ...) "
    "from every table of the warehouse and from the dlt load files beside it, keep what "
    "accounting needs without the person (ids, amounts, currencies, dates), record a tombstone "
    "so later syncs neither store nor send them again, rewrite the warehouse file so the erased "
    "values leave its bytes, and file a SUPPRESS_WITH_DELETE regulation with Segment "
    "(SEGMENT_PUBLIC_API_TOKEN) or print the Privacy Portal steps."
)

EPILOG = """\
examples:
  dodo-segment forget cus_123 --dry-run
  dodo-segment forget ana@example.com

Exit codes: 0 forgotten, 1 failure, 2 usage, 5 unknown customer (nothing changed), 6 erased here
but Segment did not take the request (run it again).
"""


def add_arguments(commands: Subcommands, summary: str) -> None:
    """`forget` and its arguments."""
    parser = add_command(commands, "forget", summary, DESCRIPTION, handle, EPILOG)
    add_common(parser)
    parser.add_argument("customer", nargs="+", metavar="CUSTOMER_ID_OR_EMAIL")
    parser.add_argument(
        "--dry-run", action="store_true", help="list what would be removed; change nothing"
    )
    add_wait(parser)


def handle(args: argparse.Namespace) -> int:
    """Forget the named customers under the run lock."""
    config = load_command_config(args)
    return with_lock(
        config, "forget", args.wait,
        lambda: forget_customers(config, args.customer, dry_run=args.dry_run),
    )  # fmt: skip


class UnknownCustomer(LookupError):
    """A customer id or email the warehouse does not hold."""


def _existing(con: duckdb.DuckDBPyConnection) -> set[str]:
    rows = con.execute(
        "select schema_name || '.' || table_name from duckdb_tables() "
        "where database_name = current_database()"
    ).fetchall()
    return {r[0] for r in rows}


def resolve(con: duckdb.DuckDBPyConnection, keys: Sequence[str]) -> dict[str, set[str]]:
    """Each CUSTOMER_ID or email -> the customer ids it names; raises UnknownCustomer."""
    tables = _existing(con)
    known_forgotten = forgotten_ids(con)
    resolved: dict[str, set[str]] = {}
    for key in keys:
        ids: set[str] = set()
        by_email = "@" in key
        if not by_email and key in known_forgotten:
            ids.add(key)
        for table, id_column, email_column in _LOOKUPS:
            if table not in tables:
                continue
            match = f"lower({email_column}) = lower(?)" if by_email else f"{id_column} = ?"
            rows = con.execute(
                f"select distinct {id_column} from {table} where {match} and {id_column} is not null",
                [key],
            ).fetchall()
            ids.update(r[0] for r in rows)
        if not ids:
            kind = "email" if by_email else "customer id"
            raise UnknownCustomer(
                f"no customer with the {kind} {key!r} in the warehouse; nothing was changed "
                "(a customer id looks like cus_...; an email must match the one Dodo holds)"
            )
        resolved[key] = ids
    return resolved


def _masked(email: str) -> str:
    local, _, domain = email.partition("@")
    return f"{local[:1]}***@{domain}"


def forget_customers(config: AppConfig, keys: Sequence[str], dry_run: bool = False) -> int:
    """Forget these customers (ids or emails); with dry_run, list what would be removed."""
    path = config.warehouse_path
    try:
        with warehouse.connect(path, read_only=True) as con:  # nothing written before all resolve
            resolved = resolve(con, keys)
            ids = set().union(*resolved.values())
            values = personal_values(con, ids)
            filed = tombstones(con)
            planned = erase(con, values, apply=False) if dry_run else []
    except UnknownCustomer as exc:
        complain(str(exc))
        return UNKNOWN_CUSTOMER
    store = WebhookStore(store_folder(path))
    if dry_run:
        _describe(resolved, planned, dry_run)
        files = load_files(path)
        if files:
            say(f"  {len(files)} dlt load file(s) under {pipeline_dir(path)} would be deleted")
        if scratch_folder(path).exists():
            say(f"  {scratch_folder(path)} (a stopped verification's copy) would be deleted")
        waiting = sum(1 for d in store.pending() if mentions(orjson.dumps(d.payload).decode(), ids))
        if waiting:
            say(f"  {waiting} stored webhook delivery(ies) would lose the personal fields")
        _segment_plan(config, sorted(ids), filed)
        say("dry run: nothing was changed")
        return int(ExitCode.OK)
    warehouse.prepare(path, package_version())
    with warehouse.connect(path, memory_limit=config.memory_limit) as con:
        changes = _erase(con, values)
        models_error = _rebuild_models(con, config)
        remaining = leftovers(con, values)
    _describe(resolved, changes, dry_run)
    removed = remove_load_files(path)
    if removed:
        say(f"  {removed} dlt load file(s) under {pipeline_dir(path)} deleted")
    if clear_scratch(path):
        say(f"  {scratch_folder(path)} (a stopped verification's copy of the warehouse) deleted")
    scrubbed = store.rewrite_pending(
        lambda payload: (
            scrub_json(payload) if mentions(orjson.dumps(payload).decode(), ids) else payload
        )
    )
    if scrubbed:
        say(f"  {scrubbed} stored webhook delivery(ies) rewritten without the personal fields")
    code = _tell_segment(config, sorted(ids), filed)
    if not path.startswith("md:"):
        rewrite_file(path)
        say(f"  {path} rewritten: the erased values are gone from the file's bytes")
    if models_error:
        complain(f"the customers were erased, but the models did not rebuild: {models_error}")
        return int(ExitCode.FAILED)
    if remaining:
        complain(
            f"the erased email or phone can still be read in {', '.join(remaining)} (another "
            "customer id holding the same email? forget by email to erase every id with it)"
        )
        return int(ExitCode.FAILED)
    return code


def _erase(con: duckdb.DuckDBPyConnection, values: PersonalValues) -> list[Change]:
    """Tombstones first (a later run scrubs even if this stops half-way), then the erasure of
    every table in one transaction."""
    now = datetime.now(UTC)
    ensure_tombstone(con)
    for customer_id in sorted(values.ids):
        record_forgotten(con, customer_id, now, None)
    con.execute("begin")
    changes = erase(con, values)
    con.execute("commit")
    return changes


def _rebuild_models(con: duckdb.DuckDBPyConnection, config: AppConfig) -> str | None:
    """Build the models again so analytics and the outboxes follow; the error, if any."""
    try:
        result = run_models(
            con,
            event_catalog=config.segment.event_catalog,
            skip_unchanged=config.skip_unchanged_models,
            identity=(config.models or ModelsConfig()).identity,
        )
    except ModelError as exc:
        return str(exc).splitlines()[0][:300]
    if result.emission_blocked:
        log.warning("models rebuilt after forget, but an error data test failed (see status)")
    return None


def _describe(resolved: dict[str, set[str]], changes: list[Change], dry_run: bool) -> None:
    verb = "would forget" if dry_run else "forgot"
    for key, ids in resolved.items():
        shown = _masked(key) if "@" in key else key
        say(f"{verb} {', '.join(sorted(ids))} (asked as {shown})", customer_ids=sorted(ids))
    if not changes:
        say("  no personal data left in the warehouse for them")
    for change in changes:
        say(f"  {change.line()}", table=change.table, action=change.action, rows=change.rows)
    say(
        "  kept for accounting: customer ids, payment, subscription, refund and dispute ids, "
        "amounts, currencies, dates and statuses"
    )


def _segment_plan(config: AppConfig, ids: list[str], filed: dict[str, str | None]) -> None:
    todo = [i for i in ids if not filed.get(i)]
    if not todo:
        say("  Segment: a SUPPRESS_WITH_DELETE regulation was already filed for them")
    elif config.segment.public_api_token:
        say(
            f"  Segment: a SUPPRESS_WITH_DELETE regulation would be filed for {len(todo)} "
            f"userId(s) at {config.segment.public_api_host}"
        )
    else:
        say("  Segment: no Public API token; the Privacy Portal steps would be printed")


def _tell_segment(config: AppConfig, ids: list[str], filed: dict[str, str | None]) -> int:
    """File the Segment regulation (or print the Privacy Portal steps); the exit code."""
    from pipelines.emit import (
        PRIVACY_PORTAL_STEPS,
        RegulationError,
        file_suppress_with_delete,
    )

    todo = [i for i in ids if not filed.get(i)]
    if not todo:
        say("  Segment: a SUPPRESS_WITH_DELETE regulation was already filed for them")
        return int(ExitCode.OK)
    token = config.segment.public_api_token
    if not token:
        say(PRIVACY_PORTAL_STEPS.format(ids="\n".join(f"       {i}" for i in todo)))
        return int(ExitCode.OK)
    try:
        regulate_id = file_suppress_with_delete(
            todo, token, config.segment.public_api_host, config.segment.timeout_seconds
        )
    except RegulationError as exc:
        complain(
            f"the warehouse no longer holds them, but {exc}; run this forget again to file the "
            "Segment request (or use the Privacy Portal)"
        )
        return SEGMENT_NOT_FILED
    with warehouse.connect(config.warehouse_path) as con:
        now = datetime.now(UTC)
        for customer_id in todo:
            record_forgotten(con, customer_id, now, regulate_id)
    say(
        f"  Segment: SUPPRESS_WITH_DELETE regulation {regulate_id} filed for {len(todo)} "
        "userId(s); Segment deletes their data within 30 days",
        regulate_id=regulate_id,
    )
    return int(ExitCode.OK)
