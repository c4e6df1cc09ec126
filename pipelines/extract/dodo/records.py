"""Turn pages of API items into typed Arrow tables with the raw columns; set bad items aside."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc

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


def item_fields(resource: str) -> set[str]:
    """The top-level fields of a list item that have a raw column (`customer` for its nest)."""
    fields = {c for c in RAW_COLUMNS[resource] if not c.startswith(NESTED_PREFIX)}
    if any(c.startswith(NESTED_PREFIX) for c in RAW_COLUMNS[resource]):
        fields.add("customer")
    return fields


_TOP_LEVEL = {resource: item_fields(resource) for resource in RAW_COLUMNS}


def _scalar_struct(resource: str) -> pa.StructType:
    """The non-JSON columns of a resource as one struct, for a conversion done in C++
    (timestamps as text first; nested customer fields as a child struct)."""
    top: list[pa.Field] = []
    nested: list[pa.Field] = []
    for name, kind in RAW_COLUMNS[resource].items():
        if kind == "json":
            continue
        arrow = pa.string() if kind == "timestamp" else ARROW_TYPES[kind]
        if name.startswith(NESTED_PREFIX):
            nested.append(pa.field(name[len(NESTED_PREFIX) :], arrow))
        else:
            top.append(pa.field(name, arrow))
    if nested:
        top.append(pa.field("customer", pa.struct(nested)))
    return pa.struct(top)


_SCALAR_STRUCTS = {resource: _scalar_struct(resource) for resource in RAW_COLUMNS}


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


def _json_texts(values: list[Any]) -> list[str | None]:
    dumps = orjson.dumps
    return [None if v is None else dumps(v).decode() for v in values]


def _column(values: list[Any], kind: ColumnType) -> pa.Array:
    if kind == "json":
        return pa.array(_json_texts(values), pa.string())
    if kind == "timestamp":
        return pa.array(values, pa.string()).cast(ARROW_TYPES["timestamp"])
    if kind == "text":
        try:  # the common case: every value already a string (or null), converted in C++
            return pa.array(values, pa.string())
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            return pa.array([_text(v) for v in values], pa.string())
    return pa.array(values, ARROW_TYPES[kind])


def _column_values(items: list[dict[str, Any]], name: str, nested: list[Any]) -> list[Any]:
    """One raw column's values across a page; `customer__x` reads the nested customer object.

    `nested` caches the page's customer objects between columns (filled on first use).
    """
    if not name.startswith(NESTED_PREFIX):
        return [i.get(name) for i in items]
    if not nested:
        nested.extend(i.get("customer") for i in items)
    field = name[len(NESTED_PREFIX) :]
    return [c.get(field) if c.__class__ is dict else None for c in nested]


def _table(resource: str, items: list[dict[str, Any]], synced_at: datetime) -> pa.Table:
    # Column-wise list comprehensions over plain dict.get: the per-item Python work is the
    # extract's largest cost after the HTTP wait, so no helper call per value.
    columns = RAW_COLUMNS[resource]
    nested: list[Any] = []
    arrays: dict[str, pa.Array] = {}
    for name, kind in columns.items():
        arrays[name] = _column(_column_values(items, name, nested), kind)
    unknown = sorted(set().union(*items) - _TOP_LEVEL[resource])
    for name in unknown:  # new API fields are data: keep them as text columns
        arrays[name] = pa.array([_text(i.get(name)) for i in items], pa.string())
    arrays[SYNCED_AT_COLUMN] = _synced_at(synced_at, len(items))
    return pa.table(arrays)


def _synced_at(synced_at: datetime, rows: int) -> pa.Array:
    return pa.repeat(pa.scalar(synced_at, ARROW_TYPES["timestamp"]), rows)


def _fast_table(resource: str, items: list[Any], synced_at: datetime) -> pa.Table | None:
    """The table of a clean page, with the per-value work in Arrow's C++ converter; None when
    some item needs the item-by-item path (not an object, no key, a value of the wrong type)."""
    struct = _SCALAR_STRUCTS[resource]
    try:
        parsed = pa.array(items, struct)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
        return None
    fields = dict(zip(struct.names, parsed.flatten(), strict=True))
    for required in (PRIMARY_KEYS[resource], "created_at"):
        column = fields[required]
        if column.null_count or pc.any(pc.equal(column, "")).as_py():
            return None
    if "customer" in fields:
        nested_struct = struct.field("customer").type
        for field, column in zip(nested_struct, fields.pop("customer").flatten(), strict=True):
            fields[NESTED_PREFIX + field.name] = column
    nested: list[Any] = []
    arrays: dict[str, pa.Array] = {}
    try:
        for name, kind in RAW_COLUMNS[resource].items():
            if kind == "json":
                values = _column_values(items, name, nested)
                arrays[name] = pa.array(_json_texts(values), pa.string())
            elif kind == "timestamp":
                arrays[name] = fields[name].cast(ARROW_TYPES["timestamp"])
            else:
                arrays[name] = fields[name]
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
        return None
    unknown = sorted(set().union(*items) - _TOP_LEVEL[resource])
    for name in unknown:  # new API fields are data: keep them as text columns
        arrays[name] = pa.array([_text(i.get(name)) for i in items], pa.string())
    arrays[SYNCED_AT_COLUMN] = _synced_at(synced_at, len(items))
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
    if not isinstance(items, list):
        items = list(items)
    if not overrides and items:
        table = _fast_table(resource, items, synced_at)
        if table is not None:
            return table, []
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
