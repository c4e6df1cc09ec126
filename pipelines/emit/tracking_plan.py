"""The tracking plan: a JSON Schema per event, for identify traits and group traits, taken from
what the models produce (`analytics.tracking_plan`), written by `dodo-segment tracking-plan`
and checked against every message before it is sent."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import duckdb
import fastjsonschema

from pipelines.emit.ledger import outbox_columns

SCHEMA_DIALECT = "http://json-schema.org/draft-07/schema#"
"""Draft 7: what Segment Protocols' rules are written in (README, "Tracking plan")."""
JSON_TYPES = {
    "VARCHAR": "string", "BIGINT": "integer", "UBIGINT": "integer", "HUGEINT": "integer",
    "DOUBLE": "number", "BOOLEAN": "boolean", "ARRAY": "array", "OBJECT": "object",
}  # fmt: skip
"""DuckDB's JSON types of the models' values -> JSON Schema types."""
OTHER_CATALOG_EVENTS = {
    "default": ("Order Completed", "Order Refunded"),
    "ecommerce": ("Payment Completed", "Payment Refunded"),
}
"""Product events the other `[events] catalog` sends instead (not part of the active plan)."""
CONTEXT_PROPERTIES = {"dodo_customer_id": "string", "plan": "string", "product_id": "string"}
"""Properties the emitter adds to tracks from the outbox's context columns."""


BUILT_FROM = "built_from"


