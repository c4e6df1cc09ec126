"""No record can sink a run (issue 13): the whole job against random items that are valid by the
official SDK's JSON schemas (dodopayments 1.123 `model_json_schema()`, generated with
hypothesis-jsonschema), served over HTTP like the API. Every run ends with exit 0 or 3 (records
set aside, counted), never a traceback, and what is sound still goes out."""

from __future__ import annotations

import json
import random
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import duckdb
import pytest
from dodopayments import types as sdk
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from pipelines.dodo_contract import ENDPOINTS, PRIMARY_KEYS, STATUS_FIELDS
from pipelines.job import RunOptions, run_job
from pipelines.sandbox.collector import SegmentCollector
from pipelines.sandbox.loopback import LoopbackServer
from tests.conftest import API_KEY, WRITE_KEY, Sandbox

pytestmark = pytest.mark.slow  # heavy: a whole job run per random business (10-12 s each)

MODELS = {
    "payments": sdk.PaymentListResponse,
    "subscriptions": sdk.SubscriptionListResponse,
    "customers": sdk.Customer,
    "refunds": sdk.RefundListItem,
    "disputes": sdk.DisputeListResponse,
    "products": sdk.ProductListResponse,
    "balance_ledger": sdk.BalanceLedgerEntry,
}
AS_OF = datetime(2026, 11, 1, tzinfo=UTC)
BACKFILL = datetime(2025, 11, 1, tzinfo=UTC)
ITEMS_PER_RESOURCE = 8


def _draw(strategy: st.SearchStrategy[Any], seed_value: int, examples: int) -> list[Any]:
    """Examples of a strategy, reproducible for a seed (Hypothesis' own generation)."""
    drawn: list[Any] = []

    @seed(seed_value)
    @settings(
        max_examples=examples, database=None, deadline=None, phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )  # fmt: skip
    @given(strategy)
    def grab(value: Any) -> None:
        drawn.append(value)

    grab()
    return drawn


def random_business(seed_value: int) -> dict[str, list[dict[str, Any]]]:
    """Schema-valid random items per resource; most created inside the synced range (the API
    filters by created_at), unique primary keys, customers shared so events have owners."""
    rng = random.Random(seed_value)
    items: dict[str, list[dict[str, Any]]] = {}
    customers: list[str] = []
    for resource, model in MODELS.items():
        drawn = _draw(from_schema(model.model_json_schema()), seed_value, ITEMS_PER_RESOURCE)
        key = PRIMARY_KEYS[resource]
        chosen = []
        for index, item in enumerate(drawn[-ITEMS_PER_RESOURCE:]):
            item = dict(item)
            item[key] = f"{resource[:3]}_{seed_value}_{index}_{item.get(key, '')}"[:60]
            if rng.random() < 0.85:  # the rest keep their drawn created_at: maybe never read
                at = BACKFILL + (AS_OF - BACKFILL) * rng.random()
                item["created_at"] = at.isoformat().replace("+00:00", "Z")
            if resource == "customers":
                customers.append(item[key])
            elif isinstance(item.get("customer"), dict) and customers and rng.random() < 0.7:
                item["customer"] = {**item["customer"], "customer_id": rng.choice(customers)}
            chosen.append(item)
        items[resource] = chosen
    return items


def _created(item: dict[str, Any]) -> datetime | None:
    try:
        value = datetime.fromisoformat(str(item.get("created_at")).replace("Z", "+00:00"))
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class RandomApi(LoopbackServer):
    """The Dodo list endpoints over HTTP, answering from fixed random items: created_at and
    status filters, 0-based pages; nothing else of the API."""

    def __init__(self, items: dict[str, list[dict[str, Any]]]) -> None:
        self.items, self.host, self.port = items, "127.0.0.1", 0
        self.lock = threading.Lock()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        return type("Handler", (_Handler,), {"api": self})

    def page(self, path: str, query: dict[str, str]) -> list[dict[str, Any]]:
        resource = {p: r for r, p in ENDPOINTS.items()}.get(path)
        if resource is None:
            return []
        found = self.items[resource]
        if resource == "products":
            found = [] if query.get("archived") == "true" else found
        for bound, keep in (
            ("created_at_gte", lambda a, b: a >= b),
            ("created_at_lte", lambda a, b: a <= b),
        ):
            if bound in query:
                limit = datetime.fromisoformat(query[bound].replace("Z", "+00:00"))
                found = [i for i in found if (c := _created(i)) is not None and keep(c, limit)]
        status = STATUS_FIELDS.get(resource)
        if status and status in query:
            found = [i for i in found if i.get(status) == query[status]]
        if "reference_object_id" in query:
            found = [
                i for i in found if i.get("reference_object_id") == query["reference_object_id"]
            ]
        size, number = int(query.get("page_size", 10)), int(query.get("page_number", 0))
        return found[number * size : (number + 1) * size]


