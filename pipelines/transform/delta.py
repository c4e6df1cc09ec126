"""Delta build: rebuild only the touched customers' rows of each model, from their whole history.

Each model declares its grain in a header (`-- grain: customer`, `-- grain: customer by user_id`,
`subscription`, `dispute`, `ledger_object`, or `global`; docs/models.md lists them). A user model
without the header is global. In a delta build, a keyed model's rows for the touched keys are
deleted and recomputed by its own SQL over its inputs narrowed to the touched customers (all
their rows, never a time slice), NULL-safely; a global model is rebuilt in full; views are left
as they are. The whole build is one transaction.

A full build is chosen instead (`plan_delta` says why) on a first build, when the SQL, catalog,
event rules, settings or raw columns changed since the last one, when a month began, or when the
touched customers are more than `CROSSOVER` of all (bench/delta_bench.py measures it).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol

import duckdb

from pipelines import dodo_contract
from pipelines.transform import touched
from pipelines.transform.previous import PreviousState, in_touched_users
from pipelines.transform.touched import TOUCHED, in_scope, in_touched, rows_where
from pipelines.transform.user_models import EXTENSION_POINTS

SCHEMA = dodo_contract.ANALYTICS_SCHEMA
STATE_TABLE = f"{SCHEMA}._delta_state"
"""One row: the fingerprint (SQL, catalog, rules, raw columns) of the build the snapshot matches."""
GRAINS = ("customer", "user", "subscription", "dispute", "ledger_object", "day", "counts", "global")
CROSSOVER = 0.05
"""Above this share of touched customers a full build is cheaper: bench/delta_bench.py (models
alone, each build in its own process) measured the delta build at 1% / 3% / 5% / 10% of the
customers against the full build: 60k payments 2.16 / 2.26 / 2.54 / 3.29 s vs 2.29 s (load
~3.4); in the first pass, 300k: 10% broke even. The break-even share rises with the history (a
full build grows with it, a delta with the touched rows); below it at small sizes both take ~2
s, so the threshold favours the large warehouses the delta is for."""

RATES_MODEL = "int_currency_rates"
PAYMENTS_USD_MODEL = "int_payments_usd"
KNOWN_GLOBALS = frozenset({"event_catalog", "int_as_of", "int_results_valid_until", RATES_MODEL})
"""Global models whose effect on keyed models is known: the catalog is constant, `as_of`
moves results only through the time facts `plan_delta` touches, and a moved fallback USD rate
touches the customers whose payments it converts (`touch_rate_changes`)."""
_GRAIN = re.compile(r"^(\w+)(?:\s+by\s+(\w+))?$")
_SCOPE = "delta_scope_"
_SCOPE_OBJECTS = "delta_scope_objects"

_KEY_COLUMNS = {
    "customer": "customer_id",
    "user": "user_id",
    "subscription": "subscription_id",
    "dispute": "dispute_id",
    "ledger_object": "object_id",
    "day": "date",
}


def key_column(kind: str) -> str:
    """The key column a grain declares by default (`customer` -> customer_id, ...)."""
    return _KEY_COLUMNS[kind]


def key_predicate(grain: str, column: str) -> str:
    """SQL: the row's key is one of the touched keys of its grain."""
    if grain == "customer":
        return in_touched(column)
    if grain == "user":
        return in_touched_users(column)
    if grain == "subscription":
        scoped = f"{_SCOPE}stg_subscriptions"
        return in_scope(column, scoped, "subscription_id", "delta_every_subscriptions")
    if grain == "dispute":
        return in_scope(column, f"{_SCOPE}stg_disputes", "dispute_id", "delta_every_disputes")
    if grain == "ledger_object":
        return in_scope(column, _SCOPE_OBJECTS, "object_id", "delta_every_objects")
    if grain == "day":
        return in_touched_days(column)
    raise ValueError(f"no key predicate for grain {grain!r}")


