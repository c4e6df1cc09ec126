"""Dodo Payments API simulator: a loopback HTTP server over a sandbox Business."""

from __future__ import annotations

import argparse
import bisect
import sys
import threading
import time
import zlib
from collections import Counter, OrderedDict
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson

from pipelines.dodo_contract import (
    DISPUTE_STAGES,
    DISPUTE_STATUSES,
    ENDPOINTS,
    LEDGER_EVENT_TYPES,
    MAX_PAGE_SIZE,
    PAYMENT_STATUSES,
    REFUND_STATUSES,
    SUBSCRIPTION_STATUSES,
)
from pipelines.sandbox.business import Business, Item, generate_business
from pipelines.sandbox.faults import FAULT_KINDS, Fault, Mutator, PageContext
from pipelines.sandbox.loopback import LoopbackServer
from pipelines.sandbox.ratelimit import RateLimit, TokenBuckets
from pipelines.sandbox.records import parse_iso

DEFAULT_PAGE_SIZE = 10
RESOURCE_OF_PATH = {path: name for name, path in ENDPOINTS.items()}
ENUMS = {
    ("payments", "status"): PAYMENT_STATUSES,
    ("subscriptions", "status"): SUBSCRIPTION_STATUSES,
    ("refunds", "status"): REFUND_STATUSES,
    ("disputes", "dispute_status"): DISPUTE_STATUSES,
    ("disputes", "dispute_stage"): DISPUTE_STAGES,
}
Predicate = Callable[[Item], bool]


