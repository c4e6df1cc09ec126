"""A server's rate limit for the simulator: a token bucket per API key, with X-RateLimit headers."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RateLimit:
    """How the simulator limits each key (off unless given to the simulator).

    Dodo's default tier as integrators quote it: 240 requests a minute sustained, bursts of 40.
    """

    per_minute: float = 240.0
    burst: int = 40
    headers: bool = True
    """Answer X-RateLimit-Limit/-Remaining/-Reset; False: only 429 with Retry-After."""


@dataclass(frozen=True)
class Decision:
    """Whether a request may be served, and the headers that go with the answer."""

    allowed: bool
    headers: dict[str, str]


class TokenBuckets:
    """One bucket per key: `burst` tokens, refilled at `per_minute` / 60 a second.

    Headers: `X-RateLimit-Limit` the sustained requests a minute, `X-RateLimit-Remaining` the
    whole requests left in the bucket, `X-RateLimit-Reset` the seconds (to the millisecond)
    until the bucket is full again. A refused request gets `Retry-After`: whole seconds until
    one token is back.
    """

    def __init__(self, limit: RateLimit, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self._rate = limit.per_minute / 60.0
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self.refused = 0

    def take(self, key: str) -> Decision:
        """Spend one token of `key`'s bucket if there is one."""
        burst = float(self.limit.burst)
        with self._lock:
            now = self._clock()
            tokens, at = self._buckets.get(key, (burst, now))
            tokens = min(burst, tokens + (now - at) * self._rate)
            allowed = tokens >= 1.0
            if allowed:
                tokens -= 1.0
            else:
                self.refused += 1
            self._buckets[key] = (tokens, now)
        headers: dict[str, str] = {}
        if self.limit.headers:
            headers = {
                "X-RateLimit-Limit": f"{self.limit.per_minute:g}",
                "X-RateLimit-Remaining": str(int(tokens)),
                "X-RateLimit-Reset": f"{(burst - tokens) / self._rate:.3f}",
            }
        if not allowed:
            headers["Retry-After"] = str(max(1, math.ceil((1.0 - tokens) / self._rate)))
        return Decision(allowed, headers)
