"""Segment calls from outbox rows: track, identify, group and alias messages; invalid rows set aside."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from pipelines.emit.ledger import outbox_hash
from pipelines.emit.segment_client import Outgoing
from pipelines.emit.tracking_plan import PlanValidator

MAX_MESSAGE_ID_LENGTH = 100
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Rejects:
    """Messages refused before sending (invalid input), kept for `rejected_messages`."""

    def __init__(self) -> None:
        self.rows: list[tuple[str | None, str, str | None, str, str]] = []

    def add(self, message_id: str | None, kind: str, user_id: str | None, reason: str, raw: Any):
        payload = orjson.dumps(raw, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
        self.rows.append((message_id, kind, user_id, reason, payload))


def decode_object(text: str | None, what: str) -> tuple[dict[str, Any] | None, str | None]:
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


def track_messages(
    rows: Iterator[tuple[Any, ...]],
    excluded: tuple[str, ...],
    rejects: Rejects,
    plan: PlanValidator | None = None,
) -> Iterator[Outgoing]:
    """Track calls for outbox rows; invalid rows, and rows that break the tracking `plan`, go
    to `rejects` with the reason."""
    loads, decode_error = orjson.loads, orjson.JSONDecodeError
    for row in rows:
        event_id, user_id, event, occurred_us, properties_json = row[:5]
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
            rejects.add(event_id, "track", user_id, track_reject_reason(row), raw_track(row))
            continue
        group_id = None
        if len(row) > 5:  # the outbox's context columns (ledger.TRACK_CONTEXT_COLUMNS)
            customer_id, group_id, plan_name, product_id = row[5:9]
            if customer_id is not None:
                properties["dodo_customer_id"] = customer_id
            if plan_name is not None and "plan" not in properties:
                properties["plan"] = plan_name
            if product_id is not None and "product_id" not in properties:
                properties["product_id"] = product_id
        for key in excluded:
            properties.pop(key, None)
        if plan is not None and (violation := plan.track(event, properties)):
            rejects.add(event_id, "track", user_id, violation, raw_track(row))
            continue
        call = {
            "user_id": user_id,
            "event": event,
            "properties": properties,
            "timestamp": EPOCH + timedelta(microseconds=occurred_us),
            "message_id": event_id,
        }
        if group_id is not None:
            call["context"] = {"groupId": group_id}
        yield Outgoing("track", event_id, event_id, call)


def raw_track(row: tuple[Any, ...]) -> dict[str, Any]:
    """The outbox row of a rejected track, as stored in `rejected_messages.payload`."""
    event_id, user_id, event, occurred_us, properties_json = row[:5]
    return {"event_id": event_id, "user_id": user_id, "event": event,
            "occurred_at_us": occurred_us, "properties": properties_json}  # fmt: skip


def track_reject_reason(row: tuple[Any, ...]) -> str:
    """Why a track row cannot be sent (the first failing check of the list below wins)."""
    event_id, user_id, event, occurred_us, properties_json = row[:5]
    if len(event_id) > MAX_MESSAGE_ID_LENGTH:
        return f"event_id longer than {MAX_MESSAGE_ID_LENGTH} characters"
    if not user_id:
        return "missing user_id"
    if not event:
        return "missing event name"
    if occurred_us is None:
        return "missing occurred_at"
    return decode_object(properties_json, "properties")[1] or "invalid"


def sent_traits_hash(traits: dict[str, Any]) -> str:
    """Stable hash of the traits exactly as sent (after exclusions)."""
    return hashlib.sha256(orjson.dumps(traits, option=orjson.OPT_SORT_KEYS)).hexdigest()


def identify_messages(
    rows: Iterator[tuple[Any, ...]],
    excluded: tuple[str, ...],
    rejects: Rejects,
    sent_at: datetime,
    force_run_id: str | None = None,
    rejected_before: set[str] | None = None,
    kind: str = "identify",
    plan: PlanValidator | None = None,
) -> Iterator[Outgoing]:
    """Identify calls for users whose sent traits changed (all of them when forced).

    Rows: (user_id, traits_json, last_sent_hash[, group_id]). With kind="group", rows are
    (group_id, traits_json, last_sent_hash, member user_id) and group calls come out, diffed
    the same way."""
    for row in rows:
        user_id, traits_json, last_hash = row[:3]
        group_id = row[3] if len(row) > 3 else None
        traits, reason = decode_object(traits_json, "traits")
        if traits is None:
            rejects.add(None, "identify", user_id, reason or "invalid", {"traits": traits_json})
            continue
        # A null would wipe the trait in Segment; an absent key leaves the last value in place.
        traits = {k: v for k, v in traits.items() if v is not None and k not in excluded}
        sent_hash = sent_traits_hash(traits)
        if group_id is not None and kind == "identify":  # a new account re-identifies too
            sent_hash = hashlib.sha256(f"{sent_hash}\x1e{group_id}".encode()).hexdigest()
        if force_run_id is None and sent_hash == last_hash:
            continue
        # Same traits -> same messageId, so a rerun after a kill is de-duplicated by Segment;
        # a forced recompute gets fresh ids so Segment does not swallow it.
        seed = f"{user_id}\x1f{sent_hash}" + (f"\x1f{force_run_id}" if force_run_id else "")
        message_id = f"{kind}-" + hashlib.sha256(seed.encode()).hexdigest()[:40]
        if force_run_id is None and rejected_before and message_id in rejected_before:
            continue  # rejected before with these very traits: only resend/recompute retries
        if plan is not None and (violation := plan.traits(kind, traits)):
            rejects.add(message_id, kind, user_id, violation, {"traits": traits_json})
            continue
        if kind == "group":  # the key is the account; the member it is sent for rides along
            call = {"user_id": group_id, "group_id": user_id, "traits": traits,
                    "timestamp": sent_at, "message_id": message_id}  # fmt: skip
        else:
            call = {"user_id": user_id, "traits": traits, "timestamp": sent_at,
                    "message_id": message_id}  # fmt: skip
            if group_id is not None:
                call["context"] = {"groupId": group_id}
        yield Outgoing(
            kind, user_id, message_id, call, traits_hash=sent_hash,
            outbox_hash=outbox_hash(traits_json, excluded, group_id if kind == "identify" else None),
        )  # fmt: skip


def alias_messages(rows: Iterator[tuple[str, str, str]], sent_at: datetime) -> Iterator[Outgoing]:
    """One alias call per customer whose user id changed: rows (customer_id, previous_id,
    user_id); the messageId depends on the pair only, so a rerun is de-duplicated."""
    for customer_id, previous_id, user_id in rows:
        seed = f"{previous_id}\x1f{user_id}"
        message_id = "alias-" + hashlib.sha256(seed.encode()).hexdigest()[:40]
        call = {"previous_id": previous_id, "user_id": user_id, "timestamp": sent_at,
                "message_id": message_id}  # fmt: skip
        yield Outgoing("alias", customer_id, message_id, call)
