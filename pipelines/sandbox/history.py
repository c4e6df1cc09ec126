"""Seeded history of the sandbox business: customers, subscriptions, payments and their money trail."""

from __future__ import annotations

import math
import random
import zlib
from dataclasses import dataclass, field
from typing import Any

from pipelines.sandbox import records as rec
from pipelines.sandbox.billing import (
    NON_TERMINAL_PAYMENT,
    RETRY_DAYS,
    bill,
    multi_checkouts,
    subscription_record,
)  # fmt: skip
from pipelines.sandbox.bookkeeper import Bookkeeper, Buyer, Sink
from pipelines.sandbox.identities import assign_identities
from pipelines.sandbox.records import US_PER_DAY, add_interval, convert_usd, new_id

SCENARIOS = (
    "active", "cancel_at_end", "plan_change", "scheduled", "trial", "cancelled",
    "cancelled_end", "on_hold", "paused", "pending", "failed", "expired",
    "recovered", "dunning_on_hold", "dunning_cancelled", "usage", "trial_no_card",
)  # fmt: skip
SCENARIO_WEIGHTS = (52, 4, 5, 1, 3, 12, 4, 5, 3, 2, 4, 5, 3, 2, 2, 3, 1)
FORCED_SCENARIOS = (
    "active", "trial", "pending", "on_hold", "paused", "cancelled", "cancelled_end", "failed",
    "expired", "cancel_at_end", "plan_change", "scheduled", "active", "trial",
    "recovered", "dunning_on_hold", "dunning_cancelled", "past_due", "usage", "trial_no_card",
)  # fmt: skip
CHARGE_TYPE_SINCE_DAYS = 90
"""Subscription payments of the first 90 days of history have no charge_type (older rows)."""
PLAN_WEIGHTS = {"Starter Monthly": 30, "Pro Monthly": 30, "Pro Annual": 10, "Team Monthly": 10}
PLAN_WEIGHTS |= {"Weekly Digest": 8, "Daily Pass": 2, "Six-Month Bootcamp": 5}


@dataclass
class History:
    """Generated rows per resource as (created_at microseconds, item), plus generator state."""

    rows: dict[str, list[tuple[int, dict[str, Any]]]]
    archived_product_ids: set[str]
    buyers: dict[str, Buyer]
    products_by_name: dict[str, dict[str, Any]] = field(default_factory=dict)
    dunning_attempts: dict[str, int] = field(default_factory=dict)
    """Retries made so far of each past_due subscription's failed renewal."""
    identities: dict[str, list[str]] = field(default_factory=dict)
    """Customers given an app user id or a company (`identities.assign_identities`)."""


