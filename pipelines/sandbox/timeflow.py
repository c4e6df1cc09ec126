"""Time passing in the sandbox business: renewals, churn, settlements and new sales."""

from __future__ import annotations

import random
from datetime import datetime
from typing import Any, Protocol

from pipelines.sandbox.records import add_interval, from_us, iso, parse_iso, to_us

Item = dict[str, Any]


class ChangingBusiness(Protocol):
    """What time passing needs of the sandbox business (`business.Business` provides it)."""

    now: datetime
    customers: list[Item]
    payments: list[Item]
    subscriptions: list[Item]
    refunds: list[Item]
    disputes: list[Item]
    products_by_name: dict[str, Item]

    def touch(self) -> None: ...
    def add_customers(self, *args: Any, **kwargs: Any) -> Any: ...
    def add_payments(self, *args: Any, **kwargs: Any) -> Any: ...
    def add_subscription(self, *args: Any, **kwargs: Any) -> Any: ...
    def add_refund(self, *args: Any, **kwargs: Any) -> Any: ...
    def add_dispute(self, *args: Any, **kwargs: Any) -> Any: ...
    def cancel_subscription(self, *args: Any, **kwargs: Any) -> Any: ...
    def change_plan(self, *args: Any, **kwargs: Any) -> Any: ...
    def renew_subscription(self, *args: Any, **kwargs: Any) -> Any: ...
    def set_subscription_status(self, *args: Any, **kwargs: Any) -> Any: ...
    def set_payment_status(self, *args: Any, **kwargs: Any) -> Any: ...
    def set_refund_status(self, *args: Any, **kwargs: Any) -> Any: ...
    def set_dispute_status(self, *args: Any, **kwargs: Any) -> Any: ...
    def fail_renewal(self, *args: Any, **kwargs: Any) -> Any: ...
    def retry_renewal(self, *args: Any, **kwargs: Any) -> Any: ...

    dunning_attempts: dict[str, int]


MONTHLY_PLANS = ("Starter Monthly", "Pro Monthly", "Team Monthly", "Legacy Pro (2024)")


def advance(biz: ChangingBusiness, end: datetime, rng: random.Random) -> dict[str, Any]:
    """Let what happens between the business clock and `end` happen, and say what it was.

    The summary maps each kind of change to ids. The caller moves the clock and lists what
    was created (`ChangingBusiness.advance_time`).
    """
    start_us, end_us = to_us(biz.now), to_us(end)
    summary: dict[str, Any] = {"from": iso(start_us), "to": iso(end_us)}

    def when() -> datetime:
        return from_us(start_us + int(rng.random() * (end_us - start_us)))

    days = (end_us - start_us) / 86_400_000_000
    summary |= _renewals(biz, end_us)
    active = [s for s in biz.subscriptions if s["status"] == "active"]
    plain = [s for s in active if not s["cancel_at_next_billing_date"]]
    picks = rng.sample(plain, min(5, len(plain)))
    on_hold = [s["subscription_id"] for s in biz.subscriptions if s["status"] == "on_hold"]
    past_due = [s["subscription_id"] for s in biz.subscriptions if s["status"] == "past_due"]
    changes = {
        "cancelled": picks[0:1], "cancel_at_next_billing_date": picks[1:2], "on_hold": picks[2:3],
        "paused": picks[3:4], "plan_changed": [s for s in picks[4:5]],
    }  # fmt: skip
    for sub in changes["cancelled"]:
        biz.cancel_subscription(sub["subscription_id"], at=when())
    for sub in changes["cancel_at_next_billing_date"]:
        biz.cancel_subscription(sub["subscription_id"], at_period_end=True)
    for sub in changes["on_hold"]:
        _fail_renewal(biz, sub, when())
    for sub in changes["paused"]:
        biz.set_subscription_status(sub["subscription_id"], "paused", when())
    for sub in changes["plan_changed"]:
        _change_plan(biz, sub, when())
    summary |= {key: [s["subscription_id"] for s in subs] for key, subs in changes.items()}
    summary["resumed"] = []
    if on_hold:
        resumed = rng.choice(on_hold)
        at = when()
        biz.set_subscription_status(resumed, "active", at)
        biz.renew_subscription(resumed, at)
        summary["resumed"].append(resumed)
    summary |= _settlements(biz, rng, when)
    summary |= _new_business(biz, rng, days, when)
    summary |= _dunning(biz, rng, when, past_due, {s["subscription_id"] for s in picks})
    return summary


def _dunning(
    biz: ChangingBusiness, rng: random.Random, when: Any, past_due: list[str], taken: set[str]
) -> dict[str, list[str]]:
    """API 1.123 grace periods: a renewal fails (active -> past_due); each subscription that
    was past_due gets its next retry, which recovers it (-> active) or, after the third,
    ends the grace period (-> on_hold or cancelled). Drawn after everything else, so the rest
    of an advance is what it was before past_due existed."""
    out: dict[str, list[str]] = {"past_due": [], "recovered": [], "dunning_ended": []}
    for sid in past_due:
        attempt = biz.dunning_attempts.get(sid, 0) + 1
        draw = rng.random()
        if draw < 0.5:
            biz.retry_renewal(sid, True, when())
            out["recovered"].append(sid)
        elif attempt >= 3:
            biz.retry_renewal(sid, False, when(), "on_hold" if draw < 0.8 else "cancelled")
            out["dunning_ended"].append(sid)
        else:
            biz.retry_renewal(sid, False, when(), "past_due")
    plain = [
        s for s in biz.subscriptions
        if s["status"] == "active" and not s["cancel_at_next_billing_date"]
        and s["subscription_id"] not in taken
    ]  # fmt: skip
    if plain:
        sub = rng.choice(plain)
        biz.fail_renewal(sub["subscription_id"], when())
        out["past_due"].append(sub["subscription_id"])
    return out


