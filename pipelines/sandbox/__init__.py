"""Embedded sandbox: a Dodo Payments API simulator and a Segment-compatible collector on loopback.

Its public names are imported on first use, so `python -m pipelines.sandbox.simulator` (or
`.collector`) runs its module once, not a second copy imported by this package.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "Business",
    "DodoSimulator",
    "RateLimit",
    "SegmentCollector",
    "WebhookSender",
    "changes_since",
    "generate_business",
    "snapshot",
]


def __getattr__(name: str) -> Any:
    if name in ("Business", "generate_business"):
        from pipelines.sandbox import business

        return getattr(business, name)
    if name == "DodoSimulator":
        from pipelines.sandbox.simulator import DodoSimulator

        return DodoSimulator
    if name == "RateLimit":
        from pipelines.sandbox.ratelimit import RateLimit

        return RateLimit
    if name == "SegmentCollector":
        from pipelines.sandbox.collector import SegmentCollector

        return SegmentCollector
    if name in ("WebhookSender", "changes_since", "snapshot"):
        from pipelines.sandbox import webhooks

        return getattr(webhooks, name)
    raise AttributeError(f"module 'pipelines.sandbox' has no attribute {name!r}")
