"""Build the SQL models of `sql/` into the `analytics` schema, in dependency order, with data tests."""

from __future__ import annotations

import functools
import graphlib
import hashlib
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import duckdb

from pipelines import dodo_contract
from pipelines.config import IdentityConfig
from pipelines.transform import delta, outbox_changes, previous, scoped_tests, touched
from pipelines.transform.data_tests import (
    DataTest,
    DataTestResult,
    load_data_tests,
    parse_data_tests,
    reset_quarantine,
    run_data_test,
    save_data_test_results,
)
from pipelines.transform.outbox_changes import OutboxChanges
from pipelines.transform.user_models import (
    CUSTOM_GROUP_TRAITS,
    CUSTOM_TRAITS,
    EVENT_RULES_MODEL,
    EXTENSION_POINTS,
    TRAIT_DEFINING_MODELS,
    builtin_trait_names,
    check_custom_traits,
    check_event_rules,
    user_fingerprint,
    user_model_files,
    user_test_files,
    write_event_rules,
    write_identity_rules,
)

log = logging.getLogger("dodo_segment")


def _product_sql_dir() -> Path:
    """`pipelines/sql` inside an installed wheel; the repository's top-level `sql/` otherwise."""
    packaged = Path(__file__).resolve().parents[1] / "sql"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "sql"


SQL_DIR: Path = _product_sql_dir()
"""Default location of the models: `sql/staging`, `sql/marts`, `sql/segment`, `sql/macros.sql`
(the wheel carries the same files as `pipelines/sql`)."""

LAYERS: tuple[str, ...] = ("staging", "marts", "segment")
USER_LAYER = "user"
"""The layer of a model from the user's folders (`[models] paths`)."""
SCHEMA = dodo_contract.ANALYTICS_SCHEMA
EVENT_CATALOGS: tuple[str, ...] = ("default", "ecommerce")

_DUCKDB_TYPES = {
    "text": "VARCHAR",
    "bigint": "BIGINT",
    "bool": "BOOLEAN",
    "timestamp": "TIMESTAMPTZ",
    "json": "JSON",
}

HISTORY_COLUMNS: dict[str, dict[str, str]] = {
    dodo_contract.SUBSCRIPTION_HISTORY_TABLE: {
        "subscription_id": "text",
        "observed_at": "timestamp",
        "status": "text",
        "product_id": "text",
        "quantity": "bigint",
        "cancel_at_next_billing_date": "bool",
        "paused_at": "timestamp",
        "cancelled_at": "timestamp",
    },
    dodo_contract.DISPUTE_HISTORY_TABLE: {
        "dispute_id": "text",
        "observed_at": "timestamp",
        "dispute_status": "text",
        "dispute_stage": "text",
    },
}
"""Columns of the append-only history tables (docs/architecture.md)."""

OPTIONAL_SOURCE_COLUMNS: dict[str, dict[str, str]] = {"payments": {"charge_type": "text"}}
"""API fields newer than the contract that the models use when present (NULL otherwise)."""

_REFERENCE = re.compile(rf"\b{SCHEMA}\.([a-z_][a-z0-9_]*)\b", re.IGNORECASE)
_HEADER = re.compile(r"^\s*--\s*([a-z_]+)\s*:\s*(.*?)\s*$", re.IGNORECASE)