class _Handler(BaseHTTPRequestHandler):
    api: RandomApi
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        items = self.api.page(url.path.rstrip("/"), dict(parse_qsl(url.query)))
        body = json.dumps({"items": items}).encode()  # integers beyond 64 bits too
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.mark.parametrize("seed_value", [1, 2, 3])
def test_random_schema_valid_items_never_sink_a_run(seed_value: int, tmp_path: Path) -> None:
    items = random_business(seed_value)
    for resource, model in MODELS.items():  # the generator keeps to the SDK's schema
        for item in items[resource]:
            model.model_validate_json(json.dumps(item))
    db = str(tmp_path / "warehouse.duckdb")
    with RandomApi(items) as api, SegmentCollector(write_key=WRITE_KEY) as collector:
        from pipelines.config import load_config

        config = load_config({
            "warehouse.path": db, "sources.dodo.api_key": API_KEY,
            "sources.dodo.base_url": api.base_url, "sources.dodo.environment": "test_mode",
            "sources.dodo.requests_per_minute": 0, "sources.dodo.max_retries": 1,
            "sources.dodo.backfill_start": BACKFILL.isoformat(),
            "sources.dodo.as_of": AS_OF.isoformat(), "segment.write_key": WRITE_KEY,
            "segment.host": collector.base_url,
        })  # fmt: skip
        report = run_job(config, RunOptions(events_since=BACKFILL - timedelta(days=1)))
        assert report.exit_code in (0, 3), report.error
        assert report.error is None
        with duckdb.connect(db, read_only=True) as con:
            set_aside = con.execute(
                "select count(*) from information_schema.tables "
                "where table_schema = 'dodo_raw' and table_name = 'rejected_records'"
            ).fetchone()[0]
            reasons = (
                con.execute("select reason from dodo_raw.rejected_records").fetchall()
                if set_aside
                else []
            )
            outbox_users = {
                r[0]
                for r in con.execute("select user_id from analytics.identify_outbox").fetchall()
            }
            outbox_events = {
                r[0] for r in con.execute("select event_id from analytics.track_outbox").fetchall()
            }
        # what was set aside is counted and gives exit code 3, with a reason each
        assert report.extract is not None and report.extract.rejected_records == len(reasons)
        if reasons:
            assert report.exit_code == 3 and all(reason for (reason,) in reasons)
        # everything else still goes out
        assert outbox_users and {m["userId"] for m in collector.identifies()} == outbox_users
        assert {m["messageId"] for m in collector.tracks()} == outbox_events


def test_values_outside_any_real_range_are_set_aside_with_a_reason(sandbox: Sandbox) -> None:
    """The ones that sank a run, each on one record of the sandbox business: the record is set
    aside with its reason, counted (exit code 3), and the rest goes out."""
    biz = sandbox.business
    payment = next(p for p in biz.payments if p["service_periods"])
    negative = next(p for p in biz.payments if p["status"] == "succeeded" and p is not payment)
    trial = biz.subscriptions[0]
    bad = {
        payment["payment_id"]: {
            "service_periods": [
                {**payment["service_periods"][0], "ends_at": "9999-12-31T00:00:00Z"}
            ]
        },
        negative["payment_id"]: {"total_amount": -500},
        trial["subscription_id"]: {"trial_period_days": 251_282_272_500},
    }

    def spoil(items: list[Any], ctx: Any) -> list[Any]:
        return [
            {**i, **bad.get(i.get("payment_id") or i.get("subscription_id"), {})} for i in items
        ]

    sandbox.simulator.inject_fault(mutate=spoil, times=10**9)
    report = run_job(sandbox.config(), RunOptions())
    assert report.exit_code == 3 and report.error is None
    with duckdb.connect(sandbox.db, read_only=True) as con:
        reasons = dict(
            con.execute(
                "select coalesce(record_json::json ->> 'payment_id', "
                "record_json::json ->> 'subscription_id'), reason from dodo_raw.rejected_records"
            ).fetchall()
        )
        loaded = con.execute("select count(*) from dodo_raw.payments").fetchone()[0]
    assert reasons == {
        payment["payment_id"]: (
            "value out of any real range: service_periods[].ends_at = '9999-12-31T00:00:00Z'"
        ),
        negative[
            "payment_id"
        ]: "value out of any real range: total_amount = -500 (0 to 1000000000000000)",
        trial["subscription_id"]: (
            "value out of any real range: trial_period_days = 251282272500 (0 to 36500)"
        ),
    }
    assert loaded == len(biz.payments) - 2
    assert report.identifies_sent > 0
