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
    # the rest of the 1.113 enum
    "refund_fees_reversal",
    "dispute_fees",
    "payout_fees",
    "payout_reversal",
    "payout_fees_reversal",
    "dodo_credits",
    "adjustment",
    "currency_conversion",
    "abandoned_cart_recovery_fee",
    "dunning_fees",
    "payment_retry_fee",
    "byop_fee",
    # new in 1.123 (docs/reference: dodo-api-1.123.md section 9)
    "ethoca_fees",
    "ethoca_fees_reversal",
    "visa_rdr_fee",
    "dispute_fees_reversal",
    "deflection_fees",
    "deflection_fees_reversal",
    "reserve_hold",
    "reserve_release",
    "moderation_fees",
    "dodo_fixed_fee",
    "interchange_fee",
    "scheme_fee",
    "opening_balance",
)
CHARGE_TYPES: Final = ("new", "renewal", "plan_change", "on_demand")
"""Payment `charge_type` (API 1.123); null on a one-time payment and on rows older than the field."""
CANCELLED_BY_ACTORS: Final = ("customer", "merchant_user", "api_key", "dodo_team")

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
        # API 1.123
        "is_multi_subscription": "bool",
        "subscription_ids": "json",
        "service_periods": "json",
        "retry_attempt": "bigint",
        "includes_usage": "bool",
        "checkout_session_id": "text",
        "card_type": "text",
        "card_exp_month": "text",
        "card_exp_year": "text",
        "three_ds_flow": "text",
        "three_ds_status": "text",
        "three_ds_version": "text",
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
        # API 1.123
        "has_payment_method": "bool",
        "cancelled_by": "json",
    },
    "customers": {
        "customer_id": "text",
        "business_id": "text",
        "created_at": "timestamp",
        "email": "text",
        "name": "text",
        "phone_number": "text",
        "metadata": "json",
        # API 1.123
        "blocked_at": "timestamp",
        "blocklist_entry_id": "text",
        "preferred_locale": "text",
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
        # API 1.123
        "network_reference": "text",
        "network_reference_type": "text",
        "network_reference_updated_at": "timestamp",
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
        # API 1.123
        "payout_id": "text",
    },
}
"""Known columns of each raw table. Unknown API fields are kept too, as extra text columns."""

SYNCED_AT_COLUMN: Final = "_synced_at"
"""Every raw row carries the start time of the sync that last wrote it (TIMESTAMPTZ)."""

HASHED_RAW_KEYS: Final[tuple[tuple[str, str], ...]] = (
    ("balance_ledger", "id"),
    ("balance_ledger", "reference_object_id"),
    ("payments", "customer__customer_id"),
    ("payments", "payment_id"),
)
"""(raw table, key column) the models step keeps hashed beside the key, in `key_hash_column`
(UBIGINT, `transform.touched.hash_raw_keys`): look-up keys, not content. The writers leave
them empty; whatever reads or compares a raw row's content leaves them out."""


def key_hash_column(column: str) -> str:
    """The raw column holding the hash of the raw key column `column`."""
    return f"_{column}_hash"


def key_hash_columns(table: str) -> list[str]:
    """The key hash columns of a raw table (`HASHED_RAW_KEYS`)."""
    return [key_hash_column(column) for t, column in HASHED_RAW_KEYS if t == table]


REJECTED_RECORDS_TABLE: Final = "rejected_records"
"""dodo_raw.rejected_records: items the extract set aside (resource, reason, raw JSON, time)."""

SUBSCRIPTION_HISTORY_TABLE: Final = "subscription_history"
DISPUTE_HISTORY_TABLE: Final = "dispute_history"

LOOKBACK_PASSES_TABLE: Final = "lookback_passes"
"""dodo_raw.lookback_passes: one row per extract (short window or deep pass, what it found)."""
WEBHOOK_MERGES_TABLE: Final = "webhook_merges"
"""dodo_raw.webhook_merges (resource, id, merged_at): the objects a webhook merge wrote. Their
`_synced_at` is the event's time, which can be older than rows an API read wrote before, so a
delta build learns from here which rows were written since the last build."""
RAW_BOOKKEEPING_TABLES: Final = (LOOKBACK_PASSES_TABLE, WEBHOOK_MERGES_TABLE)
"""Raw-schema tables that record how the extract ran, not what the API said: no model reads
them, so they are not part of the raw data the models' keep-the-last-build check compares."""

# --- Warehouse schemas of the later steps ------------------------------------------------------

ANALYTICS_SCHEMA: Final = "analytics"
SYNC_SCHEMA: Final = "segment_sync"
OUTBOX_BUILD_TABLE: Final = "_outbox_build"
"""Table of the analytics schema: the id of the models build the outboxes are now (written by
the models step, read by the emitter to tell which build an emit settled)."""
WAREHOUSE_SCHEMA_VERSION: Final = 3
"""3: the raw columns of Dodo API 1.123 typed in place (`warehouse.type_raw_columns`)."""

# --- Forgotten customers (erasure requests) ----------------------------------------------------

FORGOTTEN_CUSTOMERS_TABLE: Final = "forgotten_customers"
"""dodo_raw.forgotten_customers: the tombstones `dodo-segment forget` records. A customer listed
here has their personal fields dropped by the extract at load and is left out of the outboxes."""

FORGOTTEN_CUSTOMERS_COLUMNS: Final[dict[str, ColumnType]] = {
    "customer_id": "text",
    "forgotten_at": "timestamp",
    "regulation_id": "text",  # Segment's regulateId, once the SUPPRESS_WITH_DELETE was filed
}

CUSTOMER_KEY_COLUMNS: Final = ("customer_id", "customer__customer_id", "user_id")
"""Columns that name the customer a row belongs to, in any table of the warehouse."""

PERSONAL_FIELDS: Final = frozenset(
    {
        "email", "name", "phone", "phone_number", "metadata", "billing", "tax_id",
        "customer__email", "customer__name", "customer__phone_number", "customer__metadata",
        "customer_email", "customer_name", "customer_phone", "customer_business_name",
        "card_last_four", "card_exp_month", "card_exp_year", "payment_method_id", "invoice_url",
        "cancelled_by",
        "traits_hash", "outbox_hash",
    }
)  # fmt: skip
"""Columns (and JSON keys) that hold a person's data, or a hash of it, in the rows of a customer.
A forgotten customer keeps ids, amounts, currencies, dates and statuses (what accounting needs)."""
