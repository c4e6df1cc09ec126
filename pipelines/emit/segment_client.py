"""Sending through segment-analytics-python with confirmation per batch, back-pressure and splits.

The library batches, gzips, retries (honouring Retry-After) and reports failures through
`on_error`, but says nothing about success. We observe each consumer's `request(batch)` (it
returns only on a 2xx), so a message counts as delivered only when its batch was acknowledged;
anything enqueued and never acknowledged (dropped, drained, killed) stays pending.

segment-analytics-python (and the JWT/cryptography stack it imports, ~0.2 s) is imported when
a sender is made: a run with nothing to send never loads it.
"""

from __future__ import annotations

import atexit
import base64
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from pipelines.emit.settings import EmitSettings

log = logging.getLogger(__name__)

SPLIT_STATUSES = frozenset({400, 413})
"""Answers that blame the batch's content: split it until the offending message is alone."""


@dataclass
class Outgoing:
    """A validated message ready for the client: `key` is what the ledger records."""

    kind: str  # "track" | "identify" | "group" | "alias"
    key: str
    message_id: str
    call: dict[str, Any]
    traits_hash: str | None = None
    outbox_hash: str | None = None
    """Identify only: `sync_state.outbox_hash` of the outbox row the traits came from."""


@dataclass
class SendStats:
    """What one sender observed: batches acknowledged, their bytes, failures and rejects."""

    batches: int = 0
    bytes: int = 0
    """Request bodies as sent (gzipped when the client gzips)."""
    failed_batches: int = 0
    rejected: list[tuple[str | None, str, str | None, str, str]] = field(default_factory=list)
    stopped: bool = False
    error: str | None = None


