"""HTTP client for the Dodo Payments API: bearer auth, 0-based paging, retries and a request budget."""

from __future__ import annotations

import email.utils
import json
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import orjson

from pipelines.dodo_contract import ENDPOINTS, MAX_PAGE_SIZE
from pipelines.extract.dodo.connections import TRANSIENT_ERRORS, ApiConnections
from pipelines.extract.dodo.pacing import DEFAULT_FALLBACK_PER_MINUTE, PaceFigures, Pacer

log = logging.getLogger(__name__)

RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class DodoApiError(RuntimeError):
    """The API failed in a way retries did not fix."""


class DodoAuthError(DodoApiError):
    """The API refused the key (401/403)."""


class DodoUnavailable(DodoApiError):
    """The API kept failing (5xx, 429, timeouts, refused connections) through every retry."""


class WindowOverflow(Exception):
    """A query filled every page up to the per-query page limit: its window must be split."""


@dataclass(frozen=True)
class ClientSettings:
    """How hard and how fast the client may talk to the API."""

    base_url: str
    api_key: str
    environment: str = "live_mode"
    page_size: int = MAX_PAGE_SIZE
    max_pages_per_query: int = 50
    requests_per_minute: float | None = None
    """The user's ceiling (a key shared with their app); None: the server's headers alone, and
    DEFAULT_FALLBACK_PER_MINUTE while the server sends none; 0: no client-side limit at all."""
    timeout_seconds: float = 60.0
    max_retries: int = 8
    backoff_base_seconds: float = 1.0
    backoff_max_seconds: float = 60.0
    max_retry_after_seconds: float = 300.0

    def __repr__(self) -> str:  # never print the key
        return f"ClientSettings(base_url={self.base_url!r}, environment={self.environment!r})"


def format_timestamp(value: datetime) -> str:
    """ISO-8601 UTC with microseconds, the form the list filters accept."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class DodoClient:
    """A thin, counted, retrying client over the list endpoints."""

    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        self.requests_by_resource: Counter[str] = Counter()
        self.retries_by_resource: Counter[str] = Counter()
        ceiling = settings.requests_per_minute
        self.pacer = Pacer(
            ceiling or None, DEFAULT_FALLBACK_PER_MINUTE if ceiling is None else ceiling or None
        )
        self._count_lock = threading.Lock()  # resources read from their own threads
        self._connections = ApiConnections(settings.base_url, settings.timeout_seconds)
        self._headers = {
            "Authorization": f"Bearer {settings.api_key}",
            "Accept": "application/json",
        }
        self.on_page: Callable[[str, int], None] | None = None
        """Told (resource, rows) after each page read: the backfill's progress bar."""

    def close(self) -> None:
        """Close the connections."""
        self._connections.close()

    def pacing(self) -> PaceFigures:
        """What pacing to the rate limit cost so far (waits, 429s)."""
        return self.pacer.figures()

    def get_page(self, resource: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Fetch one page of a list endpoint, retrying transient failures."""
        path = ENDPOINTS[resource]
        attempt = 0
        while True:
            self.pacer.acquire()
            with self._count_lock:
                self.requests_by_resource[resource] += 1
            try:
                # not retried nor redirected by the connections: retried below, with backoff
                try:
                    response = self._connections.get(f"{path}?{urlencode(params)}", self._headers)
                except BaseException:  # no answer: the request no longer holds a place
                    self.pacer.observe(0, None)
                    raise
                self.pacer.observe(response.status, response.headers)
                status = response.status
                if status == 200:
                    items = _parse_items(response.body, resource)
                    if self.on_page is not None:
                        self.on_page(resource, len(items))
                    return items
                if status in (401, 403):
                    raise DodoAuthError(self._auth_message(status))
                if status not in RETRYABLE_STATUSES:
                    raise DodoApiError(
                        f"Dodo API answered {status} for GET {ENDPOINTS[resource]}: "
                        f"{_error_text(response.body)}"
                    )
                reason = f"HTTP {status}"
                retry_after = _retry_after_seconds(response.headers.get("Retry-After"))
                if status == 429 and retry_after is not None:  # every thread waits, not only this
                    self.pacer.hold(min(retry_after, self.settings.max_retry_after_seconds))
            except TRANSIENT_ERRORS as exc:
                reason, retry_after = type(exc).__name__, None
            except _MalformedPage as exc:
                reason, retry_after = str(exc), None
            attempt += 1
            if attempt > self.settings.max_retries:
                raise DodoUnavailable(
                    f"Dodo API kept failing on GET {ENDPOINTS[resource]} ({reason}) after "
                    f"{self.settings.max_retries} retries"
                )
            with self._count_lock:
                self.retries_by_resource[resource] += 1
            delay = self._backoff(attempt, retry_after)
            log.warning(
                "Dodo API %s on %s; retry %d/%d in %.1fs",
                reason,
                ENDPOINTS[resource],
                attempt,
                self.settings.max_retries,
                delay,
            )
            time.sleep(delay)

    def list_query(
        self, resource: str, filters: Mapping[str, Any], *, allow_overflow: bool = False
    ) -> Iterator[list[dict[str, Any]]]:
        """Page through one query from page 0 until a short or empty page.

        Raises WindowOverflow when the query fills the per-query page limit (deep pages are
        capped server-side, so the caller must narrow the window) unless allow_overflow is set.
        """
        size = self.settings.page_size
        for page_number in range(self.settings.max_pages_per_query):
            items = self.get_page(
                resource, {**filters, "page_size": size, "page_number": page_number}
            )
            if items:
                yield items
            if len(items) < size:
                return
        if not allow_overflow:
            raise WindowOverflow(resource)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.settings.max_retry_after_seconds)
        base = self.settings.backoff_base_seconds * (2 ** (attempt - 1))
        return min(base, self.settings.backoff_max_seconds) * random.uniform(0.5, 1.0)

    def _auth_message(self, status: int) -> str:
        return (
            f"Dodo API refused the key (HTTP {status}) for {self.settings.environment} at "
            f"{self.settings.base_url}: check DODO_PAYMENTS_API_KEY (and "
            f"DODO_PAYMENTS_ENVIRONMENT: live and test mode have separate keys)"
        )


class _MalformedPage(Exception):
    """A 200 response whose body is not the expected JSON list."""


def _parse_items(body: bytes, resource: str) -> list[dict[str, Any]]:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        try:  # valid JSON orjson refuses (an integer beyond 64 bits): the records decide
            document = json.loads(body)
        except ValueError:
            raise _MalformedPage(f"malformed JSON from {ENDPOINTS[resource]}") from exc
    items = document.get("items") if isinstance(document, dict) else None
    if not isinstance(items, list):
        raise _MalformedPage(f"no 'items' list in the response of {ENDPOINTS[resource]}")
    return items


def _retry_after_seconds(header: str | None) -> float | None:
    if not header:
        return None
    try:
        return max(0.0, float(header))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(header)
        if parsed is None:
            return None
        return max(0.0, (parsed - datetime.now(UTC)).total_seconds())


def _error_text(body: bytes) -> str:
    try:
        document = orjson.loads(body)
        return f"{document.get('code', '')} {document.get('message', '')}".strip()[:200]
    except (orjson.JSONDecodeError, AttributeError):
        return body[:200].decode("utf-8", "replace")