def plan_is_current(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether `analytics.tracking_plan` was built with the identify_outbox there now (False:
    another set of models rebuilt the outboxes since, e.g. a replaced model folder)."""
    try:
        row = con.execute(
            """select
                   (select key from analytics.tracking_plan where call = ?),
                   (select analytics.traits_fingerprint(traits_hash)
                    from analytics.identify_outbox)""",
            [BUILT_FROM],
        ).fetchone()
    except duckdb.CatalogException:  # built by a release without the macro: another plan
        return False
    return bool(row and row[0] is not None and row[0] == row[1])


class PlanError(ValueError):
    """A tracking plan file that cannot be read or is not a plan."""


def _property_type(kinds: dict[str, int]) -> str | None:
    """One JSON Schema type for a key seen with these types (rows per type). Numbers agree
    (integer when never fractional); otherwise the most frequent type is the plan's."""
    known = {kind: rows for kind, rows in kinds.items() if kind}
    if not known:
        return None
    if set(known) <= {"integer", "number"}:
        return "number" if "number" in known else "integer"
    return sorted(known.items(), key=lambda item: (-item[1], item[0]))[0][0]


def _object_schema(
    title: str, keys: dict[str, dict[str, int]], total: int, extra: dict[str, tuple[str, bool]]
) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    required: list[str] = []
    for key, kinds in sorted(keys.items()):
        kind = _property_type(kinds)
        properties[key] = {"type": kind} if kind else {}
        if total and sum(kinds.values()) >= total:
            required.append(key)
    for key, (kind, is_required) in extra.items():
        properties.setdefault(key, {"type": kind})
        if is_required and key not in required:
            required.append(key)
    return {
        "$schema": SCHEMA_DIALECT,
        "title": title,
        "type": "object",
        "properties": properties,
        "required": sorted(required),
    }


def build_plan(con: duckdb.DuckDBPyConnection, event_catalog: str = "default") -> dict[str, Any]:
    """The plan of the active catalog from the last build: every event the models can send
    (built-in, custom, renames and skips applied; one with no row yet constrains nothing) and
    the identify and group traits."""
    if "call" not in outbox_columns(con, "tracking_plan"):
        raise PlanError("no tracking plan in the warehouse yet: run the models first")
    observed: dict[tuple[str, str], dict[str, dict[str, int]]] = {}
    totals: dict[tuple[str, str], int] = {}
    for call, event, key, json_type, rows in con.execute(
        "select call, event, key, json_type, rows from analytics.tracking_plan"
    ).fetchall():
        if call == BUILT_FROM:
            continue
        if key == "":
            totals[(call, event)] = int(rows)
        else:
            kinds = observed.setdefault((call, event), {}).setdefault(key, {})
            kind = JSON_TYPES.get(json_type, "")
            kinds[kind] = kinds.get(kind, 0) + int(rows)
    names = {event for call, event in totals if call == "track"}
    names |= set(_sendable_names(con, event_catalog))
    track_columns = outbox_columns(con, "track_outbox")
    context = {
        key: (kind, key == "dodo_customer_id")
        for key, kind in CONTEXT_PROPERTIES.items()
        if {"dodo_customer_id": "customer_id"}.get(key, key) in track_columns
    }
    events = {
        name: _object_schema(
            name, observed.get(("track", name), {}), totals.get(("track", name), 0), context
        )
        for name in sorted(names)
    }
    return {
        "catalog": event_catalog,
        "events": events,
        "identify": _object_schema(
            "identify traits",
            observed.get(("identify", ""), {}),
            totals.get(("identify", ""), 0),
            {},
        ),
        "group": _object_schema(
            "group traits", observed.get(("group", ""), {}), totals.get(("group", ""), 0), {}
        ),
    }


def _sendable_names(con: duckdb.DuckDBPyConnection, event_catalog: str) -> list[str]:
    """The product catalog's events of the active catalog and the custom events' names, with
    `[events] skip` and `rename` applied."""
    tables = {"event_catalog", "event_rules", "custom_events"}
    if not all(outbox_columns(con, t) for t in tables):
        return []
    rows = con.execute(
        """with names as (
               select event from analytics.event_catalog
               where event not in (select unnest($other::VARCHAR[]))
               union select event from analytics.custom_events where event is not null
           )
           select distinct coalesce(r.renamed_to, names.event)
           from names
           left join analytics.event_rules r on r.action = 'rename' and r.event = names.event
           where names.event not in (select event from analytics.event_rules where action = 'skip')""",
        {"other": list(OTHER_CATALOG_EVENTS.get(event_catalog, ()))},
    ).fetchall()
    return [r[0] for r in rows]


def segment_rules(plan: dict[str, Any]) -> dict[str, Any]:
    """The plan as Segment Protocols tracking plan rules (TRACK per event, IDENTIFY, GROUP), each
    a draft-7 schema over the message with the plan's schema under properties or traits."""

    def rule(kind: str, key: str | None, field: str, schema: dict[str, Any]) -> dict[str, Any]:
        inner = {k: v for k, v in schema.items() if k not in ("$schema", "title")}
        body = {"context": {}, "traits": {}, "properties": {}, field: inner}
        return {
            "key": key,
            "type": kind,
            "version": 1,
            "jsonSchema": {
                "$schema": SCHEMA_DIALECT,
                "type": "object",
                "properties": body,
                "required": [field],
            },
        }

    rules = [rule("TRACK", name, "properties", s) for name, s in plan["events"].items()]
    rules.append(rule("IDENTIFY", None, "traits", plan["identify"]))
    rules.append(rule("GROUP", None, "traits", plan["group"]))
    return {"rules": rules}


def write_plan(plan: dict[str, Any], path: str | None, fmt: str = "json-schema") -> str:
    """The plan as text (`json-schema`, or `segment` rules); written to `path` when given."""
    document = segment_rules(plan) if fmt == "segment" else plan
    text = json.dumps(document, indent=2, ensure_ascii=False, sort_keys=False) + "\n"
    if path:
        Path(path).expanduser().write_text(text)
    return text


def load_plan(path: str) -> dict[str, Any]:
    """A plan written by `tracking-plan` (json-schema format), for `[tracking_plan] path`."""
    try:
        plan = json.loads(Path(path).expanduser().read_text())
    except (OSError, ValueError) as exc:
        raise PlanError(f"tracking_plan.path: cannot read {path}: {exc}") from exc
    if not isinstance(plan, dict) or not isinstance(plan.get("events"), dict):
        raise PlanError(
            f"tracking_plan.path: {path} is not a plan written by `dodo-segment tracking-plan` "
            "(json-schema format)"
        )
    return plan


@functools.lru_cache(maxsize=256)
def _compiled(schema: str) -> Callable[[Any], Any]:
    """fastjsonschema's validator of a schema (JSON text), kept for the process's later runs:
    compiling the plan's schemas cost each run ~15 ms, and `listen`'s worker runs many."""
    return fastjsonschema.compile(json.loads(schema))


class PlanValidator:
    """Checks messages against a plan with compiled validators (fastjsonschema); excluded fields
    are never required (they are removed before sending)."""

    def __init__(self, plan: dict[str, Any], excluded: Sequence[str] = ()) -> None:
        self.plan = plan
        self._excluded = set(excluded)
        self._compiled: dict[str, Callable[[Any], Any]] = {}

    def _validator(self, name: str, schema: dict[str, Any]) -> Callable[[Any], Any]:
        found = self._compiled.get(name)
        if found is None:
            schema = {**schema, "$schema": SCHEMA_DIALECT}
            schema["required"] = [k for k in schema.get("required", []) if k not in self._excluded]
            found = self._compiled[name] = _compiled(json.dumps(schema))
        return found

    def _check(self, name: str, schema: dict[str, Any], document: dict[str, Any]) -> str | None:
        try:
            self._validator(name, schema)(document)
        except fastjsonschema.JsonSchemaValueException as exc:
            return f"tracking plan: {name}: {exc.message}"
        return None

    def track(self, event: str, properties: dict[str, Any]) -> str | None:
        """Why these properties break the plan of `event` (None: they follow it)."""
        schema = self.plan["events"].get(event)
        if schema is None:
            return f"tracking plan: event {event!r} is not in the plan"
        return self._check(f"track {event}", schema, properties)

    def traits(self, kind: str, traits: dict[str, Any]) -> str | None:
        """Why these identify or group traits break the plan (None: they follow it)."""
        schema = self.plan.get(kind)
        return None if schema is None else self._check(kind, schema, traits)