_INPUT_SCOPES: dict[str, tuple[str, str]] = {
    "stg_customers": ("customer", "customer_id"),
    "stg_payments": ("customer", "customer_id"),
    "stg_payment_subscriptions": ("customer", "customer_id"),
    "stg_subscriptions": ("customer", "customer_id"),
    "stg_subscription_history": ("subscription", "subscription_id"),
    "stg_dispute_history": ("dispute", "dispute_id"),
    "stg_balance_ledger": ("ledger_object", "reference_object_id"),
}
"""Staging relations narrowed to the touched customers' rows, and how (grain, key column).
Refunds and disputes reach a customer through their payment (below)."""


@dataclass(frozen=True)
class Grain:
    """A model's grain: the kind of key its rows are rebuilt by, and the column holding it."""

    kind: str
    column: str | None = None


class Model(Protocol):
    """What the delta build reads of a model (`pipelines.transform.runner.Model`)."""

    name: str
    path: Path
    sql: str
    materialized: str
    grain: Grain
    replaces: bool


def parse_grain(declared: str | None) -> Grain:
    """The grain of a `-- grain:` header value (None: global); ValueError when unknown."""
    if not declared:
        return Grain("global")
    match = _GRAIN.match(declared.strip().lower())
    if not match or match.group(1) not in GRAINS:
        raise ValueError(f"unknown grain {declared!r} (one of {', '.join(GRAINS)})")
    kind = match.group(1)
    if kind in ("global", "counts"):
        return Grain(kind)
    return Grain(kind, match.group(2) or _KEY_COLUMNS[kind])


def model_grain(model: Model) -> Grain:
    """The grain a model declares; global when it declares none."""
    return model.grain


@dataclass
class DeltaPlan:
    """What a run will do: `delta` True for a delta build; `reason` says why not otherwise."""

    delta: bool
    reason: str
    touched: int = 0
    customers: int = 0
    changed: int = 0


def config_fingerprint(con: duckdb.DuckDBPyConnection, base: str) -> str:
    """The build fingerprint without the raw rows: `base` (SQL, catalog, rules), the raw
    tables' columns (a schema migration changes them) and what the snapshot's format depends
    on."""
    digest = hashlib.sha256(base.encode())
    digest.update(repr(sorted(touched.raw_columns(con).items())).encode())
    digest.update(f"{dodo_contract.WAREHOUSE_SCHEMA_VERSION}:{touched.SNAPSHOT_FORMAT}".encode())
    # the snapshot's hashes are DuckDB's `hash`, which another DuckDB may compute otherwise
    digest.update(duckdb.__version__.encode())
    return digest.hexdigest()


def forget_state(con: duckdb.DuckDBPyConnection) -> None:
    """Invalidate the delta state (a full build is under way, or ran without a snapshot)."""
    con.execute(f"drop table if exists {STATE_TABLE}")


def remember_state(con: duckdb.DuckDBPyConnection, fingerprint: str, full: bool) -> None:
    """After a clean build: snapshot the raw data (in full after a full build) and keep the
    fingerprint the snapshot belongs to."""
    if full or not touched.has_snapshot(con):
        touched.write_snapshot(con)
    else:
        touched.update_snapshot(con)
    con.execute(f"create or replace table {STATE_TABLE} (fingerprint varchar)")
    con.execute(f"insert into {STATE_TABLE} values (?)", [fingerprint])