def build_history(
    seed: int, n_customers: int, n_subscriptions: int, payments_target: int | None,
    start_us: int, now_us: int, older_closed_payments: int = 0,
) -> History:  # fmt: skip
    """Generate the whole history, sorted by created_at, deterministic for its arguments.

    `older_closed_payments` adds that many closed payments before `start_us` (`_older_history`):
    the same business with a deeper past.
    """
    rng = random.Random(seed)
    rows: dict[str, list[tuple[int, dict[str, Any]]]] = {
        name: [] for name in ("customers", "products", "subscriptions", "payments", "refunds")
    }
    rows |= {"disputes": [], "balance_ledger": []}

    def sink(resource: str, item: dict[str, Any], created_us: int) -> None:
        rows[resource].append((created_us, item))

    products, archived = rec.product_catalog(rng, start_us - 60 * US_PER_DAY)
    for product in products:
        rows["products"].append((rec.parse_iso(product["created_at"]), product))
    by_name = {p["name"]: p for p in products}
    history = History(rows, archived, {}, by_name)
    buyers = _customers(rng, n_customers, start_us, now_us, sink)
    history.buyers = {b.record["customer_id"]: b for b in buyers}
    bk = Bookkeeper(rng, now_us, sink)
    bk.charge_type_since_us = start_us + CHARGE_TYPE_SINCE_DAYS * US_PER_DAY
    plan_names, weights = list(PLAN_WEIGHTS), list(PLAN_WEIGHTS.values())
    early = min(len(buyers), 24)
    for i in range(n_subscriptions):
        forced = i < len(FORCED_SCENARIOS)
        if forced:
            scenario, buyer = FORCED_SCENARIOS[i], buyers[i % early]
        else:
            scenario = rng.choices(SCENARIOS, SCENARIO_WEIGHTS)[0]
            buyer = buyers[rng.randrange(len(buyers))]
        plan = by_name[rng.choices(plan_names, weights)[0]]
        created = buyer.created_us + int(
            rng.random() * min(30 * US_PER_DAY, now_us - buyer.created_us)
        )
        if scenario in ("trial", "trial_no_card"):
            plan = by_name[rng.choice(("Pro Monthly", "Team Monthly", "Pro Annual"))]
            created = now_us - int(rng.uniform(0.2, 6.5) * US_PER_DAY)
        elif scenario == "past_due":  # the renewal failed 2.5 days ago: in its grace period
            plan = by_name["Pro Monthly"]
            created = add_interval(now_us - int(2.5 * US_PER_DAY), "Month", -1)
        elif scenario == "usage":
            plan = by_name["Team Monthly"]
        elif scenario == "pending":
            created = now_us - int(rng.uniform(0.01, 1.5) * US_PER_DAY)
        elif scenario == "expired":
            plan = by_name["Six-Month Bootcamp"]
        elif scenario == "plan_change" or forced:
            plan = by_name[
                "Starter Monthly" if forced else rng.choice(("Starter Monthly", "Pro Monthly"))
            ]
        elif created < start_us + 180 * US_PER_DAY and rng.random() < 0.08:
            plan = by_name["Legacy Pro (2024)"]
        quantity = rng.randrange(2, 20) if plan["name"] == "Team Monthly" else 1
        sub = subscription_record(rng, buyer, plan, created, quantity)
        bill(bk, rng, sub, buyer, scenario, created, now_us, by_name)
        sink("subscriptions", sub, created)
        if sub["status"] == "past_due":
            due = rec.parse_iso(sub["next_billing_date"])
            history.dunning_attempts[sub["subscription_id"]] = sum(
                1 for days in RETRY_DAYS if due + days * US_PER_DAY <= now_us
            )
    _guarantees(bk, rng, buyers, now_us, by_name)
    multi_checkouts(bk, buyers, max(2, n_subscriptions // 40), now_us, by_name, sink)
    one_time = (payments_target - len(rows["payments"])) if payments_target else 2 * n_customers
    _one_time_payments(bk, rng, buyers, max(0, one_time), start_us, now_us, products, archived)
    if older_closed_payments:
        _older_history(
            random.Random(seed * 104_729 + 3), sink, older_closed_payments, n_customers,
            start_us, now_us, products,
        )  # fmt: skip
    for name in rows:
        rows[name].sort(key=lambda row: row[0])
    rows["balance_ledger"] = with_balances(rng, rows["balance_ledger"], now_us)
    history.identities = assign_identities(
        seed,
        [item for _, item in rows["customers"]],
        [item for _, item in rows["payments"]],
        [item for _, item in rows["subscriptions"]],
    )
    return history


def _customers(rng: random.Random, n: int, start_us: int, now_us: int, sink: Sink) -> list[Buyer]:
    span = now_us - start_us
    buyers = []
    for i in range(n):
        if i < 24:  # early customers carry the guaranteed scenarios (long renewal histories)
            created = start_us + int(rng.random() * 30 * US_PER_DAY)
        else:
            created = start_us + int(span * math.sqrt(rng.random()) * 0.999)
        country = (
            rec.COUNTRIES[i]
            if i < len(rec.COUNTRIES)
            else rng.choices(rec.COUNTRIES, rec.COUNTRY_WEIGHTS)[0]
        )
        currency = rec.COUNTRY_CURRENCY[country]
        second = None
        if i == 0 or rng.random() < 0.05:
            second = "EUR" if currency == "USD" else "USD"
        record = rec.customer_record(rng, i, created)
        buyers.append(
            Buyer(record, rec.limited_customer(record), country, currency, second, created)
        )
        sink("customers", record, created)
    return buyers


def _guarantees(
    bk: Bookkeeper, rng: random.Random, buyers: list[Buyer], now_us: int, by_name: dict[str, Any]
) -> None:
    """Records every test relies on, whatever the size: currencies, refunds, disputes, statuses."""
    book = by_name["Field Guide (e-book)"]
    day = US_PER_DAY

    def pay(i: int, ago_days: float, status: str = "succeeded", second: bool = False) -> dict:
        buyer = buyers[i % len(buyers)]
        currency = (buyer.second_currency if second else None) or buyer.currency
        amount = convert_usd(book["price"], currency)
        return bk.pay(buyer, now_us - int(ago_days * day), status, amount, currency, extras=False)

    pay(0, 100), pay(0, 50, second=True)
    for i in range(len(rec.COUNTRIES)):
        pay(i, 40 + i)
    for i, (status, partial) in enumerate(
        [("succeeded", True), ("succeeded", False), ("pending", False), ("review", True)]
        + [("failed", False)]
    ):
        bk.refund(pay(i + 1, 30), now_us - 2 * day - i * 3_600_000_000, status, partial)
    bk.dispute(pay(6, 5), now_us - 3 * day, "dispute_opened", "pre_dispute")
    bk.dispute(pay(7, 40), now_us - 15 * day, "dispute_challenged", "dispute")
    bk.dispute(pay(8, 120), now_us - 90 * day, "dispute_won", "dispute")
    bk.dispute(pay(9, 120), now_us - 80 * day, "dispute_lost", "pre_arbitration")
    for i, status in enumerate((*NON_TERMINAL_PAYMENT, "failed", "cancelled")):
        pay(i + 2, 0.05 + i / 24, status)


def _one_time_payments(
    bk: Bookkeeper, rng: random.Random, buyers: list[Buyer], n: int, start_us: int, now_us: int,
    products: list[dict[str, Any]], archived: set[str],
) -> None:  # fmt: skip
    goods = [p for p in products if not p["is_recurring"] and p["product_id"] not in archived]
    old_goods = [p for p in products if not p["is_recurring"]]
    retired_after = start_us + 180 * US_PER_DAY
    recent = now_us - 3 * US_PER_DAY
    n_buyers = len(buyers)
    for _ in range(n):
        buyer = buyers[rng.randrange(n_buyers)]
        created = buyer.created_us + int(rng.random() * (now_us - buyer.created_us))
        currency = buyer.currency
        if buyer.second_currency and rng.random() < 0.35:
            currency = buyer.second_currency
        product = rng.choice(old_goods if created < retired_after else goods)
        if created > recent and rng.random() < 0.3:
            status = rng.choice(NON_TERMINAL_PAYMENT)
        else:
            draw = rng.random()
            status = "succeeded" if draw < 0.92 else "failed" if draw < 0.97 else "cancelled"
        bk.pay(buyer, created, status, convert_usd(product["price"], currency), currency)


OLDEST_HISTORY_US = rec.to_us(rec.from_us(0).replace(year=2020))
"""2020-01-01T00:00:00Z: the job's default `sources.dodo.backfill_start`."""


def _older_history(
    rng: random.Random, sink: Sink, n_payments: int, first_index: int, start_us: int,
    now_us: int, products: list[dict[str, Any]],
) -> None:  # fmt: skip
    """Closed history before `start_us`: `n_payments` one-time payments (succeeded, failed or
    cancelled; never refunded or disputed) by customers of their own (one per ten payments),
    spread over nine times the generated span, but, for a business that starts after 2020, not
    before 2020 (`OLDEST_HISTORY_US`, the job's default `backfill_start`: a first sync reads all
    of it). Nothing in it is recent or open, so
    a sync's re-reads (the lookback window, the open objects) are those of the business without
    it: only the depth of history differs. Its own random stream leaves the rest of the business
    as is."""
    bk = Bookkeeper(rng, now_us, sink)
    span = 9 * (now_us - start_us)
    if start_us - OLDEST_HISTORY_US > US_PER_DAY:
        span = min(span, start_us - OLDEST_HISTORY_US)
    buyers = []
    for i in range(max(1, n_payments // 10)):
        created = start_us - span + int(rng.random() * span * 0.9)
        country = rng.choices(rec.COUNTRIES, rec.COUNTRY_WEIGHTS)[0]
        record = rec.customer_record(rng, first_index + i, created)
        currency = rec.COUNTRY_CURRENCY[country]
        buyers.append(Buyer(record, rec.limited_customer(record), country, currency, None, created))
        sink("customers", record, created)
    goods = [p for p in products if not p["is_recurring"]]
    for _ in range(n_payments):
        buyer = buyers[rng.randrange(len(buyers))]
        created = buyer.created_us + int(rng.random() * (start_us - buyer.created_us))
        draw = rng.random()
        status = "succeeded" if draw < 0.92 else "failed" if draw < 0.97 else "cancelled"
        price = convert_usd(rng.choice(goods)["price"], buyer.currency)
        bk.pay(buyer, created, status, price, buyer.currency, extras=False)


def with_balances(
    rng: random.Random, rows: list[tuple[int, dict[str, Any]]], until_us: int
) -> list[tuple[int, dict[str, Any]]]:
    """Fill before/after balances in time order and add monthly payouts of 90% per currency."""
    out: list[tuple[int, dict[str, Any]]] = []
    balances: dict[str, int] = {}
    next_payout = add_interval(_month_start(rows[0][0]), "Month", 1) if rows else until_us

    def book(at_us: int, entry: dict[str, Any]) -> None:
        before = balances.get(entry["currency"], 0)
        after = before + entry["amount"] if entry["is_credit"] else before - entry["amount"]
        entry["before_balance"], entry["after_balance"] = before, after
        balances[entry["currency"]] = after
        out.append((at_us, entry))

    if rows:  # the account's first entry (API 1.123 `opening_balance`), nothing carried over
        first = rows[0][0]
        opening = rec.ledger_record(rng, first, "opening_balance", 0, "USD", True, None, None)
        opening["id"] = f"ble_{zlib.crc32(str(first).encode()):021x}"  # leaves rng as it was
        book(first, opening)
    for at_us, entry in rows:
        while at_us >= next_payout:
            for currency, balance in sorted(balances.items()):
                if balance > 0:
                    ref = new_id(rng, "po_")
                    amount = balance * 9 // 10
                    book(next_payout, rec.ledger_record(
                        rng, next_payout, "payout", amount, currency, False, ref, "Monthly payout",
                        payout_id=ref,
                    ))  # fmt: skip
            next_payout = add_interval(next_payout, "Month", 1)
        book(at_us, entry)
    return out


def _month_start(us: int) -> int:
    moment = rec.from_us(us)
    return rec.to_us(moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0))