class ApiError(Exception):
    """An error answered as the API's {code, message} body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _bool(value: str) -> bool:
    if value.lower() not in ("true", "false", "1", "0"):
        raise ApiError(422, "INVALID_REQUEST", f"not a boolean: {value!r}")
    return value.lower() in ("true", "1")


def _int(query: dict[str, str], name: str, default: int) -> int:
    try:
        value = int(query.get(name, default))
    except ValueError:
        raise ApiError(422, "INVALID_REQUEST", f"{name} must be an integer") from None
    if value < 0:
        raise ApiError(422, "INVALID_REQUEST", f"{name} must be >= 0")
    return value


def _predicates(biz: Business, resource: str, query: dict[str, str]) -> list[Predicate]:
    """Item predicates for the filters the resource supports; unknown params are ignored."""
    preds: list[Predicate] = []

    def eq(field: str, value: Any) -> None:
        preds.append(lambda item: item.get(field) == value)

    def via_payment(field: str, value: str) -> None:
        payments = biz.tables["payments"]

        def pred(item: Item) -> bool:
            payment = payments.get(item["payment_id"]) or {}
            if field == "customer_id":
                return (payment.get("customer") or {}).get("customer_id") == value
            return value in (payment.get("subscription_ids") or ())

        preds.append(pred)

    for name, value in query.items():
        allowed = ENUMS.get((resource, name))
        if allowed is not None and value not in allowed:
            raise ApiError(422, "INVALID_REQUEST", f"unknown {name}: {value!r}")
        if resource == "payments" and name == "subscription_id":  # API 1.123: any it charges
            preds.append(lambda item, v=value: v in (item.get("subscription_ids") or ()))
        elif resource == "payments" and name in ("status", "brand_id", "currency"):
            eq(name, value)
        elif resource in ("payments", "subscriptions") and name == "customer_id":
            preds.append(lambda item, v=value: item["customer"]["customer_id"] == v)
        elif resource == "subscriptions" and name in ("status", "product_id"):
            eq(name, value)
        elif resource == "subscriptions" and name == "cancel_at_next_billing_date":
            eq(name, _bool(value))
        elif resource == "customers" and name == "email":
            eq("email", value)
        elif resource == "customers" and name == "name":
            needle = value.lower()
            preds.append(lambda item, v=needle: v in item["name"].lower())
        elif resource == "refunds" and name == "status":
            eq(name, value)
        elif resource in ("refunds", "disputes") and name in ("customer_id", "subscription_id"):
            via_payment(name, value)
        elif resource == "disputes" and name in ("dispute_status", "dispute_stage"):
            eq(name, value)
        elif resource == "balance_ledger" and name in ("reference_object_id", "currency"):
            eq(name, value)
        elif resource == "balance_ledger" and name == "event_type":
            if value not in LEDGER_EVENT_TYPES:
                raise ApiError(422, "INVALID_REQUEST", f"unknown event_type: {value!r}")
            eq(name, value)
        elif resource == "products" and name == "recurring":
            eq("is_recurring", _bool(value))
    if resource == "products":
        archived = _bool(query.get("archived", "false"))
        preds.append(lambda item: biz.is_archived(item["product_id"]) == archived)
    return preds


def _order_key(item_id: str) -> int:
    """Serving order: a hash of the primary key, stable and unrelated to creation time."""
    return zlib.crc32(item_id.encode())


class DodoSimulator(LoopbackServer):
    """A real HTTP server that answers the Dodo list endpoints from a Business."""

    def __init__(
        self,
        business: Business,
        api_key: str = "sandbox_api_key",
        page_cap: int = 100,
        host: str = "127.0.0.1",
        port: int = 0,
        rate_limit: RateLimit | None = None,
    ) -> None:
        self.business, self.api_key, self.page_cap = business, api_key, page_cap
        self.limiter = TokenBuckets(rate_limit) if rate_limit is not None else None
        """A server's rate limit per key (None: unlimited, as for the demo)."""
        self.host, self.port = host, port
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.faults: list[Fault] = []
        self._cache: OrderedDict[tuple[Any, ...], list[Item]] = OrderedDict()
        self._state_lock = threading.Lock()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        return type("Handler", (_Handler,), {"sim": self})

    # --- accounting and faults --------------------------------------------------------------

    def request_counts_by_endpoint(self) -> dict[str, int]:
        """Number of requests received per path."""
        with self._state_lock:
            return dict(Counter(path for path, _ in self.requests))

    def reset_counts(self) -> None:
        """Forget the recorded requests."""
        with self._state_lock:
            self.requests.clear()

    def inject_fault(
        self,
        path: str | None = None,
        status: int = 500,
        kind: str = "status",
        times: int = 1,
        retry_after: float | None = None,
        delay: float = 5.0,
        mutate: Mutator | None = None,
        match: Callable[[dict[str, str]], bool] | None = None,
    ) -> Fault:
        """Queue a fault for requests to `path` (None: any path); see faults.FAULT_KINDS."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {FAULT_KINDS}")
        if mutate is not None:
            kind = "mutate"
        fault = Fault(kind, path, status, retry_after, delay, mutate, match, times)
        with self._state_lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        """Drop every queued fault."""
        with self._state_lock:
            self.faults.clear()

    def _take_fault(self, path: str, query: dict[str, str]) -> Fault | None:
        with self._state_lock:
            for fault in self.faults:
                if fault.matches(path, query):
                    fault.hits += 1
                    return fault
        return None

    # --- querying ---------------------------------------------------------------------------

    def ordered(self, resource: str, query: dict[str, str]) -> list[Item]:
        """Every item matching the query's filters, in serving order (cached per version)."""
        filters = {k: v for k, v in query.items() if k not in ("page_size", "page_number")}
        biz = self.business
        key = (biz.version, resource, tuple(sorted(filters.items())))
        with self._state_lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        table = biz.tables[resource]
        lo, hi = 0, len(table.keys)
        try:
            if resource != "products" and "created_at_gte" in filters:
                lo = bisect.bisect_left(table.keys, parse_iso(filters["created_at_gte"]))
            if resource != "products" and "created_at_lte" in filters:
                hi = bisect.bisect_right(table.keys, parse_iso(filters["created_at_lte"]))
        except ValueError:
            raise ApiError(422, "INVALID_REQUEST", "created_at filters must be ISO-8601") from None
        preds = _predicates(biz, resource, filters)
        items = table.items[lo:hi] if lo < hi else []
        if preds:
            items = [item for item in items if all(pred(item) for pred in preds)]
        pk = table.pk
        items.sort(key=lambda item: _order_key(item[pk]))
        with self._state_lock:
            self._cache[key] = items
            while len(self._cache) > 128:
                self._cache.popitem(last=False)
        return items

    def page(self, path: str, query: dict[str, str]) -> tuple[list[Item], PageContext]:
        """The items of one page of a list endpoint."""
        resource = RESOURCE_OF_PATH.get(path)
        if resource is None:
            raise ApiError(404, "NOT_FOUND", f"no route for GET {path}")
        size = _int(query, "page_size", DEFAULT_PAGE_SIZE)
        number = _int(query, "page_number", 0)
        if size > MAX_PAGE_SIZE:
            raise ApiError(422, "INVALID_REQUEST", f"page_size must be <= {MAX_PAGE_SIZE}")
        with self.business.lock:
            ordered = self.ordered(resource, query)
            items = [] if number >= self.page_cap else ordered[number * size : (number + 1) * size]
        return items, PageContext(path, query, number, size, ordered)