def plan_delta(
    con: duckdb.DuckDBPyConnection,
    fingerprint: str,
    models: Sequence[Model],
    as_of_sql: str,
    staging: Mapping[str, str],
    crossover: float = CROSSOVER,
) -> DeltaPlan:
    """Decide between a delta and a full build; for a delta, fill `delta_touched`
    (`staging`: `staging_sqls`)."""
    try:
        row = con.execute(f"select fingerprint from {STATE_TABLE}").fetchone()
    except duckdb.Error:
        return DeltaPlan(False, "first build")
    if not row or row[0] != fingerprint or not touched.has_snapshot(con):
        return DeltaPlan(False, "models, settings or raw columns changed")
    names = {m.name for m in models}
    replaced = sorted(m.name for m in models if m.replaces and m.name not in EXTENSION_POINTS)
    if replaced:  # the lineage and the narrowed inputs are the product models'
        return DeltaPlan(False, f"product model(s) replaced: {', '.join(replaced)}")
    try:
        old = con.execute(f"select as_of from {SCHEMA}.int_as_of").fetchone()
        new = con.execute(f"select as_of from (\n{as_of_sql}\n)").fetchone()
    except duckdb.Error:
        return DeltaPlan(False, "no previous build")
    if not old or not new or "int_subscriptions" not in names:
        return DeltaPlan(False, "no previous build")
    month = "date_trunc('month', timezone('UTC', ?::timestamptz))"
    same_month = con.execute(f"select {month} = {month}", [old[0], new[0]]).fetchone()
    if not same_month or not same_month[0]:
        return DeltaPlan(False, "a month began")
    changed = touched.find_changes(con)
    touched.touch_changed(con, staging)
    # time alone: a trial ended or a paid period began or ended since the last build's as_of
    low, high = min(old[0], new[0]), max(old[0], new[0])
    touched.add_touched(
        con,
        f"""select customer_id from {SCHEMA}.int_subscriptions
            where trial_end_date between ?::timestamptz and ?::timestamptz
            union select customer_id from {SCHEMA}.int_service_periods
            where period_end between ?::timestamptz and ?::timestamptz
               or period_start between ?::timestamptz and ?::timestamptz""",
        [low, high, low, high, low, high],
    )
    row = con.execute(f"select count(*) from {SCHEMA}.customer_traits").fetchone()
    customers = int(row[0]) if row else 0
    count = touched.count_touched(con)
    plan = DeltaPlan(True, "delta", touched=count, customers=customers, changed=changed)
    if count > crossover * max(customers, 1):
        plan.delta, plan.reason = False, f"{count} of {customers} customers touched"
    return plan


_EVERY = {
    "payments": ("payment_id", f"select payment_id from {SCHEMA}.stg_payments"),
    "subscriptions": ("subscription_id", f"select subscription_id from {SCHEMA}.stg_subscriptions"),
    "disputes": ("dispute_id", f"select dispute_id from {SCHEMA}.stg_disputes"),
    "objects": (
        "object_id",
        f"select payment_id from {SCHEMA}.stg_payments "
        f"union all select refund_id from {SCHEMA}.stg_refunds",
    ),
}
"""Every id of each kind (temp tables `delta_every_<kind>`): an id outside them is an orphan."""


def _in_scoped_payments(expr: str) -> str:
    return in_scope(expr, f"{_SCOPE}stg_payments", "payment_id", "delta_every_payments")


_RAW_SCOPES: tuple[tuple[str, str, Callable[[str], str]], ...] = (
    ("stg_customers", "customer_id", in_touched),
    ("stg_payments", "customer_id", in_touched),
    ("stg_subscriptions", "customer_id", in_touched),
    ("stg_refunds", "payment_id", _in_scoped_payments),
    ("stg_disputes", "payment_id", _in_scoped_payments),
    ("stg_subscription_history", "subscription_id", partial(key_predicate, "subscription")),
    ("stg_dispute_history", "dispute_id", partial(key_predicate, "dispute")),
    ("stg_balance_ledger", "reference_object_id", partial(key_predicate, "ledger_object")),
)
"""The staging relations read from raw, narrowed to the touched customers' rows: (view, key
column, the predicate on a key) in order (a later one reads the earlier ones); materialized as
temp tables, refreshed when more customers are touched (`refresh_scopes`)."""
_RAW_SCOPE_NAMES = frozenset(name for name, _, _ in _RAW_SCOPES)
_RAW_SCOPE_KEYS: dict[tuple[str, str], touched.KeyList] = {
    ("stg_payments", "customer_id"): touched.touched_keys(),
    ("stg_balance_ledger", "reference_object_id"): touched.scope_keys(_SCOPE_OBJECTS, "object_id"),
}
"""The keys the predicates of `_RAW_SCOPES` over a hashed raw key accept, by (view, key
column): `in_touched` and `key_predicate('ledger_object')` (`staging_rows`)."""


