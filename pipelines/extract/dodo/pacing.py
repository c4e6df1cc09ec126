"""Pace requests to the server's rate-limit headers, under the user's own ceiling."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

RESERVE = 1
"""Requests the pacer leaves in the server's allowance before its reset: never run Remaining
to zero (a key shared with the merchant's own app keeps a request for it)."""
EPOCH_THRESHOLD = 1_000_000_000.0
"""A reset above this is a Unix time, not a number of seconds."""
DEFAULT_FALLBACK_PER_MINUTE = 100.0
"""Without rate-limit headers and without a configured ceiling: Dodo's lowest published limit."""


@dataclass(frozen=True)
class PaceFigures:
    """What pacing cost one run: time the pacer held requests back, and 429s answered."""

    headers_seen: bool
    gated_seconds: float
    """Union of the periods the pacer held every request back (headers, Retry-After)."""
    waits: int
    throttled: int
    """Responses 429 (each honoured with its Retry-After)."""


class _Spacing:
    """Requests evenly spaced at most `per_minute` a minute (0 or None: no spacing)."""

    def __init__(self, per_minute: float | None, clock: Callable[[], float]) -> None:
        self.interval = 60.0 / per_minute if per_minute else 0.0
        self._next = 0.0
        self._clock = clock

    def claim(self) -> float:
        """Seconds until the caller's slot (the slot is taken); called under the pacer's lock."""
        if not self.interval:
            return 0.0
        now = self._clock()
        delay = self._next - now
        self._next = max(now, self._next) + self.interval
        return max(0.0, delay)


class Pacer:
    """Decides when each request may go, shared by every reader thread of a run.

    With `X-RateLimit-Remaining`/`-Reset` in the answers, requests go at once while the
    allowance lasts and wait for the reset only when it is down to RESERVE: no wait longer than
    the server asks for, no request into an empty allowance. Without them, requests are spaced
    at the fallback rate. `ceiling` (the user's requests_per_minute) applies either way. A 429's
    Retry-After holds back every thread, not only the one that got it.
    """

    def __init__(
        self,
        ceiling_per_minute: float | None,
        fallback_per_minute: float | None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self._ceiling = _Spacing(ceiling_per_minute, clock)
        self._fallback = _Spacing(fallback_per_minute, clock)
        self._headers_seen = False
        self._remaining: int | None = None
        self._reset_at: float | None = None
        self._largest_remaining = 0
        self._in_flight = 0
        self._blocked_until = 0.0
        self._gated_until = 0.0
        self._gated_seconds = 0.0
        self._waits = 0
        self._throttled = 0

    def acquire(self) -> None:
        """Wait until a request may go; the caller then sends exactly one."""
        while True:
            with self._lock:
                gate = self._gate_until(self._clock())
                if gate is None:
                    spacing = self._ceiling.claim()
                    if not self._headers_seen:
                        spacing = max(spacing, self._fallback.claim())
                    self._take()
                    break
                self._note_gate(gate)
                delay = gate - self._clock()
            if delay > 0:
                self._sleep(delay)
        if spacing > 0:
            self._sleep(spacing)

    def _gate_until(self, now: float) -> float | None:
        """When the next request may go, if not now."""
        if self._blocked_until > now:
            return self._blocked_until
        if self._remaining is None or self._reset_at is None:
            return None
        if self._reset_at <= now:
            # the allowance is back; the next answer says how much of it (assume what we saw)
            self._remaining, self._reset_at = max(self._largest_remaining, RESERVE + 1), None
            return None
        if self._remaining <= RESERVE:
            return self._reset_at
        return None

    def _take(self) -> None:
        self._in_flight += 1
        if self._remaining is not None:
            self._remaining -= 1

    def _note_gate(self, until: float) -> None:
        now = self._clock()
        start = max(now, self._gated_until)
        if until > start:
            self._gated_seconds += until - start
            self._gated_until = until
            self._waits += 1

    def observe(self, status: int, headers: Mapping[str, str] | None) -> None:
        """Learn from one answer (also an error's): its rate-limit headers, and a 429."""
        with self._lock:
            self._in_flight = max(0, self._in_flight - 1)
            if status == 429:
                self._throttled += 1
            remaining = _number(headers, "X-RateLimit-Remaining")
            reset = _number(headers, "X-RateLimit-Reset")
            if remaining is None or reset is None:
                return
            now = self._clock()
            if reset > EPOCH_THRESHOLD:  # a Unix time
                reset = max(0.0, reset - time.time())
            self._headers_seen = True
            self._largest_remaining = max(self._largest_remaining, int(remaining))
            # requests still in flight may not be counted in this answer yet: count them used
            self._remaining = int(remaining) - self._in_flight
            self._reset_at = now + reset

    def hold(self, seconds: float) -> None:
        """Hold every request back for `seconds` (a 429's Retry-After)."""
        with self._lock:
            until = self._clock() + seconds
            self._blocked_until = max(self._blocked_until, until)
            self._note_gate(until)

    def figures(self) -> PaceFigures:
        """What pacing cost so far."""
        with self._lock:
            return PaceFigures(
                self._headers_seen, round(self._gated_seconds, 3), self._waits, self._throttled
            )


def _number(headers: Mapping[str, str] | None, name: str) -> float | None:
    if headers is None:
        return None
    value = headers.get(name)
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if number >= 0 else None
