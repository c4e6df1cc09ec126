"""The sandbox's webhooks: signed Dodo-style deliveries of what changed when time passed.

Like Dodo, it signs with Standard Webhooks (`standardwebhooks`), retries a delivery that did
not get a 2xx, and can deliver some events twice and out of order.
"""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import requests
from standardwebhooks.webhooks import Webhook

from pipelines.sandbox.business import Business

FAMILIES = {"payments": "payment", "subscriptions": "subscription", "refunds": "refund",
            "disputes": "dispute"}  # fmt: skip
KEYS = {"payments": "payment_id", "subscriptions": "subscription_id", "refunds": "refund_id",
        "disputes": "dispute_id"}  # fmt: skip
STATUS_FIELDS = {"payments": "status", "subscriptions": "status", "refunds": "status",
                 "disputes": "dispute_status"}  # fmt: skip


def snapshot(business: Business) -> dict[str, dict[str, bytes]]:
    """Every object the webhooks cover, serialised, to tell later what changed."""
    with business.lock:
        return {
            resource: {
                item[KEYS[resource]]: orjson.dumps(item) for item in business.tables[resource].items
            }
            for resource in FAMILIES
        }


def event_type(resource: str, item: dict[str, Any]) -> str:
    """The Dodo event name for an object's current state (`payment.succeeded`, ...)."""
    status = str(item.get(STATUS_FIELDS[resource]) or "updated")
    return f"{FAMILIES[resource]}.{status.removeprefix('dispute_')}"


def changes_since(before: dict[str, dict[str, bytes]], business: Business) -> list[dict[str, Any]]:
    """One webhook payload per object created or changed since `before`, in creation order."""
    events = []
    now = business.now.astimezone(UTC).isoformat().replace("+00:00", "Z")
    after = snapshot(business)
    for resource, items in after.items():
        for key, text in items.items():
            if before.get(resource, {}).get(key) == text:
                continue
            data = orjson.loads(text)
            events.append({"business_id": "bus_sandbox", "type": event_type(resource, data),
                           "timestamp": now, "data": data})  # fmt: skip
    return events


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