def staging_sqls(
    con: duckdb.DuckDBPyConnection, models: Sequence[Model], product_dir: Path
) -> dict[str, str]:
    """The product's own staging views (files under `product_dir`) whose raw rows
    `touched.staging_rows` reads narrowed: view -> its model's SQL."""
    product = product_dir.resolve()
    own = {
        m.name: m.sql
        for m in models
        if m.materialized == "view" and m.path.resolve().is_relative_to(product)
    }
    return touched.narrowable_staging(con, own)


def _fill_every(con: duckdb.DuckDBPyConnection) -> None:
    """The `delta_every_<kind>` tables: full when rows without a customer (NULL) are touched
    (their orphans are then in scope), else empty (no predicate reads them then)."""
    row = con.execute(f"select count(*) from {TOUCHED} where customer_id is null").fetchone()
    full = bool(row and row[0])
    for kind, (column, query) in _EVERY.items():
        body = query if full else f"select null::varchar as {column} where false"
        con.execute(f"create or replace temp table delta_every_{kind}({column}) as {body}")


_SCOPE_KEYS = {
    "stg_payments": "payment_id",
    "stg_subscriptions": "subscription_id",
    "stg_disputes": "dispute_id",
}
"""The scoped relations `in_scope` predicates read (by this key), as session variables."""


def refresh_scopes(con: duckdb.DuckDBPyConnection, staging: Mapping[str, str]) -> None:
    """(Re)materialize the narrowed staging relations for the current touched customers
    (`staging`: view -> its model's SQL, `staging_sqls`)."""
    _fill_every(con)
    for name, column, predicate_of in _RAW_SCOPES:
        keys = _RAW_SCOPE_KEYS.get((name, column))
        rows = touched.staging_rows(staging, name, column, predicate_of, keys=keys)
        con.execute(f"create or replace temp table {_SCOPE}{name} as {rows}")
        if name in _SCOPE_KEYS:
            touched.sync_scope_ids(con, f"{_SCOPE}{name}", _SCOPE_KEYS[name])
        if name == "stg_disputes":  # the objects come before the ledger that reads them
            con.execute(
                f"create or replace temp table {_SCOPE_OBJECTS} as "
                f"select payment_id as object_id from {_SCOPE}stg_payments "
                f"union all select refund_id from {_SCOPE}stg_refunds"
            )
            touched.sync_scope_ids(con, _SCOPE_OBJECTS, "object_id")


def open_scopes(
    con: duckdb.DuckDBPyConnection, models: Sequence[Model], staging: Mapping[str, str]
) -> dict[str, str]:
    """Create the relations that narrow each input to the touched customers' rows (`staging`:
    `staging_sqls`); return model name -> relation name for the references to rewrite."""
    refresh_scopes(con, staging)
    scopes = {name: f"{_SCOPE}{name}" for name, _, _ in _RAW_SCOPES}

    tables = {m.name for m in models if m.materialized == "table"}

    def scope(name: str, predicate: str) -> None:
        rows = rows_where(f"{SCHEMA}.{name}", predicate, table=name in tables)
        con.execute(f"create or replace temp view {_SCOPE}{name} as {rows}")
        scopes[name] = f"{_SCOPE}{name}"

    for name, (grain, column) in _INPUT_SCOPES.items():
        if name not in scopes:
            scope(name, key_predicate(grain, column))
    for model in models:
        grain = model_grain(model)
        if model.name in scopes:
            continue
        if grain.kind != "global" and grain.column:
            scope(model.name, scope_predicate(model))
    return scopes


