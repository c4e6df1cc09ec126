"""The sandbox's webhooks: signed Dodo-style deliveries of what changed when time passed.

Like Dodo, it signs with Standard Webhooks (`standardwebhooks`), retries a delivery that did
not get a 2xx, and can deliver some events twice and out of order.
"""

from __future__ import annotations

import bisect
import random
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import requests
from standardwebhooks.webhooks import Webhook

from pipelines.sandbox.business import Business
from pipelines.sandbox.records import parse_iso
from pipelines.sandbox.tables import Item, Table

FAMILIES = {"payments": "payment", "subscriptions": "subscription", "refunds": "refund",
            "disputes": "dispute"}  # fmt: skip
KEYS = {"payments": "payment_id", "subscriptions": "subscription_id", "refunds": "refund_id",
        "disputes": "dispute_id"}  # fmt: skip
STATUS_FIELDS = {"payments": "status", "subscriptions": "status", "refunds": "status",
                 "disputes": "dispute_status"}  # fmt: skip


class Snapshot(Mapping[str, Mapping[str, bytes]]):
    """The webhooks' objects as they were when it was taken: resource -> id -> serialised object.

    It copies nothing up front. While it lives, the Business tells it of every change made
    through its methods (`Business.watch`): it keeps the serialised state of each object before
    that object's first change, and the ids created since; every other object is as it is now.
    So it costs what changed, not the whole business (a full copy took ~8 GB at 1M payments).
    """

    def __init__(self, business: Business) -> None:
        self.business = business
        self.before: dict[str, dict[str, bytes]] = {resource: {} for resource in FAMILIES}
        """The objects changed since, as they were."""
        self.new: dict[str, dict[str, Item]] = {resource: {} for resource in FAMILIES}
        """The objects created since, by id."""
        business.watch(self)

    def changing(self, resource: str, item: Item) -> None:
        """Keep an object's state before its first change (Business's watcher)."""
        if resource in FAMILIES:
            key = item[KEYS[resource]]
            if key not in self.before[resource] and key not in self.new[resource]:
                self.before[resource][key] = orjson.dumps(item)

    def created(self, resource: str, item: Item) -> None:
        """Note an object created since (Business's watcher)."""
        if resource in FAMILIES:
            self.new[resource][item[KEYS[resource]]] = item

    def __getitem__(self, resource: str) -> Mapping[str, bytes]:
        if resource not in FAMILIES:
            raise KeyError(resource)
        return _Then(self, resource)

    def __iter__(self) -> Iterator[str]:
        return iter(FAMILIES)

    def __len__(self) -> int:
        return len(FAMILIES)

    __eq__ = object.__eq__  # a watcher is held in a weak set: compared and hashed by identity
    __hash__ = object.__hash__


class _Then(Mapping[str, bytes]):
    """One resource's objects of a Snapshot (id -> serialised object), served on demand."""

    def __init__(self, snap: Snapshot, resource: str) -> None:
        self.snap, self.resource = snap, resource
        self.table = snap.business.tables[resource]

    def __getitem__(self, key: str) -> bytes:
        if key in self.snap.new[self.resource]:
            raise KeyError(key)
        text = self.snap.before[self.resource].get(key)
        if text is not None:
            return text
        item = self.table.get(key)
        if item is None:
            raise KeyError(key)
        return orjson.dumps(item)

    def __iter__(self) -> Iterator[str]:
        new, pk = self.snap.new[self.resource], self.table.pk
        return (item[pk] for item in list(self.table.items) if item[pk] not in new)

    def __len__(self) -> int:
        return len(self.table.items) - len(self.snap.new[self.resource])


def snapshot(business: Business) -> Snapshot:
    """The objects the webhooks cover as they are now, to tell later what changed."""
    with business.lock:
        return Snapshot(business)


def event_type(resource: str, item: dict[str, Any]) -> str:
    """The Dodo event name for an object's current state (`payment.succeeded`, ...)."""
    status = str(item.get(STATUS_FIELDS[resource]) or "updated")
    return f"{FAMILIES[resource]}.{status.removeprefix('dispute_')}"


def changes_since(before: Snapshot, business: Business) -> list[dict[str, Any]]:
    """One webhook payload per object created or changed since `before`, by resource and then
    in the order the business lists them (creation order)."""
    events = []
    now = business.now.astimezone(UTC).isoformat().replace("+00:00", "Z")
    with business.lock:
        for resource in FAMILIES:
            table = business.tables[resource]
            found = []
            for item in before.new[resource].values():
                found.append((_position(table, item), orjson.dumps(item)))
            for key, then in before.before[resource].items():
                item = table.get(key)
                text = orjson.dumps(item)
                if text != then:
                    found.append((_position(table, item), text))
            for _, text in sorted(found, key=lambda pair: pair[0]):
                data = orjson.loads(text)
                events.append({"business_id": "bus_sandbox", "type": event_type(resource, data),
                               "timestamp": now, "data": data})  # fmt: skip
    return events


def _position(table: Table, item: Item) -> int:
    """Where an item is in its table's list (created_at order, then insertion)."""
    at = bisect.bisect_left(table.keys, parse_iso(item["created_at"]))
    while table.items[at] is not item:
        at += 1
    return at


@dataclass
class DeliveryReport:
    """What one `deliver` did."""

    events: int = 0
    attempts: int = 0
    duplicates: int = 0
    failed: list[str] = field(default_factory=list)
    """webhook-ids given up after max_attempts."""
    sent_at: dict[str, float] = field(default_factory=dict)
    """webhook-id -> time.time() of its first 2xx (for latency figures)."""


class WebhookSender:
    """Deliver payloads to one endpoint, signed with the endpoint's secret."""

    def __init__(
        self,
        url: str,
        secret: str,
        seed: int = 0,
        duplicate_share: float = 0.0,
        shuffle: bool = False,
        max_attempts: int = 5,
        retry_seconds: float = 0.2,
    ) -> None:
        self.url, self.webhook = url, Webhook(secret)
        self.rng = random.Random(seed)
        self.duplicate_share, self.shuffle = duplicate_share, shuffle
        self.max_attempts, self.retry_seconds = max_attempts, retry_seconds
        self.session = requests.Session()

    def signed(self, webhook_id: str, body: str) -> dict[str, str]:
        """The Standard Webhooks headers of one delivery, signed now."""
        now = datetime.now(UTC)
        return {
            "webhook-id": webhook_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": self.webhook.sign(webhook_id, now, body),
            "content-type": "application/json",
        }

    def deliver(self, payloads: list[dict[str, Any]]) -> DeliveryReport:
        """POST each payload (some twice, maybe shuffled), retrying until a 2xx."""
        report = DeliveryReport(events=len(payloads))
        queue = [(f"msg_{uuid.UUID(int=self.rng.getrandbits(128)).hex}", p) for p in payloads]
        queue += [item for item in queue if self.rng.random() < self.duplicate_share]
        report.duplicates = len(queue) - len(payloads)
        if self.shuffle:
            self.rng.shuffle(queue)
        for webhook_id, payload in queue:
            body = orjson.dumps(payload).decode()
            for attempt in range(self.max_attempts):
                report.attempts += 1
                try:
                    response = self.session.post(
                        self.url, data=body, headers=self.signed(webhook_id, body), timeout=10
                    )
                    if 200 <= response.status_code < 300:
                        report.sent_at.setdefault(webhook_id, time.time())
                        break
                except requests.RequestException:
                    pass
                time.sleep(self.retry_seconds * (2**attempt))
            else:
                report.failed.append(webhook_id)
        return report
