"""Upgrading to Dodo API 1.123 (issue 13): a warehouse the previous release built is migrated in
place (warehouse version 3) and sends no duplicate: the event_ids of the facts it had keep."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import pytest

from pipelines import warehouse
from pipelines.dodo_contract import RAW_COLUMNS, WAREHOUSE_SCHEMA_VERSION
from pipelines.emit import emit
from pipelines.job import RunOptions, emit_settings, run_job
from pipelines.sandbox.faults import PageContext
from pipelines.transform import run_models
from tests.conftest import Sandbox

pytestmark = pytest.mark.slow  # heavy: two releases' builds and runs (7 s)

PREVIOUS_RELEASE_SQL = Path(__file__).resolve().parent / "fixtures" / "previous_release_sql"

NEW_FIELDS = {
    # the fields of API 1.123 the previous release's contract did not have (charge_type it had)
    "payments": (
        "is_multi_subscription", "subscription_ids", "service_periods", "retry_attempt",
        "includes_usage", "checkout_session_id", "card_type", "card_exp_month", "card_exp_year",
        "three_ds_flow", "three_ds_status", "three_ds_version",
    ),
    "subscriptions": ("has_payment_method", "cancelled_by"),
    "customers": ("blocked_at", "blocklist_entry_id", "preferred_locale"),
    "refunds": ("network_reference", "network_reference_type", "network_reference_updated_at"),
    "balance_ledger": ("payout_id",),
}  # fmt: skip
RESOURCE_OF_PATH = {
    "/payments": "payments",
    "/subscriptions": "subscriptions",
    "/customers": "customers",
    "/refunds": "refunds",
    "/balances/ledger": "balance_ledger",
}


def _previous_shape(items: list[Any], ctx: PageContext) -> list[Any]:
    """Items as the API showed them before 1.123 (the previous release's sandbox)."""
    dropped = NEW_FIELDS.get(RESOURCE_OF_PATH.get(ctx.path, ""), ())
    return [{k: v for k, v in item.items() if k not in dropped} for item in items]


def _outbox(db: str) -> dict[tuple[str, str, str], str]:
    with duckdb.connect(db, read_only=True) as con:
        rows = con.execute(
            "select event, object_id, coalesce(properties ->> 'subscription_id', ''), event_id "
            "from analytics.lifecycle_events"
        ).fetchall()
    return {(event, obj, sub): event_id for event, obj, sub, event_id in rows}


def _as_the_previous_release_left_it(db: str) -> None:
    """Raw columns of the 1.123 fields as text (how the previous release kept unknown fields),
    and schema version 2."""
    with duckdb.connect(db) as con:
        present = {
            (t, c)
            for t, c in con.execute(
                "select table_name, column_name from information_schema.columns "
                "where table_schema = 'dodo_raw'"
            ).fetchall()
        }
        for table, columns in NEW_FIELDS.items():
            for column in columns:
                if (table, column) in present and RAW_COLUMNS[table][column] != "text":
                    con.execute(
                        f'alter table dodo_raw."{table}" alter column "{column}" '
                        f'set data type varchar using cast("{column}" as varchar)'
                    )
        con.execute("delete from segment_sync.warehouse_meta where schema_version > 2")


def test_a_previous_release_warehouse_upgrades_without_duplicates(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    sim = sandbox.simulator
    # the previous release: the API without the 1.123 fields, its own models, its sends
    sim.inject_fault(mutate=_previous_shape, times=10**9)
    first = run_job(sandbox.config(), RunOptions(skip_emit=True))
    assert first.exit_code == 0, first.error
    config = sandbox.config()
    with duckdb.connect(sandbox.db) as con:
        assert not run_models(con, sql_dir=PREVIOUS_RELEASE_SQL).emission_blocked
        emitted = emit(con, emit_settings(config), run_id="previous-release")
        assert emitted.identifies_sent and not emitted.failed
    before = _outbox(sandbox.db)
    with duckdb.connect(sandbox.db, read_only=True) as con:
        ledger_before = {
            r[0]
            for r in con.execute("select event_id from segment_sync.delivered_events").fetchall()
        }
    assert len(ledger_before) == len(before)  # first sync: the backlog recorded as skipped
    _as_the_previous_release_left_it(sandbox.db)
    with duckdb.connect(sandbox.db, read_only=True) as con:
        assert warehouse.schema_version(con) == 2

    sim.clear_faults()  # today's API: every 1.123 field
    sandbox.business.advance_time(days=3, seed=5)
    received = len(sandbox.collector.tracks())
    second = run_job(sandbox.config(), RunOptions())
    assert second.exit_code == 0, second.error

    with duckdb.connect(sandbox.db, read_only=True) as con:
        assert warehouse.schema_version(con) == WAREHOUSE_SCHEMA_VERSION == 3
        types = dict(
            con.execute(
                "select column_name, data_type from information_schema.columns "
                "where table_schema = 'dodo_raw' and table_name = 'payments'"
            ).fetchall()
        )
        assert types["retry_attempt"] == "BIGINT" and types["is_multi_subscription"] == "BOOLEAN"
        assert types["service_periods"] == "JSON"
        typed = con.execute(
            "select count(payments.retry_attempt), count(*) filter (where not service_periods_known) "
            "from dodo_raw.payments join analytics.stg_payment_subscriptions using (payment_id)"
        ).fetchone()
        assert typed[0] > 0 and typed[1] > 0  # re-read rows carry the new fields; older do not
    after = _outbox(sandbox.db)
    # every fact the previous release had that is still a fact keeps its event_id
    kept = set(before) & set(after)
    assert len(kept) > 0.9 * len(before)
    assert all(before[key] == after[key] for key in kept)
    # nothing sent after the upgrade repeats a message of before it
    sent = [m["messageId"] for m in sandbox.collector.tracks()[received:]]
    assert sent and not set(sent) & ledger_before and len(sent) == len(set(sent))
    # a fact of before is never sent again under another id
    again = {
        (m["event"], m["properties"].get("payment_id") or m["properties"].get("subscription_id"))
        for m in sandbox.collector.tracks()[received:]
        if m["event"] not in ("Subscription Renewed",)
    }
    old_facts = {(event, obj) for event, obj, _ in before}
    assert not {fact for fact in again if fact in old_facts and fact[0] == "Payment Completed"}
