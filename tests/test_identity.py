"""Who the messages land on: `[identity] user_id`, shared ids, id changes and alias, `[group] id`,
over the sandbox (real HTTP both ways, a real DuckDB file), and the configuration errors."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import duckdb
import pytest

from pipelines.config import ConfigError, load_config
from pipelines.job import RunOptions, run_job
from pipelines.sandbox.identities import APP_USER_ID, SHARED_USER_ID
from tests.conftest import Sandbox, make_sandbox, run_cli

pytestmark = pytest.mark.xdist_group("test_identity")  # one worker builds the module-scoped setup

CUSTOM_GROUP_TRAITS = """\
select distinct tax_id as group_id, 'enterprise' as sales_tier
from analytics.stg_subscriptions
where tax_id is not null
"""
APP_IDS = '["customer.metadata.app_user_id", "payment.metadata.app_user_id", "customer_id"]'


def expected_user_ids(sandbox: Sandbox) -> dict[str, str]:
    """customer_id -> user id under APP_IDS, worked out from the business's records."""
    biz = sandbox.business
    first_payment_id: dict[str, str] = {}
    for payment in sorted(biz.payments, key=lambda p: (p["created_at"], p["payment_id"])):
        value = (payment.get("metadata") or {}).get(APP_USER_ID)
        if isinstance(value, str) and value.strip():
            first_payment_id.setdefault(payment["customer"]["customer_id"], value.strip())
    out = {}
    for customer in biz.customers:
        own = (customer.get("metadata") or {}).get(APP_USER_ID)
        customer_id = customer["customer_id"]
        if isinstance(own, str) and own.strip():
            out[customer_id] = own.strip()
        else:
            out[customer_id] = first_payment_id.get(customer_id, customer_id)
    return out


