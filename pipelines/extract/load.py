"""Extract + load: run the Dodo source into the warehouse's dodo_raw schema and keep status history."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import dlt
import duckdb
from dlt.pipeline.exceptions import PipelineStepFailed

from pipelines import warehouse
from pipelines.config import AppConfig, dlt_telemetry_off, pipeline_dir
from pipelines.dodo_contract import (
    DISPUTE_HISTORY_TABLE,
    NON_TERMINAL_STATUSES,
    PRIMARY_KEYS,
    RAW_DATASET,
    REJECTED_RECORDS_TABLE,
    RESOURCES,
    STATUS_FIELDS,
    SUBSCRIPTION_HISTORY_TABLE,
)
from pipelines.extract.dlt_lookups import install as keep_dlt_lookups
from pipelines.extract.dlt_lookups import keep_partial_configuration
from pipelines.extract.dodo import ExtractPlan, ItemFormat, KnownRows, OpenObject, dodo_source
from pipelines.extract.dodo.client import ClientSettings, DodoApiError, DodoClient
from pipelines.extract.dodo.settled import settled_before, settled_ledger_source
from pipelines.extract.forgotten import forgotten_ids, remove_completed_packages, scrub_rejected
from pipelines.extract.lookback import before_deep_pass, close_pass, deep_pass_due
from pipelines.gc_passes import fewer_gc_passes
from pipelines.logs import quiet_dlt
from pipelines.warehouse import WarehouseError

log = logging.getLogger(__name__)

PIPELINE_NAME = "dodo_segment"


@dataclass(frozen=True)
class ExtractFormat:
    """How rows travel through dlt: the item format the source yields and the load file format."""

    items: ItemFormat = "arrow"
    loader_file_format: str | None = "parquet"
    """None: the destination's own default (DuckDB: insert_values)."""


JOB_FORMAT = ExtractFormat()
"""Arrow tables written as parquet: dlt's Python normaliser never runs. The alternatives exist
for `make bench`, which compares the job against them."""
MAX_LOADS_PER_RUN = 1000
ALLOCATIONS_PER_GC_PASS = 100_000
"""Parsing API pages: the collector ran 3,200 times in a 300k first sync at the default."""

SUBSCRIPTION_HISTORY_SQL = f"""
create table if not exists {RAW_DATASET}.{SUBSCRIPTION_HISTORY_TABLE} (
    subscription_id varchar not null, observed_at timestamptz not null, status varchar,
    product_id varchar, quantity bigint, cancel_at_next_billing_date boolean,
    paused_at timestamptz, cancelled_at timestamptz
);
insert into {RAW_DATASET}.{SUBSCRIPTION_HISTORY_TABLE}
with latest as (
    select * from {RAW_DATASET}.{SUBSCRIPTION_HISTORY_TABLE}
    qualify row_number() over (partition by subscription_id order by observed_at desc) = 1
)
select s.subscription_id, s._synced_at, s.status, s.product_id, s.quantity,
       s.cancel_at_next_billing_date, s.paused_at, s.cancelled_at
from {RAW_DATASET}.subscriptions as s
left join latest as h using (subscription_id)
where h.subscription_id is null
   or s.status is distinct from h.status
   or s.product_id is distinct from h.product_id
   or s.quantity is distinct from h.quantity
   or s.cancel_at_next_billing_date is distinct from h.cancel_at_next_billing_date
   or s.paused_at is distinct from h.paused_at
   or s.cancelled_at is distinct from h.cancelled_at;
"""

DISPUTE_HISTORY_SQL = f"""
create table if not exists {RAW_DATASET}.{DISPUTE_HISTORY_TABLE} (
    dispute_id varchar not null, observed_at timestamptz not null,
    dispute_status varchar, dispute_stage varchar
);
insert into {RAW_DATASET}.{DISPUTE_HISTORY_TABLE}
with latest as (
    select * from {RAW_DATASET}.{DISPUTE_HISTORY_TABLE}
    qualify row_number() over (partition by dispute_id order by observed_at desc) = 1
)
select d.dispute_id, d._synced_at, d.dispute_status, d.dispute_stage
from {RAW_DATASET}.disputes as d
left join latest as h using (dispute_id)
where h.dispute_id is null
   or d.dispute_status is distinct from h.dispute_status
   or d.dispute_stage is distinct from h.dispute_stage;
"""


