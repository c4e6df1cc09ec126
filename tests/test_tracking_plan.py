"""The tracking plan: written from the models, every message the collector receives follows it
(checked here with jsonschema, not the emitter's validator), a broken custom event is rejected
before sending and listed by status, and a written plan can be enforced."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import jsonschema
import pytest

from pipelines.commands.status import collect
from pipelines.commands.tracking_plan import write_tracking_plan
from pipelines.emit.tracking_plan import plan_is_current
from pipelines.job import RunOptions, run_job
from tests.conftest import make_sandbox, run_cli

pytestmark = pytest.mark.xdist_group(
    "test_tracking_plan"
)  # one worker builds the module-scoped setup

# 'seats' is a number on every row but the earliest, where it is a string: a typo in a custom
# model that would break a dashboard downstream
BROKEN_EVENTS = """\
with payments as (
    select * from analytics.stg_payments
),

numbered as (
    select *, row_number() over (order by created_at, payment_id) as n
    from payments
    where status = 'succeeded' and subscription_id is not null
),

final as (
    select
        analytics.event_id('seat_added', payment_id) as event_id,
        'Seat Added' as event,
        customer_id,
        created_at as occurred_at,
        json_object(
            'payment_id', payment_id,
            'seats', case when n = 1 then to_json('three') else to_json(3) end
        ) as properties
    from numbered
)

select event_id, event, customer_id, occurred_at, properties from final
"""
APP_IDS = '["customer.metadata.app_user_id", "payment.metadata.app_user_id", "customer_id"]'


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One run that sends the whole history (custom events, groups, app ids), then the plan."""
    folder = tmp_path_factory.mktemp("plan")
    models = folder / "models"
    models.mkdir()
    (models / "custom_events.sql").write_text(BROKEN_EVENTS)
    for sandbox in make_sandbox(folder, customers=80):
        flags = {
            "models.paths": str(models), "identity.user_id": APP_IDS, "group.id": "tax_id",
        }  # fmt: skip
        config = sandbox.config(**flags)
        report = run_job(config, RunOptions(events_since=datetime(2000, 1, 1, tzinfo=UTC)))
        assert report.exit_code == 3, report.error  # finished with rejections
        out = folder / "tracking_plan.json"
        assert write_tracking_plan(config, "json-schema", str(out)) == 0
        yield {"sandbox": sandbox, "plan": json.loads(out.read_text()), "path": out, "flags": flags}


def test_every_received_message_follows_the_written_plan(planned) -> None:
    plan, collector = planned["plan"], planned["sandbox"].collector
    kinds = {"track": 0, "identify": 0, "group": 0}
    for message in collector.messages:
        kind = message["type"]
        kinds[kind] += 1
        if kind == "track":
            schema, document = plan["events"][message["event"]], message["properties"]
        else:
            schema, document = plan[kind], message["traits"]
        jsonschema.Draft7Validator(schema).validate(document)
    assert all(kinds.values()), kinds
    seat = plan["events"]["Seat Added"]
    assert seat["properties"]["seats"] == {"type": "integer"}
    assert {"payment_id", "seats", "dodo_customer_id"} <= set(seat["required"])
    assert plan["identify"]["properties"]["total_spent"]["type"] == "number"
    assert plan["group"]["properties"]["members"]["type"] == "integer"


def test_the_broken_custom_event_is_rejected_not_sent_and_listed_by_status(planned) -> None:
    sandbox = planned["sandbox"]
    sent = [m for m in sandbox.collector.tracks() if m["event"] == "Seat Added"]
    assert sent and all(isinstance(m["properties"]["seats"], int) for m in sent)
    with duckdb.connect(sandbox.db, read_only=True) as con:
        rejected = con.execute(
            "select message_id, reason from segment_sync.rejected_messages where kind = 'track'"
        ).fetchall()
    assert len(rejected) == 1 and "seats" in rejected[0][1] and "tracking plan" in rejected[0][1]
    assert rejected[0][0] not in {m["messageId"] for m in sandbox.collector.tracks()}
    listed = collect(sandbox.db)["rejected"]
    assert any(r["kind"] == "track" and "seats" in r["reason"] for r in listed)


