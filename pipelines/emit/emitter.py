"""Reverse ETL: send the outboxes to Segment (identify, then track) and keep the ledger.

State lives in `segment_sync` (see `ledger.py`); messages are built in `messages.py`; sending,
confirmation and splitting of rejected batches in `segment_client.py`.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import duckdb
import orjson

from pipelines.emit import accounts, ledger, settled
from pipelines.emit.checkpoint import ledger_state
from pipelines.emit.ledger import ensure_sync_schema
from pipelines.emit.messages import (
    EPOCH,
    Rejects,
    alias_messages,
    identify_messages,
    track_messages,
)
from pipelines.emit.segment_client import Outgoing, SegmentSender, redact
from pipelines.emit.settings import EmitSettings
from pipelines.emit.settled import ChangedSince, LedgerState, Scope
from pipelines.emit.tracking_plan import PlanValidator, build_plan, load_plan, plan_is_current
from pipelines.gc_passes import fewer_gc_passes

__all__ = [
    "ChangedSince",
    "EmitResult",
    "EmitSettings",
    "Preview",
    "emit",
    "ensure_sync_schema",
    "preview",
    "recompute_traits",
    "resend",
]

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int | None], None]
"""progress(kind, acknowledged_so_far, total): kind "identify" (total None) or "track"."""


@dataclass
class EmitResult:
    """What a run sent. In a dry run `*_sent` are the counts that would be sent."""

    identifies_sent: int = 0
    tracks_sent: int = 0
    groups_sent: int = 0
    aliases_sent: int = 0
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
    tracks_rejected: int = 0
    scoped: bool = False
    """Only the outbox rows the models changed since the last settled emit were read."""
    ledger_state: LedgerState | None = None
    """The ledger over the track outbox after a run that left nothing pending (for the
    checkpoint); None: not worked out."""


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


def plan_validator(con: duckdb.DuckDBPyConnection, settings: EmitSettings) -> PlanValidator | None:
    """The tracking plan every message is checked against: the written one of
    `tracking_plan_path`, else the one of the last build (None: no plan model was built)."""
    if not settings.validate:
        return None
    if settings.tracking_plan_path:
        return PlanValidator(load_plan(settings.tracking_plan_path), settings.excluded_fields)
    if not ledger.outbox_columns(con, "tracking_plan"):
        return None
    if not plan_is_current(con):
        log.warning(
            "tracking plan: analytics.tracking_plan was built with other outboxes (another set "
            "of models ran since): messages are not checked until the models are built again"
        )
        return None
    return PlanValidator(build_plan(con, settings.event_catalog), settings.excluded_fields)


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
    rejects: Rejects,
    result: EmitResult,
    progress: Progress | None,
) -> EmitResult:
    """Identify phase, then track phase; the ledger is written as batches are acknowledged."""
    started = time.monotonic()
    first = next(identifies, None) if identifies is not None else None
    if first is None and tracks is None:  # nothing to send: no client, no threads to wind down
        ledger.record_rejected(con, run_id, rejects.rows)
        result.rejected, result.pending = len(rejects.rows), 0
        result.seconds = time.monotonic() - started
        return result
    sender = SegmentSender(settings)
    identify_source = _Counted(itertools.chain([] if first is None else [first], identifies or ()))
    try:

        def identifies_acked(acked: list[Outgoing]) -> None:
            # the first phase also carries the group and alias calls
            ledger.save_identify_state(
                con,
                run_id,
                [
                    (o.key, o.traits_hash or "", o.outbox_hash)
                    for o in acked
                    if o.kind == "identify"
                ],
            )
            groups = [(o.key, o.traits_hash or "") for o in acked if o.kind == "group"]
            aliases = [(o.key, o.call["user_id"]) for o in acked if o.kind == "alias"]
            accounts.save_group_state(con, run_id, groups)
            accounts.record_aliased(con, run_id, aliases)
            result.groups_sent += len(groups)
            result.aliases_sent += len(aliases)
            result.identifies_sent += len(acked) - len(groups) - len(aliases)
            if progress:
                progress("identify", result.identifies_sent, None)

        def tracks_acked(acked: list[Outgoing]) -> None:
            ledger.mark_delivered(con, run_id, [o.key for o in acked])
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
        ledger.record_rejected(con, run_id, rows)
    stats = sender.stats
    # Identifies: counted as they reach the sender, so only Segment's rejects are among them
    # (an identify with invalid traits never got that far). Tracks: counted in SQL, all rows.
    identify_rejects = sum(1 for r in stats.rejected if r[1] != "track")
    track_rejects = sum(1 for r in rows if r[1] == "track")
    unsent_identifies = sum(1 for _ in identify_source.items)  # left over when stopped early
    first_phase_sent = result.identifies_sent + result.groups_sent + result.aliases_sent
    result.pending = (
        identify_source.count - first_phase_sent - identify_rejects + unsent_identifies
        + max(track_total - result.tracks_sent - track_rejects, 0)
    )  # fmt: skip
    result.rejected = len(rows)
    result.tracks_rejected = len({r[0] for r in rows if r[1] == "track"})
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
    changed: ChangedSince | None = None,
) -> EmitResult:
    """Send changed identifies, then undelivered tracks; first sync skips the track backlog.

    First sync (nothing in the ledger nor in identify_state): the outbox's tracks are recorded as
    `skipped` (only those before `events_since` when given) and every identify is sent. Later
    runs send every track not in the ledger nor rejected, plus skipped ones from `events_since`.

    `changed` (what the models step says it changed since which build): when the last emit
    settled that build and nothing else moved (`settled.scope`), only the changed keys' rows are
    read, and a run that leaves nothing pending records itself as settled for the next one.
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
    accounts.ensure_account_schema(con)
    before = settled.take(con)  # a run that fails or is killed from here on leaves none
    result = EmitResult()
    first = ledger.is_first_sync(con)
    scope = None
    if since is None and not first:  # read before this run writes anything
        scope = settled.scope(con, before, changed, settings)
    result.scoped = scope is not None
    if first:
        # Recorded before anything is sent: a kill later cannot turn the backlog into "new".
        result.skipped_backlog = ledger.record_skipped_backlog(con, run_id, since)
    rejects = Rejects()
    plan = plan_validator(con, settings)
    identifies = _first_phase(con, settings, rejects, plan, scope)
    scoped_cursor, newest = None, None
    if scope is None:
        track_total = ledger.count_tracks(con, since)
    elif scope.customer_ids:
        scoped_cursor, track_total, newest = ledger.scoped_tracks(
            con, scope.customer_ids, scope.tracks_table
        )
    else:
        track_total = 0

    def tracks() -> Iterator[Outgoing]:
        rows = ledger.iter_tracks(con, since, scoped=scoped_cursor)
        built = track_messages(rows, settings.excluded_fields, rejects, plan)
        return as_first_sent(con, run_id, built, settings.excluded_fields, plan, in_flight > 0)

    in_flight = ledger.prune_journal(con)
    # Nothing undelivered (the usual no-change run): skip the second pass over the outbox.
    pending_tracks = tracks if track_total else None
    result = _send(
        con, settings, run_id, identifies, pending_tracks, track_total, rejects, result, progress
    )
    if not result.failed:
        # a user identified now is a changed one, and every customer of it is a changed one
        only = None if scope is None else scope.customer_ids
        accounts.record_user_ids(con, run_id, keep_changed=settings.alias, only_customers=only)
    if changed is not None and not result.failed and result.pending == 0:
        result.ledger_state = _state_after(con, before if scope else None, result, newest)
        # what was read: the build the changes describe, or every row of the build there now
        # (the deep pass may have rebuilt the models after the changes were told)
        build = changed.build_id if scope is not None else settled.current_build(con)
        if build is not None:
            settled.record(con, run_id, build, settings, result.ledger_state)
    return result