@dataclass
class ExtractResult:
    """What one extract+load did: rows per table, API requests per resource, timings."""

    rows_loaded: dict[str, int] = field(default_factory=dict)
    api_requests: dict[str, int] = field(default_factory=dict)
    api_retries: dict[str, int] = field(default_factory=dict)
    rejected_records: int = 0
    loads: int = 0
    recovered: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    deep: bool = False
    """This run was the deep pass (the whole lookback_days window behind each cursor)."""
    lookback_seconds: float = 0.0
    deep_found: dict[str, dict[str, int]] = field(default_factory=dict)
    """What the deep pass found that the short runs had missed, per resource (new, changed)."""
    pacing: dict[str, Any] = field(default_factory=dict)
    """Rate-limit pacing: headers seen, seconds held back, waits, responses 429."""

    @property
    def total_rows(self) -> int:
        """Rows loaded into the raw tables (rejected records not counted)."""
        return sum(n for t, n in self.rows_loaded.items() if t in RESOURCES)


def make_pipeline(warehouse_path: str) -> dlt.Pipeline:
    """The dlt pipeline that loads dodo_raw in the given warehouse; its folder sits beside it."""
    dlt_telemetry_off()
    # Personal data stays only in the warehouse: no merge staging rows, no completed job files.
    os.environ.setdefault("LOAD__TRUNCATE_STAGING_DATASET", "true")
    os.environ.setdefault("LOAD__DELETE_COMPLETED_JOBS", "true")
    quiet_dlt()
    keep_dlt_lookups()
    destination: Any = keep_partial_configuration(
        dlt.destinations.motherduck(warehouse_path)
        if warehouse_path.startswith("md:")
        else dlt.destinations.duckdb(str(warehouse_path))
    )
    return dlt.pipeline(
        pipeline_name=PIPELINE_NAME,
        destination=destination,
        dataset_name=RAW_DATASET,
        pipelines_dir=str(pipeline_dir(warehouse_path)),
    )


def recover_pending(warehouse_path: str, pipeline: dlt.Pipeline | None = None) -> str | None:
    """Discard a load left unfinished by a crashed or failed run and rewind its state.

    The warehouse is the truth: the unloaded package is dropped together with the local
    pipeline folder, so the incremental state is restored from the warehouse on the next run
    and the rows of the lost package are extracted again. Returns what was done, or None.
    `pipeline`: the run's own pipeline (made once a run); after a discard it must be made again.
    """
    folder = pipeline_dir(warehouse_path)
    if not folder.exists():
        return None
    pipeline = pipeline or make_pipeline(warehouse_path)
    try:
        if not pipeline.has_pending_data:
            return None
        packages = len(pipeline.list_extracted_load_packages()) + len(
            pipeline.list_normalized_load_packages()
        )
        what = f"discarded {packages} unfinished load package(s) from an earlier run"
    except FileNotFoundError:  # a run killed while dlt made or removed the folder left part of it
        what = "discarded the pipeline folder an earlier run left incomplete (killed mid-setup)"
    shutil.rmtree(folder / PIPELINE_NAME, ignore_errors=True)
    return (
        f"{what} and rewound the incremental state to the warehouse; rows not loaded are read again"
    )


def discard_state_ahead(warehouse_path: str, pipeline: dlt.Pipeline) -> str | None:
    """Discard a pipeline folder whose extract state the warehouse never stored.

    A warehouse restored in place from an older copy keeps the pipeline folder beside it, whose
    state is newer. dlt keeps a local state newer than the destination's, cursors included, so
    the rows between the copy and those cursors would never be read again. Without the folder,
    the state comes back from the warehouse and the run reads on from the copy's own cursors
    (the warehouse is the truth, as for `recover_pending`). Returns what was done, or None.
    """
    folder = pipeline_dir(warehouse_path) / PIPELINE_NAME
    if not folder.exists() or not _warehouse_exists(warehouse_path):
        return None
    local = pipeline.state
    version, version_hash = local.get("_state_version") or 0, local.get("_version_hash")
    if not version:
        return None
    with warehouse.connect(warehouse_path, read_only=True) as con:
        if "_dlt_pipeline_state" not in _raw_tables(con):
            return None  # nothing stored (a new or lost warehouse): dlt wipes the folder itself
        newest, stored = con.execute(
            f"select max(version), count(*) filter (where version_hash = ?) "
            f'from "{RAW_DATASET}"._dlt_pipeline_state where pipeline_name = ?',
            [version_hash, PIPELINE_NAME],
        ).fetchone()
    if stored or newest is None or newest >= version:
        return None
    shutil.rmtree(folder, ignore_errors=True)
    return (
        f"the warehouse's extract state is older than its pipeline folder's (version {newest} "
        f"< {version}: restored from an older copy?); discarded the folder, so this run reads "
        "on from the warehouse's own cursors"
    )


