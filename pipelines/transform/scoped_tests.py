"""Data tests in a delta build: a test of a keyed model reads only the touched keys' rows.

A test whose every input is a model keyed by customer or user id (or the track outbox, whose
rows are a customer's, or the constant event catalog) finds the same offending rows per key
in the whole table as in the touched keys' rows. A delta build runs it twice over the touched
keys: over the tables as the last build left them (`PreviousState`) and as they are now. Its
count is the last build's minus the first plus the second; the keys it quarantines are the
last build's, minus those the first run found, plus those the second finds. When the last build
found no offending row and quarantined none (the usual case), the first run would find none
either: it runs once, over the tables as they are now.

A test that also reads staging relations (views over the raw tables, whose rows as the last
build saw them are gone) runs once, over the touched customers' rows now, when the last build
found no offending row and quarantined none: an untouched customer's rows are the ones the
last build tested, so they still offend nothing, and the touched ones it finds are all there
is to quarantine. Every other test reads whole tables, as in a full build.

A test's sample (the rows listed in the result) holds the touched keys' offending rows only.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from datetime import datetime
from typing import Any

import duckdb

from pipelines import dodo_contract
from pipelines.transform import delta
from pipelines.transform.data_tests import DataTest, DataTestResult, offending_rows
from pipelines.transform.previous import TOUCHED_USERS, TRACK_INPUTS, PreviousState
from pipelines.transform.touched import CHANGED, TOUCHED, in_touched

SCHEMA = dodo_contract.ANALYTICS_SCHEMA
TRACK_OUTBOX = "track_outbox"
CONSTANT_INPUTS = frozenset({"event_catalog"})
"""Inputs a scoped test reads whole: they do not depend on the raw data."""
STAGING_BY_CUSTOMER = frozenset(
    {"stg_customers", "stg_payments", "stg_subscriptions", "stg_refunds", "stg_disputes"}
)
"""Staging relations whose delta scope holds every touched customer's rows (a refund or dispute
by its payment's customer; the orphans when rows without a customer are touched)."""


def track_outbox_sql(sqls: dict[str, str], inputs: dict[str, str]) -> str:
    """The track outbox's SQL (`sqls`: model name -> SQL of track_outbox and outbound_events)
    reading `inputs` (name -> relation) in place of its customer-keyed tables. Its rows are
    those of customers in every keyed input (an inner join on customer_id, never NULL), so
    narrowing each input to some customers gives exactly those customers' rows."""
    outbound = delta.rewrite_references(sqls["outbound_events"], inputs)
    relations = {**inputs, "outbound_events": f"(\n{outbound}\n)"}
    return delta.rewrite_references(sqls[TRACK_OUTBOX], relations)


def refresh_track_inputs(
    con: duckdb.DuckDBPyConnection,
    tables: Collection[str],
    empty: bool = False,
    scopes: Mapping[str, str] | None = None,
) -> None:
    """Keep the touched customers' rows of the track outbox's keyed inputs (temp tables the
    view `delta_test_track_outbox` reads) before that view is read, once those models are
    built or more customers are touched since (`empty`: the tables only, no rows yet;
    `tables`: the models materialized as tables; `scopes`: model -> a relation holding exactly
    those rows, read instead of the table)."""
    for name in TRACK_INPUTS:
        if not empty and scopes and name in scopes:  # the same rows, maybe kept by the build
            rows = f"select * from {scopes[name]}"
        else:
            where = "false" if empty else in_touched("customer_id")
            rows = delta.rows_where(f"{SCHEMA}.{name}", where, table=not empty and name in tables)
        con.execute(f"create or replace temp table delta_track_{name} as {rows}")


def scopes_for_tests(
    con: duckdb.DuckDBPyConnection, keyed: dict[str, str], sqls: dict[str, str]
) -> dict[str, str]:
    """The relations scoped tests read (`keyed`: model -> its key column's grain, customer or
    user), as temp views of the touched keys' rows; the track outbox's by its customer, from
    the touched customers' rows of its inputs (`refresh_track_inputs`)."""
    if {TRACK_OUTBOX, "outbound_events"} <= sqls.keys():
        refresh_track_inputs(con, (), empty=True)  # filled when first read
        inputs = {name: f"delta_track_{name}" for name in TRACK_INPUTS}
        query = track_outbox_sql(sqls, inputs)
    else:  # a model set without the product's outboxes: the view as it is, filtered
        query = f"select * from {SCHEMA}.{TRACK_OUTBOX} where {in_touched('customer_id')}"
    con.execute(f"create or replace temp view delta_test_{TRACK_OUTBOX} as {query}")
    scopes = {TRACK_OUTBOX: f"delta_test_{TRACK_OUTBOX}"}
    for name in keyed:  # filled by `keep_touched_rows` when a test first reads them
        con.execute(
            f"create or replace temp table delta_test_{name} as "
            f"select * from {SCHEMA}.{name} where false"
        )
        scopes[name] = f"delta_test_{name}"
    return scopes