class _Handler(BaseHTTPRequestHandler):
    """Answers one request of the simulator (GET only)."""

    sim: DodoSimulator
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out at once: no 40 ms delayed-ACK stall

    def log_message(self, format: str, *args: Any) -> None:
        """Keep the test output quiet."""

    def do_GET(self) -> None:
        """Route, authenticate, apply faults, answer JSON."""
        sim = self.sim
        url = urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        with sim._state_lock:
            sim.requests.append((path, query))
        if self.headers.get("Authorization", "") != f"Bearer {sim.api_key}":
            self._error(ApiError(401, "UNAUTHORIZED", "Invalid or missing API key"))
            return
        limits: dict[str, str] = {}
        if sim.limiter is not None:
            decision = sim.limiter.take(sim.api_key)
            limits = decision.headers
            if not decision.allowed:
                self._error(ApiError(429, "TOO_MANY_REQUESTS", "rate limit exceeded"), limits)
                return
        fault = sim._take_fault(path, query)
        if fault is not None and fault.kind == "status":
            headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after else {}
            code = "TOO_MANY_REQUESTS" if fault.status == 429 else "INTERNAL_SERVER_ERROR"
            self._error(ApiError(fault.status, code, "injected fault"), headers)
            return
        if fault is not None and fault.kind == "timeout":
            time.sleep(fault.delay)
        try:
            items, ctx = sim.page(path, query)
            if fault is not None and fault.kind == "mutate" and fault.mutate is not None:
                items = fault.mutate(orjson.loads(orjson.dumps(items)), ctx)
            with sim.business.lock:
                body = orjson.dumps({"items": items})
        except ApiError as error:
            self._error(error)
            return
        if fault is not None and fault.kind == "malformed_json":
            body = body[: max(1, len(body) // 2)] + b"<!-- truncated"
        if fault is not None and fault.kind == "reset":
            self._send(200, body, {}, cut=True)
            return
        self._send(200, body, limits)

    def do_POST(self) -> None:
        """The simulator is read-only."""
        self._error(ApiError(405, "METHOD_NOT_ALLOWED", "the sandbox only serves GET"))

    def _error(self, error: ApiError, headers: dict[str, str] | None = None) -> None:
        body = orjson.dumps({"code": error.code, "message": error.message})
        self._send(error.status, body, headers or {})

    def _send(
        self, status: int, body: bytes, headers: dict[str, str] | None = None, cut: bool = False
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if cut:  # headers and half the body, then the connection drops
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.wfile.write(body)


def main(argv: list[str] | None = None) -> None:
    """Serve a generated business until killed (for benchmarks and manual testing)."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.sandbox.simulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--payments", type=int, default=None, help="target number of payments")
    parser.add_argument("--customers", type=int, default=None, help="default: payments / 10")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--page-cap", type=int, default=100)
    parser.add_argument("--api-key", default="sandbox_api_key")
    parser.add_argument(
        "--older-closed-payments", type=int, default=0,
        help="that many more payments, all closed, before the generated history (a deeper past)",
    )  # fmt: skip
    parser.add_argument(
        "--rate-limit-per-minute", type=float, default=0,
        help="limit each key to this many requests a minute, token bucket (0: no limit)",
    )  # fmt: skip
    parser.add_argument("--rate-limit-burst", type=int, default=40)
    parser.add_argument(
        "--rate-limit-no-headers", action="store_true",
        help="answer no X-RateLimit headers (429 and Retry-After only)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    customers = args.customers or max(300, (args.payments or 0) // 10)
    began = time.perf_counter()
    business = generate_business(
        args.seed, customers, payments_target=args.payments,
        older_closed_payments=args.older_closed_payments,
    )  # fmt: skip
    print(f"generated {business.counts()} in {time.perf_counter() - began:.1f}s", file=sys.stderr)
    limit = (
        RateLimit(args.rate_limit_per_minute, args.rate_limit_burst, not args.rate_limit_no_headers)
        if args.rate_limit_per_minute > 0
        else None
    )
    sim = DodoSimulator(business, args.api_key, args.page_cap, args.host, args.port, limit)
    # the business's clock: a job run against this frozen world uses it as its now
    print(f"{sim.start()} {sim.api_key} {business.now.isoformat()}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        sim.stop()


if __name__ == "__main__":
    main()