def _raw_tables(con: duckdb.DuckDBPyConnection) -> set[str]:
    """Names of the tables the warehouse has in the raw schema."""
    rows = con.execute(
        "select table_name from information_schema.tables where table_schema = ?", [RAW_DATASET]
    ).fetchall()
    return {r[0] for r in rows}


def _warehouse_exists(warehouse_path: str) -> bool:
    return warehouse_path.startswith("md:") or os.path.exists(warehouse_path)


def _known_non_terminal(con: duckdb.DuckDBPyConnection) -> dict[str, list[OpenObject]]:
    """Objects the warehouse holds in a status that can still change."""
    known: dict[str, list[OpenObject]] = {}
    tables = _raw_tables(con)
    for resource, statuses in NON_TERMINAL_STATUSES.items():
        if resource not in tables:
            continue
        key, status = PRIMARY_KEYS[resource], STATUS_FIELDS[resource]
        rows = con.execute(
            f'select "{key}", created_at, "{status}" from "{RAW_DATASET}"."{resource}" '
            f'where "{status}" in (select unnest(?::varchar[]))',
            [list(statuses)],
        ).fetchall()
        known[resource] = [OpenObject(*r) for r in rows]
    return known


def _known_recent(con: duckdb.DuckDBPyConnection, lookback: timedelta) -> dict[str, KnownRows]:
    """created_at of each table's rows from its newest row minus the lookback on.

    A run's lookback starts at its cursor minus the lookback, and the cursor is never older
    than the newest row loaded, so these cover every lookback window the run may walk.
    """
    known: dict[str, KnownRows] = {}
    for resource, newest in _newest_loaded(con).items():
        since = newest - lookback
        rows = con.execute(
            f'select created_at from "{RAW_DATASET}"."{resource}" where created_at >= ? '
            "order by created_at",
            [since],
        ).fetchall()
        known[resource] = KnownRows(since, [r[0] for r in rows])
    return known


def _newest_loaded(con: duckdb.DuckDBPyConnection) -> dict[str, datetime]:
    """created_at of the newest row of each incremental raw table that has rows."""
    tables = _raw_tables(con)
    newest: dict[str, datetime] = {}
    for resource in RESOURCES:
        if resource == "products" or resource not in tables:
            continue
        value = con.execute(f'select max(created_at) from "{RAW_DATASET}"."{resource}"').fetchone()
        if value and value[0] is not None:
            newest[resource] = value[0]
    return newest


REJECTED_RECORDS_SQL = f"""
create table if not exists {RAW_DATASET}.{REJECTED_RECORDS_TABLE} (
    resource varchar not null, reason varchar not null, record_json varchar not null,
    record_hash varchar not null, rejected_at timestamptz not null,
    primary key (resource, record_hash)
)
"""


def store_rejected(warehouse_path: str, rejected: list[dict[str, Any]]) -> int:
    """Keep the items the extract set aside (idempotent: a re-read item is stored once)."""
    if not rejected:
        return 0
    with warehouse.connect(warehouse_path) as con:
        return store_rejected_on(con, rejected)


def store_rejected_on(con: duckdb.DuckDBPyConnection, rejected: list[dict[str, Any]]) -> int:
    """`store_rejected` on an open connection."""
    if not rejected:
        return 0
    rows = [
        (
            r["resource"],
            r["reason"],
            r["record_json"],
            hashlib.sha256(r["record_json"].encode()).hexdigest(),
            r["rejected_at"],
        )
        for r in rejected
    ]
    con.execute(f"create schema if not exists {RAW_DATASET}")
    con.execute(REJECTED_RECORDS_SQL)
    con.executemany(
        f"insert into {RAW_DATASET}.{REJECTED_RECORDS_TABLE} values (?, ?, ?, ?, ?) on conflict do nothing",
        rows,
    )
    return len(rows)


def record_history(warehouse_path: str) -> None:
    """Append the subscription and dispute states this sync saw for the first time."""
    with warehouse.connect(warehouse_path) as con:
        record_history_on(con)


def record_history_on(con: duckdb.DuckDBPyConnection) -> None:
    """`record_history` on an open connection."""
    tables = _raw_tables(con)
    if "subscriptions" in tables:
        con.execute(SUBSCRIPTION_HISTORY_SQL)
    if "disputes" in tables:
        con.execute(DISPUTE_HISTORY_SQL)


