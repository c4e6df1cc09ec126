"""The sandbox's app user ids and B2B buyers: metadata ids, tax ids and business names.

Drawn from their own random stream after the history is generated, so every other record,
amount and event of the seeded business is exactly what it was without them; only the touched
customers' metadata, their checkout payments' metadata and their subscriptions' tax_id and
customer_business_name change (each with a new dict: records that shared one keep theirs).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

APP_USER_ID = "app_user_id"
"""The metadata key the sandbox's merchant puts its own user id under."""
SHARED_USER_ID = "usr_shared_0001"
"""The user id two customers (two emails of one person) share."""
COMPANIES = (
    ("Acme Analytics GmbH", "DE811907980"),
    ("Nordlys Studio AB", "SE556677889901"),
    ("Maple Leaf Learning Inc.", "CA123456789RT0001"),
    ("Sakura Systems KK", "JP1234567890123"),
    ("Bright Path Ltd", "GB123456789"),
)


def assign_identities(
    seed: int,
    customers: Sequence[dict[str, Any]],
    payments: Sequence[dict[str, Any]],
    subscriptions: Sequence[dict[str, Any]],
) -> dict[str, list[str]]:
    """Give about 40% of the customers an app user id (three in four on the customer's metadata,
    the rest only on their first payment's), two customers one shared id, one customer a blank
    id on the customer beside a valid one on the payment, and about a tenth of the subscribers
    a company (tax_id and business name on every subscription, several customers per company).
    Returns the customer ids of each kind, for tests."""
    rng = random.Random(seed * 15_485_863 + 11)
    first_payment: dict[str, dict[str, Any]] = {}
    for payment in payments:  # created_at order: the first one is the checkout
        first_payment.setdefault(payment["customer"]["customer_id"], payment)
    subscriptions_of: dict[str, list[dict[str, Any]]] = {}
    for sub in subscriptions:
        subscriptions_of.setdefault(sub["customer"]["customer_id"], []).append(sub)
    out: dict[str, list[str]] = {
        "customer_metadata": [], "payment_metadata": [], "shared": [], "invalid_then_payment": [],
        "b2b": [],
    }  # fmt: skip
    paying = [c for c in customers if c["customer_id"] in first_payment]
    shared = {c["customer_id"] for c in paying[-2:]} if len(paying) >= 4 else set()
    blank = paying[-3]["customer_id"] if len(paying) >= 4 else None
    for number, customer in enumerate(customers, start=1):
        customer_id = customer["customer_id"]
        user_id = f"usr_{number:05d}"
        if customer_id in shared:
            _set_metadata(customer, SHARED_USER_ID)
            out["shared"].append(customer_id)
        elif customer_id == blank:
            _set_metadata(customer, "   ")
            _set_metadata(first_payment[customer_id], user_id)
            out["invalid_then_payment"].append(customer_id)
        else:
            draw = rng.random()
            if draw < 0.30:
                _set_metadata(customer, user_id)
                out["customer_metadata"].append(customer_id)
            elif draw < 0.40 and customer_id in first_payment:
                _set_metadata(first_payment[customer_id], user_id)
                out["payment_metadata"].append(customer_id)
        if customer_id in subscriptions_of and rng.random() < 0.12:
            name, tax_id = COMPANIES[rng.randrange(len(COMPANIES))]
            for sub in subscriptions_of[customer_id]:
                sub["customer_business_name"], sub["tax_id"] = name, tax_id
            out["b2b"].append(customer_id)
    return out


def _set_metadata(record: dict[str, Any], user_id: str) -> None:
    record["metadata"] = {**(record.get("metadata") or {}), APP_USER_ID: user_id}
