"""API-shaped record builders of the sandbox business: ids, timestamps, money, catalog."""

from __future__ import annotations

import random
import zlib
from datetime import UTC, datetime, timedelta
from typing import Any

from pipelines.dodo_contract import currency_exponent

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
US_PER_DAY = 86_400_000_000
BUSINESS_ID = "bus_5aNdB0xD0d0Seg"
BRAND_IDS = ("brd_main0000000000001", "brd_labs0000000000002")

USD_CENTS_PER_MINOR: dict[str, float] = {
    "USD": 1.0,
    "EUR": 1.08,
    "GBP": 1.27,
    "CAD": 0.73,
    "INR": 0.012,
    "JPY": 0.67,
    "KWD": 0.325,
}
"""Fixed FX rates: US cents per minor unit of each currency (1 yen = 0.67 US cents)."""

COUNTRY_CURRENCY = {
    "US": "USD",
    "DE": "EUR",
    "FR": "EUR",
    "ES": "EUR",
    "GB": "GBP",
    "CA": "CAD",
    "IN": "INR",
    "JP": "JPY",
    "KW": "KWD",
    "SE": "EUR",
    "CN": "USD",
}
COUNTRIES = tuple(COUNTRY_CURRENCY)
COUNTRY_WEIGHTS = (30, 10, 6, 4, 10, 5, 12, 8, 3, 4, 8)

FIRST_NAMES = (
    "Zoë", "José", "李", "Ólafur", "Amélie", "Søren", "Ngozi", "Priya", "Hiroshi", "Fatima",
    "Jürgen", "Łukasz", "Chloé", "Mohammed", "Ana", "Björn", "Aarav", "Yuki", "Émile", "Olga",
)  # fmt: skip
LAST_NAMES = (
    "Ålund", "Müller", "雷", "Núñez", "Smith", "O'Connor", "García", "Sharma", "Tanaka",
    "Al-Sabah", "Kowalski", "Dubois", "Øvergaard", "Nguyễn", "Ivanova", "Brown",
)  # fmt: skip
LOCALES = (None, None, None, "en", "fr", "de", "ja", None, "es", "pt")
REFUND_REASONS = ("requested_by_customer", "duplicate", "fraudulent", None, "Not as described")
EMPTY: dict[str, Any] = {}

# name, one-time price or recurring plan (price USD cents, freq interval, freq count, period
# interval, period count, trial days), archived
RECURRING_PLANS = (
    ("Starter Monthly", 999, "Month", 1, "Year", 10, 0, False),
    ("Pro Monthly", 2900, "Month", 1, "Year", 10, 14, False),
    ("Pro Annual", 29000, "Year", 1, "Year", 10, 14, False),
    ("Team Monthly", 9900, "Month", 1, "Year", 10, 7, False),
    ("Weekly Digest", 300, "Week", 1, "Year", 5, 0, False),
    ("Daily Pass", 150, "Day", 1, "Month", 1, 0, False),
    ("Six-Month Bootcamp", 4900, "Month", 1, "Month", 6, 0, False),
    ("Legacy Pro (2024)", 1900, "Month", 1, "Year", 10, 0, True),
)
ONE_TIME_PRODUCTS = (
    ("Field Guide (e-book)", 1900, "e_book", False),
    ("Video Course", 14900, "edtech", False),
    ("Template Pack", 4900, "digital_products", False),
    ("1:1 Tutoring Hour", 8000, "live_tutoring", False),
    ("Old Plugin v1", 2900, "digital_products", True),
)


