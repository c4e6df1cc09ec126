"""Seeded history of the sandbox business: customers, subscriptions, payments and their money trail."""

from __future__ import annotations

import math
import random
import zlib
from dataclasses import dataclass, field
from typing import Any

from pipelines.sandbox import records as rec
from pipelines.sandbox.bookkeeper import Bookkeeper, Buyer, Sink
from pipelines.sandbox.records import US_PER_DAY, add_interval, convert_usd, iso, new_id

NON_TERMINAL_PAYMENT = ("processing", "requires_customer_action", "requires_payment_method")
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
RETRY_DAYS = (2, 4, 6)
"""Dunning: the n-th retry of a failed renewal, days after it; the grace period ends after 7."""
GRACE_DAYS = 7
CANCEL_ACTORS = ("customer", "merchant_user", "api_key", "dodo_team")
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


def subscription_record(
    rng: random.Random, buyer: Buyer, plan: dict[str, Any], created_us: int, quantity: int
) -> dict[str, Any]:
    """A SubscriptionListResponseItem for a plan, before billing fills in dates and status."""
    detail = plan["price_detail"]
    discounted = rng.random() < 0.05
    discount_id = new_id(rng, "dsc_") if discounted else None
    return {
        "subscription_id": new_id(rng, "sub_"),
        "status": "active",
        "product_id": plan["product_id"],
        "product_name": plan["name"],
        "quantity": quantity,
        "currency": buyer.currency,
        "recurring_pre_tax_amount": convert_usd(plan["price"], buyer.currency) * quantity,
        "tax_inclusive": False,
        "payment_frequency_interval": detail["payment_frequency_interval"],
        "payment_frequency_count": detail["payment_frequency_count"],
        "subscription_period_interval": detail["subscription_period_interval"],
        "subscription_period_count": detail["subscription_period_count"],
        "created_at": iso(created_us),
        "next_billing_date": iso(created_us),
        "previous_billing_date": iso(created_us),
        "cancelled_at": None,
        "cancel_at_next_billing_date": False,
        "paused_at": None,
        "trial_period_days": 0,
        "trial_amount": None,
        "on_demand": False,
        "customer": buyer.ref,
        "customer_business_name": None,
        "billing": rec.billing_address(rng, buyer.country),
        "discounts": [{"discount_id": discount_id, "discount_cycles_remaining": 2}]
        if discount_id
        else [],
        "discount_id": discount_id,
        "discount_cycles_remaining": 2 if discount_id else None,
        "payment_method_id": new_id(rng, "pm_"),
        "tax_id": None,
        "scheduled_change": None,
        "metadata": {"plan_tier": plan["name"].split()[0].lower()} if rng.random() < 0.3 else {},
        "has_payment_method": True,
        "cancelled_by": None,
    }


