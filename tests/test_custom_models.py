"""The user's own models, through the real CLI on the sandbox: custom traits and events, event
skip/rename, a broken user model, name clashes, a replaced product model."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from tests.conftest import Sandbox, make_sandbox, run_cli

pytestmark = pytest.mark.slow  # every test here drives a subprocess

TRAITS_V1 = """\
-- one trait from the customer's metadata, one computed
with customers as (
    select * from analytics.stg_customers
),

final as (
    select
        customer_id,
        metadata ->> 'signup_source' as signup_source,
        'tier-1' as loyalty_tier
    from customers
)

select customer_id, signup_source, loyalty_tier from final
"""

EVENTS = """\
with payments as (
    select * from analytics.stg_payments
),

final as (
    select
        analytics.event_id('big_payment', payment_id) as event_id,
        'Big Payment' as event,
        customer_id,
        created_at as occurred_at,
        json_object('payment_id', payment_id, 'amount', amount, 'currency', currency)
            as properties
    from payments
    where status = 'succeeded' and amount_minor >= 5000
)

select event_id, event, customer_id, occurred_at, properties from final
"""


@pytest.fixture()
def small(tmp_path: Path) -> Iterator[Sandbox]:
    """A 40-customer business; the test's working directory (tmp_path) is the project folder."""
    yield from make_sandbox(tmp_path, customers=40)


def write_model(name: str, sql: str, folder: str = "models") -> Path:
    path = Path(folder) / f"{name}.sql"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(sql)
    return path


def query(db: str, sql: str) -> list[tuple]:
    with duckdb.connect(db, read_only=True) as con:
        return con.execute(sql).fetchall()


def test_custom_trait_reaches_every_customer_and_a_change_reidentifies_only_changed(
    small: Sandbox,
) -> None:
    write_model("custom_traits", TRAITS_V1)
    first = run_cli("run", env=small.env())
    assert first.returncode in (0, 3), first.stderr
    customers = {c["customer_id"] for c in small.business.tables["customers"].items}
    identified = {m["userId"]: m["traits"] for m in small.collector.identifies()}
    assert set(identified) == customers
    assert all(t["loyalty_tier"] == "tier-1" for t in identified.values())
    expected_sources = {
        c["customer_id"]: (c.get("metadata") or {}).get("signup_source")
        for c in small.business.tables["customers"].items
    }
    for user_id, traits in identified.items():
        if expected_sources[user_id] is None:
            assert "signup_source" not in traits  # a null trait is omitted
        else:
            assert traits["signup_source"] == expected_sources[user_id]
        assert "email" in traits  # built-in traits are still there

    # the definition changes for five customers only
    changed = sorted(customers)[:5]
    listed = ", ".join(f"'{c}'" for c in changed)
    write_model(
        "custom_traits",
        TRAITS_V1.replace(
            "'tier-1' as loyalty_tier",
            f"case when customer_id in ({listed}) then 'tier-2' else 'tier-1' end as loyalty_tier",
        ),
    )
    small.collector.reset()
    second = run_cli("run", env=small.env())
    assert second.returncode in (0, 3), second.stderr
    again = small.collector.identifies()
    assert sorted(m["userId"] for m in again) == changed
    assert {m["traits"]["loyalty_tier"] for m in again} == {"tier-2"}

    small.collector.reset()
    recompute = run_cli("traits", "recompute", env=small.env())
    assert recompute.returncode == 0, recompute.stderr
    assert {m["userId"] for m in small.collector.identifies()} == customers


def test_custom_event_is_delivered_once_and_never_again(small: Sandbox) -> None:
    write_model("custom_events", EVENTS)
    first = run_cli("run", "--events-since", "2000-01-01", env=small.env())
    assert first.returncode in (0, 3), first.stderr
    expected = query(small.db, "select event_id from analytics.custom_events")
    assert expected, "the sandbox has payments of 50.00 or more"
    big = [m for m in small.collector.tracks() if m["event"] == "Big Payment"]
    assert sorted(m["messageId"] for m in big) == sorted(r[0] for r in expected)
    assert all(isinstance(m["properties"]["amount"], int | float) for m in big)
    delivered = query(
        small.db,
        "select count(*) from segment_sync.delivered_events d join analytics.custom_events c "
        "using (event_id) where d.status = 'delivered'",
    )
    assert delivered == [(len(expected),)]

    small.collector.reset()
    second = run_cli("run", "--events-since", "2000-01-01", env=small.env())
    assert second.returncode in (0, 3), second.stderr
    assert [m for m in small.collector.tracks() if m["event"] == "Big Payment"] == []


