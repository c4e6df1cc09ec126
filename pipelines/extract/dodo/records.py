"""Turn pages of API items into typed Arrow tables with the raw columns; set bad items aside."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
from dlt.common.normalizers.naming.snake_case import NamingConvention

from pipelines.dodo_contract import PRIMARY_KEYS, RAW_COLUMNS, SYNCED_AT_COLUMN, ColumnType

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
    return _dumps_lossless(value)


def _json_texts(values: list[Any]) -> list[str | None]:
    dumps = orjson.dumps
    try:
        return [None if v is None else dumps(v).decode() for v in values]
    except TypeError:  # an integer beyond 64 bits somewhere: the slow, lossless path
        return [None if v is None else _dumps_lossless(v) for v in values]


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


EXTRA_FIELDS_COLUMN = "_extra_fields"
"""Unknown fields whose names would collide once dlt normalises them into column names (`Note`
and `note`, a name like a known column's or dlt's own, an empty name), kept together as one JSON
text column: nothing is lost and no load fails on a column clash."""
_NAMING = NamingConvention()
_RESERVED = frozenset({SYNCED_AT_COLUMN, EXTRA_FIELDS_COLUMN, "_dlt_id", "_dlt_load_id"})


@functools.cache
def _column_name(name: str) -> str:
    """The column name dlt's snake_case naming gives a field name ('' when it cannot)."""
    try:
        return _NAMING.normalize_path(name) if name else ""
    except Exception:  # a name the convention refuses: kept in _extra_fields
        return ""


def _unknown_columns(resource: str, items: list[Any]) -> dict[str, pa.Array]:
    """New API fields are data: each one as a text column, except those whose column names would
    collide, which go together into `_extra_fields` (JSON text)."""
    unknown = sorted(set().union(*items) - _TOP_LEVEL[resource])
    taken = {_column_name(c) for c in RAW_COLUMNS[resource]} | _RESERVED
    by_column: dict[str, list[str]] = {}
    for name in unknown:
        by_column.setdefault(_column_name(name), []).append(name)
    arrays: dict[str, pa.Array] = {}
    odd: list[str] = []
    for column, names in by_column.items():
        if column and column not in taken and len(names) == 1:
            name = names[0]
            arrays[name] = pa.array([_text(i.get(name)) for i in items], pa.string())
        else:
            odd.extend(names)
    if odd:
        extras = [{n: i[n] for n in odd if n in i} or None for i in items]
        arrays[EXTRA_FIELDS_COLUMN] = pa.array(
            [None if e is None else _dumps_lossless(e) for e in extras], pa.string()
        )
    return arrays


def fold_colliding_columns(resource: str, table: pa.Table) -> pa.Table:
    """Pages joined into one table may bring unknown fields whose column names collide across
    pages (each page alone was fine): fold those into `_extra_fields`, as one page would."""
    known = set(RAW_COLUMNS[resource]) | _RESERVED
    taken = {_column_name(c) for c in RAW_COLUMNS[resource]} | _RESERVED
    by_column: dict[str, list[str]] = {}
    for name in table.column_names:
        if name not in known:
            by_column.setdefault(_column_name(name), []).append(name)
    odd = [n for column, names in by_column.items()
           if not column or column in taken or len(names) > 1 for n in names]  # fmt: skip
    if not odd:
        return table
    has_extra = EXTRA_FIELDS_COLUMN in table.column_names
    earlier = table[EXTRA_FIELDS_COLUMN].to_pylist() if has_extra else [None] * table.num_rows
    folded = []
    for text, row in zip(earlier, table.select(odd).to_pylist(), strict=True):
        fields = orjson.loads(text) if text else {}
        fields.update({name: value for name, value in row.items() if value is not None})
        folded.append(_dumps_lossless(fields) if fields else None)
    table = table.drop_columns([*odd, *([EXTRA_FIELDS_COLUMN] if has_extra else [])])
    return table.append_column(EXTRA_FIELDS_COLUMN, pa.array(folded, pa.string()))