def cancelled_by(sub: dict[str, Any], by: str | None = None) -> dict[str, Any] | None:
    """Who cancelled (API 1.123 `cancelled_by`), from a hash of the id; None: the system."""
    actor = by or CANCEL_ACTORS[zlib.crc32(sub["subscription_id"].encode()) % 4]
    person = actor in ("customer", "merchant_user")
    email = sub["customer"]["email"] if actor == "customer" else "ops@merchant.example"
    return {
        "actor_type": actor,
        "email": email if person else None,
        "name": (sub["customer"]["name"] if actor == "customer" else "Ops") if person else None,
    }


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
        _bill(bk, rng, sub, buyer, scenario, created, now_us, by_name)
        sink("subscriptions", sub, created)
        if sub["status"] == "past_due":
            due = rec.parse_iso(sub["next_billing_date"])
            history.dunning_attempts[sub["subscription_id"]] = sum(
                1 for days in RETRY_DAYS if due + days * US_PER_DAY <= now_us
            )
    _guarantees(bk, rng, buyers, now_us, by_name)
    _multi_checkouts(bk, buyers, max(2, n_subscriptions // 40), now_us, by_name, sink)
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


def _bill(
    bk: Bookkeeper, rng: random.Random, sub: dict[str, Any], buyer: Buyer, scenario: str,
    created: int, now_us: int, by_name: dict[str, dict[str, Any]],
) -> None:  # fmt: skip
    """Fill a subscription's payments, dates and status for its scenario."""
    interval, count = sub["payment_frequency_interval"], sub["payment_frequency_count"]
    sid, currency = sub["subscription_id"], sub["currency"]
    anchor, end = created, now_us
    if scenario in ("trial", "trial_no_card"):
        sub["trial_period_days"] = 14 if sub["product_name"] != "Team Monthly" else 7
        anchor = created + sub["trial_period_days"] * US_PER_DAY
        if scenario == "trial_no_card":  # a card-optional trial: no card on file yet
            sub["has_payment_method"], sub["payment_method_id"] = False, None
        else:  # the card is saved with a zero-amount payment
            bk.pay(buyer, created, "succeeded", 0, currency, sid, "new", False)
    if scenario in ("cancelled", "cancelled_end", "usage"):
        end = created + int((now_us - created) * rng.uniform(0.3, 0.9))
    elif scenario == "paused":
        end = now_us - int(rng.uniform(1, 40) * US_PER_DAY)
    expiry = add_interval(
        created, sub["subscription_period_interval"], sub["subscription_period_count"]
    )
    if expiry <= end:
        end, scenario = expiry - 1, "expired"
    change_at = created + int((now_us - created) * rng.uniform(0.4, 0.8))
    dunning = scenario in ("dunning_on_hold", "dunning_cancelled", "past_due")
    k, due, prev = 0, anchor, created
    while due <= end:
        nxt = add_interval(anchor, interval, (k + 1) * count)
        if scenario == "plan_change" and prev < change_at <= due:
            _change_plan(bk, sub, buyer, by_name, change_at, prev, due)
        amount = sub["recurring_pre_tax_amount"]
        charge = "new" if k == 0 else "renewal"
        period = [(sid, due, nxt, "1")]
        if scenario == "failed" or (scenario == "on_hold" and nxt > end and k > 0):
            bk.pay(buyer, due, "failed", amount, currency, sid, charge)
            break
        if scenario == "pending":
            bk.pay(buyer, due, rng.choice(NON_TERMINAL_PAYMENT), amount, currency, sid, charge)
            break
        if dunning and nxt > end and k > 0:
            scenario = _dunning(bk, sub, buyer, due, now_us, scenario)
            break
        if scenario == "recovered" and k == 1:  # recovered by the second retry
            for attempt in (0, 1):
                at = due + (RETRY_DAYS[attempt - 1] if attempt else 0) * US_PER_DAY
                bk.pay(buyer, at, "failed", amount, currency, sid, charge, retry_attempt=attempt)
            at = due + RETRY_DAYS[1] * US_PER_DAY
            bk.pay(buyer, at, "succeeded", amount, currency, sid, charge, True, period, 2)
        elif k > 0 and rng.random() < 0.03:  # a failed attempt, then a successful retry
            bk.pay(buyer, due, "failed", amount, currency, sid, charge)
            retry = min(due + US_PER_DAY, now_us)
            bk.pay(buyer, retry, "succeeded", amount, currency, sid, charge, True, period, 1)
        elif scenario == "usage" and k > 0:  # seats plus metered usage of the last cycle
            usage = amount * (1 + zlib.crc32(sid.encode()) % 3) // 10
            bk.pay(buyer, due, "succeeded", amount, currency, sid, charge, True, period, 0, usage)
        else:
            bk.pay(buyer, due, "succeeded", amount, currency, sid, charge, True, period)
        prev, due, k = due, nxt, k + 1
    sub["previous_billing_date"], sub["next_billing_date"] = iso(prev), iso(due)
    status = {"on_hold": "on_hold", "paused": "paused", "pending": "pending", "failed": "failed"}
    status |= {"dunning_on_hold": "on_hold", "past_due": "past_due"}
    sub["status"] = status.get(scenario, "active")
    if scenario in ("on_hold", "dunning_on_hold", "past_due") and k == 0:
        sub["status"] = "active"
    if scenario == "expired":
        sub["status"] = "expired"
    elif scenario == "paused":
        sub["paused_at"] = iso(end)
    elif scenario == "dunning_cancelled" and k > 0:  # grace period over: the system cancelled
        sub["status"] = "cancelled"
        sub["cancelled_at"] = iso(due + GRACE_DAYS * US_PER_DAY)
    elif scenario in ("cancelled", "cancelled_end", "usage"):
        sub["status"] = "cancelled"
        at_end = scenario in ("cancelled_end", "usage") and due <= now_us
        sub["cancel_at_next_billing_date"] = at_end
        sub["cancelled_at"] = iso(due if at_end else end)
        sub["cancelled_by"] = cancelled_by(sub, "customer" if scenario == "usage" else None)
        if scenario == "usage" and at_end and k > 1:  # the last cycle's usage, billed alone
            usage = sub["recurring_pre_tax_amount"] * (1 + zlib.crc32(sid.encode()) % 3) // 10
            bk.pay(buyer, due, "succeeded", 0, currency, sid, "renewal", False, [], 0, usage)
    elif scenario == "cancel_at_end":
        sub["cancel_at_next_billing_date"] = True
        sub["cancelled_by"] = cancelled_by(sub)
    elif scenario == "scheduled":
        target = by_name["Pro Monthly" if sub["product_name"] != "Pro Monthly" else "Team Monthly"]
        sub["scheduled_change"] = {
            "id": new_id(rng, "spc_"), "product_id": target["product_id"], "quantity": 1,
            "effective_at": sub["next_billing_date"], "created_at": iso(now_us - US_PER_DAY),
            "addons": [], "product_name": target["name"], "product_description": None,
        }  # fmt: skip


def _dunning(
    bk: Bookkeeper, sub: dict[str, Any], buyer: Buyer, due: int, now_us: int, scenario: str
) -> str:
    """A renewal that fails, then its retries (API 1.123 `retry_attempt` 1, 2, ...), all failing:
    past_due while the grace period lasts, then on_hold or cancelled. Returns the scenario."""
    sid, amount, currency = sub["subscription_id"], sub["recurring_pre_tax_amount"], sub["currency"]
    bk.pay(buyer, due, "failed", amount, currency, sid, "renewal")
    for attempt, days in enumerate(RETRY_DAYS, start=1):
        if due + days * US_PER_DAY > now_us:
            return "past_due"
        at = due + days * US_PER_DAY
        bk.pay(buyer, at, "failed", amount, currency, sid, "renewal", retry_attempt=attempt)
    if due + GRACE_DAYS * US_PER_DAY > now_us:
        return "past_due"
    return "dunning_on_hold" if scenario == "past_due" else scenario


def _change_plan(
    bk: Bookkeeper, sub: dict[str, Any], buyer: Buyer, by_name: dict[str, Any], at_us: int,
    period_start: int, period_end: int,
) -> None:  # fmt: skip
    """Upgrade a subscription (Starter -> Pro, or more seats) mid-cycle, keeping the cycle: a
    plan_change charge for the rest of the period, with its partial proration_factor."""
    old_amount = sub["recurring_pre_tax_amount"]
    if sub["product_name"] == "Team Monthly":
        sub["quantity"] += 3
        sub["recurring_pre_tax_amount"] = old_amount // (sub["quantity"] - 3) * sub["quantity"]
    else:
        target = by_name["Pro Monthly" if sub["product_name"] != "Pro Monthly" else "Team Monthly"]
        sub["product_id"], sub["product_name"] = target["product_id"], target["name"]
        sub["recurring_pre_tax_amount"] = convert_usd(target["price"], sub["currency"])
        sub["metadata"] = {**sub["metadata"], "upgraded_from": "starter"}
    factor = rec.proration(period_start, at_us, period_end)
    delta = max(1, round((sub["recurring_pre_tax_amount"] - old_amount) * float(factor)))
    period = [(sub["subscription_id"], at_us, period_end, factor)]
    bk.pay(
        buyer, at_us, "succeeded", delta, sub["currency"], sub["subscription_id"], "plan_change",
        True, period,
    )  # fmt: skip


def _multi_checkouts(
    bk: Bookkeeper, buyers: list[Buyer], n: int, now_us: int, by_name: dict[str, Any], sink: Sink
) -> None:
    """Checkouts that start two subscriptions with one payment (API 1.123
    `is_multi_subscription`), renewed together every month; drawn from their own random
    stream so the rest of the business stays as it was."""
    rng = random.Random(len(buyers) * 7 + n)
    plans = (by_name["Starter Monthly"], by_name["Team Monthly"])
    for i in range(n):
        buyer = buyers[(i * 5 + 3) % len(buyers)]
        span = min(20 * US_PER_DAY, now_us - buyer.created_us)
        created = buyer.created_us + int(rng.random() * span)
        subs = [subscription_record(rng, buyer, p, created, 1 + j) for j, p in enumerate(plans)]
        sids = [sub["subscription_id"] for sub in subs]
        due, prev, k = created, created, 0
        while due <= now_us:
            nxt = add_interval(created, "Month", k + 1)
            periods = [(sid, due, nxt, "1") for sid in sids]
            amount = sum(sub["recurring_pre_tax_amount"] for sub in subs)
            charge = "new" if k == 0 else "renewal"
            bk.pay(buyer, due, "succeeded", amount, buyer.currency, sids, charge, False, periods)
            prev, due, k = due, nxt, k + 1
        for sub in subs:
            sub["previous_billing_date"], sub["next_billing_date"] = iso(prev), iso(due)
            sink("subscriptions", sub, created)


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


def _older_history(
    rng: random.Random, sink: Sink, n_payments: int, first_index: int, start_us: int,
    now_us: int, products: list[dict[str, Any]],
) -> None:  # fmt: skip
    """Closed history before `start_us`: `n_payments` one-time payments (succeeded, failed or
    cancelled; never refunded or disputed) by customers of their own (one per ten payments),
    spread over nine times the generated span. Nothing in it is recent or open, so a sync's
    re-reads (the lookback window, the open objects) are those of the business without it: only
    the depth of history differs. Its own random stream leaves the rest of the business as is."""
    bk = Bookkeeper(rng, now_us, sink)
    span = 9 * (now_us - start_us)
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