def keeps_scope(model: Model, scopes: dict[str, str]) -> bool:
    """Whether `rebuild_keys` may keep the model's rows for its scope: the scope is a view of
    its table's rows under the very predicate the rebuild deletes and inserts by."""
    grain = model_grain(model)
    return (
        model.name in scopes
        and model.name not in _RAW_SCOPE_NAMES
        and grain.column is not None
        and scope_predicate(model) == key_predicate(grain.kind, grain.column)
    )


def scope_predicate(model: Model) -> str:
    """SQL: a row of the model is in its scope (`open_scopes`)."""
    if model.name in _INPUT_SCOPES:
        return key_predicate(*_INPUT_SCOPES[model.name])
    grain = model_grain(model)
    assert grain.column is not None
    return key_predicate(grain.kind, grain.column)


_NOT_ALIASES = frozenset(
    "where join left right inner outer full cross natural on using group order having limit "
    "union except intersect window qualify positional asof anti semi lateral".split()
)
_TABLE_REFERENCE = re.compile(rf"\b{SCHEMA}\.([a-z_][a-z0-9_]*)\b(\s*)([a-z_]*)", re.IGNORECASE)


def scoped_sql(model: Model, scopes: dict[str, str]) -> str:
    """The model's SQL reading the narrowed inputs instead of the whole tables (a reference
    without an alias keeps the relation's name as its alias)."""
    return rewrite_references(model.sql, scopes)


def referenced(sql: str) -> set[str]:
    """The analytics relations a query reads (comments left out)."""
    body = re.sub(r"--[^\n]*", "", sql)
    return {m.group(1).lower() for m in _TABLE_REFERENCE.finditer(body)}


def rewrite_references(sql: str, scopes: dict[str, str]) -> str:
    """`sql` reading `scopes[name]` wherever it reads `analytics.<name>` (comments left out)."""

    def swap(match: re.Match[str]) -> str:
        name, spacing, follower = match.group(1).lower(), match.group(2), match.group(3)
        if name not in scopes:
            return match.group(0)
        aliased = follower != "" and follower.lower() not in _NOT_ALIASES
        return scopes[name] + ("" if aliased else f" as {name}") + spacing + follower

    body = re.sub(r"--[^\n]*", "", sql).strip().rstrip(";")
    return _TABLE_REFERENCE.sub(swap, body)


def rebuild_keys(
    con: duckdb.DuckDBPyConnection, model: Model, scopes: dict[str, str], keep: bool = False
) -> None:
    """Delete the model's rows of the touched keys and insert them recomputed. With `keep`,
    those rows are kept in a temp table and the model's scope reads them there: they are
    exactly the touched keys' rows of the table, which its readers would otherwise look up in
    it (a key-column scan each; `reopen_scope` once the touched keys grow)."""
    grain = model_grain(model)
    assert grain.column is not None
    predicate = key_predicate(grain.kind, f'"{grain.column}"')
    table = f"{SCHEMA}.{model.name}"
    rebuilt = f"select * from (\n{scoped_sql(model, scopes)}\n) where {predicate}"
    con.execute(f"delete from {table} where {predicate}")
    if not keep:
        con.execute(f"insert into {table} by name {rebuilt}")
        return
    kept = f"{_REBUILT}{model.name}"
    con.execute(f"create or replace temp table {kept} as {rebuilt}")
    con.execute(f"insert into {table} by name select * from {kept}")
    con.execute(f"create or replace temp view {scopes[model.name]} as select * from {kept}")


_REBUILT = "delta_rebuilt_"
"""Temp tables `delta_rebuilt_<model>`: the rows a delta build inserted for the touched keys."""


def reopen_scope(con: duckdb.DuckDBPyConnection, model: Model, scopes: dict[str, str]) -> None:
    """Point a model's scope that `rebuild_keys` kept back at the touched keys' rows of its
    table (the touched keys grew since: the kept rows lack the new keys' rows)."""
    rows = rows_where(f"{SCHEMA}.{model.name}", scope_predicate(model))
    con.execute(f"create or replace temp view {scopes[model.name]} as {rows}")
    con.execute(f"drop table if exists {_REBUILT}{model.name}")