def _state_after(
    con: duckdb.DuckDBPyConnection,
    before: settled.Settled | None,
    result: EmitResult,
    newest: datetime | None,
) -> LedgerState:
    """The ledger over the track outbox after a run that left nothing pending: read over the
    whole outbox, or (`before`: a run that read only the changed rows) the settled emit's
    counts plus this run's deliveries and rejects, and the later of its newest time and the
    changed rows' (`newest`). Carried counts miss a changed row that left the outbox until the
    next run that reads everything; the times, which a restore relies on, are exact or later
    (every event before them is settled)."""
    if before is None:
        return ledger_state(con)
    old = before.state
    latest = max((t for t in (old.newest, newest) if t is not None), default=None)
    return LedgerState(
        old.delivered + result.tracks_sent,
        old.skipped,
        old.rejected + result.tracks_rejected,
        0,
        None,
        latest,
    )


JOURNAL_CHUNK = 1000
"""Tracks written down per statement before the client gets them."""


def as_first_sent(
    con: duckdb.DuckDBPyConnection,
    run_id: str,
    tracks: Iterator[Outgoing],
    excluded: tuple[str, ...] = (),
    plan: PlanValidator | None = None,
    replay: bool = True,
) -> Iterator[Outgoing]:
    """Write each track down (`segment_sync.tracks_in_flight`) before the client gets it, and
    send one that an earlier run handed out (then stopped before its ledger write) as it went
    then: a repeat under the same messageId carries the same content, not the object's later
    state (a subscription's next billing date, a dispute's status). Today's excluded fields
    still apply to it, and a first copy today's tracking plan refuses gives way to the one built
    now. Rows go when Segment acknowledges or rejects the track. `replay=False`: nothing was
    written down before this run (the usual case): no look-up."""
    while chunk := list(itertools.islice(tracks, JOURNAL_CHUNK)):
        earlier = ledger.journal_tracks(
            con, run_id, [(out.key, orjson.dumps(out.call).decode()) for out in chunk], replay
        )
        for out in chunk:
            if out.key in earlier:
                out.call = _call_from_json(earlier[out.key], out.call, excluded, plan)
            yield out