def test_the_plan_holds_the_active_catalog_renamed_and_skipped(planned, tmp_path: Path) -> None:
    plan = planned["plan"]
    assert "Payment Completed" in plan["events"] and "Order Completed" not in plan["events"]
    assert "Dispute Lost" in plan["events"]  # in the catalog, whether it happened or not
    sandbox = planned["sandbox"]
    config = sandbox.config(**planned["flags"], **{
        "events.rename": '{"Payment Completed": "Order Paid"}', "events.skip": "Trial Ended",
    })  # fmt: skip
    assert run_job(config, RunOptions(skip_emit=True, command="transform")).exit_code in (0, 3)
    out = tmp_path / "renamed.json"
    assert write_tracking_plan(config, "json-schema", str(out)) == 0
    renamed = json.loads(out.read_text())["events"]
    assert "Order Paid" in renamed and "Payment Completed" not in renamed
    assert "Trial Ended" not in renamed


def test_the_plan_is_used_only_with_the_outboxes_it_was_built_from(planned, tmp_path: Path) -> None:
    copy = tmp_path / "copy.duckdb"
    shutil.copyfile(planned["sandbox"].db, copy)
    first = "(select min(user_id) from analytics.identify_outbox)"
    with duckdb.connect(str(copy)) as con:
        assert plan_is_current(con)
        # another set of models gave one user other traits, then left one user out
        con.execute(
            f"update analytics.identify_outbox set traits_hash = md5(traits_hash) "
            f"where user_id = {first}"
        )
        assert not plan_is_current(con)
        con.execute(f"delete from analytics.identify_outbox where user_id = {first}")
        assert not plan_is_current(con)


def test_a_written_plan_is_enforced(planned, tmp_path: Path) -> None:
    sandbox = planned["sandbox"]
    frozen = json.loads(planned["path"].read_text())
    # the team's plan says Subscription Renewed must carry a coupon: new renewals break it
    frozen["events"]["Subscription Renewed"]["required"].append("coupon")
    path = tmp_path / "frozen.json"
    path.write_text(json.dumps(frozen))
    sandbox.collector.reset()
    sandbox.business.advance_time(days=40, seed=3)
    later = {
        "sources.dodo.as_of": sandbox.business.now.isoformat(),
        "tracking_plan.path": str(path),
    }
    report = run_job(sandbox.config(**planned["flags"], **later), RunOptions())
    assert report.exit_code == 3, report.error
    assert not [m for m in sandbox.collector.tracks() if m["event"] == "Subscription Renewed"]
    with duckdb.connect(sandbox.db, read_only=True) as con:
        reasons = con.execute(
            "select reason from segment_sync.rejected_messages where reason like '%coupon%'"
        ).fetchall()
    assert reasons


@pytest.mark.slow
def test_cli_writes_segment_rules(planned, tmp_path: Path) -> None:
    sandbox = planned["sandbox"]
    out = tmp_path / "rules.json"
    done = run_cli("tracking-plan", "--format", "segment", "--out", str(out), env=sandbox.env())
    assert done.returncode == 0, done.stderr
    rules = json.loads(out.read_text())["rules"]
    types = {r["type"] for r in rules}
    assert types == {"TRACK", "IDENTIFY", "GROUP"}
    track = next(r for r in rules if r["key"] == "Payment Completed")
    assert track["version"] == 1
    assert track["jsonSchema"]["properties"]["properties"]["type"] == "object"
    missing = run_cli("run", env=sandbox.env(TRACKING_PLAN__PATH=str(tmp_path / "nope.json")))
    assert missing.returncode == 2 and "tracking_plan.path" in missing.stderr
