"""Subscriptions of the sandbox business and how they were billed: scenarios (renewals, plan
changes, dunning retries and grace periods, usage, trials), multi-subscription checkouts."""

from __future__ import annotations

import random
import zlib
from typing import Any

from pipelines.sandbox import records as rec
from pipelines.sandbox.bookkeeper import Bookkeeper, Buyer, Sink
from pipelines.sandbox.records import US_PER_DAY, add_interval, convert_usd, iso, new_id

NON_TERMINAL_PAYMENT = ("processing", "requires_customer_action", "requires_payment_method")
RETRY_DAYS = (2, 4, 6)
"""Dunning: the n-th retry of a failed renewal, days after it; the grace period ends after 7."""
GRACE_DAYS = 7
CANCEL_ACTORS = ("customer", "merchant_user", "api_key", "dodo_team")


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


def bill(
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


def multi_checkouts(
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
