"""The Dodo API simulator over HTTP: schema-valid pages, paging, filters, auth, faults, time."""

from __future__ import annotations

import json
import weakref
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests
from dodopayments import types as sdk

from pipelines.dodo_contract import ENDPOINTS, LEDGER_EVENT_TYPES, PRIMARY_KEYS
from pipelines.sandbox.business import Business, generate_business
from pipelines.sandbox.faults import drop_field, huge_metadata, set_field, shift_page
from pipelines.sandbox.ratelimit import RateLimit
from pipelines.sandbox.simulator import DodoSimulator
from pipelines.sandbox.webhooks import FAMILIES, KEYS, changes_since, snapshot

pytestmark = pytest.mark.xdist_group("test_simulator")  # one worker builds the module-scoped setup

SPEC_PATH = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
SPEC_PATH = SPEC_PATH / "dodopayments-openapi.json"
NOW = datetime(2026, 11, 1, tzinfo=UTC)
LIST_SCHEMAS = {
    "payments": "GetPaymentsListResponse",
    "subscriptions": "GetSubscriptionsListResponse",
    "customers": "GetCustomersListResponse",
    "refunds": "GetRefundsListResponse",
    "disputes": "GetDisputesListResponse",
    "products": "GetProductsListResponse",
    "balance_ledger": "ListBalanceLedgerEntriesResponse",
}


@pytest.fixture(scope="module")
def business() -> Business:
    return generate_business(seed=7, customers=300, now=NOW)


@pytest.fixture(scope="module")
def sim(business: Business) -> Iterator[DodoSimulator]:
    with DodoSimulator(business) as server:
        yield server


@pytest.fixture()
def api(sim: DodoSimulator) -> Iterator[requests.Session]:
    sim.clear_faults()
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {sim.api_key}"
    yield session
    session.close()


