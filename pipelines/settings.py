"""Shared constants of the Dodo Payments API and the warehouse: endpoints, keys, enums, raw columns."""

from __future__ import annotations

from typing import Final, Literal

# --- Dodo Payments API -------------------------------------------------------------------------

LIVE_BASE_URL: Final = "https://live.dodopayments.com"
TEST_BASE_URL: Final = "https://test.dodopayments.com"
BASE_URLS: Final = {"live_mode": LIVE_BASE_URL, "test_mode": TEST_BASE_URL}

MAX_PAGE_SIZE: Final = 100
"""The API's largest page_size. Pages are 0-based (`page_number=0` is the first page)."""

ResourceName = Literal[
    "payments", "subscriptions", "customers", "refunds", "disputes", "products", "balance_ledger"
]
RESOURCES: Final[tuple[str, ...]] = (
    "customers",
    "products",
    "subscriptions",
    "payments",
    "refunds",
    "disputes",
    "balance_ledger",
)

ENDPOINTS: Final[dict[str, str]] = {
    "payments": "/payments",
    "subscriptions": "/subscriptions",
    "customers": "/customers",
    "refunds": "/refunds",
    "disputes": "/disputes",
    "products": "/products",
    "balance_ledger": "/balances/ledger",
}

PRIMARY_KEYS: Final[dict[str, str]] = {
    "payments": "payment_id",
    "subscriptions": "subscription_id",
    "customers": "customer_id",
    "refunds": "refund_id",
    "disputes": "dispute_id",
    "products": "product_id",
    "balance_ledger": "id",
}

STATUS_FIELDS: Final[dict[str, str]] = {
    "payments": "status",
    "subscriptions": "status",
    "refunds": "status",
    "disputes": "dispute_status",
}
"""The field (and list filter) that holds each resource's lifecycle status."""

STATUS_FILTER_PARAMS: Final[dict[str, str]] = {
    "payments": "status",
    "subscriptions": "status",
    "refunds": "status",
    "disputes": "dispute_status",
}

PAYMENT_STATUSES: Final = (
    "succeeded",
    "failed",
    "cancelled",
    "processing",
    "requires_customer_action",
    "requires_merchant_action",
    "requires_payment_method",
    "requires_confirmation",
    "requires_capture",
    "partially_captured",
    "partially_captured_and_capturable",
)
SUBSCRIPTION_STATUSES: Final = (
    "pending",
    "active",
    "on_hold",
    "paused",
    "past_due",
    "cancelled",
    "failed",
    "expired",
)
REFUND_STATUSES: Final = ("succeeded", "failed", "pending", "review")
DISPUTE_STATUSES: Final = (
    "dispute_opened",
    "dispute_expired",
    "dispute_accepted",
    "dispute_cancelled",
    "dispute_challenged",
    "dispute_won",
    "dispute_lost",
)
DISPUTE_STAGES: Final = ("pre_dispute", "dispute", "pre_arbitration")
TIME_INTERVALS: Final = ("Day", "Week", "Month", "Year")
LEDGER_EVENT_TYPES: Final = (
    "payment",
    "refund",
    "refund_reversal",
    "dispute",
    "dispute_reversal",
    "tax",
    "tax_reversal",
    "payment_fees",
    "refund_fees",
    "payout",
)

NON_TERMINAL_STATUSES: Final[dict[str, tuple[str, ...]]] = {
    "payments": (
        "processing",
        "requires_customer_action",
        "requires_merchant_action",
        "requires_payment_method",
        "requires_confirmation",
        "requires_capture",
        "partially_captured",
        "partially_captured_and_capturable",
    ),
    "subscriptions": ("pending", "active", "on_hold", "paused", "past_due"),
    "refunds": ("pending", "review"),
    "disputes": ("dispute_opened", "dispute_challenged"),
}
"""Statuses that can still change. Every run re-reads objects in these, whatever their age."""

# --- Money -------------------------------------------------------------------------------------

ZERO_DECIMAL_CURRENCIES: Final = frozenset(
    "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF".split()
)
THREE_DECIMAL_CURRENCIES: Final = frozenset("BHD IQD JOD KWD LYD OMR TND".split())


def currency_exponent(currency: str) -> int:
    """ISO 4217 minor-unit exponent of a currency code (0, 2 or 3)."""
    code = currency.upper()
    if code in ZERO_DECIMAL_CURRENCIES:
        return 0
    if code in THREE_DECIMAL_CURRENCIES:
        return 3
    return 2


# --- Raw warehouse tables (the extract's contract with sql/staging) ----------------------------

RAW_DATASET: Final = "dodo_raw"
"""Schema of the raw tables written by the extract."""

ColumnType = Literal["text", "bigint", "bool", "timestamp", "json"]

_CUSTOMER_COLUMNS: Final[dict[str, ColumnType]] = {
    "customer__customer_id": "text",
    "customer__email": "text",
    "customer__name": "text",
    "customer__phone_number": "text",
    "customer__metadata": "json",
}

