"""Turn pages of API items into typed Arrow tables with the raw columns; set bad items aside."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

import orjson
import pyarrow as pa

from pipelines.settings import PRIMARY_KEYS, RAW_COLUMNS, SYNCED_AT_COLUMN, ColumnType

ARROW_TYPES: dict[ColumnType, pa.DataType] = {
    "text": pa.string(),
    "bigint": pa.int64(),
    "bool": pa.bool_(),
    "timestamp": pa.timestamp("us", tz="UTC"),
    "json": pa.string(),
}
NESTED_PREFIX = "customer__"


def dlt_column_hints(resource: str) -> dict[str, dict[str, Any]]:
    """dlt column hints for a raw table: JSON columns typed as json, timestamps as timestamptz."""
    hints: dict[str, dict[str, Any]] = {}
    for name, kind in RAW_COLUMNS[resource].items():
        if kind == "json":
            hints[name] = {"data_type": "json"}
        elif kind == "timestamp":
            hints[name] = {"data_type": "timestamp", "timezone": True}
        elif kind == "bigint":
            hints[name] = {"data_type": "bigint"}
        elif kind == "bool":
            hints[name] = {"data_type": "bool"}
        else:
            hints[name] = {"data_type": "text"}
    hints[PRIMARY_KEYS[resource]]["nullable"] = False
    hints[SYNCED_AT_COLUMN] = {"data_type": "timestamp", "timezone": True}
    return hints


def _top_level_fields(resource: str) -> set[str]:
    fields = {c for c in RAW_COLUMNS[resource] if not c.startswith(NESTED_PREFIX)}
    if any(c.startswith(NESTED_PREFIX) for c in RAW_COLUMNS[resource]):
        fields.add("customer")
    return fields


_TOP_LEVEL = {resource: _top_level_fields(resource) for resource in RAW_COLUMNS}


def _value(item: dict[str, Any], column: str) -> Any:
    if column.startswith(NESTED_PREFIX):
        nested = item.get("customer")
        return nested.get(column[len(NESTED_PREFIX) :]) if isinstance(nested, dict) else None
    return item.get(column)


def _json_text(value: Any) -> str | None:
    if value is None:
        return None
    return orjson.dumps(value).decode()


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


def _column(values: list[Any], kind: ColumnType) -> pa.Array:
    if kind == "json":
        return pa.array([_json_text(v) for v in values], pa.string())
    if kind == "timestamp":
        return pa.array(values, pa.string()).cast(ARROW_TYPES["timestamp"])
    if kind == "text":
        return pa.array([_text(v) for v in values], pa.string())
    return pa.array(values, ARROW_TYPES[kind])


def _table(resource: str, items: list[dict[str, Any]], synced_at: datetime) -> pa.Table:
    columns = RAW_COLUMNS[resource]
    arrays = {
        name: _column([_value(i, name) for i in items], kind) for name, kind in columns.items()
    }
    unknown = sorted({k for item in items for k in item} - _TOP_LEVEL[resource])
    for name in unknown:  # new API fields are data: keep them as text columns
        arrays[name] = pa.array([_text(i.get(name)) for i in items], pa.string())
    arrays[SYNCED_AT_COLUMN] = pa.array([synced_at] * len(items), ARROW_TYPES["timestamp"])
    return pa.table(arrays)


def to_arrow(
    resource: str,
    items: Iterable[dict[str, Any]],
    synced_at: datetime,
    overrides: dict[str, Any] | None = None,
) -> tuple[pa.Table | None, list[dict[str, Any]]]:
    """Build the raw Arrow table for a page of items and list the items that had to be set aside.

    An item without its primary key or created_at, or with a value of the wrong type, is
    rejected on its own with a reason; the rest of the page still loads.
    """
    key = PRIMARY_KEYS[resource]
    good: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    for item in items:
        if not isinstance(item, dict):
            rejected.append(_rejection(resource, item, "item is not a JSON object", synced_at))
        elif not item.get(key) or not isinstance(item.get(key), str):
            rejected.append(_rejection(resource, item, f"missing {key}", synced_at))
        elif not item.get("created_at"):
            rejected.append(_rejection(resource, item, "missing created_at", synced_at))
        else:
            good.append({**item, **overrides} if overrides else item)
    if not good:
        return None, rejected
    try:
        return _table(resource, good, synced_at), rejected
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
        pass
    # Some item holds a value of the wrong type: find it by building the items one by one.
    keep: list[dict[str, Any]] = []
    for item in good:
        try:
            _table(resource, [item], synced_at)
            keep.append(item)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as exc:
            reason = f"unparsable value: {str(exc).splitlines()[0][:200]}"
            rejected.append(_rejection(resource, item, reason, synced_at))
    return (_table(resource, keep, synced_at) if keep else None), rejected


def _rejection(resource: str, item: Any, reason: str, synced_at: datetime) -> dict[str, Any]:
    return {
        "resource": resource,
        "reason": reason,
        "record_json": orjson.dumps(item, default=str).decode(),
        "rejected_at": synced_at,
    }