def _dumps_lossless(value: Any) -> str:
    """JSON text of any decoded JSON value, integers beyond 64 bits included."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value, ensure_ascii=False)


def _table(resource: str, items: list[dict[str, Any]], synced_at: datetime) -> pa.Table:
    # Column-wise list comprehensions over plain dict.get: the per-item Python work is the
    # extract's largest cost after the HTTP wait, so no helper call per value.
    columns = RAW_COLUMNS[resource]
    nested: list[Any] = []
    arrays: dict[str, pa.Array] = {}
    for name, kind in columns.items():
        arrays[name] = _column(_column_values(items, name, nested), kind)
    arrays.update(_unknown_columns(resource, items))
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
    arrays.update(_unknown_columns(resource, items))
    arrays[SYNCED_AT_COLUMN] = _synced_at(synced_at, len(items))
    return pa.table(arrays)


def to_arrow(
    resource: str,
    items: Iterable[dict[str, Any]],
    synced_at: datetime,
    overrides: dict[str, Any] | None = None,
) -> tuple[pa.Table | None, list[dict[str, Any]]]:
    """Build the raw Arrow table for a page of items and list the items that had to be set aside.

    An item without its primary key or created_at, with a value of the wrong type, or with a
    value outside any real range (`out_of_range`) is rejected on its own with a reason; the rest
    of the page still loads.
    """
    table, rows, rejected = _build(resource, items, synced_at, overrides)
    if table is None:
        return None, rejected
    bad = out_of_range(resource, table, rows)
    if bad:
        for index, reason in bad.items():
            rejected.append(_rejection(resource, rows[index], reason, synced_at))
        mask = pa.array([i not in bad for i in range(table.num_rows)], pa.bool_())
        table = table.filter(mask)
        if table.num_rows == 0:
            return None, rejected
    return table, rejected


REAL_TIMES = (datetime(1970, 1, 1, tzinfo=UTC), datetime(2200, 1, 1, tzinfo=UTC))
"""A timestamp outside these is no real payment's or subscription's (and dates far beyond them
overflow DuckDB's calendar once the models add a billing period)."""
REAL_MAGNITUDE = 10**15
"""No real amount, balance or count reaches 10^15 (ten trillion dollars in cents)."""
REAL_COUNTS: dict[str, tuple[int, int]] = {
    "trial_period_days": (0, 36_500),
    "payment_frequency_count": (0, 1_000),
    "subscription_period_count": (0, 1_000),
    "retry_attempt": (0, 1_000),
    "quantity": (0, 1_000_000_000),
}
"""Bounds of the counts the models do arithmetic with (a period of 1,000 years still fits)."""
NON_NEGATIVE: frozenset[tuple[str, str]] = frozenset({
    ("payments", "total_amount"), ("refunds", "amount"), ("products", "price"),
    ("subscriptions", "recurring_pre_tax_amount"), ("subscriptions", "trial_amount"),
})  # fmt: skip
"""Amounts that are never negative (ledger amounts and balances can be)."""


def out_of_range(resource: str, table: pa.Table, rows: list[dict[str, Any]]) -> dict[int, str]:
    """Rows (by index) holding a value outside any real range, with the reason."""
    masks: list[tuple[str, pa.Array, str]] = []
    for name, kind in RAW_COLUMNS[resource].items():
        if name not in table.column_names:
            continue
        column = table[name]
        if kind == "timestamp":
            low, high = (pa.scalar(t, ARROW_TYPES["timestamp"]) for t in REAL_TIMES)
            bad = pc.or_(pc.less(column, low), pc.greater_equal(column, high))
            masks.append((name, bad, f"{REAL_TIMES[0]:%Y} to {REAL_TIMES[1]:%Y}"))
        elif kind == "bigint":
            low, high = REAL_COUNTS.get(name, (-REAL_MAGNITUDE, REAL_MAGNITUDE))
            if (resource, name) in NON_NEGATIVE:
                low = 0
            bad = pc.or_(pc.less(column, low), pc.greater(column, high))
            masks.append((name, bad, f"{low} to {high}"))
    found: dict[int, str] = {}
    for name, bad, real in masks:
        if not pc.any(bad).as_py():
            continue
        for index in pc.indices_nonzero(pc.fill_null(bad, False)).to_pylist():
            value = rows[index].get(name)
            found.setdefault(index, f"value out of any real range: {name} = {value!r:.60} ({real})")
    if "service_periods" in table.column_names:
        # only rows whose JSON text may hold a date outside 1970-2199 are parsed in Python
        suspect = pc.match_substring_regex(table["service_periods"], SUSPECT_PERIOD)
        for index in pc.indices_nonzero(pc.fill_null(suspect, False)).to_pylist():
            reason = _period_out_of_range(rows[index].get("service_periods"))
            if reason and index not in found:
                found[index] = reason
    return found


SUSPECT_PERIOD = r'"(?:starts_at|ends_at)":\s*(?:[^"\s]|"(?:[^12]|1[0-8]|19[0-6]|2[2-9]))'
"""A service-period date that is not text, or whose year is not 1970-2199."""


def _period_out_of_range(periods: Any) -> str | None:
    """A service period whose dates are not real ones (or not dates at all)."""
    if not isinstance(periods, list):
        return None
    for period in periods:
        if not isinstance(period, dict):
            continue
        for field in ("starts_at", "ends_at"):
            text = period.get(field)
            try:
                moment = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
                if moment.tzinfo is None:
                    moment = moment.replace(tzinfo=UTC)
            except ValueError:
                return f"unparsable service_periods[].{field}: {text!r:.60}"
            if not REAL_TIMES[0] <= moment < REAL_TIMES[1]:
                return f"value out of any real range: service_periods[].{field} = {text!r:.60}"
    return None


def _build(
    resource: str,
    items: Iterable[dict[str, Any]],
    synced_at: datetime,
    overrides: dict[str, Any] | None = None,
) -> tuple[pa.Table | None, list[dict[str, Any]], list[dict[str, Any]]]:
    """The table of the page's loadable items, those items (one per row), the rejected ones."""
    if not isinstance(items, list):
        items = list(items)
    if not overrides and items:
        table = _fast_table(resource, items, synced_at)
        if table is not None:
            return table, items, []
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
        return None, [], rejected
    try:
        return _table(resource, good, synced_at), good, rejected
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
    return (_table(resource, keep, synced_at) if keep else None), keep, rejected


def _rejection(resource: str, item: Any, reason: str, synced_at: datetime) -> dict[str, Any]:
    return {
        "resource": resource,
        "reason": reason,
        "record_json": _record_text(item),
        "rejected_at": synced_at,
    }


def _record_text(item: Any) -> str:
    try:
        return orjson.dumps(item, default=str).decode()
    except TypeError:  # an integer beyond 64 bits
        return json.dumps(item, default=str, ensure_ascii=False)
