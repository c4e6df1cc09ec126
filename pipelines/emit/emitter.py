"""Reverse ETL: send the outboxes to Segment (identify, then track) and keep the ledger.

State lives in `segment_sync` (see `pipelines/sync_state.py`); sending, confirmation and
splitting of rejected batches in `pipelines/segment_client.py`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import duckdb
import orjson
from segment.analytics import Client

from pipelines import sync_state
from pipelines.gc_passes import fewer_gc_passes
from pipelines.segment_client import Outgoing, SegmentSender, redact
from pipelines.sync_state import ensure_sync_schema

__all__ = [
    "EmitResult",
    "EmitSettings",
    "Preview",
    "emit",
    "ensure_sync_schema",
    "preview",
    "recompute_traits",
    "resend",
]

SEGMENT_MAX_BATCH_MESSAGES = 2500
MAX_MESSAGE_ID_LENGTH = 100
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

Progress = Callable[[str, int, int | None], None]
"""progress(kind, acknowledged_so_far, total): kind "identify" (total None) or "track"."""


@dataclass
class EmitSettings:
    """How to reach Segment and how hard to try. Defaults suit production; tests shrink them."""

    write_key: str = field(repr=False)
    host: str = "https://api.segment.io"
    upload_size: int = 2000
    """Messages per batch at most (Segment drops batches over 2,500 silently)."""
    upload_interval: float = 0.25
    """Seconds a consumer waits to fill a batch before sending a partial one."""
    max_queue_size: int = 20_000
    max_retries: int = 6
    """Retries per batch without Retry-After (backoff 0, 0.5, 1, 2, 4, 8 s)."""
    timeout: float = 10.0
    max_backoff_seconds: float = 120.0
    """Cap on the time one batch spends in counted retries."""
    max_rate_limit_seconds: float = 300.0
    """Cap on one 429/Retry-After episode; after it the batch counts as failed."""
    max_events_per_second: float | None = None
    checkpoint_every_messages: int = 10_000
    checkpoint_every_seconds: float = 30.0
    max_consecutive_failed_batches: int = 3
    excluded_fields: tuple[str, ...] = ()
    """Top-level property/trait keys never sent to Segment (e.g. customer_email, phone)."""
    threads: int = 3
    """Consumer threads of the client (3 measured best on 2 cores: see bench/emit_bench.py)."""
    gzip: bool = True
    """Compress request bodies (the library's fixed level 9): ~6x fewer bytes on the wire for the
    real catalog, for ~20% more CPU per message (off: 10-30% more events/s on 2 busy cores)."""

    def __post_init__(self) -> None:
        if not self.write_key:
            raise ValueError("a Segment write key is required")
        if not 1 <= self.upload_size <= SEGMENT_MAX_BATCH_MESSAGES:
            raise ValueError(f"upload_size must be 1..{SEGMENT_MAX_BATCH_MESSAGES}")
        if self.max_consecutive_failed_batches < 1 or self.threads < 1:
            raise ValueError("max_consecutive_failed_batches and threads must be >= 1")
        self.excluded_fields = tuple(self.excluded_fields)

    def outage_bound_seconds(self) -> float:
        """Upper bound on how long a run keeps trying during a Segment outage."""
        per_batch = max(
            min(self.max_backoff_seconds, 60.0 * self.max_retries) + self.timeout,
            self.max_rate_limit_seconds,
        ) + self.timeout * (self.max_retries + 1)
        return per_batch * self.max_consecutive_failed_batches


@dataclass
class EmitResult:
    """What a run sent. In a dry run `*_sent` are the counts that would be sent."""

    identifies_sent: int = 0
    tracks_sent: int = 0
    skipped_backlog: int = 0
    rejected: int = 0
    pending: int = 0
    batches: int = 0
    bytes: int = 0
    """Request bodies of the acknowledged batches as sent (gzipped when `gzip`)."""
    failed: bool = False
    error: str | None = None
    dry_run: bool = False
    seconds: float = 0.0


@dataclass
class Preview:
    """What a run would send, without sending: counts and sample messages as sent."""

    identifies: int
    tracks: int
    skipped_backlog: int
    first_sync: bool
    identify_samples: list[dict[str, Any]]
    track_samples: list[dict[str, Any]]
    rejected: list[tuple[str | None, str, str | None, str, str]] = field(default_factory=list)


# --- building and validating messages ------------------------------------------------------


class _Rejects:
    """Messages refused before sending (invalid input), kept for `rejected_messages`."""

    def __init__(self) -> None:
        self.rows: list[tuple[str | None, str, str | None, str, str]] = []

    def add(self, message_id: str | None, kind: str, user_id: str | None, reason: str, raw: Any):
        payload = orjson.dumps(raw, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
        self.rows.append((message_id, kind, user_id, reason, payload))


def _decode_object(text: str | None, what: str) -> tuple[dict[str, Any] | None, str | None]:
    """JSON object from the warehouse as plain Python; strict: NaN/Infinity are refused."""
    if text is None:
        return {}, None
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        return None, f"{what} are not valid JSON (NaN, Infinity or malformed): {exc}"
    if not isinstance(value, dict):
        return None, f"{what} must be a JSON object"
    return value, None


def _track_messages(
    rows: Iterator[tuple[Any, ...]], excluded: tuple[str, ...], rejects: _Rejects
) -> Iterator[Outgoing]:
    """Track calls for outbox rows; invalid rows go to `rejects` with the reason."""
    loads, decode_error = orjson.loads, orjson.JSONDecodeError
    for row in rows:
        event_id, user_id, event, occurred_us, properties_json = row
        # The common case in a few operations; anything unusual takes the slow path for its reason.
        try:
            properties = {} if properties_json is None else loads(properties_json)
        except decode_error:
            properties = None
        if (
            type(properties) is not dict
            or len(event_id) > MAX_MESSAGE_ID_LENGTH
            or not user_id
            or not event
            or occurred_us is None
        ):
            rejects.add(event_id, "track", user_id, _track_reject_reason(row), _raw_track(row))
            continue
        for key in excluded:
            properties.pop(key, None)
        call = {
            "user_id": user_id,
            "event": event,
            "properties": properties,
            "timestamp": EPOCH + timedelta(microseconds=occurred_us),
            "message_id": event_id,
        }
        yield Outgoing("track", event_id, event_id, call)


def _raw_track(row: tuple[Any, ...]) -> dict[str, Any]:
    event_id, user_id, event, occurred_us, properties_json = row
    return {"event_id": event_id, "user_id": user_id, "event": event,
            "occurred_at_us": occurred_us, "properties": properties_json}  # fmt: skip


def _track_reject_reason(row: tuple[Any, ...]) -> str:
    """Why a track row cannot be sent (the first failing check of the list below wins)."""
    event_id, user_id, event, occurred_us, properties_json = row
    if len(event_id) > MAX_MESSAGE_ID_LENGTH:
        return f"event_id longer than {MAX_MESSAGE_ID_LENGTH} characters"
    if not user_id:
        return "missing user_id"
    if not event:
        return "missing event name"
    if occurred_us is None:
        return "missing occurred_at"
    return _decode_object(properties_json, "properties")[1] or "invalid"


def _sent_traits_hash(traits: dict[str, Any]) -> str:
    """Stable hash of the traits exactly as sent (after exclusions)."""
    return hashlib.sha256(orjson.dumps(traits, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _identify_messages(
    rows: Iterator[tuple[str, str | None, str | None]],
    excluded: tuple[str, ...],
    rejects: _Rejects,
    sent_at: datetime,
    force_run_id: str | None = None,
    rejected_before: set[str] | None = None,
) -> Iterator[Outgoing]:
    """Identify calls for customers whose sent traits changed (all of them when forced)."""
    for user_id, traits_json, last_hash in rows:
        traits, reason = _decode_object(traits_json, "traits")
        if traits is None:
            rejects.add(None, "identify", user_id, reason or "invalid", {"traits": traits_json})
            continue
        # A null would wipe the trait in Segment; an absent key leaves the last value in place.
        traits = {k: v for k, v in traits.items() if v is not None and k not in excluded}
        sent_hash = _sent_traits_hash(traits)
        if force_run_id is None and sent_hash == last_hash:
            continue
        # Same traits -> same messageId, so a rerun after a kill is de-duplicated by Segment;
        # a forced recompute gets fresh ids so Segment does not swallow it.
        seed = f"{user_id}\x1f{sent_hash}" + (f"\x1f{force_run_id}" if force_run_id else "")
        message_id = "identify-" + hashlib.sha256(seed.encode()).hexdigest()[:40]
        if force_run_id is None and rejected_before and message_id in rejected_before:
            continue  # rejected before with these very traits: only resend/recompute retries
        call = {"user_id": user_id, "traits": traits, "timestamp": sent_at,
                "message_id": message_id}  # fmt: skip
        yield Outgoing(
            "identify", user_id, message_id, call, traits_hash=sent_hash,
            outbox_hash=sync_state.outbox_hash(traits_json, excluded),
        )  # fmt: skip


class _Counted:
    """Iterate and count what went through."""

    def __init__(self, items: Iterator[Outgoing]) -> None:
        self.items, self.count = items, 0

    def __iter__(self) -> Iterator[Outgoing]:
        for item in self.items:
            self.count += 1
            yield item


def _aware(moment: datetime | date | None) -> datetime | None:
    """A timezone-aware datetime (naive values and dates are read as UTC)."""
    if moment is None:
        return None
    if not isinstance(moment, datetime):
        moment = datetime(moment.year, moment.month, moment.day)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


ALLOCATIONS_PER_GC_PASS = 50_000
"""Sending allocates about ten short-lived containers per message."""


# --- sending ---------------------------------------------------------------------------------


def _send(
    con: duckdb.DuckDBPyConnection,
    settings: EmitSettings,
    run_id: str,
    identifies: Iterator[Outgoing] | None,
    tracks: Callable[[], Iterator[Outgoing]] | None,
    track_total: int,
    rejects: _Rejects,
    result: EmitResult,
    progress: Progress | None,
) -> EmitResult:
    """Identify phase, then track phase; the ledger is written as batches are acknowledged."""
    started = time.monotonic()
    sender = SegmentSender(settings)
    identify_source = _Counted(identifies or iter(()))
    try:

        def identifies_acked(acked: list[Outgoing]) -> None:
            sync_state.save_identify_state(
                con, run_id, [(o.key, o.traits_hash or "", o.outbox_hash) for o in acked]
            )
            result.identifies_sent += len(acked)
            if progress:
                progress("identify", result.identifies_sent, None)

        def tracks_acked(acked: list[Outgoing]) -> None:
            sync_state.mark_delivered(con, run_id, [o.key for o in acked])
            result.tracks_sent += len(acked)
            if progress:
                progress("track", result.tracks_sent, track_total)

        with fewer_gc_passes(ALLOCATIONS_PER_GC_PASS):
            sender.send(identify_source, identifies_acked)
            if tracks is not None and not sender.stats.stopped:
                sender.send(tracks(), tracks_acked)
    finally:
        sender.close()
        rows = rejects.rows + sender.stats.rejected
        sync_state.record_rejected(con, run_id, rows)
    stats = sender.stats
    # Identifies: counted as they reach the sender, so only Segment's rejects are among them
    # (an identify with invalid traits never got that far). Tracks: counted in SQL, all rows.
    identify_rejects = sum(1 for r in stats.rejected if r[1] == "identify")
    track_rejects = sum(1 for r in rows if r[1] == "track")
    unsent_identifies = sum(1 for _ in identify_source.items)  # left over when stopped early
    result.pending = (
        identify_source.count - result.identifies_sent - identify_rejects + unsent_identifies
        + max(track_total - result.tracks_sent - track_rejects, 0)
    )  # fmt: skip
    result.rejected = len(rows)
    result.batches, result.bytes = stats.batches, stats.bytes
    # Failed: Segment did not take everything (stopped after an outage, or batches that failed
    # after their retries); what it did not take stays pending for the next run.
    result.failed = stats.stopped or stats.failed_batches > 0
    if stats.error:
        result.error = redact(stats.error, settings.write_key)
    result.seconds = time.monotonic() - started
    return result


def emit(
    con: duckdb.DuckDBPyConnection,
    settings: EmitSettings,
    run_id: str,
    events_since: datetime | date | None = None,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> EmitResult:
    """Send changed identifies, then undelivered tracks; first sync skips the track backlog.

    First sync (nothing in the ledger nor in identify_state): the outbox's tracks are recorded as
    `skipped` (only those before `events_since` when given) and every identify is sent. Later
    runs send every track not in the ledger nor rejected, plus skipped ones from `events_since`.
    """
    since = _aware(events_since)
    if dry_run:
        plan = preview(con, settings, events_since=since, sample=0)
        return EmitResult(
            identifies_sent=plan.identifies,
            tracks_sent=plan.tracks,
            skipped_backlog=plan.skipped_backlog,
            rejected=len(plan.rejected),
            dry_run=True,
        )
    ensure_sync_schema(con)
    result = EmitResult()
    if sync_state.is_first_sync(con):
        # Recorded before anything is sent: a kill later cannot turn the backlog into "new".
        result.skipped_backlog = sync_state.record_skipped_backlog(con, run_id, since)
    rejects = _Rejects()
    identifies = _identify_messages(
        sync_state.iter_identify_rows(con, skip_unchanged_for=settings.excluded_fields),
        settings.excluded_fields,
        rejects,
        datetime.now(UTC),
        rejected_before=sync_state.rejected_identify_ids(con),
    )
    track_total = sync_state.count_tracks(con, since)

    def tracks() -> Iterator[Outgoing]:
        rows = sync_state.iter_tracks(con, since)
        return _track_messages(rows, settings.excluded_fields, rejects)

    # Nothing undelivered (the usual no-change run): skip the second pass over the outbox.
    pending_tracks = tracks if track_total else None
    return _send(
        con, settings, run_id, identifies, pending_tracks, track_total, rejects, result, progress
    )


def resend(
    con: duckdb.DuckDBPyConnection,
    settings: EmitSettings,
    run_id: str,
    since: datetime | date,
    event: str | None = None,
) -> EmitResult:
    """Re-send every outbox track from `since` (optionally one event) with its original messageId.

    Delivered, skipped, pending and previously rejected events alike (rejected ones are
    validated again). Identifies are not part of it: use `recompute_traits` for profiles.
    """
    ensure_sync_schema(con)
    moment = _aware(since)
    rejects = _Rejects()
    total = sync_state.count_tracks(con, moment, event, resend=True)

    def tracks() -> Iterator[Outgoing]:
        rows = sync_state.iter_tracks(con, moment, event, resend=True)
        return _track_messages(rows, settings.excluded_fields, rejects)

    return _send(con, settings, run_id, None, tracks, total, rejects, EmitResult(), None)


def recompute_traits(
    con: duckdb.DuckDBPyConnection,
    settings: EmitSettings,
    run_id: str,
    customer_ids: Sequence[str] | None = None,
) -> EmitResult:
    """Send identify for every (or the named) customer regardless of the stored hash."""
    ensure_sync_schema(con)
    rejects = _Rejects()
    identifies = _identify_messages(
        sync_state.iter_identify_rows(con, customer_ids),
        settings.excluded_fields,
        rejects,
        datetime.now(UTC),
        force_run_id=run_id,
    )
    return _send(con, settings, run_id, identifies, None, 0, rejects, EmitResult(), None)


def preview(
    con: duckdb.DuckDBPyConnection,
    settings: EmitSettings,
    events_since: datetime | date | None = None,
    sample: int = 3,
) -> Preview:
    """Count and sample what `emit` would send now, without sending or recording anything.

    Creates the (empty) `segment_sync` tables if missing. Samples are the library's own message
    dicts (the batch envelope adds only `sentAt` and `writeKey`).
    """
    ensure_sync_schema(con)
    since = _aware(events_since)
    first = sync_state.is_first_sync(con)
    shaper = Client("preview", send=False)  # send=False returns the message exactly as queued
    rejects = _Rejects()
    identify_samples: list[dict[str, Any]] = []
    identifies = 0
    for out in _identify_messages(
        sync_state.iter_identify_rows(con, skip_unchanged_for=settings.excluded_fields),
        settings.excluded_fields,
        rejects,
        datetime.now(UTC),
        rejected_before=sync_state.rejected_identify_ids(con),
    ):
        identifies += 1
        if len(identify_samples) < sample:
            identify_samples.append(shaper.identify(**out.call)[1])
    skipped = 0
    since_us = None if since is None else (since - EPOCH) // timedelta(microseconds=1)
    track_samples: list[dict[str, Any]] = []
    tracks = 0
    rows = sync_state.iter_tracks(con, since)
    for out in _track_messages(rows, settings.excluded_fields, rejects):
        occurred_us = (out.call["timestamp"] - EPOCH) // timedelta(microseconds=1)
        if first and (since_us is None or occurred_us < since_us):
            skipped += 1
            continue
        tracks += 1
        if len(track_samples) < sample:
            track_samples.append(shaper.track(**out.call)[1])
    return Preview(
        identifies, tracks, skipped, first, identify_samples, track_samples, rejects.rows
    )