RAW_COLUMNS: Final[dict[str, dict[str, ColumnType]]] = {
    "payments": {
        "payment_id": "text",
        "created_at": "timestamp",
        "status": "text",
        "total_amount": "bigint",
        "currency": "text",
        **_CUSTOMER_COLUMNS,
        "subscription_id": "text",
        "payment_method": "text",
        "payment_method_type": "text",
        "card_last_four": "text",
        "card_network": "text",
        "refund_status": "text",
        "dispute_status": "text",
        "brand_id": "text",
        "payment_provider": "text",
        "invoice_id": "text",
        "invoice_url": "text",
        "digital_products_delivered": "bool",
        "has_license_key": "bool",
        "charge_type": "text",
        "metadata": "json",
    },
    "subscriptions": {
        "subscription_id": "text",
        "created_at": "timestamp",
        "status": "text",
        "product_id": "text",
        "product_name": "text",
        "quantity": "bigint",
        "currency": "text",
        "recurring_pre_tax_amount": "bigint",
        "tax_inclusive": "bool",
        "payment_frequency_interval": "text",
        "payment_frequency_count": "bigint",
        "subscription_period_interval": "text",
        "subscription_period_count": "bigint",
        "next_billing_date": "timestamp",
        "previous_billing_date": "timestamp",
        "cancelled_at": "timestamp",
        "cancel_at_next_billing_date": "bool",
        "paused_at": "timestamp",
        "trial_period_days": "bigint",
        "trial_amount": "bigint",
        "on_demand": "bool",
        **_CUSTOMER_COLUMNS,
        "customer_business_name": "text",
        "discount_id": "text",
        "discount_cycles_remaining": "bigint",
        "payment_method_id": "text",
        "tax_id": "text",
        "billing": "json",
        "discounts": "json",
        "scheduled_change": "json",
        "metadata": "json",
    },
    "customers": {
        "customer_id": "text",
        "business_id": "text",
        "created_at": "timestamp",
        "email": "text",
        "name": "text",
        "phone_number": "text",
        "metadata": "json",
    },
    "refunds": {
        "refund_id": "text",
        "payment_id": "text",
        "business_id": "text",
        "created_at": "timestamp",
        "status": "text",
        "is_partial": "bool",
        "amount": "bigint",
        "currency": "text",
        "reason": "text",
    },
    "disputes": {
        "dispute_id": "text",
        "payment_id": "text",
        "business_id": "text",
        "created_at": "timestamp",
        "amount": "text",  # the API sends minor units as a string; staging casts it
        "currency": "text",
        "dispute_stage": "text",
        "dispute_status": "text",
        "payment_provider": "text",
        "is_resolved_by_rdr": "bool",
    },
    "products": {
        "product_id": "text",
        "business_id": "text",
        "created_at": "timestamp",
        "updated_at": "timestamp",
        "name": "text",
        "description": "text",
        "is_recurring": "bool",
        "price": "bigint",
        "currency": "text",
        "tax_category": "text",
        "tax_inclusive": "bool",
        "image": "text",
        "pricing_mode": "text",
        "price_detail": "json",
        "entitlements": "json",
        "metadata": "json",
        "is_archived": "bool",  # not an API field: set from the `archived` filter of the sweep
    },
    "balance_ledger": {
        "id": "text",
        "business_id": "text",
        "created_at": "timestamp",
        "event_type": "text",
        "amount": "bigint",
        "currency": "text",
        "usd_equivalent_amount": "bigint",
        "is_credit": "bool",
        "reference_object_id": "text",
        "before_balance": "bigint",
        "after_balance": "bigint",
        "description": "text",
    },
}
"""Known columns of each raw table. Unknown API fields are kept too, as extra text columns."""

SYNCED_AT_COLUMN: Final = "_synced_at"
"""Every raw row carries the start time of the sync that last wrote it (TIMESTAMPTZ)."""

REJECTED_RECORDS_TABLE: Final = "rejected_records"
"""dodo_raw.rejected_records: items the extract set aside (resource, reason, raw JSON, time)."""

SUBSCRIPTION_HISTORY_TABLE: Final = "subscription_history"
DISPUTE_HISTORY_TABLE: Final = "dispute_history"

LOOKBACK_PASSES_TABLE: Final = "lookback_passes"
"""dodo_raw.lookback_passes: one row per extract (short window or deep pass, what it found)."""
RAW_BOOKKEEPING_TABLES: Final = (LOOKBACK_PASSES_TABLE,)
"""Raw-schema tables that record how the extract ran, not what the API said: no model reads
them, so they are not part of the raw data the models' keep-the-last-build check compares."""

# --- Warehouse schemas of the later steps ------------------------------------------------------

ANALYTICS_SCHEMA: Final = "analytics"
SYNC_SCHEMA: Final = "segment_sync"
WAREHOUSE_SCHEMA_VERSION: Final = 2