def test_skip_and_rename_act_and_rename_keeps_the_event_id(small: Sandbox) -> None:
    first = run_cli("run", "--events-since", "2000-01-01", env=small.env())
    assert first.returncode in (0, 3), first.stderr
    before = Counter(m["event"] for m in small.collector.tracks())
    first_ids = {m["messageId"] for m in small.collector.tracks()}
    assert before["Payment Completed"] and before["Payment Failed"]

    Path(".dlt").mkdir(exist_ok=True)
    Path(".dlt/config.toml").write_text(
        '[events]\nskip = ["Payment Failed"]\nrename = {"Payment Completed" = "Order Paid"}\n'
    )
    small.business.advance_time(until=small.wall)  # new payments, some failed
    small.collector.reset()
    env = small.env(SOURCES__DODO__AS_OF=small.wall.isoformat())
    second = run_cli("run", env=env)
    assert second.returncode in (0, 3), second.stderr
    sent = Counter(m["event"] for m in small.collector.tracks())
    assert sent["Order Paid"] > 0
    assert sent["Payment Completed"] == 0 and sent["Payment Failed"] == 0
    # a renamed event keeps its event_id: nothing delivered under the old name went out again
    renamed = {m["messageId"] for m in small.collector.tracks() if m["event"] == "Order Paid"}
    assert not renamed & first_ids
    product_ids = query(
        small.db,
        "select event_id from analytics.lifecycle_events where event = 'Payment Completed'",
    )
    assert renamed <= {r[0] for r in product_ids}
    skipped_in_outbox = query(
        small.db, "select count(*) from analytics.track_outbox where event = 'Payment Failed'"
    )
    assert skipped_in_outbox == [(0,)]

    Path(".dlt/config.toml").write_text('[events]\nskip = ["Payment Faild"]\n')
    typo = run_cli("run", env=env)
    assert typo.returncode == 2, typo.stderr
    assert "Payment Faild" in typo.stderr and "Traceback" not in typo.stderr


def test_a_broken_user_model_names_its_file_and_sends_nothing(small: Sandbox) -> None:
    path = write_model("custom_events", "select event_id frm analytics.nothing_here\n")
    result = run_cli("run", env=small.env())
    assert result.returncode == 1
    assert str(path.resolve()) in result.stderr
    assert "Traceback" not in result.stderr
    assert small.collector.messages == []


def test_a_custom_trait_named_like_a_builtin_is_a_clear_error(small: Sandbox) -> None:
    path = write_model(
        "custom_traits", "select customer_id, 'x@example.com' as email from analytics.stg_customers"
    )
    result = run_cli("run", env=small.env())
    assert result.returncode == 1
    assert str(path.resolve()) in result.stderr
    assert "email" in result.stderr and "built-in trait" in result.stderr
    assert small.collector.messages == []

    # replacing the product's customer_traits lifts the rule (and is warned about, and listed)
    product = Path(__file__).resolve().parents[1] / "sql" / "marts" / "customer_traits.sql"
    write_model("customer_traits", product.read_text())
    listed = run_cli("transform", "--list", env=small.env())
    assert listed.returncode == 0, listed.stderr
    line = next(x for x in listed.stdout.splitlines() if x.split()[:1] == ["customer_traits"])
    assert "replaces" in line and "models/customer_traits.sql" in line
    replaced = run_cli("run", env=small.env())
    assert replaced.returncode in (0, 3), replaced.stderr
    assert replaced.stderr.count("replaces the product's model customer_traits") == 1
    assert {m["traits"]["email"] for m in small.collector.identifies()} == {"x@example.com"}


def test_two_user_models_of_one_name_are_refused(small: Sandbox) -> None:
    write_model("custom_traits", TRAITS_V1)
    write_model("custom_traits", TRAITS_V1, folder="models/more")
    result = run_cli("run", env=small.env())
    assert result.returncode == 1
    assert "duplicate model name 'custom_traits'" in result.stderr
    assert small.collector.messages == []