_IN_TOUCHED = "(customer_id in (select unnest($ids::varchar[])) or (customer_id is null and $null))"
"""SQL over the previous state: the row's customer is touched (parameters `$ids`, `$null`)."""


def keep_touched_rows(
    con: duckdb.DuckDBPyConnection,
    previous: PreviousState,
    name: str,
    grain: str,
    now: bool = True,
    before: bool = True,
    table: bool = True,
    scope: str | None = None,
) -> None:
    """Keep the touched keys' rows of the keyed model `name` (`grain`: customer or user) for
    the scoped tests that read it, each test then reading a few rows rather than scanning the
    table: as they are `now` (temp table `delta_test_<name>`) and as the last build left them
    (`before`: `delta_test_old_<name>`, on the previous state's connection; `table`: the
    model is materialized as a table; `scope`: a relation holding exactly its touched keys'
    rows now, read instead of the table)."""
    relation = f"{SCHEMA}.{name}"
    if now:
        if scope is not None:  # the same rows, maybe kept by the build
            rows = f"select * from {scope}"
        else:
            rows = delta.rows_where(
                relation, delta.key_predicate(grain, delta.key_column(grain)), table=table
            )
        con.execute(f"create or replace temp table delta_test_{name} as {rows}")
    if not before:
        return
    if grain == "user":
        users = [r[0] for r in con.execute(f"select user_id from {TOUCHED_USERS}").fetchall()]
        where, params = "user_id in (select unnest($users::varchar[]))", {"users": users}
    else:
        rows = con.execute(f"select customer_id from {TOUCHED}").fetchall()
        where = _IN_TOUCHED
        params = {
            "ids": [r[0] for r in rows if r[0] is not None],
            "null": any(r[0] is None for r in rows),
        }
    previous.cursor.execute(
        f"create or replace temp table delta_test_old_{name} as "
        f"{delta.rows_where(relation, where, table=table)}",
        params,
    )


def _previous_scopes(names: set[str], sqls: dict[str, str] | None = None) -> dict[str, str]:
    """The same relations over the previous state: the keyed models' rows `keep_touched_rows`
    kept; the track outbox from its inputs' rows of the touched customers (parameter `$ids`;
    its inputs are tables), given `sqls`, else by its customer."""
    scopes = {}
    for name in names:
        if name == TRACK_OUTBOX and sqls and {TRACK_OUTBOX, "outbound_events"} <= sqls.keys():
            ids = "customer_id in (select unnest($ids::varchar[]))"
            inputs = {n: f"({delta.rows_where(f'{SCHEMA}.{n}', ids)})" for n in TRACK_INPUTS}
            scopes[name] = f"(\n{track_outbox_sql(sqls, inputs)}\n)"
        elif name == TRACK_OUTBOX:
            scopes[name] = f"(select * from {SCHEMA}.{name} where {_IN_TOUCHED})"
        else:
            scopes[name] = f"delta_test_old_{name}"
    return scopes


def run_scoped(
    con: duckdb.DuckDBPyConnection,
    previous: PreviousState,
    test: DataTest,
    run_at: datetime,
    keyed: dict[str, str],
    scopes: dict[str, str],
    sqls: dict[str, str] | None = None,
    prepare: Callable[[set[str], bool], None] | None = None,
    track_inputs_stored: bool = False,
) -> DataTestResult | None:
    """Run `test` over the touched keys' rows and update the last build's outcome; None when
    it cannot be (an input that is not keyed, or no outcome of it in the last build). A test
    of the track outbox that found rows last time needs its inputs as the last build left
    them: None unless they are all tables (`track_inputs_stored`; a view keeps no rows).
    `prepare(names, before)` keeps the touched rows of the relations it reads
    (`keep_touched_rows`), and as the last build left them when `before`."""
    inputs = delta.referenced(test.sql)
    if not inputs or not inputs <= (set(keyed) | {TRACK_OUTBOX} | CONSTANT_INPUTS):
        return None
    totals = previous.cursor.execute(
        f"select failures from {SCHEMA}.data_test_results where test_name = ?", [test.name]
    ).fetchall()  # fetched whole: an unfinished result would hold the connection
    if len(totals) != 1:
        return None
    old_total = int(totals[0][0] or 0)
    quarantines = test.severity == "warn" and bool(test.quarantine)
    # the last build found no offending row (and quarantined none): the touched keys' rows as
    # it left them offend nothing either, so the previous state is not read
    clean = old_total == 0 and not (quarantines and _quarantined(previous, test.name))
    scoped = inputs - CONSTANT_INPUTS
    if not clean and TRACK_OUTBOX in scoped and not track_inputs_stored:
        return None
    if prepare is not None:
        prepare(scoped, not clean)
    new_sql = delta.rewrite_references(test.sql, {n: scopes[n] for n in scoped})
    if clean:
        if quarantines:  # nothing to keep: the last build quarantined nothing
            con.execute("create or replace temp table delta_test_kept_keys (key varchar)")
        return _result(con, test, run_at, new_sql, 0)
    old_sql = delta.rewrite_references(test.sql, _previous_scopes(scoped, sqls))
    params: dict[str, Any] = {}
    rows = con.execute(f"select customer_id from {TOUCHED}").fetchall()
    if "$ids" in old_sql:
        params["ids"] = [r[0] for r in rows if r[0] is not None]
    if "$null" in old_sql:
        params["null"] = any(r[0] is None for r in rows)
    if "$users" in old_sql:
        params["users"] = [
            r[0] for r in con.execute(f"select user_id from {TOUCHED_USERS}").fetchall()
        ]
    try:
        old_row = previous.cursor.execute(f"select count(*) from ({old_sql})", params).fetchall()[0]
    except duckdb.Error as exc:
        raise ValueError(f"{test.path}: data test {test.name} failed to run: {exc}") from exc
    if quarantines:
        key = test.quarantine
        previous.copy(
            con,
            "delta_test_kept_keys",
            f"select key from {SCHEMA}.quarantined_rows where test_name = $name "
            f"except select cast({key} as varchar) from ({old_sql})",
            {**params, "name": test.name},
        )
    return _result(con, test, run_at, new_sql, old_total - int(old_row[0]))