def _renewals(biz: ChangingBusiness, end_us: int) -> dict[str, list[str]]:
    """Charge every active subscription whose billing date passed; end or expire the due ones."""
    renewals: list[str] = []
    cancelled: list[str] = []
    expired: list[str] = []
    for sub in list(biz.subscriptions):
        if sub["status"] != "active":
            continue
        expiry = add_interval(
            parse_iso(sub["created_at"]),
            sub["subscription_period_interval"],
            sub["subscription_period_count"],
        )
        due = parse_iso(sub["next_billing_date"])
        while due <= end_us:
            if sub["cancel_at_next_billing_date"]:
                biz.set_subscription_status(sub["subscription_id"], "cancelled", from_us(due))
                cancelled.append(sub["subscription_id"])
                break
            if due >= expiry:
                biz.set_subscription_status(sub["subscription_id"], "expired", from_us(due))
                expired.append(sub["subscription_id"])
                break
            renewals.append(biz.renew_subscription(sub["subscription_id"])["payment_id"])
            due = parse_iso(sub["next_billing_date"])
    return {"renewals": renewals, "cancelled_at_period_end": cancelled, "expired": expired}


def _fail_renewal(biz: ChangingBusiness, sub: dict[str, Any], at: datetime) -> None:
    """A renewal charge fails: a failed payment and the subscription goes on hold."""
    biz.add_payments(1, "failed", sub["customer"]["customer_id"], sub["currency"], at)
    biz.set_subscription_status(sub["subscription_id"], "on_hold", at)


def _change_plan(biz: ChangingBusiness, sub: dict[str, Any], at: datetime) -> None:
    """Upgrade Starter -> Pro, or add seats."""
    name = sub["product_name"]
    if name == "Starter Monthly":
        biz.change_plan(
            sub["subscription_id"], biz.products_by_name["Pro Monthly"]["product_id"], at=at
        )
    else:
        biz.change_plan(sub["subscription_id"], quantity=sub["quantity"] + 2, at=at)


def _settlements(biz: ChangingBusiness, rng: random.Random, when: Any) -> dict[str, list[str]]:
    """A processing payment succeeds, a pending refund succeeds, an open dispute is decided."""
    out: dict[str, list[str]] = {"payments_succeeded": [], "refunds_succeeded": []}
    out["disputes_resolved"] = []
    processing = [p for p in biz.payments[-5000:] if p["status"] == "processing"]
    if processing:
        payment = rng.choice(processing)
        biz.set_payment_status(payment["payment_id"], "succeeded", when())
        out["payments_succeeded"].append(payment["payment_id"])
    pending = [r for r in biz.refunds if r["status"] == "pending"]
    if pending:
        refund = rng.choice(pending)
        biz.set_refund_status(refund["refund_id"], "succeeded", when())
        out["refunds_succeeded"].append(refund["refund_id"])
    open_ = [
        d for d in biz.disputes if d["dispute_status"] in ("dispute_opened", "dispute_challenged")
    ]
    if open_:
        dispute = rng.choice(open_)
        status = rng.choice(("dispute_won", "dispute_lost"))
        biz.set_dispute_status(dispute["dispute_id"], status, at=when())
        out["disputes_resolved"].append(dispute["dispute_id"])
    return out


def _new_business(
    biz: ChangingBusiness, rng: random.Random, days: float, when: Any
) -> dict[str, list[str]]:
    """New customers, one-time sales, subscriptions, and fresh work for the next advance."""
    n_customers = max(1, round(len(biz.customers) * 0.002 * days))
    customers = [biz.add_customers(1, when())[0] for _ in range(n_customers)]
    n_payments = max(3, round(len(biz.payments) / 540 * 0.5 * days))
    payments = [biz.add_payments(1, at=when())[0] for _ in range(n_payments)]
    plan = biz.products_by_name[rng.choice(MONTHLY_PLANS[:3])]
    subs = [
        biz.add_subscription(c["customer_id"], plan["product_id"], at=when())
        for c in customers[: max(1, len(customers) // 2)]
    ]
    processing = biz.add_payments(1, "processing", at=when())
    ok = [p for p in payments if p["status"] == "succeeded"]
    refund = biz.add_refund(ok[0]["payment_id"], "pending", at=when())
    dispute = biz.add_dispute(ok[-1]["payment_id"], at=when())
    return {
        "new_customers": [c["customer_id"] for c in customers],
        "new_payments": [p["payment_id"] for p in payments + processing],
        "new_subscriptions": [s["subscription_id"] for s in subs],
        "new_refunds": [refund["refund_id"]],
        "new_disputes": [dispute["dispute_id"]],
    }