def snapshot_rates(con: duckdb.DuckDBPyConnection) -> None:
    """Keep the fallback USD rates (`int_currency_rates`, one row per currency) before they are
    rebuilt."""
    con.execute(
        f"create or replace temp table delta_old_rates as select * from {SCHEMA}.{RATES_MODEL}"
    )


def rebuild_rates(con: duckdb.DuckDBPyConnection, model: Model) -> bool:
    """Rebuild the fallback USD rates (each currency's latest ledger payment) from the ledger
    objects this build rebuilt plus the payments the rates came from (`rate_object_id`): the
    same rates as from every object, since an object not rebuilt is as the last build saw it.
    False when it cannot be: a rate came from a rebuilt object (the latest may now be one of
    the others)."""
    predicate = key_predicate("ledger_object", "rate_object_id")
    rebuilt_source = con.execute(
        f"select count(*) from delta_old_rates where rate_object_id is null or {predicate}"
    ).fetchone()
    if not rebuilt_source or rebuilt_source[0]:
        return False
    predicate = key_predicate("ledger_object", "object_id")
    rows = rows_where(
        f"{SCHEMA}.int_ledger_by_object",
        f"({predicate} or object_id in (select rate_object_id from delta_old_rates))",
    )
    scopes = {"int_ledger_by_object": f"(\n{rows}\n)"}
    con.execute(
        f"create or replace table {SCHEMA}.{RATES_MODEL} as "
        f"select * from (\n{scoped_sql(model, scopes)}\n)"
    )
    return True


def touch_rate_changes(con: duckdb.DuckDBPyConnection) -> None:
    """A currency's fallback rate moved: touch the customers with a succeeded payment in it
    that the ledger does not convert itself, as `int_payments_usd.usd_source` says (its rows of
    an untouched customer are as the last build left them, and still right; it is the
    product's, since a replaced product model makes the build full)."""
    con.execute(
        f"""create or replace temp table delta_moved_rates as
        select currency from (
            (select currency, usd_rate from {SCHEMA}.{RATES_MODEL}
             except select currency, usd_rate from delta_old_rates)
            union all
            (select currency, usd_rate from delta_old_rates
             except select currency, usd_rate from {SCHEMA}.{RATES_MODEL})
        )"""
    )
    moved = con.execute("select count(*) from delta_moved_rates").fetchone()
    if moved and moved[0]:
        touched.add_touched(
            con,
            f"""select customer_id from {SCHEMA}.{PAYMENTS_USD_MODEL}
                where coalesce(usd_source, 'fallback_rate') = 'fallback_rate'
                  and currency in (select currency from delta_moved_rates)""",
        )
    touched.close_over_subscriptions(con)


def snapshot_quarantined_users(con: duckdb.DuckDBPyConnection, previous: PreviousState) -> None:
    """Keep the user ids quarantined by the last build (identify_outbox leaves them out); the
    build has emptied `quarantined_rows` by now, so they are read from the previous state."""
    previous.copy(
        con,
        "delta_old_quarantine",
        f"select key from {SCHEMA}.quarantined_rows where key_kind = 'user_id'",
    )


def touch_quarantine_changes(con: duckdb.DuckDBPyConnection) -> None:
    """Touch the customers whose quarantine as a user id started or ended in this build."""
    current = f"select key from {SCHEMA}.quarantined_rows where key_kind = 'user_id'"
    touched.add_touched(
        con,
        f"(select key from delta_old_quarantine except {current}) "
        f"union ({current} except select key from delta_old_quarantine)",
    )