class _RedactSecret(logging.Filter):
    """Replace the write key (and its Basic-auth form) in every record of the library's logger."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(s in message for s in self.secrets):
            for s in self.secrets:
                message = message.replace(s, "***")
            record.msg, record.args = message, None
        return True


def redact(text: str, secret: str) -> str:
    """`text` without the write key (plain or Basic-auth encoded)."""
    if not secret:
        return text
    encoded = base64.b64encode(f"{secret}:".encode()).decode()
    return text.replace(secret, "***").replace(encoded, "***")


class SegmentSender:
    """One client per run: `send()` a stream of messages, `close()` at the end."""

    def __init__(self, settings: EmitSettings) -> None:
        self.settings = settings
        self.stats = SendStats()
        self._lock = threading.Lock()
        self._inflight: dict[str, Outgoing] = {}
        self._acked: list[Outgoing] = []
        self._to_split: list[list[dict[str, Any]]] = []
        self._consecutive_failures = 0
        self._secret_filter = _RedactSecret(
            [settings.write_key, base64.b64encode(f"{settings.write_key}:".encode()).decode()]
        )
        logging.getLogger("segment").addFilter(self._secret_filter)
        from segment.analytics import Client
        from segment.analytics.consumer import Consumer

        self.client = Client(
            settings.write_key,
            host=settings.host,
            on_error=self._on_error,
            gzip=settings.gzip,
            upload_size=settings.upload_size,
            upload_interval=settings.upload_interval,
            max_queue_size=settings.max_queue_size,
            max_retries=settings.max_retries,
            timeout=settings.timeout,
            thread=settings.threads,
            max_total_backoff_duration=settings.max_backoff_seconds,
            max_rate_limit_duration=settings.max_rate_limit_seconds,
        )
        # Client(thread=N) keeps only the last consumer in `client.consumers` (2.4 bug), so
        # find them all by their queue.
        self._consumers = [
            t
            for t in threading.enumerate()
            if isinstance(t, Consumer) and t.queue is self.client.queue
        ]
        for consumer in self._consumers:
            consumer.request = self._observed(consumer.request)  # type: ignore[method-assign]

    # --- callbacks from the consumer threads ---------------------------------------------------

    def _observed(self, request: Callable[[list[dict[str, Any]]], Any]) -> Callable[..., Any]:
        def request_and_confirm(batch: list[dict[str, Any]]) -> Any:
            response = request(batch)  # raises unless Segment answered 2xx
            self._confirm(batch, response)
            return response

        return request_and_confirm

    def _confirm(self, batch: list[dict[str, Any]], response: Any) -> None:
        size = len(response.request.body or b"")  # as sent: no fourth serialisation of the batch
        with self._lock:
            self.stats.batches += 1
            self.stats.bytes += size
            self._consecutive_failures = 0
            for msg in batch:
                outgoing = self._inflight.pop(msg.get("messageId"), None)
                if outgoing is not None:
                    self._acked.append(outgoing)

    def _on_error(self, exc: Exception, batch: list[dict[str, Any]]) -> None:
        from segment.analytics.request import APIError

        with self._lock:
            if isinstance(exc, APIError) and exc.status in SPLIT_STATUSES:
                self._to_split.append(batch)
                return
            self.stats.failed_batches += 1
            self._consecutive_failures += 1
            self.stats.error = redact(f"{type(exc).__name__}: {exc}", self.settings.write_key)
            if self._consecutive_failures >= self.settings.max_consecutive_failed_batches:
                self.stats.stopped = True

    # --- producer side -------------------------------------------------------------------------

    def send(
        self,
        messages: Iterable[Outgoing],
        on_acked: Callable[[list[Outgoing]], None],
        on_rejected: Callable[[], None] | None = None,
    ) -> None:
        """Enqueue every message (with back-pressure and the rate ceiling) and wait for the end.

        `on_acked` receives acknowledged messages at least every `checkpoint_every_messages`
        or `checkpoint_every_seconds`, and once at the end. Returns early (stats.stopped) after
        `max_consecutive_failed_batches` failed batches, leaving the rest pending.
        """
        s = self.settings
        started = last_checkpoint = time.monotonic()
        enqueued = 0
        for out in messages:
            if self.stats.stopped:
                break
            if s.max_events_per_second:
                ahead = enqueued / s.max_events_per_second - (time.monotonic() - started)
                if ahead > 0.01:
                    time.sleep(ahead)
            with self._lock:
                self._inflight[out.message_id] = out
            while not self._enqueue(out):  # full queue: wait for the consumers
                time.sleep(0.002)
                last_checkpoint = self._maybe_checkpoint(on_acked, last_checkpoint)
                if self.stats.stopped:
                    break
            enqueued += 1
            if len(self._acked) >= s.checkpoint_every_messages or (
                time.monotonic() - last_checkpoint >= s.checkpoint_every_seconds
            ):
                last_checkpoint = self._checkpoint(on_acked)
        while self.client.queue.unfinished_tasks:
            if self.stats.stopped:
                self._drain()
            time.sleep(0.005)
            last_checkpoint = self._maybe_checkpoint(on_acked, last_checkpoint)
        self.client.flush()  # returns at once: everything was acknowledged or reported
        self._split_rejected_batches()
        self._checkpoint(on_acked)

    def _enqueue(self, out: Outgoing) -> bool:
        fn = getattr(self.client, out.kind)  # track, identify, group or alias
        try:
            ok, _ = fn(**out.call)
        except RuntimeError:  # the library refuses a message over 32 KB
            self._reject_alone(out, "message exceeds Segment's 32 KB limit")
            return True
        return bool(ok)

    def _maybe_checkpoint(self, on_acked: Callable[[list[Outgoing]], None], last: float) -> float:
        s = self.settings
        if len(self._acked) >= s.checkpoint_every_messages or (
            time.monotonic() - last >= s.checkpoint_every_seconds
        ):
            return self._checkpoint(on_acked)
        return last

    def _checkpoint(self, on_acked: Callable[[list[Outgoing]], None]) -> float:
        with self._lock:
            acked, self._acked = self._acked, []
        if acked:
            on_acked(acked)
        return time.monotonic()

    def _drain(self) -> None:
        """Stop: take back everything still queued; it stays pending for the next run."""
        while True:
            try:
                self.client.queue.get_nowait()
            except queue.Empty:
                return
            self.client.queue.task_done()

    # --- 400 answers: bisect -------------------------------------------------------------------

    def _split_rejected_batches(self) -> None:
        with self._lock:
            batches, self._to_split = self._to_split, []
        for batch in batches:
            self._bisect(batch)

    def _bisect(self, batch: list[dict[str, Any]]) -> None:
        if len(batch) == 1:
            self._post_or_reject(batch)
            return
        middle = len(batch) // 2
        for half in (batch[:middle], batch[middle:]):
            self._post_or_reject(half)

    def _post_or_reject(self, batch: list[dict[str, Any]]) -> None:
        from segment.analytics.request import APIError, post

        s = self.settings
        try:
            response = post(s.write_key, s.host, gzip=s.gzip, timeout=s.timeout, batch=batch)
        except APIError as exc:
            if exc.status not in SPLIT_STATUSES:
                self._fail(exc)
            elif len(batch) > 1:
                self._bisect(batch)
            else:
                reason = f"Segment answered {exc.status}: {exc.message}"
                outgoing = self._inflight.get(batch[0].get("messageId"))
                self._reject_sent(batch[0], outgoing, redact(reason, s.write_key))
            return
        except Exception as exc:  # network: leave pending, the next run retries
            self._fail(exc)
            return
        self._confirm(batch, response)

    def _fail(self, exc: Exception) -> None:
        with self._lock:
            self.stats.failed_batches += 1
            self.stats.error = redact(f"{type(exc).__name__}: {exc}", self.settings.write_key)

    def _reject_sent(self, msg: dict[str, Any], out: Outgoing | None, reason: str) -> None:
        with self._lock:
            self._inflight.pop(msg.get("messageId"), None)
            self.stats.rejected.append(
                (
                    msg.get("messageId"),
                    out.kind if out else str(msg.get("type")),
                    msg.get("userId"),
                    reason,
                    orjson.dumps(msg).decode(),
                )
            )

    def _reject_alone(self, out: Outgoing, reason: str) -> None:
        payload = {"type": out.kind, "messageId": out.message_id, **out.call}
        size = len(orjson.dumps(payload, default=str))
        with self._lock:
            self._inflight.pop(out.message_id, None)
            self.stats.rejected.append(
                (
                    out.message_id,
                    out.kind,
                    out.call.get("user_id"),
                    f"{reason} ({size} bytes)",
                    orjson.dumps(payload, default=str).decode(),
                )
            )

    # --- end -----------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the consumer threads and the log filter. After a `send` that returned, nothing
        is queued or in flight: each consumer waits on the empty queue and ends when that wait
        times out (within `upload_interval`), so it is not joined (joining cost every run that
        long). After a `send` cut short (a ledger write failed, a signal), a consumer may still
        be posting a batch: its acknowledgement is no longer recorded, so those messages stay
        pending and go again next run with the same messageId (the timed join did no better).

        The client registered its `join` to run at exit; that registration is removed, or it
        would keep this sender and its client alive for the life of the process (~30 KB a run
        in `listen`'s worker)."""
        self._drain()
        for consumer in self._consumers:
            consumer.pause()
        atexit.unregister(self.client.join)
        logging.getLogger("segment").removeFilter(self._secret_filter)
