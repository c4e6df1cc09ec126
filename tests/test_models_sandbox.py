"""The SQL models on simulator data, checked against values computed independently from the API."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime, timedelta
from decimal import Decimal

import duckdb
import pytest

from pipelines.dodo_contract import currency_exponent
from pipelines.extract import run_extract
from pipelines.transform import run_models
from tests.conftest import Sandbox, make_sandbox

pytestmark = pytest.mark.xdist_group(
    "test_models_sandbox"
)  # one worker builds the module-scoped setup

DEFAULT_CATALOG = {
    "Payment Completed", "Subscription Started", "Subscription Cancelled", "Payment Failed",
    "Payment Refunded", "Dispute Opened", "Subscription Renewed", "Trial Started", "Trial Ended",
    "Subscription On Hold", "Subscription Paused", "Subscription Resumed", "Subscription Expired",
    "Subscription Failed", "Subscription Plan Changed", "Subscription Cancellation Scheduled",
    "Dispute Won", "Dispute Lost",
}  # fmt: skip


def _major(minor: int, currency: str) -> Decimal:
    return Decimal(minor) / (Decimal(10) ** currency_exponent(currency))


@pytest.fixture(scope="module")
def two_syncs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """A first sync, then every kind of transition over two more syncs (built once per module)."""
    for sandbox in make_sandbox(tmp_path_factory.mktemp("models")):
        yield _sync_three_times(sandbox)


def _sync_three_times(sandbox: Sandbox) -> Sandbox:
    biz = sandbox.business
    run_extract(sandbox.config())
    active = [s for s in biz.subscriptions if s["status"] == "active"]
    products = [p for p in biz.products if p["is_recurring"]]
    hold, resume, pause, plan, cancel_later, expire, fail, cancel_now = active[:8]
    biz.set_subscription_status(hold["subscription_id"], "on_hold")
    biz.set_subscription_status(resume["subscription_id"], "on_hold")
    biz.set_subscription_status(pause["subscription_id"], "paused")
    other = next(p for p in products if p["product_id"] != plan["product_id"])
    biz.change_plan(plan["subscription_id"], product_id=other["product_id"], quantity=2)
    biz.cancel_subscription(cancel_later["subscription_id"], at_period_end=True)
    biz.set_subscription_status(expire["subscription_id"], "expired")
    biz.set_subscription_status(fail["subscription_id"], "failed")
    biz.cancel_subscription(cancel_now["subscription_id"])
    open_disputes = [d for d in biz.disputes if d["dispute_status"] == "dispute_opened"]
    for _ in range(2 - len(open_disputes)):
        paid = next(
            p for p in biz.payments if p["status"] == "succeeded" and not p.get("dispute_status")
        )
        open_disputes.append(biz.add_dispute(paid["payment_id"]))
    run_extract(
        sandbox.config(**{"sources.dodo.as_of": (biz.now + timedelta(minutes=30)).isoformat()})
    )
    biz.set_subscription_status(resume["subscription_id"], "active")
    biz.set_dispute_status(open_disputes[0]["dispute_id"], "dispute_won")
    biz.set_dispute_status(open_disputes[1]["dispute_id"], "dispute_lost")
    # The last sync happens 15 days on, when every trial (7 or 14 days) has ended.
    run_extract(
        sandbox.config(**{"sources.dodo.as_of": (biz.now + timedelta(days=15)).isoformat()})
    )
    with duckdb.connect(sandbox.db) as con:
        result = run_models(con)
    assert not result.emission_blocked, [str(e) for e in result.errors]
    return sandbox


def test_every_event_of_the_catalog_is_derived_from_simulator_data(two_syncs: Sandbox) -> None:
    with duckdb.connect(two_syncs.db, read_only=True) as con:
        events = {
            r[0]
            for r in con.execute("select distinct event from analytics.lifecycle_events").fetchall()
        }
        ids = con.execute(
            "select count(*), count(distinct event_id), max(length(event_id)) from analytics.lifecycle_events"
        ).fetchone()
    assert DEFAULT_CATALOG <= events, DEFAULT_CATALOG - events
    assert ids[0] == ids[1] and ids[2] <= 100


def test_one_completed_event_per_succeeded_payment(two_syncs: Sandbox) -> None:
    succeeded = {
        p["payment_id"]: p for p in two_syncs.business.payments if p["status"] == "succeeded"
    }
    with duckdb.connect(two_syncs.db, read_only=True) as con:
        rows = con.execute(
            "select properties->>'payment_id', (properties->>'amount')::decimal(18,3), properties->>'currency' "
            "from analytics.lifecycle_events where event = 'Payment Completed'"
        ).fetchall()
    assert {r[0] for r in rows} == set(succeeded)
    for payment_id, amount, currency in rows:
        api = succeeded[payment_id]
        assert currency == api["currency"]
        assert amount == _major(api["total_amount"], api["currency"])  # JPY x1, KWD /1000


def test_traits_match_an_independent_computation(two_syncs: Sandbox) -> None:
    biz = two_syncs.business
    paid: dict[str, list[dict]] = defaultdict(list)
    for p in biz.payments:
        if p["status"] == "succeeded":
            paid[p["customer"]["customer_id"]].append(p)
    payments_by_id = {p["payment_id"]: p for p in biz.payments}
    refunded: dict[str, Decimal] = defaultdict(Decimal)
    for r in biz.refunds:
        if r["status"] == "succeeded":
            payment = payments_by_id[r["payment_id"]]
            amount = r.get("amount") if r.get("amount") is not None else payment["total_amount"]
            refunded[payment["customer"]["customer_id"]] += _major(amount, payment["currency"])
    with duckdb.connect(two_syncs.db, read_only=True) as con:
        traits = {
            r[0]: r[1:]
            for r in con.execute(
                "select customer_id, payments_count, total_spent, currency, customer_since, total_refunded "
                "from analytics.customer_traits"
            ).fetchall()
        }
    assert set(traits) == {c["customer_id"] for c in biz.customers}
    checked = 0
    for customer_id, payments in paid.items():
        currencies = {p["currency"] for p in payments}
        count, total_spent, currency, since, total_refunded = traits[customer_id]
        assert count == len(payments)
        first = min(
            datetime.fromisoformat(p["created_at"].replace("Z", "+00:00")) for p in payments
        )
        assert since == first
        if len(currencies) == 1:
            (code,) = currencies
            gross = sum(_major(p["total_amount"], code) for p in payments)
            assert currency == code
            assert Decimal(str(total_spent)) == gross - refunded[customer_id], customer_id
            assert Decimal(str(total_refunded)) == refunded[customer_id]
            checked += 1
        else:
            assert currency == "USD"  # several currencies: USD from the ledger
    assert checked > 20
    no_payments = [c["customer_id"] for c in biz.customers if c["customer_id"] not in paid]
    for customer_id in no_payments:
        assert traits[customer_id][0] == 0 and traits[customer_id][3] is None