class ModelError(RuntimeError):
    """A model (or macro file) failed to build: names the file and carries DuckDB's message."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


@dataclass(frozen=True)
class Model:
    """One SQL model: a SELECT in `sql/<layer>/<name>.sql`, built as `analytics.<name>`."""

    name: str
    path: Path
    layer: str
    materialized: str
    depends_on: tuple[str, ...]
    sql: str
    replaces: bool = False
    """A user model that replaces the product model of the same name."""
    grain: delta.Grain = field(default_factory=lambda: delta.Grain("global"))
    """What its rows are keyed by for a delta build (`-- grain:` header; global by default)."""


@dataclass
class BuiltModel:
    """A model built in this run and how long it took."""

    name: str
    materialized: str
    seconds: float


@dataclass
class TransformResult:
    """Outcome of `run_models`: what was built, the data tests, and whether emission may go."""

    models: list[BuiltModel] = field(default_factory=list)
    tests: list[DataTestResult] = field(default_factory=list)
    errors: list[DataTestResult] = field(default_factory=list)
    quarantined: dict[str, int] = field(default_factory=dict)
    emission_blocked: bool = False
    seconds: float = 0.0
    tests_seconds: float = 0.0
    skipped: bool = False
    """True when nothing the models read had changed: the previous build was kept."""
    build: str = "full"
    """"full", "delta" (only the touched customers' rows were rebuilt) or "kept"."""
    build_reason: str = ""
    """Why a run with `incremental` built in full (first build, changed SQL, share...)."""
    touched_customers: int = 0
    outbox_changes: OutboxChanges | None = None
    """What the build may have changed in the outboxes (the emitter reads only that when it
    settled the build they changed from); None: not known."""


def _headers(sql: str) -> dict[str, str]:
    """`-- key: value` lines at the top of a file (before the first non-comment line)."""
    headers: dict[str, str] = {}
    for line in sql.splitlines():
        if not line.strip():
            continue
        if not line.lstrip().startswith("--"):
            break
        match = _HEADER.match(line)
        if match:
            headers.setdefault(match.group(1).lower(), match.group(2))
    return headers


def _strip_comments(sql: str) -> str:
    return re.sub(r"--[^\n]*", "", sql)


def list_models(sql_dir: Path | None = None, user_paths: Sequence[Path] = ()) -> list[Model]:
    """Models of `sql_dir` (default `sql/`) and of the user's folders, in dependency order.

    A user model named like a product model replaces it (`Model.replaces`)."""
    sql_dir = Path(sql_dir or SQL_DIR)
    found: dict[str, tuple[Path, str, str]] = {}
    for layer in LAYERS:
        for path in sorted((sql_dir / layer).glob("*.sql")):
            if path.name.endswith(".tests.sql"):
                continue
            if path.stem in found:
                raise ModelError(path, f"duplicate model name {path.stem!r}")
            found[path.stem] = (path, layer, path.read_text())
    replaced: set[str] = set()
    for path in user_model_files(user_paths):
        if path.stem in found and found[path.stem][1] == USER_LAYER:
            raise ModelError(
                path, f"duplicate model name {path.stem!r} (also {found[path.stem][0]})"
            )
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", path.stem):
            raise ModelError(
                path, "a model's file name must be a lower-case SQL name (a-z, 0-9, _)"
            )
        if path.stem in found:
            replaced.add(path.stem)
        found[path.stem] = (path, USER_LAYER, path.read_text())

    models: dict[str, Model] = {}
    for name, (path, layer, sql) in found.items():
        headers = _headers(sql)
        declared = {d.strip() for d in headers.get("depends_on", "").split(",") if d.strip()}
        referenced = {ref.lower() for ref in _REFERENCE.findall(_strip_comments(sql))}
        depends_on = tuple(sorted(((referenced | declared) & found.keys()) - {name}))
        materialized = headers.get("materialized", "view" if layer == "staging" else "table")
        if materialized not in ("view", "table"):
            raise ModelError(path, f"unknown materialization {materialized!r}")
        try:
            grain = delta.parse_grain(headers.get("grain"))
        except ValueError as exc:
            raise ModelError(path, str(exc)) from exc
        models[name] = Model(
            name, path, layer, materialized, depends_on, sql, replaces=name in replaced,
            grain=grain,
        )  # fmt: skip

    sorter = graphlib.TopologicalSorter({m.name: m.depends_on for m in models.values()})
    try:
        sorter.prepare()
    except graphlib.CycleError as exc:
        raise ModelError(sql_dir, f"dependency cycle between models: {exc.args[1]}") from exc
    ordered: list[Model] = []
    layer_rank = {layer: rank for rank, layer in enumerate(LAYERS)}
    layer_rank[USER_LAYER] = layer_rank["marts"]
    while sorter.is_active():
        ready = sorted(sorter.get_ready(), key=lambda n: (layer_rank[models[n].layer], n))
        for name in ready:
            ordered.append(models[name])
            sorter.done(name)
    return ordered


def ensure_raw_tables(con: duckdb.DuckDBPyConnection) -> None:
    """Create absent raw tables (empty, contract columns), the key hash columns a delta build
    looks rows up by (`touched.hash_raw_keys`), and the `analytics.source_<table>()` table
    macros that staging reads: the raw table without those hashes, plus any contract column
    it lacks (as NULL)."""
    raw = dodo_contract.RAW_DATASET
    con.execute(f"create schema if not exists {raw}")
    con.execute(f"create schema if not exists {SCHEMA}")
    contracts = {
        table: {**columns, dodo_contract.SYNCED_AT_COLUMN: "timestamp"}
        for table, columns in dodo_contract.RAW_COLUMNS.items()
    }
    contracts.update(HISTORY_COLUMNS)
    contracts[dodo_contract.FORGOTTEN_CUSTOMERS_TABLE] = dict(
        dodo_contract.FORGOTTEN_CUSTOMERS_COLUMNS
    )
    for table, columns in contracts.items():
        typed = ", ".join(f'"{col}" {_DUCKDB_TYPES[kind]}' for col, kind in columns.items())
        con.execute(f"create table if not exists {raw}.{table} ({typed})")
    present = touched.add_key_hash_columns(con)
    for table, columns in contracts.items():
        every = {**columns, **OPTIONAL_SOURCE_COLUMNS.get(table, {})}
        empty = ", ".join(
            f'cast(null as {_DUCKDB_TYPES[kind]}) as "{col}"' for col, kind in every.items()
        )
        hashes = [c for c in dodo_contract.key_hash_columns(table) if (table, c) in present]
        exclude = " exclude (" + ", ".join(f'"{c}"' for c in hashes) + ")" if hashes else ""
        con.execute(
            f"create or replace macro {SCHEMA}.source_{table}() as table "
            f"select {empty} where false "
            f"union all by name select *{exclude} from {raw}.{table}"
        )


def _build(con: duckdb.DuckDBPyConnection, model: Model) -> None:
    body = model.sql.strip().rstrip(";")
    kind = "view" if model.materialized == "view" else "table"
    # drop a stale object of the other kind (a model switched materialization)
    other = "table" if kind == "view" else "view"
    existing = con.execute(
        "select table_type from information_schema.tables "
        "where table_schema = ? and table_name = ?",
        [SCHEMA, model.name],
    ).fetchone()
    if existing and (existing[0] == "VIEW") == (other == "view"):
        con.execute(f"drop {other} {SCHEMA}.{model.name} cascade")
    con.execute(f"create or replace {kind} {SCHEMA}.{model.name} as\n{body}\n")


def run_models(
    con: duckdb.DuckDBPyConnection,
    event_catalog: str = "default",
    sql_dir: Path | None = None,
    skip_unchanged: bool = False,
    user_paths: Sequence[Path] = (),
    skip_events: Sequence[str] = (),
    rename_events: Sequence[tuple[str, str]] = (),
    on_model: Callable[[str, int, int], None] | None = None,
    identity: IdentityConfig | None = None,
    incremental: bool = False,
    crossover: float = delta.CROSSOVER,
    delta_memory_limit: str | None = None,
) -> TransformResult:
    """Build macros, models and data tests of `sql_dir` into `analytics`.

    A model that fails raises `ModelError` and nothing after it runs. Each model's data tests run
    right after it (before downstream models), so warn tests quarantine rows before the outboxes
    are built; a failing error test sets `emission_blocked`.

    With `skip_unchanged`, the build is skipped (`skipped=True`) when a rebuild would give the
    same tables: the raw data (ignoring `_synced_at`), the SQL and the catalog are exactly those
    of the last clean build, and no time-driven fact fell due since (the new `as_of` is before
    that build's `int_results_valid_until`: no month began, no trial or paid period ended).
    Only `int_as_of` is then rebuilt, so it tells the new time the results refer to.

    `user_paths` adds the user's models and data tests (a user model that fails raises
    `ModelError` naming the user's file); `skip_events`/`rename_events` become
    `analytics.event_rules` (an unknown name raises `ConfigError`). `on_model(name, done,
    total)` is told after each model is built. `identity` (`[identity]`, `[group]`) becomes
    `analytics.identity_rules` (default: userId = customer_id, no groups).

    With `incremental`, a run whose raw data changed rebuilds only the touched customers' rows
    (`pipelines.transform.delta`) when that is possible and cheaper, in one transaction, and
    snapshots the raw data for the next run; without it every build is full and the snapshot is
    dropped. Above `crossover` (the share of customers touched) a full build is chosen.
    `delta_memory_limit` (e.g. "256MB"): DuckDB's memory_limit while a delta build plans and
    runs; a full build runs under the connection's own (restored before it starts). A delta
    build that runs out of memory under it is rolled back and built again under the
    connection's own limit (its `build_reason` says so).
    """
    build = functools.partial(
        _run_models, con, event_catalog, sql_dir, skip_unchanged, user_paths, skip_events,
        rename_events, on_model, identity, incremental, crossover,
    )  # fmt: skip
    if not (incremental and delta_memory_limit):
        return build(None)
    try:
        return build(delta_memory_limit)
    except _DeltaOutOfMemory:
        pass
    log.warning(
        "models: the delta build ran out of memory under delta_memory_limit %s: rolled back, "
        "building again under memory_limit",
        delta_memory_limit,
    )
    result = build(None)
    result.build_reason = f"{result.build_reason} (again under memory_limit: out of memory under {delta_memory_limit})"  # fmt: skip
    return result


class _DeltaOutOfMemory(Exception):
    """A delta build ran out of memory under `delta_memory_limit` and was rolled back."""


def _out_of_memory(exc: BaseException | None) -> bool:
    """Whether DuckDB running out of memory caused this error (it may come wrapped)."""
    while exc is not None:
        if isinstance(exc, duckdb.OutOfMemoryException):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _run_models(
    con: duckdb.DuckDBPyConnection,
    event_catalog: str,
    sql_dir: Path | None,
    skip_unchanged: bool,
    user_paths: Sequence[Path],
    skip_events: Sequence[str],
    rename_events: Sequence[tuple[str, str]],
    on_model: Callable[[str, int, int], None] | None,
    identity: IdentityConfig | None,
    incremental: bool,
    crossover: float,
    delta_memory_limit: str | None,
) -> TransformResult:
    """`run_models` once, its delta build (if any) under `delta_memory_limit`."""
    identity = identity or IdentityConfig()
    if event_catalog not in EVENT_CATALOGS:
        raise ValueError(f"event_catalog must be one of {EVENT_CATALOGS}, got {event_catalog!r}")
    sql_dir = Path(sql_dir or SQL_DIR)
    started = time.perf_counter()
    models = list_models(sql_dir, user_paths)
    by_name = {model.name: model for model in models}
    for model in models:
        if model.replaces and model.name not in EXTENSION_POINTS:
            log.warning(
                "models: %s replaces the product's model %s (its product data tests are off)",
                model.path,
                model.name,
            )
    fingerprint = ""
    if skip_unchanged and not incremental:  # (a delta build's own snapshot tells the same)
        ensure_raw_tables(con)  # a first build creates absent ones: fingerprint them as built
        fingerprint = build_fingerprint(
            con,
            sql_dir,
            event_catalog,
            extra=user_fingerprint(user_paths, skip_events, rename_events) + repr(identity),
        )
        if _previous_build_holds(con, fingerprint, models):
            return TransformResult(
                skipped=True,
                build="kept",
                quarantined=_quarantined_by_test(con),
                seconds=time.perf_counter() - started,
                outbox_changes=outbox_changes.kept(con),
            )
    tests_by_model: dict[str, list[DataTest]] = {}
    for test in _data_tests(sql_dir, user_paths, by_name):
        tests_by_model.setdefault(test.model, []).append(test)

    previous_tz = con.execute("select current_setting('TimeZone')").fetchone()
    con.execute("set TimeZone = 'UTC'")  # month/day arithmetic of the marts is in UTC
    con.execute("set variable event_catalog = ?", [event_catalog])
    plan = delta.DeltaPlan(False, "not incremental")
    in_transaction = False
    last_build: previous.PreviousState | None = None
    staging: dict[str, str] = {}
    configured_limit: str | None = None
    try:
        ensure_raw_tables(con)
        if incremental:
            if delta_memory_limit:
                configured_limit = _lower_memory_limit(con, delta_memory_limit)
            delta_fingerprint = delta.config_fingerprint(
                con,
                _config_fingerprint(
                    sql_dir,
                    event_catalog,
                    user_fingerprint(user_paths, skip_events, rename_events) + repr(identity),
                ),
            )
            con.execute("begin transaction")
            in_transaction = True
            last_build = previous.PreviousState(con)  # the tables as the last build left them
            as_of_sql = by_name[AS_OF_MODEL].sql if AS_OF_MODEL in by_name else "select null"
            staging = delta.staging_sqls(con, models, SQL_DIR)
            plan = delta.plan_delta(con, delta_fingerprint, models, as_of_sql, staging, crossover)
            fingerprint = delta_fingerprint
            if skip_unchanged and _nothing_changed(con, plan, fingerprint, by_name):
                last_build.close()
                last_build = None
                con.execute("commit")
                in_transaction = False
                return TransformResult(
                    skipped=True,
                    build="kept",
                    build_reason="no raw row changed and nothing fell due",
                    quarantined=_quarantined_by_test(con),
                    seconds=time.perf_counter() - started,
                    outbox_changes=outbox_changes.kept(con),
                )
            if not plan.delta:
                last_build.close()
                last_build = None
                con.execute("rollback")
                in_transaction = False
                if configured_limit is not None:  # a full build: the configured memory
                    con.execute("set memory_limit = ?", [configured_limit])
                    configured_limit = None
        if not plan.delta:
            delta.forget_state(con)
            if incremental:  # the snapshot this build leaves: every key hash checked first
                touched.hash_raw_keys(con, {})
        # A build that stops half-way must never be mistaken for the last clean one.
        con.execute(f"drop table if exists {BUILD_STATE_TABLE}")
        # before any model changes (a delta's inside its transaction): a build that stops
        # half-way leaves an id no emit settled
        build_id, since_build = outbox_changes.start_build(con, delta=plan.delta)
        macros = sql_dir / "macros.sql"
        if macros.exists():
            try:
                con.execute(macros.read_text())
            except duckdb.Error as exc:
                raise ModelError(macros, str(exc)) from exc
        run_at = reset_quarantine(con)
        write_event_rules(con, skip_events, rename_events)
        write_identity_rules(con, identity)

        result = TransformResult(build="delta" if plan.delta else "full")
        result.build_reason = plan.reason
        builder = (
            _DeltaBuilder(con, models, last_build, staging) if last_build is not None else None
        )
        for index, model in enumerate(models):
            t0 = time.perf_counter()
            if model.name == EVENT_RULES_MODEL and _knows_event_names(by_name):
                check_event_rules(con)
            try:
                if builder is None:
                    _build(con, model)
                else:
                    builder.build(model)
            except duckdb.Error as exc:
                raise ModelError(model.path, str(exc)) from exc
            if model.name == CUSTOM_TRAITS and model.layer == USER_LAYER:
                _check_custom_traits(con, model, by_name, sql_dir)
            if model.name == CUSTOM_GROUP_TRAITS and model.layer == USER_LAYER:
                _check_custom_group_traits(con, model, sql_dir)
            result.models.append(
                BuiltModel(model.name, model.materialized, time.perf_counter() - t0)
            )
            if on_model is not None:
                on_model(model.name, index + 1, len(models))
            if builder is not None:
                builder.after(model)
            for test in tests_by_model.get(model.name, []):
                t1 = time.perf_counter()
                outcome = (
                    builder.run_test(test, run_at, product=test.path.is_relative_to(sql_dir))
                    if builder
                    else None
                )
                if outcome is None:
                    outcome = run_data_test(con, test, run_at)
                result.tests_seconds += time.perf_counter() - t1
                result.tests.append(outcome)
                if outcome.failures and test.severity == "error":
                    result.errors.append(outcome)
                if outcome.quarantined:
                    result.quarantined[test.name] = outcome.quarantined
        result.emission_blocked = bool(result.errors)
        save_data_test_results(con, result.tests, run_at)
        result.outbox_changes = OutboxChanges(build_id, None)
        if incremental:
            if builder is not None:
                result.touched_customers = delta.touched_count(con)
                assert last_build is not None
                track_rows = builder.changed_tracks()
                whole = bool(builder.full) or outbox_changes.lifted_event_quarantine(
                    con, last_build, track_rows
                )
                result.outbox_changes = outbox_changes.delta_changes(
                    con, build_id, since_build, track_rows, whole=whole
                )
            delta.remember_state(con, delta_fingerprint, full=builder is None)
        if last_build is not None:
            last_build.close()
            last_build = None
        if configured_limit is not None:  # the commit (and its checkpoint) under the configured
            con.execute("set memory_limit = ?", [configured_limit])
            configured_limit = None
        if in_transaction:
            in_transaction = False  # a commit that fails ends the transaction too
            con.execute("commit")
        if skip_unchanged:
            _remember_build(con, fingerprint, clean=not result.errors)
    except Exception as exc:
        if in_transaction and configured_limit is not None and _out_of_memory(exc):
            raise _DeltaOutOfMemory() from exc  # (rolled back below, nothing of it kept)
        raise
    finally:
        if last_build is not None:
            last_build.close()
        if in_transaction:
            try:
                con.execute("rollback")
            except duckdb.TransactionException:  # DuckDB ended it with the error that got here
                pass
        if configured_limit is not None:
            con.execute("set memory_limit = ?", [configured_limit])
        if previous_tz:
            con.execute("set TimeZone = ?", [previous_tz[0]])
    result.seconds = time.perf_counter() - started
    return result


def _lower_memory_limit(con: duckdb.DuckDBPyConnection, limit: str) -> str | None:
    """Set DuckDB's memory_limit to `limit` for a delta build; return the one to restore (as
    DuckDB prints it, e.g. "953.6 MiB": restoring it may round it by 0.1 MiB). None: the
    database holds more than `limit` right now, so the limit stays as configured."""
    row = con.execute("select current_setting('memory_limit')").fetchone()
    try:
        con.execute("set memory_limit = ?", [limit])
    except duckdb.OutOfMemoryException:
        log.info("models: the database holds more than delta_memory_limit %s now: kept %s",
                 limit, row[0] if row else "the configured limit")  # fmt: skip
        return None
    return str(row[0]) if row else limit


BUILD_STATE_TABLE = f"{SCHEMA}._build_state"
"""One row: the fingerprint of what the last clean build read, when it was built, and until when
its results hold without new data (`int_results_valid_until`)."""

AS_OF_MODEL = "int_as_of"
"""The model that says which instant the results refer to (the latest observation)."""

VALID_UNTIL_MODEL = "int_results_valid_until"
"""The model that says when time alone would change a result (a month, trial or period ends)."""


def _data_tests(
    sql_dir: Path, user_paths: Sequence[Path], by_name: dict[str, Model]
) -> list[DataTest]:
    """The product's data tests (minus those of models the user replaced, except the extension
    points') and the user's, each attached to its model; test names are unique."""
    tests = [
        test
        for test in load_data_tests(sql_dir, set(by_name))
        if not by_name[test.model].replaces or test.model in EXTENSION_POINTS
    ]
    for path in user_test_files(user_paths):
        model = path.name.removesuffix(".tests.sql")
        if model not in by_name:
            raise ModelError(path, f"no model named {model!r} to attach these tests to")
        try:
            tests.extend(parse_data_tests(path))
        except ValueError as exc:
            raise ModelError(path, str(exc)) from exc
    seen: dict[str, Path] = {}
    for test in tests:
        if test.name in seen:
            raise ModelError(test.path, f"data test {test.name!r} is also in {seen[test.name]}")
        seen[test.name] = test.path
    return tests


def _knows_event_names(by_name: dict[str, Model]) -> bool:
    return all(n in by_name for n in ("event_catalog", "custom_events", "lifecycle_events"))


def _check_custom_traits(
    con: duckdb.DuckDBPyConnection, model: Model, by_name: dict[str, Model], sql_dir: Path
) -> None:
    """Refuse a user's custom_traits without customer_id or shadowing a built-in trait (unless
    the user replaced the models that define the built-in traits)."""
    if any(by_name[name].replaces for name in TRAIT_DEFINING_MODELS if name in by_name):
        builtin: set[str] = set()
    else:
        outbox = sql_dir / "segment" / "identify_outbox.sql"
        builtin = builtin_trait_names(outbox.read_text()) if outbox.exists() else set()
    try:
        check_custom_traits(con, builtin)
    except ValueError as exc:
        raise ModelError(model.path, str(exc)) from exc


def _check_custom_group_traits(con: duckdb.DuckDBPyConnection, model: Model, sql_dir: Path) -> None:
    """Refuse a user's custom_group_traits without group_id or shadowing a built-in group trait."""
    outbox = sql_dir / "segment" / "group_outbox.sql"
    builtin = builtin_trait_names(outbox.read_text()) if outbox.exists() else set()
    try:
        check_custom_traits(con, builtin, CUSTOM_GROUP_TRAITS, "group_id")
    except ValueError as exc:
        raise ModelError(model.path, str(exc)) from exc


class _DeltaBuilder:
    """Builds each model of a delta build: keyed models by their touched keys, global ones in
    full (telling which customers' rows moved, for the keyed models that read them), the
    tracking plan's counts from the changed outbox rows, views not at all; and the lineage
    steps between models (subscriptions shared between customers, customers sharing a Segment
    user id, the ledger's fallback rates, quarantined user ids)."""

    def __init__(
        self,
        con: duckdb.DuckDBPyConnection,
        models: list[Model],
        last_build: previous.PreviousState,
        staging: dict[str, str],
    ) -> None:
        self.con = con
        self.models = models
        self.last_build = last_build
        self.staging = staging
        """The staging views whose raw rows the scopes read narrowed (`delta.staging_sqls`)."""
        touched.close_over_subscriptions(con)
        previous.create_touched_users(con)
        self.scopes = delta.open_scopes(con, models, staging)
        self.kept_scopes: set[str] = set()
        """Models whose scope reads the rows `delta.rebuild_keys` kept (until more keys are
        touched)."""
        self.full: set[str] = set()
        """Models rebuilt in full whose changes cannot be told by customer."""
        self.built_whole: set[str] = set()
        """Models rebuilt in full in this delta build (their tests read whole tables)."""
        self.users_resolved = False
        """customer_identity is rebuilt: touched customers have their user ids touched too."""
        self.by_name = {m.name: m for m in models}
        self.tables = frozenset(m.name for m in models if m.materialized == "table")
        """The models materialized as tables (their rows can be fetched by row id)."""
        self.track_inputs_stored = set(previous.TRACK_INPUTS) <= self.tables
        """The track outbox's inputs are all tables. A view among them (a user's custom_events)
        keeps no rows as the last build left them, so the tracking plan is then rebuilt in
        full, and a test of the track outbox that found rows last time reads whole tables."""
        self.readers: dict[str, set[str]] = {}
        for m in models:
            for dep in m.depends_on:
                self.readers.setdefault(dep, set()).add(m.name)
        delta.snapshot_quarantined_users(con, last_build)
        self.keyed = {
            m.name: m.grain.kind
            for m in models
            if m.layer != USER_LAYER
            and m.materialized == "table"
            and m.grain.kind in ("customer", "user")
            and m.grain.column == delta.key_column(m.grain.kind)
        }
        """Product models whose tests may read only the touched keys' rows (their grain)."""
        self.track_sqls = {
            name: self.by_name[name].sql
            for name in (scoped_tests.TRACK_OUTBOX, "outbound_events")
            if name in self.by_name
        }
        self.test_scopes = scoped_tests.scopes_for_tests(con, self.keyed, self.track_sqls)
        self.track_stale = True
        """The touched rows of the track outbox's inputs must be read again before the track
        outbox's scope is (an input was rebuilt, or more customers were touched, since)."""
        self.builds: dict[str, int] = {}
        """How many times each model was built in this build (0 or 1; a kept scope's age)."""
        self.kept_now: dict[str, tuple[int, int, int]] = {}
        self.kept_before: dict[str, tuple[int, int]] = {}
        """The keyed models' touched rows kept for the scoped tests, now and before the build:
        the touched customers and users (counts: both sets only grow) and the model's builds
        they were read at."""

    def _track_scope(self) -> str:
        """The touched customers' track outbox rows (a relation), as the tables are now."""
        if self.track_stale and len(self.track_sqls) == 2:
            predicate = touched.in_touched("customer_id")
            scoped_tests.refresh_track_inputs(
                self.con, self.tables, scopes=self._scopes_holding(predicate)
            )
        self.track_stale = False
        return self.test_scopes[scoped_tests.TRACK_OUTBOX]

    def _scopes_holding(self, predicate: str) -> dict[str, str]:
        """The models' scopes that hold exactly their rows where `predicate` holds (their
        scope's predicate): model -> scope relation."""
        return {
            name: scope
            for name, scope in self.scopes.items()
            if name in self.by_name
            and self.by_name[name].materialized == "table"
            and delta.model_grain(self.by_name[name]).kind not in ("global", "counts")
            and delta.scope_predicate(self.by_name[name]) == predicate
        }

    def changed_tracks(self) -> str:
        """The touched customers' track outbox rows as the build leaves them (a relation)."""
        return self._track_scope()

    def _keep_scopes(self, names: set[str], before: bool = True) -> None:
        """Keep the touched keys' rows of the relations a scoped test reads, unless kept since
        the model was last built and the touched keys last grew; as the last build left them
        too when the test reads the previous state (`before`)."""
        if scoped_tests.TRACK_OUTBOX in names:
            self._track_scope()
        row = self.con.execute(
            f"select (select count(*) from {touched.TOUCHED}), "
            f"(select count(*) from {previous.TOUCHED_USERS})"
        ).fetchone()
        keys = (int(row[0]), int(row[1])) if row else (0, 0)
        for name in sorted(names & self.keyed.keys()):
            now = (*keys, self.builds.get(name, 0))
            keep_now = self.kept_now.get(name) != now
            keep_before = before and self.kept_before.get(name) != keys
            if not keep_now and not keep_before:
                continue
            grain = self.keyed[name]
            predicate = delta.key_predicate(grain, delta.key_column(grain))
            scoped_tests.keep_touched_rows(
                self.con, self.last_build, name, grain,
                now=keep_now, before=keep_before, table=name in self.tables,
                scope=self._scopes_holding(predicate).get(name),
            )  # fmt: skip
            self.kept_now[name] = now
            if keep_before:
                self.kept_before[name] = keys

    def run_test(
        self, test: DataTest, run_at: datetime, product: bool = False
    ) -> DataTestResult | None:
        """A data test over the touched keys' rows (None: it reads whole tables). `product`: one
        of the product's tests (a user's test over staging may compare customers' rows)."""
        keyed = {n: k for n, k in self.keyed.items() if n not in self.built_whole}
        if scoped_tests.TRACK_OUTBOX in self.full:
            return None
        outcome = scoped_tests.run_scoped(
            self.con, self.last_build, test, run_at, keyed, self.test_scopes, self.track_sqls,
            prepare=self._keep_scopes, track_inputs_stored=self.track_inputs_stored,
        )  # fmt: skip
        if outcome is None and product:
            staging = {n: self.scopes[n] for n in scoped_tests.STAGING_BY_CUSTOMER
                       if n in self.scopes and n not in self.full}  # fmt: skip
            outcome = scoped_tests.run_touched_if_clean(
                self.con, self.last_build, test, run_at, keyed, self.test_scopes, staging,
                prepare=self._keep_scopes,
            )  # fmt: skip
        return outcome

    def _widened(self, before: int) -> None:
        """More customers were touched: their user ids too, and narrow the inputs again."""
        if touched.count_touched(self.con) != before:
            if self.users_resolved:
                previous.touch_users(self.con, self.last_build)
            delta.refresh_scopes(self.con, self.staging)
            for name in sorted(self.kept_scopes):  # they lack the new keys' rows
                delta.reopen_scope(self.con, self.by_name[name], self.scopes)
            self.kept_scopes.clear()
            self.track_stale = True

    def _has_keyed_readers(self, name: str) -> bool:
        return any(
            self.by_name[r].materialized == "table"
            and delta.model_grain(self.by_name[r]).kind not in ("global", "counts")
            for r in self.readers.get(name, ())
        )

    def build(self, model: Model) -> None:
        """Build one model of the delta build."""
        con = self.con
        forced = any(dep in self.full for dep in model.depends_on)
        if model.name == delta.RATES_MODEL:
            delta.snapshot_rates(con)
            narrowable = not (forced or set(model.depends_on) & self.built_whole)
            if narrowable and delta.rebuild_rates(con, model):
                self.builds[model.name] = self.builds.get(model.name, 0) + 1
                self.built_whole.add(model.name)
                return
        if f"{SCHEMA}.quarantined_rows" in model.sql:
            before = touched.count_touched(con)
            delta.touch_quarantine_changes(con)
            self._widened(before)
        self.builds[model.name] = self.builds.get(model.name, 0) + 1
        if model.name in previous.TRACK_INPUTS:
            self.track_stale = True
        if model.materialized == "view":
            # what reads the view reads the full rebuild behind it; a user's view without a
            # grain may change any customer's rows, and keeps none to compare
            unkeyed = model.layer == USER_LAYER and delta.model_grain(model).kind == "global"
            if forced or unkeyed:
                self.full.add(model.name)
            return
        grain = delta.model_grain(model)
        if grain.kind == "counts" and not forced and self.track_inputs_stored:
            previous.rebuild_counts(
                con,
                self.last_build,
                model.name,
                lambda relations: delta.scoped_sql(model, relations),
                lambda inputs: scoped_tests.track_outbox_sql(self.track_sqls, inputs),
                self._track_scope(),
            )
            return
        if grain.kind == "day" and model.layer != USER_LAYER and not forced:
            delta.rebuild_days(con, model, self.staging)
            return
        if grain.kind not in ("global", "counts", "day") and not forced:
            keep = delta.keeps_scope(model, self.scopes) and self._has_keyed_readers(model.name)
            delta.rebuild_keys(con, model, self.scopes, keep=keep)
            if keep:
                self.kept_scopes.add(model.name)
            return
        watch = model.name not in delta.KNOWN_GLOBALS and self._has_keyed_readers(model.name)
        if watch:
            con.execute(
                f"create or replace temp table delta_previous as select * from {SCHEMA}.{model.name}"
            )
        _build(con, model)
        self.built_whole.add(model.name)
        before = touched.count_touched(con)
        if watch and not delta.touch_global_changes(con, model, "delta_previous"):
            self.full.add(model.name)
        self._widened(before)

    def after(self, model: Model) -> None:
        """Lineage steps once `model` is built (before the models that read it)."""
        if model.name not in _LINEAGE_STEPS:
            return
        before = touched.count_touched(self.con)
        if model.name == "stg_payment_subscriptions":
            touched.close_over_subscriptions(self.con, links_moved=True)
        elif model.name == delta.RATES_MODEL:
            delta.touch_rate_changes(self.con)
        elif model.name == previous.IDENTITY_MODEL:
            previous.touch_users(self.con, self.last_build)
            self.users_resolved = True
        self._widened(before)


_LINEAGE_STEPS = frozenset(
    {"stg_payment_subscriptions", delta.RATES_MODEL, previous.IDENTITY_MODEL}
)
"""The models after which a delta build may touch more customers (`_DeltaBuilder.after`)."""


def _config_fingerprint(sql_dir: Path, event_catalog: str, extra: str) -> str:
    """A hash of the SQL files, the catalog and `extra` (the user's models and event rules)."""
    digest = hashlib.sha256(event_catalog.encode() + extra.encode())
    for path in sorted(sql_dir.rglob("*.sql")):
        digest.update(path.relative_to(sql_dir).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def build_fingerprint(
    con: duckdb.DuckDBPyConnection, sql_dir: Path, event_catalog: str, extra: str = ""
) -> str:
    """A hash of everything the models read: raw rows (without `_synced_at`), SQL, catalog,
    and `extra` (the user's models and event rules).

    One aggregate per raw table (row count and the sum of row hashes), so it costs a scan of
    the raw data but no model work.
    """
    digest = hashlib.sha256(event_catalog.encode() + extra.encode())
    for path in sorted(sql_dir.rglob("*.sql")):
        digest.update(path.relative_to(sql_dir).as_posix().encode() + b"\0" + path.read_bytes())
    for table, (count, total) in raw_table_hashes(con, (dodo_contract.SYNCED_AT_COLUMN,)).items():
        digest.update(f"{table}:{count}:{total};".encode())
    return digest.hexdigest()


def raw_table_hashes(
    con: duckdb.DuckDBPyConnection, skip_columns: tuple[str, ...]
) -> dict[str, tuple[int, str | None]]:
    """Per raw table: its row count and the sum of its row hashes over every column but
    `skip_columns` and the key hashes (`touched.hash_raw_keys`), taken in name order (so two
    warehouses loaded by different paths compare); the extract's bookkeeping tables
    (`dodo_contract.RAW_BOOKKEEPING_TABLES`) are left out."""
    columns: dict[str, list[str]] = {}
    for table, column in con.execute(
        "select table_name, column_name from information_schema.columns "
        "where table_schema = ? and table_name not like '\\_dlt%' escape '\\' "
        "order by table_name, column_name",
        [dodo_contract.RAW_DATASET],
    ).fetchall():
        if column in skip_columns or column in dodo_contract.key_hash_columns(table):
            continue
        if table not in dodo_contract.RAW_BOOKKEEPING_TABLES:
            columns.setdefault(table, []).append(column)
    hashes: dict[str, tuple[int, str | None]] = {}
    for table, names in columns.items():
        row_hash = "hash(" + ", ".join(f'"{n}"' for n in names) + ")"
        count, total = con.execute(
            f"select count(*), sum({row_hash}::hugeint)::varchar "
            f'from "{dodo_contract.RAW_DATASET}"."{table}"'
        ).fetchone() or (0, None)
        hashes[table] = (int(count), total)
    return hashes


def _previous_build_holds(
    con: duckdb.DuckDBPyConnection, fingerprint: str, models: list[Model]
) -> bool:
    """Whether the last clean build read exactly these inputs and time has not yet changed any
    of its results; if so, `int_as_of` is brought forward to the current observation."""
    by_name = {model.name: model for model in models}
    if AS_OF_MODEL not in by_name or VALID_UNTIL_MODEL not in by_name:
        return False  # a model set without them cannot tell when its results expire
    try:
        row = con.execute(f"select fingerprint, valid_until from {BUILD_STATE_TABLE}").fetchone()
        if not row or row[0] != fingerprint or row[1] is None:
            return False
        # the current as_of by the model's own rule, over the views of the last build
        as_of = con.execute(f"select as_of from (\n{by_name[AS_OF_MODEL].sql}\n)").fetchone()
        if not as_of or as_of[0] >= row[1]:
            return False
        _build(con, by_name[AS_OF_MODEL])
    except duckdb.Error:  # no previous build, or its views are gone: build
        return False
    return True


def _nothing_changed(
    con: duckdb.DuckDBPyConnection,
    plan: delta.DeltaPlan,
    fingerprint: str,
    by_name: dict[str, Model],
) -> bool:
    """A delta plan with no changed raw row and no customer touched by time, over a last build
    that was clean: the build is kept and only `int_as_of` brought forward."""
    if not plan.delta or plan.changed or plan.touched or AS_OF_MODEL not in by_name:
        return False
    # no failing query here: it would abort the delta build's transaction
    exists = con.execute(
        "select count(*) from information_schema.tables where table_schema = ? and table_name = ?",
        [SCHEMA, BUILD_STATE_TABLE.split(".")[-1]],
    ).fetchone()
    if not exists or not exists[0]:
        return False
    row = con.execute(
        f"select fingerprint = ? and valid_until is not null from {BUILD_STATE_TABLE}",
        [fingerprint],
    ).fetchone()
    if not row or not row[0]:
        return False
    _build(con, by_name[AS_OF_MODEL])
    return True


def _quarantined_by_test(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """Rows the kept build quarantined, per data test (the job reports them every run)."""
    rows = con.execute(
        f"select test_name, count(*) from {SCHEMA}.quarantined_rows group by 1 order by 1"
    ).fetchall()
    return {name: int(count) for name, count in rows}


def _remember_build(con: duckdb.DuckDBPyConnection, fingerprint: str, clean: bool) -> None:
    """Keep the fingerprint of a build whose error tests passed. A build with a failing error
    test is always redone (emission stays blocked until a build passes); quarantined rows stay
    in `quarantined_rows` with a kept build and are reported again from there."""
    con.execute(f"drop table if exists {BUILD_STATE_TABLE}")
    con.execute(
        f"create table {BUILD_STATE_TABLE} "
        "(fingerprint varchar, built_at timestamptz, valid_until timestamptz)"
    )
    if clean:
        con.execute(
            f"insert into {BUILD_STATE_TABLE} "
            f"select ?, now(), valid_until from {SCHEMA}.{VALID_UNTIL_MODEL}",
            [fingerprint],
        )