def to_us(moment: datetime) -> int:
    """Microseconds since the epoch of a datetime (naive means UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - EPOCH) // timedelta(microseconds=1)


def from_us(us: int) -> datetime:
    """Tz-aware UTC datetime of microseconds since the epoch."""
    return EPOCH + timedelta(microseconds=us)


_DAY_PREFIX: dict[int, str] = {}
_LAST_ISO: list[Any] = [None, ""]


def iso(us: int) -> str:
    """ISO-8601 UTC string with microseconds and 'Z' (fast path with a per-day cache)."""
    if _LAST_ISO[0] == us:  # a payment and its ledger rows share one timestamp
        return _LAST_ISO[1]
    secs, micro = divmod(us, 1_000_000)
    day, rem = divmod(secs, 86_400)
    prefix = _DAY_PREFIX.get(day)
    if prefix is None:
        prefix = _DAY_PREFIX[day] = (EPOCH + timedelta(days=day)).strftime("%Y-%m-%dT")
    hour, rem = divmod(rem, 3600)
    minute, second = divmod(rem, 60)
    text = f"{prefix}{hour:02d}:{minute:02d}:{second:02d}.{micro:06d}Z"
    _LAST_ISO[0], _LAST_ISO[1] = us, text
    return text


def parse_iso(text: str) -> int:
    """Microseconds since the epoch of an ISO-8601 string ('Z', offsets or naive UTC)."""
    return to_us(datetime.fromisoformat(text.strip().replace(" ", "+")))


def add_interval(us: int, interval: str, count: int) -> int:
    """Add `count` Day/Week/Month/Year to a timestamp, clamping the day of month."""
    if interval == "Day":
        return us + count * US_PER_DAY
    if interval == "Week":
        return us + 7 * count * US_PER_DAY
    months = count * (12 if interval == "Year" else 1)
    moment = from_us(us)
    month0 = moment.month - 1 + months
    year, month = moment.year + month0 // 12, month0 % 12 + 1
    day = min(moment.day, _days_in_month(year, month))
    return to_us(moment.replace(year=year, month=month, day=day))


def _days_in_month(year: int, month: int) -> int:
    nxt = datetime(year + month // 12, month % 12 + 1, 1)
    return (nxt - timedelta(days=1)).day


def new_id(rng: random.Random, prefix: str) -> str:
    """A random id with the API's prefix style, e.g. pay_1f3a..."""
    return f"{prefix}{rng.getrandbits(84):021x}"


def convert_usd(usd_cents: int, currency: str) -> int:
    """A USD-cent price in the minor units of `currency`, rounded to a 'nice' figure."""
    raw = usd_cents / USD_CENTS_PER_MINOR[currency]
    step = {0: 10, 2: 1, 3: 10}[currency_exponent(currency)]
    return max(step, int(round(raw / step)) * step)


def usd_equivalent(amount: int, currency: str) -> int:
    """Integer US cents of an amount in minor units, at the fixed FX rates."""
    return int(round(amount * USD_CENTS_PER_MINOR.get(currency, 1.0)))