def get(api: requests.Session, sim: DodoSimulator, resource: str, **params: Any) -> Any:
    response = api.get(sim.base_url + ENDPOINTS[resource], params=params, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def all_items(api: requests.Session, sim: DodoSimulator, resource: str, **params: Any) -> list:
    items: list = []
    for page in range(sim.page_cap):
        chunk = get(api, sim, resource, page_size=100, page_number=page, **params)["items"]
        items += chunk
        if len(chunk) < 100:
            return items
    raise AssertionError("window too large for the page cap")


@pytest.fixture(scope="module")
def validator_for() -> Any:
    if not SPEC_PATH.exists():
        pytest.skip(f"OpenAPI spec not found at {SPEC_PATH}")
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    spec = json.loads(SPEC_PATH.read_text())
    registry = Registry().with_resource("urn:dodo", Resource(spec, DRAFT202012))

    def make(name: str) -> Draft202012Validator:
        schema = {"$ref": f"urn:dodo#/components/schemas/{name}"}
        return Draft202012Validator(schema, registry=registry)

    return make


SDK_MODELS: dict[str, Any] = {
    "payments": sdk.PaymentListResponse,
    "subscriptions": sdk.SubscriptionListResponse,
    "customers": sdk.Customer,
    "refunds": sdk.RefundListItem,
    "disputes": sdk.DisputeListResponse,
    "products": sdk.ProductListResponse,
    "balance_ledger": sdk.BalanceLedgerEntry,
}
"""The official SDK's list-item models (dodopayments==1.123.*, the dev extra): a validator only."""
LEDGER_EVENT_TYPES_1_113 = LEDGER_EVENT_TYPES[: LEDGER_EVENT_TYPES.index("ethoca_fees")]

FILTERS = {
    "payments": [{}, {"status": "succeeded"}, {"currency": "JPY"}],
    "subscriptions": [{}, {"status": "active"}, {"status": "cancelled"}],
    "customers": [{}, {"created_at_gte": "2026-01-01T00:00:00Z"}],
    "refunds": [{}, {"status": "succeeded"}],
    "disputes": [{}, {"dispute_status": "dispute_won"}],
    "products": [{}, {"archived": "true"}, {"recurring": "false"}],
    "balance_ledger": [{}, {"event_type": "refund"}, {"currency": "KWD"}],
}


def _only_in_1_123(resource: str, item: dict[str, Any]) -> bool:
    """An item whose enum value the 1.113 spec does not have yet (API 1.123: past_due, the 13 new
    ledger event types): the 1.113 check no longer applies to it."""
    if resource == "subscriptions":
        return item["status"] == "past_due"
    if resource == "balance_ledger":
        return item["event_type"] not in LEDGER_EVENT_TYPES_1_113
    return False


@pytest.mark.parametrize("resource", list(LIST_SCHEMAS))
def test_every_endpoint_validates_against_the_openapi_schema(
    api: requests.Session, sim: DodoSimulator, validator_for: Any, resource: str
) -> None:
    validator = validator_for(LIST_SCHEMAS[resource])
    for params in FILTERS[resource]:
        for page in range(3):
            body = get(api, sim, resource, page_size=100, page_number=page, **params)
            assert set(body) == {"items"}
            body["items"] = [i for i in body["items"] if not _only_in_1_123(resource, i)]
            errors = [e.message for e in validator.iter_errors(body)][:3]
            assert not errors, (resource, params, errors)


def test_every_served_item_validates_with_the_sdk_models() -> None:
    """Every item of every endpoint, after time passed too, validates with the official SDK's
    own list-item models (dodopayments 1.123), strictly, on its JSON text."""
    biz = generate_business(seed=5, customers=120, now=NOW)
    for seed in range(4):
        biz.advance_time(days=4, seed=seed)
    validated: Counter[str] = Counter()
    with DodoSimulator(biz) as server:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {server.api_key}"
        for resource, model in SDK_MODELS.items():
            filters = [{}, {"archived": "true"}] if resource == "products" else [{}]
            for params in filters:
                for item in all_items(session, server, resource, **params):
                    model.model_validate_json(json.dumps(item), strict=True)
                    validated[resource] += 1
        past_due = all_items(session, server, "subscriptions", status="past_due")
        assert past_due and all(s["status"] == "past_due" for s in past_due)
    assert validated == biz.counts()


def test_strict_sdk_validation_rejects_what_the_api_never_sends(business: Business) -> None:
    """The check above can fail: the SDK rejects a stringly int, a 1.113-shaped payment and a
    numeric proration factor."""
    from pydantic import ValidationError

    payment = next(p for p in business.payments if p["service_periods"])
    model = SDK_MODELS["payments"]
    model.model_validate_json(json.dumps(payment), strict=True)
    bad = [
        {**payment, "total_amount": str(payment["total_amount"])},
        {k: v for k, v in payment.items() if k != "subscription_ids"},
        {**payment, "service_periods": [{**payment["service_periods"][0], "proration_factor": 1}]},
        {**payment, "charge_type": "Renewal"},
    ]
    for item in bad:
        with pytest.raises(ValidationError):
            model.model_validate_json(json.dumps(item), strict=True)


def test_business_speaks_api_1_123(business: Business) -> None:
    """The business cases of API 1.123 are all there (issue 13)."""
    payments, subs = business.payments, business.subscriptions
    multi = [p for p in payments if p["is_multi_subscription"]]
    assert multi and all(
        p["subscription_id"] is None and len(p["subscription_ids"]) == 2 for p in multi
    )
    assert any(p["charge_type"] == "renewal" for p in multi)
    sub_payments = [p for p in payments if p["subscription_ids"]]
    assert {p["charge_type"] for p in sub_payments} == {None, "new", "renewal", "plan_change"}
    assert all(p["charge_type"] is None for p in payments if not p["subscription_ids"])
    assert {p["charge_type"] for p in payments if p["status"] == "failed"} >= {"renewal", None}
    changes = [p for p in payments if p["charge_type"] == "plan_change" and p["service_periods"]]
    assert any(0 < float(p["service_periods"][0]["proration_factor"]) < 1 for p in changes)
    retries = Counter((p["retry_attempt"], p["status"]) for p in payments if p["retry_attempt"])
    assert retries[(2, "succeeded")] and retries[(1, "failed")] and retries[(3, "failed")]
    usage_only = [
        p for p in payments
        if p["charge_type"] == "renewal" and p["includes_usage"] and p["status"] == "succeeded"
        and not p["service_periods"]
    ]  # fmt: skip
    assert usage_only
    assert any(p["total_amount"] == 0 and p["status"] == "succeeded" for p in payments)
    assert all(not p["service_periods"] for p in payments if p["status"] != "succeeded")
    assert {s["status"] for s in subs} >= {"past_due", "on_hold", "cancelled"}
    actors = {(s["cancelled_by"] or {}).get("actor_type") for s in subs if s["cancelled_at"]}
    assert None in actors and len(actors - {None}) >= 2
    assert any(not s["has_payment_method"] and s["trial_period_days"] for s in subs)
    ledger_types = {e["event_type"] for e in business.balance_ledger}
    assert ledger_types - set(LEDGER_EVENT_TYPES_1_113) >= {"interchange_fee", "opening_balance"}
    assert all(e["payout_id"] for e in business.balance_ledger if e["event_type"] == "payout")


def test_paging_is_zero_based_without_gaps_or_overlap(
    api: requests.Session, sim: DodoSimulator, business: Business
) -> None:
    assert len(get(api, sim, "payments")["items"]) == 10  # default page_size
    window = {"created_at_gte": "2026-03-01T00:00:00Z", "created_at_lte": "2026-09-01T00:00:00Z"}
    ids = [p["payment_id"] for p in all_items(api, sim, "payments", **window)]
    expected = {
        p["payment_id"]
        for p in business.payments
        if "2026-03-01T00:00:00Z" <= p["created_at"] <= "2026-09-01T00:00:00Z"
    }
    assert len(ids) == len(set(ids)) == len(expected) > 100
    assert set(ids) == expected
    first = get(api, sim, "payments", page_size=5, page_number=0, **window)["items"]
    assert first == get(api, sim, "payments", page_size=5, **window)["items"]


def test_order_is_stable_and_not_creation_order(api: requests.Session, sim: DodoSimulator) -> None:
    one = [p["payment_id"] for p in all_items(api, sim, "payments")]
    two = [p["payment_id"] for p in all_items(api, sim, "payments")]
    assert one == two
    created = [p["created_at"] for p in get(api, sim, "payments", page_size=100)["items"]]
    assert created != sorted(created) and created != sorted(created, reverse=True)


def test_deep_pages_are_silently_empty(api: requests.Session, sim: DodoSimulator) -> None:
    sim.page_cap = 3
    try:
        assert len(get(api, sim, "payments", page_size=10, page_number=2)["items"]) == 10
        assert get(api, sim, "payments", page_size=10, page_number=3) == {"items": []}
    finally:
        sim.page_cap = 100
    assert len(get(api, sim, "payments", page_size=10, page_number=3)["items"]) == 10


def test_created_at_filters_are_inclusive_and_accept_offsets(
    api: requests.Session, sim: DodoSimulator, business: Business
) -> None:
    stamp = business.payments[len(business.payments) // 2]["created_at"]
    exact = get(api, sim, "payments", created_at_gte=stamp, created_at_lte=stamp)["items"]
    assert stamp in {p["created_at"] for p in exact}
    gte = {p["payment_id"] for p in all_items(api, sim, "payments", created_at_gte=stamp)}
    assert gte == {p["payment_id"] for p in business.payments if p["created_at"] >= stamp}
    offset = get(api, sim, "customers", created_at_gte="2026-01-01T02:00:00+02:00")["items"]
    assert all(c["created_at"] >= "2026-01-01T00:00:00" for c in offset)


def test_filters(api: requests.Session, sim: DodoSimulator, business: Business) -> None:
    customer_id = business.subscriptions[0]["customer"]["customer_id"]
    for item in all_items(api, sim, "payments", customer_id=customer_id):
        assert item["customer"]["customer_id"] == customer_id
    archived = all_items(api, sim, "products", archived="true")
    live = all_items(api, sim, "products")
    assert (
        archived
        and live
        and not {p["product_id"] for p in archived} & {p["product_id"] for p in live}
    )
    assert {p["is_recurring"] for p in all_items(api, sim, "products", recurring="true")} == {True}
    refund = next(r for r in business.refunds if r["status"] == "succeeded")
    ledger = all_items(api, sim, "balance_ledger", reference_object_id=refund["refund_id"])
    assert [e["event_type"] for e in ledger] == ["refund"]
    stages = {d["dispute_stage"] for d in all_items(api, sim, "disputes", dispute_stage="dispute")}
    assert stages == {"dispute"}
    response = api.get(sim.base_url + "/payments", params={"page_size": 101})
    assert response.status_code == 422 and set(response.json()) == {"code", "message"}
    assert get(api, sim, "payments", unknown_param="x", page_size=1)["items"]


def test_auth_and_key_revocation(api: requests.Session, sim: DodoSimulator) -> None:
    assert requests.get(sim.base_url + "/payments", timeout=5).status_code == 401
    wrong = requests.get(
        sim.base_url + "/payments", headers={"Authorization": "Bearer nope"}, timeout=5
    )
    assert wrong.status_code == 401 and wrong.json()["code"] == "UNAUTHORIZED"
    old, sim.api_key = sim.api_key, "rotated"
    try:
        assert api.get(sim.base_url + "/payments", timeout=5).status_code == 401
    finally:
        sim.api_key = old


def test_business_contains_the_promised_cases(business: Business) -> None:
    payments = business.payments
    currencies = Counter(p["currency"] for p in payments)
    assert currencies["JPY"] and currencies["KWD"] and currencies["INR"]
    by_customer: dict[str, set[str]] = {}
    for p in payments:
        by_customer.setdefault(p["customer"]["customer_id"], set()).add(p["currency"])
    assert any(len(c) >= 2 for c in by_customer.values())
    statuses = {s["status"] for s in business.subscriptions}
    assert statuses >= {"pending", "active", "on_hold", "paused", "cancelled", "failed", "expired"}
    assert any(
        s["trial_period_days"] > 0 and s["status"] == "active" for s in business.subscriptions
    )
    renewals = Counter(p["subscription_id"] for p in payments if p["status"] == "succeeded")
    assert max(renewals[s["subscription_id"]] for s in business.subscriptions) >= 4
    assert any(s["cancel_at_next_billing_date"] for s in business.subscriptions)
    assert all(s["cancelled_at"] for s in business.subscriptions if s["status"] == "cancelled")
    assert any(r["is_partial"] and r["status"] == "succeeded" for r in business.refunds)
    assert {r["status"] for r in business.refunds} == {"succeeded", "pending", "review", "failed"}
    assert {p["refund_status"] for p in payments} == {None, "partial", "full"}
    assert all(isinstance(d["amount"], str) for d in business.disputes)
    assert {p["status"] for p in payments} >= {"processing", "failed", "requires_payment_method"}
    jpy = next(p for p in payments if p["currency"] == "JPY" and p["status"] == "succeeded")
    entry = next(
        e for e in business.balance_ledger if e["reference_object_id"] == jpy["payment_id"]
    )
    assert entry["amount"] == jpy["total_amount"]
    assert entry["usd_equivalent_amount"] == round(jpy["total_amount"] * 0.67)
    succeeded = {p["payment_id"] for p in payments if p["status"] == "succeeded"}
    booked = {
        e["reference_object_id"] for e in business.balance_ledger if e["event_type"] == "payment"
    }
    assert succeeded == booked
    for resource, pk in PRIMARY_KEYS.items():
        ids = [item[pk] for item in business.tables[resource].items]
        assert len(ids) == len(set(ids)), resource


def test_generation_is_deterministic() -> None:
    one = generate_business(seed=3, customers=40, now=NOW)
    two = generate_business(seed=3, customers=40, now=NOW)
    assert one.payments == two.payments and one.subscriptions == two.subscriptions


def test_advance_time_changes_the_business() -> None:
    biz = generate_business(seed=11, customers=120, now=NOW)
    with DodoSimulator(biz) as sim:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {sim.api_key}"
        before = len(all_items(session, sim, "payments"))
        summary = biz.advance_time(days=3, seed=1)
        for key in ("cancelled", "cancel_at_next_billing_date", "on_hold", "paused"):
            assert len(summary[key]) == 1, key
        for key in ("resumed", "plan_changed", "payments_succeeded", "refunds_succeeded"):
            assert len(summary[key]) == 1, key
        assert summary["disputes_resolved"] and summary["new_customers"] and summary["renewals"]
        assert biz.now == datetime(2026, 11, 4, tzinfo=UTC)
        after = all_items(session, sim, "payments")
        assert len(after) == before + len(summary["created"]["payments"])
        assert set(summary["renewals"]) <= set(summary["created"]["payments"])
        subs = {s["subscription_id"]: s for s in all_items(session, sim, "subscriptions")}
        assert subs[summary["cancelled"][0]]["status"] == "cancelled"
        assert subs[summary["cancelled"][0]]["cancelled_at"]
        assert subs[summary["on_hold"][0]]["status"] == "on_hold"
        assert subs[summary["resumed"][0]]["status"] == "active"
        assert subs[summary["paused"][0]]["paused_at"]
        refund = biz.get("refunds", summary["refunds_succeeded"][0])
        assert refund["status"] == "succeeded"
        customer = summary["new_customers"][0]
        biz.change_customer_email(customer, "new@example.com")
        found = get(session, sim, "customers", email="new@example.com")["items"]
        assert [c["customer_id"] for c in found] == [customer]
        paused_id = summary["paused"][0]
        assert paused_id in {s["subscription_id"] for s in get_all_paused(session, sim)}
        biz.set_subscription_status(paused_id, "active")
        assert paused_id not in {s["subscription_id"] for s in get_all_paused(session, sim)}


def get_all_paused(session: requests.Session, sim: DodoSimulator) -> list:
    return all_items(session, sim, "subscriptions", status="paused")


def test_fault_injection(api: requests.Session, sim: DodoSimulator) -> None:
    url = sim.base_url + "/payments"
    fault = sim.inject_fault(path="/payments", status=429, retry_after=1, times=2)
    sim.inject_fault(path="/payments", status=503)
    first, second = api.get(url), api.get(url)
    assert first.status_code == second.status_code == 429 and first.headers["Retry-After"] == "1"
    assert first.json()["code"] == "TOO_MANY_REQUESTS"
    assert api.get(url).status_code == 503 and api.get(url).status_code == 200
    assert fault.hits == 2
    sim.inject_fault(path="/payments", kind="malformed_json")
    with pytest.raises(ValueError):
        api.get(url).json()
    sim.inject_fault(path="/payments", kind="reset")
    with pytest.raises(requests.exceptions.RequestException):
        api.get(url)
    sim.inject_fault(path="/payments", kind="timeout", delay=0.5)
    with pytest.raises(requests.exceptions.Timeout):
        api.get(url, timeout=0.2)
    sim.inject_fault(path="/payments", mutate=drop_field("payment_id"))
    assert all("payment_id" not in p for p in api.get(url).json()["items"])
    sim.inject_fault(path="/payments", mutate=set_field("status", "teleported", first_only=True))
    assert api.get(url).json()["items"][0]["status"] == "teleported"
    sim.inject_fault(path="/customers", mutate=huge_metadata(40))
    assert len(api.get(sim.base_url + "/customers").content) > 40_000
    page0 = api.get(url, params={"page_size": 10}).json()["items"]
    sim.inject_fault(path="/payments", mutate=shift_page(1), match=lambda q: "page_number" in q)
    page1 = api.get(url, params={"page_size": 10, "page_number": 1}).json()["items"]
    assert page1[0] == page0[-1]
    assert api.get(url).json()["items"][0]["status"] != "teleported"  # faults are consumed
    counts = sim.request_counts_by_endpoint()
    assert counts["/payments"] >= 12
    sim.reset_counts()
    assert sim.request_counts_by_endpoint() == {}


def test_the_rate_limit_is_off_by_default(api: requests.Session, sim: DodoSimulator) -> None:
    response = api.get(sim.base_url + ENDPOINTS["payments"], timeout=10)
    assert response.status_code == 200
    assert "X-RateLimit-Remaining" not in response.headers


def test_the_rate_limit_is_a_token_bucket_with_headers_and_429(business: Business) -> None:
    with DodoSimulator(business, rate_limit=RateLimit(per_minute=60, burst=3)) as limited:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {limited.api_key}"
        answers = [
            session.get(limited.base_url + ENDPOINTS["customers"], timeout=10) for _ in range(4)
        ]
        session.close()
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert [a.headers["X-RateLimit-Remaining"] for a in answers] == ["2", "1", "0", "0"]
    assert {a.headers["X-RateLimit-Limit"] for a in answers} == {"60"}
    resets = [float(a.headers["X-RateLimit-Reset"]) for a in answers[:3]]
    assert 0 < resets[0] < resets[1] < resets[2] <= 3  # seconds until the bucket is full again
    assert answers[3].headers["Retry-After"] == "1"
    assert answers[3].json()["code"] == "TOO_MANY_REQUESTS"
    assert "Retry-After" not in answers[0].headers


def _full_copy(business: Business) -> dict[str, dict[str, bytes]]:
    """What a snapshot was before it watched the business: every webhook object serialised."""
    return {
        resource: {
            item[KEYS[resource]]: orjson.dumps(item) for item in business.tables[resource].items
        }
        for resource in FAMILIES
    }


def test_a_snapshot_sees_what_a_full_copy_of_the_business_would() -> None:
    biz = generate_business(seed=5, customers=200, now=NOW)
    copy, before = _full_copy(biz), snapshot(biz)
    biz.advance_time(days=2, seed=9)
    paid = next(p for p in biz.payments if p["status"] == "succeeded" and not p["dispute_status"])
    biz.add_refund(paid["payment_id"], "succeeded", partial=True)  # edits the payment too
    disputed = biz.add_dispute(biz.payments[3]["payment_id"])
    biz.set_dispute_status(disputed["dispute_id"], "dispute_won")
    biz.change_customer_email(biz.customers[0]["customer_id"], "moved@example.com")
    sub = next(s for s in biz.subscriptions if s["status"] == "active")
    biz.set_subscription_status(sub["subscription_id"], "paused")
    biz.set_subscription_status(sub["subscription_id"], "active")  # and back: no change seen
    expected = []
    for resource, items in _full_copy(biz).items():
        for key, text in items.items():
            if copy[resource].get(key) != text:
                expected.append(orjson.loads(text))
    payloads = changes_since(before, biz)
    assert [p["data"] for p in payloads] == expected
    assert len(payloads) > 30 and sub["subscription_id"] not in {
        p["data"].get("subscription_id") for p in payloads if p["type"].startswith("subscription")
    }
    assert {r: dict(before[r]) for r in FAMILIES} == copy  # and it still reads as it was


def test_a_business_no_longer_referenced_is_freed_at_once() -> None:
    # its records are frozen out of the cyclic GC's reach: a cycle would keep them for good
    biz = generate_business(seed=3, customers=40, now=NOW)
    watched, before = weakref.ref(biz), snapshot(biz)
    del biz, before
    assert watched() is None