def _quarantined(previous: PreviousState, test_name: str) -> bool:
    """Whether the last build left keys quarantined by the test."""
    rows = previous.cursor.execute(
        f"select count(*) from {SCHEMA}.quarantined_rows where test_name = ?", [test_name]
    ).fetchall()
    return bool(rows[0][0])


def _result(
    con: duckdb.DuckDBPyConnection,
    test: DataTest,
    run_at: datetime,
    new_sql: str,
    untouched: int,
) -> DataTestResult:
    """The test's outcome: the offending rows of the touched keys now (`new_sql`) plus the
    `untouched` keys' count the last build found; a quarantine test quarantines the touched
    keys' offending rows and the untouched keys' (`delta_test_kept_keys`)."""
    new_count, sample = offending_rows(con, test, new_sql)
    result = DataTestResult(
        test.name, test.model, test.severity, untouched + new_count, sample=sample,
        touched_only=True,
    )  # fmt: skip
    if test.severity == "warn" and test.quarantine:
        key = test.quarantine
        con.execute(
            f"insert into {SCHEMA}.quarantined_rows select ?, ?, key, ? from ("
            f"select key from delta_test_kept_keys union "
            f"select cast({key} as varchar) from ({new_sql}) where {key} is not null)",
            [test.name, key, run_at],
        )
        quarantined = con.execute(
            f"select count(*) from {SCHEMA}.quarantined_rows where test_name = ?", [test.name]
        ).fetchall()
        result.quarantined = int(quarantined[0][0])
    return result


def run_touched_if_clean(
    con: duckdb.DuckDBPyConnection,
    previous: PreviousState,
    test: DataTest,
    run_at: datetime,
    keyed: dict[str, str],
    scopes: dict[str, str],
    staging: dict[str, str],
    prepare: Callable[[set[str], bool], None] | None = None,
) -> DataTestResult | None:
    """Run `test`, a product test reading staging relations (its offending rows are each one
    customer's or one entity's), over the touched customers' rows only, when the last build
    found no offending row and quarantined none (`staging`: staging name -> its delta scope);
    a quarantine test quarantines the offending rows it finds. None when it cannot be: another
    input, an offending row or a quarantined key last time, no outcome of it in the last
    build, or a changed raw row without an entity id (it has no owner to touch)."""
    inputs = delta.referenced(test.sql)
    staged = inputs & STAGING_BY_CUSTOMER & staging.keys()
    if not staged or not inputs <= set(keyed) | staged | CONSTANT_INPUTS:
        return None
    totals = previous.cursor.execute(
        f"select failures from {SCHEMA}.data_test_results where test_name = ?", [test.name]
    ).fetchall()  # fetched whole: an unfinished result would hold the connection
    if totals != [(0,)]:
        return None
    quarantines = test.severity == "warn" and bool(test.quarantine)
    if quarantines and _quarantined(previous, test.name):
        return None
    # a changed raw row without an entity id has no owner to touch: its rows are nobody's
    nameless = con.execute(f"select count(*) from {CHANGED} where id is null").fetchall()
    if nameless[0][0]:
        return None
    scoped = inputs & set(keyed)
    if prepare is not None:
        prepare(scoped, False)
    new_sql = delta.rewrite_references(
        test.sql, {**{n: scopes[n] for n in scoped}, **{n: staging[n] for n in staged}}
    )
    if quarantines:  # nothing to keep: the last build quarantined nothing
        con.execute("create or replace temp table delta_test_kept_keys (key varchar)")
    return _result(con, test, run_at, new_sql, 0)