def _step(step: Any, *args: Any, warehouse_path: str = "", **kwargs: Any) -> Any:
    """Run a dlt step; surface our own API errors and storage failures as one clear line."""
    try:
        return step(*args, **kwargs)
    except PipelineStepFailed as exc:
        cause: BaseException | None = exc
        while cause is not None:
            if isinstance(cause, DodoApiError):
                raise cause from None
            if isinstance(cause, duckdb.Error | OSError):
                first = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]
                raise WarehouseError(
                    f"cannot write the warehouse {warehouse_path} or its pipeline folder: "
                    f"{first} (read-only folder or full disk?); nothing was lost, the next run "
                    "reads the same rows again"
                ) from None
            cause = getattr(cause, "exception", None) or cause.__cause__ or cause.__context__
        raise


def build_plan(
    config: AppConfig,
    full_refresh: frozenset[str] = frozenset(),
    run_started_at: datetime | None = None,
    deep: bool = False,
) -> ExtractPlan:
    """Decide what this run reads: clock, lookback (short, or the deep pass when due or
    `deep`), sweeps, and the objects still open."""
    xc = config.extract
    client = DodoClient(
        ClientSettings(
            base_url=xc.base_url,
            api_key=xc.api_key,
            environment=xc.environment,
            page_size=xc.page_size,
            max_pages_per_query=xc.max_pages_per_query,
            requests_per_minute=xc.requests_per_minute,
            timeout_seconds=xc.timeout_seconds,
            max_retries=xc.max_retries,
            backoff_base_seconds=xc.backoff_seconds,
        )
    )
    plan = ExtractPlan(
        client=client,
        run_started_at=(run_started_at or xc.as_of or datetime.now(UTC)).replace(microsecond=0),
        backfill_start=xc.backfill_start,
        lookback=timedelta(minutes=xc.lookback_minutes),
        full_sweep_max_age={
            "customers": timedelta(hours=xc.customers_full_refresh_hours),
            "subscriptions": timedelta(hours=xc.subscriptions_full_sweep_hours),
        },
        full_refresh=full_refresh,
        rows_per_load=xc.rows_per_load,
    )
    deep_window = max(plan.lookback, timedelta(days=xc.lookback_days))
    # without a warehouse the first sync reads everything: it is the deep pass too
    plan.deep, plan.lookback = True, deep_window
    if _warehouse_exists(config.warehouse_path):
        with warehouse.connect(config.warehouse_path, read_only=True) as con:
            every = timedelta(hours=xc.deep_lookback_hours)
            plan.deep = deep or deep_pass_due(con, plan.run_started_at, every)
            plan.lookback = deep_window if plan.deep else timedelta(minutes=xc.lookback_minutes)
            plan.known_non_terminal = _known_non_terminal(con)
            plan.known_recent = _known_recent(con, plan.lookback)
            plan.newest_loaded = _newest_loaded(con)
            plan.forgotten = forgotten_ids(con)
    return plan


def run_extract(
    config: AppConfig,
    full_refresh: frozenset[str] = frozenset(),
    resources: tuple[str, ...] = RESOURCES,
    run_started_at: datetime | None = None,
    extract_format: ExtractFormat = JOB_FORMAT,
    on_page: Callable[[str, int], None] | None = None,
    deep: bool = False,
    run_id: str | None = None,
) -> ExtractResult:
    """Extract every resource from the API and load it into dodo_raw, as many loads as needed.

    `on_page(resource, rows)` is told after each page read (from the readers' threads); `deep`
    forces the deep pass; `run_id` names the run in `dodo_raw.lookback_passes`."""
    result = ExtractResult()
    started = time.monotonic()
    pipeline = make_pipeline(config.warehouse_path)
    result.recovered = recover_pending(config.warehouse_path, pipeline) or discard_state_ahead(
        config.warehouse_path, pipeline
    )
    if result.recovered:
        log.warning("%s", result.recovered)
        pipeline = make_pipeline(config.warehouse_path)  # its folder is gone: made afresh
    plan = build_plan(config, full_refresh, run_started_at, deep)
    plan.item_format = extract_format.items
    before = before_deep_pass(config.warehouse_path, plan)
    client = plan.client
    client.on_page = on_page
    rows: Counter[str] = Counter()
    timings: Counter[str] = Counter()
    pipeline.sync_destination()  # a lost local folder: state and schema come back from the warehouse
    try:
        with fewer_gc_passes(ALLOCATIONS_PER_GC_PASS):
            _load_until_done(
                pipeline, plan, config, resources, extract_format, result, rows, timings
            )
        if "balance_ledger" in resources:
            _load_settled_ledger(pipeline, plan, config, result, rows)
    finally:
        client.close()
        result.api_requests = dict(client.requests_by_resource)
        result.api_retries = dict(client.retries_by_resource)
        result.pacing = asdict(client.pacing())
    t0 = time.monotonic()
    record_history(config.warehouse_path)
    timings["history"] += time.monotonic() - t0
    result.deep, result.lookback_seconds = plan.deep, plan.lookback.total_seconds()
    short = timedelta(minutes=config.extract.lookback_minutes)
    result.deep_found = close_pass(
        config.warehouse_path, plan, before, short, result.api_requests, run_id or plan.run_id
    )
    result.rows_loaded = {t: n for t, n in rows.items() if not t.startswith("_dlt")}
    result.seconds = {**timings, "total": time.monotonic() - started}
    return result