def _call_from_json(
    text: str, built: dict[str, Any], excluded: tuple[str, ...], plan: PlanValidator | None
) -> dict[str, Any]:
    """A written-down call as the client takes it (timestamp a datetime again); the call built
    now when it cannot be read back (e.g. `forget` scrubbed it) or breaks today's plan."""
    try:
        call = orjson.loads(text)
        call["timestamp"] = datetime.fromisoformat(call["timestamp"])
        properties = call["properties"]
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return built
    if call.get("message_id") != built.get("message_id") or type(properties) is not dict:
        return built
    for key in excluded:
        properties.pop(key, None)
    if plan is not None and plan.track(call.get("event"), properties):
        return built
    return call


def _first_phase(
    con: duckdb.DuckDBPyConnection,
    settings: EmitSettings,
    rejects: Rejects,
    plan: PlanValidator | None,
    scope: Scope | None = None,
) -> Iterator[Outgoing]:
    """What goes before the tracks: alias calls (`alias`), changed identifies (of the scope's
    users only, when given), changed groups."""
    accounts.ensure_account_schema(con)
    now = datetime.now(UTC)
    rejected_before = ledger.rejected_identify_ids(con)
    if settings.alias:
        yield from alias_messages(iter(accounts.changed_user_ids(con)), now)
    yield from identify_messages(
        ledger.iter_identify_rows(
            con,
            skip_unchanged_for=settings.excluded_fields,
            with_group=True,
            only_users=None if scope is None else scope.user_ids,
        ),
        settings.excluded_fields,
        rejects,
        now,
        rejected_before=rejected_before,
        plan=plan,
    )
    yield from identify_messages(
        accounts.iter_group_rows(con),
        settings.excluded_fields,
        rejects,
        now,
        rejected_before=rejected_before,
        kind="group",
        plan=plan,
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
    settled.forget(con)
    moment = _aware(since)
    rejects = Rejects()
    total = ledger.count_tracks(con, moment, event, resend=True)
    plan = plan_validator(con, settings)

    def tracks() -> Iterator[Outgoing]:
        rows = ledger.iter_tracks(con, moment, event, resend=True)
        return track_messages(rows, settings.excluded_fields, rejects, plan)

    return _send(con, settings, run_id, None, tracks, total, rejects, EmitResult(), None)


def recompute_traits(
    con: duckdb.DuckDBPyConnection,
    settings: EmitSettings,
    run_id: str,
    customer_ids: Sequence[str] | None = None,
) -> EmitResult:
    """Send identify for every (or the named) customer regardless of the stored hash (a named
    customer is identified under its Segment user id, with the other customers sharing it)."""
    ensure_sync_schema(con)
    settled.forget(con)
    rejects = Rejects()
    if customer_ids is not None and ledger.outbox_columns(con, "customer_identity"):
        # the customers' Segment user ids ([identity] user_id), besides ids given as user ids
        rows = con.execute(
            "SELECT DISTINCT user_id FROM analytics.customer_identity "
            "WHERE list_contains(?::VARCHAR[], customer_id)",
            [list(customer_ids)],
        ).fetchall()
        customer_ids = sorted({*customer_ids, *(r[0] for r in rows)})
    identifies = identify_messages(
        ledger.iter_identify_rows(con, customer_ids, with_group=True),
        settings.excluded_fields,
        rejects,
        datetime.now(UTC),
        force_run_id=run_id,
        plan=plan_validator(con, settings),
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
    first = ledger.is_first_sync(con)
    from segment.analytics import Client  # imported only when a preview is asked for

    shaper = Client("preview", send=False)  # send=False returns the message exactly as queued
    rejects = Rejects()
    plan = plan_validator(con, settings)
    identify_samples: list[dict[str, Any]] = []
    identifies = 0
    for out in identify_messages(
        ledger.iter_identify_rows(con, skip_unchanged_for=settings.excluded_fields),
        settings.excluded_fields,
        rejects,
        datetime.now(UTC),
        rejected_before=ledger.rejected_identify_ids(con),
        plan=plan,
    ):
        identifies += 1
        if len(identify_samples) < sample:
            identify_samples.append(shaper.identify(**out.call)[1])
    skipped = 0
    since_us = None if since is None else (since - EPOCH) // timedelta(microseconds=1)
    track_samples: list[dict[str, Any]] = []
    tracks = 0
    rows = ledger.iter_tracks(con, since)
    for out in track_messages(rows, settings.excluded_fields, rejects, plan):
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