@pytest.fixture(scope="module")
def switched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A first run with the default identity, then a run with APP_IDS and alias on, then new
    business and a third run (group by tax_id), then the same again (nothing changed)."""
    for sandbox in make_sandbox(tmp_path_factory.mktemp("identity")):
        collector = sandbox.collector
        first = run_job(sandbox.config(), RunOptions())
        assert first.exit_code == 0, first.error
        default_messages = collector.messages
        collector.reset()
        flags = {"identity.user_id": APP_IDS, "identity.alias": "true"}
        second = run_job(sandbox.config(**flags), RunOptions())
        assert second.exit_code == 0, second.error
        switch_messages = collector.messages
        collector.reset()
        sandbox.business.advance_time(days=3, seed=5)
        later = sandbox.business.now.isoformat()
        models = tmp_path_factory.mktemp("identity_models")
        (models / "custom_group_traits.sql").write_text(CUSTOM_GROUP_TRAITS)
        grouped = {
            **flags, "group.id": "tax_id", "sources.dodo.as_of": later, "models.paths": str(models),
        }  # fmt: skip
        third = run_job(sandbox.config(**grouped), RunOptions())
        assert third.exit_code == 0, third.error
        group_messages = collector.messages
        collector.reset()
        fourth = run_job(sandbox.config(**grouped), RunOptions())
        assert fourth.exit_code == 0, fourth.error
        yield {
            "sandbox": sandbox,
            "default": default_messages,
            "switch": switch_messages,
            "grouped": group_messages,
            "again": collector.messages,
        }


def of_type(messages: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in messages if m.get("type") == kind]


def test_default_identity_is_the_customer_id(switched) -> None:
    customers = {c["customer_id"] for c in switched["sandbox"].business.customers}
    identifies = of_type(switched["default"], "identify")
    assert identifies and {m["userId"] for m in identifies} <= customers
    assert all(m["traits"]["dodo_customer_id"] == m["userId"] for m in identifies)
    assert all("groupId" not in m.get("context", {}) for m in switched["default"])
    assert not of_type(switched["default"], "group") and not of_type(switched["default"], "alias")


def test_switching_re_identifies_under_the_new_ids_and_sends_no_track(switched) -> None:
    sandbox = switched["sandbox"]
    expected = expected_user_ids(sandbox)
    messages = switched["switch"]
    assert not of_type(messages, "track")  # every event was delivered under the old id
    identifies = of_type(messages, "identify")
    by_user = Counter(m["userId"] for m in identifies)
    assert max(by_user.values()) == 1
    changed = {c: u for c, u in expected.items() if u != c}
    assert changed and set(changed.values()) <= set(by_user)
    for m in identifies:
        traits = m["traits"]
        assert expected[traits["dodo_customer_id"]] == m["userId"]
    # the blank id on the customer fell through to the checkout payment's
    blank = sandbox.business.identities["invalid_then_payment"][0]
    assert expected[blank].startswith("usr_") and expected[blank] in by_user


def test_customers_sharing_an_id_get_one_identify_with_combined_traits(switched) -> None:
    sandbox = switched["sandbox"]
    shared = sandbox.business.identities["shared"]
    identifies = [
        m for m in of_type(switched["switch"], "identify") if m["userId"] == SHARED_USER_ID
    ]
    assert len(identifies) == 1
    traits = identifies[0]["traits"]
    assert sorted(traits["dodo_customer_ids"]) == sorted(shared)
    with duckdb.connect(sandbox.db, read_only=True) as con:
        counts = con.execute(
            "select sum(payments_count), min(created_at) from analytics.customer_traits "
            "where list_contains(?, customer_id)",
            [shared],
        ).fetchone()
    assert traits["payments_count"] == counts[0]
    created = datetime.fromisoformat(traits["createdAt"].replace("Z", "+00:00"))
    assert abs(created - counts[1]) < timedelta(milliseconds=1)  # the earliest, in ms


def test_alias_is_sent_once_per_changed_customer(switched) -> None:
    sandbox = switched["sandbox"]
    expected = expected_user_ids(sandbox)
    aliases = of_type(switched["switch"], "alias")
    pairs = {(m["previousId"], m["userId"]) for m in aliases}
    assert len(aliases) == len(pairs)
    assert pairs == {(c, u) for c, u in expected.items() if u != c}
    later = switched["grouped"] + switched["again"]
    assert not of_type(later, "alias")


def test_new_events_carry_the_resolved_user_id_and_product_context(switched) -> None:
    expected = expected_user_ids(switched["sandbox"])
    tracks = of_type(switched["grouped"], "track")
    assert tracks
    for m in tracks:
        customer_id = m["properties"]["dodo_customer_id"]
        assert m["userId"] == expected[customer_id]
    renewals = [m for m in tracks if m["event"] == "Subscription Renewed"]
    assert renewals and all(
        m["properties"]["plan"] and m["properties"]["product_id"] for m in renewals
    )


def test_groups_by_tax_id_once_per_account_and_members_carry_group_id(switched) -> None:
    sandbox = switched["sandbox"]
    companies = {}
    for sub in sandbox.business.subscriptions:
        if sub.get("tax_id"):
            companies.setdefault(sub["tax_id"], set()).add(sub["customer"]["customer_id"])
    groups = of_type(switched["grouped"], "group")
    assert sorted(m["groupId"] for m in groups) == sorted(
        {m["groupId"] for m in groups}
    )  # one call per account
    assert {m["groupId"] for m in groups} <= set(companies) and groups
    for m in groups:
        traits = m["traits"]
        assert traits["name"] and traits["members"] >= 1 and "active_subscriptions" in traits
        assert traits["sales_tier"] == "enterprise"  # the user's custom_group_traits
    member_identifies = [
        m for m in of_type(switched["grouped"], "identify") if m.get("context", {}).get("groupId")
    ]
    assert member_identifies
    assert not of_type(switched["again"], "group")  # unchanged accounts are not sent again
    assert not of_type(switched["again"], "identify")


def test_bad_identity_settings_are_configuration_errors() -> None:
    with pytest.raises(ConfigError, match="identity.user_id: unknown source"):
        load_config({"identity.user_id": '["customer.metadata.app_user_id", "cookie"]'})
    with pytest.raises(ConfigError, match="group.id: unknown group id source"):
        load_config({"group.id": "vat_number"})
    ok = load_config({"identity.user_id": APP_IDS, "group.id": "customer.metadata.team"})
    assert ok.models is not None and ok.models.identity.group_source == "customer.metadata.team"


def test_the_build_reports_sources_fallbacks_and_shared_ids(switched) -> None:
    sandbox = switched["sandbox"]
    with duckdb.connect(sandbox.db, read_only=True) as con:
        sources = dict(
            con.execute(
                "select user_id_source, count(*) from analytics.customer_identity group by 1"
            ).fetchall()
        )
        invalid = con.execute(
            "select sum(invalid_values) from analytics.customer_identity"
        ).fetchone()[0]
    assert set(sources) == {
        "customer.metadata.app_user_id", "payment.metadata.app_user_id", "customer_id"
    }  # fmt: skip
    assert invalid >= 1


@pytest.mark.slow
def test_cli_refuses_an_unknown_source_before_reading_anything(sandbox: Sandbox) -> None:
    done = run_cli("run", env=sandbox.env(IDENTITY__USER_ID='["customer.metadata.id", "cookie"]'))
    assert done.returncode == 2 and "identity.user_id" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not sandbox.simulator.request_counts_by_endpoint() and not sandbox.collector.messages
    bad_group = run_cli("run", env=sandbox.env(GROUP__ID="vat"))
    assert bad_group.returncode == 2 and "group.id" in bad_group.stderr


def test_recompute_for_a_customer_identifies_its_user(switched) -> None:
    from pipelines.emit import recompute_traits
    from pipelines.job import emit_settings

    sandbox = switched["sandbox"]
    shared = sandbox.business.identities["shared"]
    sandbox.collector.reset()
    config = sandbox.config(**{"identity.user_id": APP_IDS, "group.id": "tax_id"})
    with duckdb.connect(sandbox.db) as con:
        result = recompute_traits(con, emit_settings(config), "recompute-test", [shared[0]])
    assert result.identifies_sent == 1
    assert [m["userId"] for m in sandbox.collector.identifies()] == [SHARED_USER_ID]