def _load_until_done(
    pipeline: dlt.Pipeline,
    plan: ExtractPlan,
    config: AppConfig,
    resources: tuple[str, ...],
    extract_format: ExtractFormat,
    result: ExtractResult,
    rows: Counter[str],
    timings: Counter[str],
) -> None:
    """Extract, normalize and load again while a resource stopped at its row budget."""
    path = config.warehouse_path
    pending = tuple(resources)
    while pending and result.loads < MAX_LOADS_PER_RUN:
        if result.loads and _warehouse_exists(path):  # what the loads so far have written
            with warehouse.connect(path) as con:
                plan.newest_loaded = _newest_loaded(con)
        source = dodo_source(plan, pending)
        t0 = time.monotonic()
        _step(
            pipeline.extract,
            source,
            loader_file_format=extract_format.loader_file_format,
            warehouse_path=path,
        )
        # Stored before the load: if the load fails, the rewound state re-reads them and
        # the insert is idempotent, so a set-aside item is never lost.
        scrub_rejected(plan.rejected, plan.forgotten)
        result.rejected_records += store_rejected(path, plan.rejected)
        plan.rejected.clear()
        t1 = time.monotonic()
        _step(pipeline.normalize, warehouse_path=path)
        t2 = time.monotonic()
        _step(pipeline.load, warehouse_path=path)
        remove_completed_packages(pipeline.working_dir)  # committed: its files are not needed
        # timed here: dlt's trace spans every step since the first extract of this loop
        timings["extract"] += t1 - t0
        timings["normalize"] += t2 - t1
        timings["load"] += time.monotonic() - t2
        result.loads += 1
        normalize_info = pipeline.last_trace.last_normalize_info
        if normalize_info:
            rows.update(normalize_info.row_counts)
        plan.full_refresh = frozenset()  # a resumed sweep continues from its saved cursor
        states = pipeline.state.get("sources", {}).get("dodo", {}).get("resources", {})
        pending = tuple(r for r in pending if states.get(r, {}).get("more"))
        if pending:
            log.info("backfill continues in another load for: %s", ", ".join(pending))


def _load_settled_ledger(
    pipeline: dlt.Pipeline,
    plan: ExtractPlan,
    config: AppConfig,
    result: ExtractResult,
    rows: Counter[str],
) -> None:
    """Read, by `reference_object_id`, the ledger entries of the payments and refunds older than
    the lookback that reached a terminal status in this run (see `dodo/settled.py`)."""
    path = config.warehouse_path
    if not _warehouse_exists(path):
        return
    with warehouse.connect(path, read_only=True) as con:
        ids = settled_before(con, plan.known_non_terminal, plan.run_started_at - plan.lookback)
    if not ids:
        return
    log.info("ledger: reading the entries of %d object(s) that settled late", len(ids))
    rejected: list[dict[str, Any]] = []
    source = settled_ledger_source(plan.client, ids, plan.run_started_at, rejected)
    _step(pipeline.extract, source, loader_file_format=JOB_FORMAT.loader_file_format,
          warehouse_path=path)  # fmt: skip
    result.rejected_records += store_rejected(path, rejected)
    _step(pipeline.normalize, warehouse_path=path)
    _step(pipeline.load, warehouse_path=path)
    result.loads += 1
    normalize_info = pipeline.last_trace.last_normalize_info
    if normalize_info:
        rows.update(normalize_info.row_counts)