def touch_global_changes(con: duckdb.DuckDBPyConnection, model: Model, previous: str) -> bool:
    """A global model with a customer_id column was rebuilt: touch the customers whose rows
    differ from `previous` (a temp copy). False when it has no customer_id column (then its
    keyed dependents must be rebuilt in full)."""
    columns = {
        r[0]
        for r in con.execute(
            "select column_name from information_schema.columns "
            "where table_schema = ? and table_name = ?",
            [SCHEMA, model.name],
        ).fetchall()
    }
    if "customer_id" not in columns:
        return False
    table = f"{SCHEMA}.{model.name}"
    touched.add_touched(
        con,
        f"select customer_id from ((select * from {table} except all select * from {previous}) "
        f"union all (select * from {previous} except all select * from {table}))",
    )
    touched.close_over_subscriptions(con)
    return True


TOUCHED_DAYS = "delta_touched_days"
"""Session variable: the UTC days whose rows of a `day` grain model a delta build rebuilds."""


def in_touched_days(expr: str) -> str:
    """SQL: `expr` (a date) is a touched day; the NULL day (payments without a date) is always
    rebuilt (finding them reads one column)."""
    return f"(list_contains(getvariable('{TOUCHED_DAYS}'), {expr}) or {expr} is null)"


_DAY = "cast(timezone('UTC', created_at) as date)"
_DAY_SCOPES = (
    ("stg_refunds", "{days}"),
    ("stg_payments", "{days} or list_contains(getvariable('delta_day_refunded'), payment_id)"),
    (
        "int_ledger_by_object",
        f"object_id in (select payment_id from {{payments}} "
        f"union all select refund_id from {_SCOPE}day_stg_refunds)",
    ),
)
"""The inputs of a `day` grain model (revenue_daily) narrowed to the touched days: the refunds
and payments made on them, the payments those refunds are of (their currency and amount), and
the ledger sums of all of these (in order: a later one reads the earlier ones)."""


_DAY_TABLES = frozenset({"int_ledger_by_object"})
"""The day scopes' inputs that are tables (the others are staging views)."""


_DAY_RANGES_MAX = 31
"""Up to this many touched days, the day scope of the payments reads each day as a range of
`created_at`; beyond it, by the day of every payment."""


def _day_payments(
    con: duckdb.DuckDBPyConnection, predicate: str, staging: Mapping[str, str]
) -> tuple[str, bool]:
    """SQL: the payments the day scope holds (`predicate`, `_DAY_SCOPES`' stg_payments one),
    each touched day read as a range of `created_at`, a filter the scan applies and whose row
    groups of other times it skips by their min and max (at 1M payments over the 100k business,
    one day's 741 payments: 11 ms against 199 ms for the day of every payment); then those
    without a time and those the refunds made on those days are of, each once (by row id,
    `touched.staging_rows`). And whether it reads by ranges (then a copy is cheap)."""
    row = con.execute(
        f"select len(getvariable('{TOUCHED_DAYS}')), len(getvariable('delta_day_refunded'))"
    ).fetchone()
    days, refunded = (int(row[0] or 0), int(row[1] or 0)) if row else (0, 0)
    stg_payments = f"{SCHEMA}.stg_payments"
    on_touched_days = in_touched_days(_DAY)
    if days > _DAY_RANGES_MAX:
        return f"select * from {stg_payments} where {predicate}", False
    parts = []
    for index in range(1, days + 1):
        touched_day = f"getvariable('{TOUCHED_DAYS}')[{index}]"
        parts.append(
            f"select * from {stg_payments} "
            f"where created_at >= timezone('UTC', {touched_day}::timestamp) "
            f"and created_at < timezone('UTC', ({touched_day} + 1)::timestamp)"
        )
    parts.append(f"select * from {stg_payments} where created_at is null")
    if refunded:
        refunded_payments = touched.staging_rows(
            staging, "stg_payments", "payment_id",
            lambda key: f"list_contains(getvariable('delta_day_refunded'), {key})",
            keys=touched.KeyList("getvariable('delta_day_refunded')"),
        )  # fmt: skip
        parts.append(
            f"select * from ({refunded_payments}) as refunded "
            f"where not coalesce({on_touched_days}, false)"
        )
    return "\nunion all\n".join(parts), True