def fee_of(amount: int) -> int:
    """Processing fee of a payment: 4% plus a fixed part, in the payment's minor units."""
    return max(1, amount * 4 // 100 + amount // 200)


def customer_record(rng: random.Random, index: int, created_us: int) -> dict[str, Any]:
    """A CustomerResponse item with a unicode name and optional phone/metadata."""
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    name = f"{last}{first}" if last == "雷" else f"{first} {last}"
    slug = "".join(ch for ch in f"{first}.{last}".lower() if ch.isascii() and ch.isalnum())
    phone = f"+1555{rng.randrange(10**6, 10**7)}" if rng.random() < 0.35 else None
    metadata = {"signup_source": rng.choice(("organic", "ads", "referral"))}
    return {
        "customer_id": new_id(rng, "cus_"),
        "business_id": BUSINESS_ID,
        "created_at": iso(created_us),
        "email": f"{slug or 'user'}.{index}@example.com",
        "name": name,
        "phone_number": phone,
        "metadata": metadata if rng.random() < 0.5 else {},
        # API 1.123: the list route leaves blocked_at empty (only GET /customers/{id} has it)
        "blocked_at": None,
        "blocklist_entry_id": None,
        "preferred_locale": LOCALES[index % len(LOCALES)],
    }


def limited_customer(customer: dict[str, Any]) -> dict[str, Any]:
    """The CustomerLimitedDetailsResponse embedded in payments and subscriptions."""
    return {
        "customer_id": customer["customer_id"],
        "email": customer["email"],
        "name": customer["name"],
        "phone_number": customer["phone_number"],
        "metadata": customer.get("metadata") or {},
    }


def product_catalog(rng: random.Random, created_us: int) -> tuple[list[dict[str, Any]], set[str]]:
    """The business's products (recurring plans and one-time goods) and the archived ids."""
    products = []
    archived_ids = set()
    for i, (name, price, f_int, f_cnt, p_int, p_cnt, trial, archived) in enumerate(RECURRING_PLANS):
        detail = {
            "type": "recurring_price", "price": price, "currency": "USD", "discount": 0,
            "purchasing_power_parity": False, "payment_frequency_count": f_cnt,
            "payment_frequency_interval": f_int, "subscription_period_count": p_cnt,
            "subscription_period_interval": p_int, "trial_period_days": trial,
            "tax_inclusive": False, "discount_bps": 0, "trial_payment_method_optional": trial > 0,
            "zero_amount_payment_method_optional": False,
        }  # fmt: skip
        products.append(_product(rng, name, price, "saas", True, detail, created_us, i, archived))
        if archived:
            archived_ids.add(products[-1]["product_id"])
    for i, (name, price, category, archived) in enumerate(ONE_TIME_PRODUCTS):
        detail = {
            "type": "one_time_price", "price": price, "currency": "USD", "discount": 0,
            "purchasing_power_parity": False, "pay_what_you_want": False, "tax_inclusive": False,
            "discount_bps": 0,
        }  # fmt: skip
        products.append(
            _product(rng, name, price, category, False, detail, created_us, i + 20, archived)
        )
        if archived:
            archived_ids.add(products[-1]["product_id"])
    return products, archived_ids


def _product(
    rng: random.Random,
    name: str,
    price: int,
    category: str,
    recurring: bool,
    detail: dict[str, Any],
    created_us: int,
    index: int,
    archived: bool,
) -> dict[str, Any]:
    created = created_us + index * US_PER_DAY
    return {
        "product_id": new_id(rng, "pdt_"),
        "business_id": BUSINESS_ID,
        "created_at": iso(created),
        "updated_at": iso(created + (200 if archived else 3) * US_PER_DAY),
        "name": name,
        "description": f"{name}: part of the sandbox catalog" if index % 3 else None,
        "is_recurring": recurring,
        "price": price,
        "currency": "USD",
        "tax_category": category,
        "tax_inclusive": False,
        "image": None,
        "pricing_mode": None,
        "price_detail": detail,
        "entitlements": [],
        "metadata": {"tier": "legacy"} if archived else {},
    }


TAX_RATES = {"DE": 0.19, "FR": 0.2, "ES": 0.21, "SE": 0.25, "GB": 0.2, "IN": 0.18, "JP": 0.1}
CARD_NETWORKS = ("VISA", "MASTERCARD", "AMEX")
CARD_TYPES = ("credit", "debit", "prepaid")
THREE_DS_FLOWS = ("challenge", "frictionless", None)
CITIES = {"US": "Austin", "DE": "München", "GB": "London", "JP": "東京", "IN": "Bengaluru"}


def tax_of(pre_tax: int, country: str) -> int:
    """Tax added on top of a tax-exclusive amount for the buyer's country."""
    return int(pre_tax * TAX_RATES.get(country, 0.0))


ServicePeriod = tuple[str, int, int, str]
"""(subscription_id, starts_at us, ends_at us, proration_factor as a decimal string)."""


def payment_record(
    rng: random.Random,
    created_us: int,
    status: str,
    total: int,
    currency: str,
    customer_ref: dict[str, Any],
    subscription_ids: list[str] | None,
    charge_type: str | None,
    periods: list[ServicePeriod] | None = None,
    retry_attempt: int = 0,
    includes_usage: bool = False,
) -> dict[str, Any]:
    """A PaymentListResponse item of API 1.123 (charge type, subscriptions, service periods).

    Card, 3DS and checkout fields come from a hash of the payment id, not from `rng`, so they
    leave the business's random stream as it was before API 1.123. A row without charge_type
    (written before the field existed) has no service periods either.
    """
    payment_id = new_id(rng, "pay_")
    upi = currency == "INR" and rng.random() < 0.4
    subscription_ids = subscription_ids or []
    multi = len(subscription_ids) > 1
    mark = zlib.crc32(payment_id.encode())
    card = not upi
    return {
        "payment_id": payment_id,
        "status": status,
        "total_amount": total,
        "currency": currency,
        "customer": customer_ref,
        "created_at": iso(created_us),
        # a multi-subscription payment names no single subscription (Payment docstring)
        "subscription_id": subscription_ids[0] if len(subscription_ids) == 1 else None,
        "brand_id": BRAND_IDS[0] if rng.random() < 0.9 else BRAND_IDS[1],
        "digital_products_delivered": status == "succeeded",
        "has_license_key": False,
        "metadata": EMPTY,
        "payment_provider": "dodo",
        "payment_method": "upi_collect" if upi else "card",
        "payment_method_type": None if upi else "credit",
        "card_last_four": None if upi else f"{rng.randrange(10000):04d}",
        "card_network": None if upi else rng.choice(CARD_NETWORKS),
        "refund_status": None,
        "dispute_status": None,
        "invoice_id": f"inv_{payment_id[4:]}" if status == "succeeded" else None,
        "invoice_url": None,
        "charge_type": charge_type,
        "is_multi_subscription": multi,
        "subscription_ids": subscription_ids,
        "service_periods": [
            {
                "subscription_id": sid,
                "starts_at": iso(start),
                "ends_at": iso(end),
                "proration_factor": factor,
            }
            for sid, start, end, factor in (periods or ())
        ]
        if status == "succeeded" and charge_type
        else [],  # fmt: skip
        "retry_attempt": retry_attempt if subscription_ids else 0,
        "includes_usage": includes_usage and charge_type is not None,
        "checkout_session_id": f"cks_{payment_id[4:]}" if charge_type in (None, "new") else None,
        "card_type": CARD_TYPES[mark % 3] if card else None,
        "card_exp_month": f"{mark % 12 + 1:02d}" if card else None,
        "card_exp_year": str(2027 + mark % 5) if card else None,
        "three_ds_flow": THREE_DS_FLOWS[mark % 3] if card else None,
        "three_ds_status": "authenticated" if card and mark % 3 < 2 else None,
        "three_ds_version": "2.2.0" if card and mark % 3 < 2 else None,
    }


def proration(start_us: int, change_us: int, end_us: int) -> str:
    """The share of the period [start, end) left after `change` as a decimal string ("0.4833")."""
    if end_us <= start_us:
        return "1"
    share = max(0.0, min(1.0, (end_us - change_us) / (end_us - start_us)))
    return "1" if share >= 1 else f"{share:.4f}"


def ledger_record(
    rng: random.Random,
    created_us: int,
    event_type: str,
    amount: int,
    currency: str,
    is_credit: bool,
    reference: str | None,
    description: str | None = None,
    payout_id: str | None = None,
) -> dict[str, Any]:
    """A BalanceLedgerEntry (API 1.123: `payout_id`); balances are filled in time order later."""
    return {
        "id": new_id(rng, "ble_"),
        "business_id": BUSINESS_ID,
        "created_at": iso(created_us),
        "event_type": event_type,
        "amount": amount,
        "currency": currency,
        "usd_equivalent_amount": usd_equivalent(amount, currency),
        "is_credit": is_credit,
        "reference_object_id": reference,
        "before_balance": None,
        "after_balance": None,
        "description": description,
        "payout_id": payout_id,
    }


def billing_address(rng: random.Random, country: str) -> dict[str, Any]:
    """A BillingAddress with a country and sometimes a street/city/zipcode."""
    full = rng.random() < 0.6
    return {
        "country": country,
        "city": CITIES.get(country) if full else None,
        "state": None,
        "street": f"{rng.randrange(1, 999)} Main St" if full else None,
        "zipcode": f"{rng.randrange(10000, 99999)}" if full else None,
    }