def rebuild_days(con: duckdb.DuckDBPyConnection, model: Model, staging: Mapping[str, str]) -> None:
    """Rebuild a `day` grain model's rows of the days whose sums may have moved: the days the
    changed payments and refunds count on, now and at the last build (the snapshot's owners,
    `_delta_owners.day`), those of the refunds of a changed payment (its currency and amount
    are theirs), and those of the payments and refunds a changed ledger entry references, or
    referenced. Every other day's payments, refunds and ledger sums are as they were."""
    changed, old, new = touched.CHANGED, touched.OLD_OWNERS, touched.NEW_OWNERS
    # the payments and refunds a changed ledger entry references, before and now, and the
    # refunds of a changed payment: all among the entities touch_changed reached
    con.execute(
        f"""create or replace temp table delta_day_objects as
        with changed_ledger as (select id from {changed} where tbl = 'balance_ledger'),
        changed_payments as (select id from {changed} where tbl = 'payments'),
        reached as (select * from {old} union all select * from {new})
        select id from {changed} where tbl in ('payments', 'refunds')
        union select ref from reached where tbl = 'balance_ledger'
            and id in (select id from changed_ledger)
        union select id from reached where tbl = 'refunds'
            and ref in (select id from changed_payments)"""
    )
    con.execute(
        "set variable delta_day_objects = (select coalesce(list(id), []::varchar[]) "
        "from delta_day_objects where id is not null)"
    )
    objects = "list_contains(getvariable('delta_day_objects'), {})"
    payments = touched.staging_rows(
        staging, "stg_payments", "payment_id", objects.format, f"{_DAY} as day",
        touched.KeyList("getvariable('delta_day_objects')"),
    )  # fmt: skip
    con.execute(
        f"""set variable {TOUCHED_DAYS} = (
            select coalesce(list(distinct day), []::date[]) from (
                select day from {old} where tbl in ('payments', 'refunds')
                    and id in (select id from delta_day_objects)
                union all {payments}
                union all select {_DAY} from {SCHEMA}.stg_refunds
                    where {objects.format("refund_id")}
            ) where day is not null)"""
    )
    days = in_touched_days(_DAY)
    scopes: dict[str, str] = {}
    for name, predicate in _DAY_SCOPES:
        predicate = predicate.format(days=days, payments=scopes.get("stg_payments"))
        kind, relation = "table", f"{_SCOPE}day_{name}"
        if name == "stg_payments":
            rows, ranged = _day_payments(con, predicate, staging)
            if not ranged:  # read through a view, not copied: the day of a payment is known
                # only once its row is read, so a copy would read every column of every payment
                # (out of the buffer pool under a low `memory_limit`), the readers a few
                kind, relation = "view", f"{_SCOPE}day_{name}_by_day"
        else:
            rows = rows_where(f"{SCHEMA}.{name}", predicate, table=name in _DAY_TABLES)
        con.execute(f"create or replace temp {kind} {relation} as {rows}")
        scopes[name] = relation
        if name == "stg_refunds":  # the payments refunded on those days, as a constant
            con.execute(
                "set variable delta_day_refunded = (select coalesce(list(distinct payment_id), "
                f"[]::varchar[]) from {_SCOPE}day_stg_refunds where payment_id is not null)"
            )
    grain = model_grain(model)
    assert grain.column is not None
    predicate = in_touched_days(f'"{grain.column}"')
    table = f"{SCHEMA}.{model.name}"
    con.execute(f"delete from {table} where {predicate}")
    con.execute(
        f"insert into {table} by name select * from (\n{scoped_sql(model, scopes)}\n) "
        f"where {predicate}"
    )


def touched_count(con: duckdb.DuckDBPyConnection) -> int:
    """How many customer keys this delta build rebuilt."""
    row = con.execute(f"select count(*) from {TOUCHED}").fetchone()
    return int(row[0]) if row else 0
