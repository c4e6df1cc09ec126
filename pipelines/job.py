"""One run of the job: extract -> load -> models -> data tests -> emit, with honest exit codes."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

import duckdb

from pipelines import alerts, bookkeeping, metrics, warehouse
from pipelines.config import AppConfig, ConfigError, ModelsConfig
from pipelines.dodo_contract import RAW_DATASET, RESOURCES
from pipelines.logs import Progress, heartbeat, scrub
from pipelines.transform import (
    ModelError,
    clear_scratch,
    forget_delta_state,
    record_check,
    run_models,
    verify_against_full_build,
)

if TYPE_CHECKING:  # the extract (dlt, pyarrow) is imported by run_job, not by every command
    from pipelines.extract import ExtractResult, WebhookMerge

log = logging.getLogger("dodo_segment")

StepHook = Callable[..., None]
"""on_step(step=..., **facts): told when the run enters a step (the CLI notes it in the lock)."""


class ExitCode(IntEnum):
    """The job's exit codes (documented in the README)."""

    OK = 0
    FAILED = 1
    USAGE = 2
    REJECTED_OR_QUARANTINED = 3
    DATA_TEST_FAILED = 4


def package_version() -> str:
    """The installed dodo-segment version."""
    try:
        return version("dodo-segment")
    except PackageNotFoundError:
        return "dev"


@dataclass
class RunOptions:
    """What `dodo-segment run` was asked to do."""

    dry_run: bool = False
    events_since: datetime | None = None
    full_refresh: frozenset[str] = frozenset()
    skip_emit: bool = False
    only_emit: bool = False
    webhook_only: bool = False
    """Merge the stored webhook deliveries and skip reading the API (runs started by `listen`)."""
    command: str = "run"
    deep: bool = False
    """Make this run the deep pass (re-read the whole lookback_days window)."""


@dataclass
class RunReport:
    """Figures of one run, as stored in segment_sync.runs and shown by `status`."""

    run_id: str
    started_at: datetime
    command: str = "run"
    outcome: str = "running"
    exit_code: int | None = None
    extract: ExtractResult | None = None
    webhooks: WebhookMerge | None = None
    models_seconds: float | None = None
    data_test_seconds: float | None = None
    quarantined: int = 0
    data_test_errors: list[str] = field(default_factory=list)
    identifies_sent: int = 0
    tracks_sent: int = 0
    skipped_backlog: int = 0
    rejected: int = 0
    pending: int | None = None
    emit_seconds: float | None = None
    error: str | None = None
    preview: Any = None
    current_step: str = "start"
    """The step the run is in (named in a disk-full error)."""
    stopped_by: str | None = None
    """"dodo" or "segment" when an outage of that service stopped the run (for alerts)."""
    models_verified: bool = False
    """The deep pass compared the models with a full build (`models_drift` what differed)."""
    models_drift: list[str] = field(default_factory=list)
    models_first_build: bool = False
    """The models were built for the first time (a first sync): a full build, nothing to verify."""
    outbox_changes: Any = None
    """What this run's models build changed in the outboxes (`OutboxChanges`), for the emit."""

    def as_row(self) -> dict[str, Any]:
        """The row written to segment_sync.runs."""
        finished = datetime.now(UTC) if self.outcome != "running" else None
        return {
            "run_id": self.run_id,
            "command": self.command,
            "started_at": self.started_at,
            "finished_at": finished,
            "duration_seconds": (finished - self.started_at).total_seconds() if finished else None,
            "outcome": self.outcome,
            "exit_code": self.exit_code,
            "rows_loaded": (self.extract.rows_loaded if self.extract else {})
            | {
                f"webhook:{t}": n
                for t, n in (self.webhooks.merged if self.webhooks else {}).items()
            },
            "api_requests": self.extract.api_requests if self.extract else {},
            "identifies_sent": self.identifies_sent,
            "tracks_sent": self.tracks_sent,
            "skipped_backlog": self.skipped_backlog,
            "rejected": self.rejected,
            "quarantined": self.quarantined,
            "pending": self.pending,
            "error": self.error,
        }


def new_run_id(now: datetime) -> str:
    """A sortable, unique run id."""
    return now.strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:8]


def check_ready(config: AppConfig, options: RunOptions) -> None:
    """Refuse a run whose configuration cannot work, before touching anything."""
    if not options.only_emit and not options.webhook_only:
        if not config.extract.api_key:
            raise ConfigError(
                "DODO_PAYMENTS_API_KEY is not set: export it (a read-only key is enough) or put "
                "it in .dlt/secrets.toml under [sources.dodo] api_key"
            )
    if not options.skip_emit and not options.dry_run and not config.segment.write_key:
        raise ConfigError(
            "SEGMENT_WRITE_KEY is not set: export your Segment source's write key, or run with "
            "--skip-emit to only extract and model"
        )
    unknown = set(options.full_refresh) - set(RESOURCES)
    if unknown:
        raise ConfigError(
            f"unknown resource for --full-refresh: {', '.join(sorted(unknown))} "
            f"(choose from {', '.join(RESOURCES)})"
        )


def _save(config: AppConfig, report: RunReport) -> None:
    try:
        with warehouse.connect(config.warehouse_path) as con:
            warehouse.record_run(con, report.as_row())
    except Exception as exc:  # read-only or full disk (duckdb/OS errors): never crash the run
        log.error("could not record the run in the warehouse: %s", scrub(str(exc).splitlines()[0]))


def _note_typical_duration(config: AppConfig, report: RunReport, on_step: StepHook) -> None:
    with warehouse.connect(config.warehouse_path) as con:
        typical = warehouse.typical_run_seconds(con, report.command)
    on_step(step="starting", run_id=report.run_id, typical_seconds=typical)


_STOPPED_BY_SIGNAL = (
    "stopped by a signal (SIGTERM or Ctrl-C); what was delivered stays delivered, "
    "the rest is pending"
)
"""A run stopped by SIGTERM or Ctrl-C: its error."""


def run_job(config: AppConfig, options: RunOptions, on_step: StepHook | None = None) -> RunReport:
    """Run every step; never raises for an expected failure, the report says what happened."""
    from pipelines.extract import DodoApiError, DodoUnavailable

    started = datetime.now(UTC)
    command = f"{options.command} --dry-run" if options.dry_run else options.command
    report = RunReport(run_id=new_run_id(started), started_at=started, command=command)
    notify = on_step or (lambda **facts: None)

    def step(**facts: Any) -> None:
        report.current_step = str(facts.get("step", report.current_step))
        notify(**facts)

    recordable = False  # a warehouse that cannot be opened or is too new takes no record
    # One open database for every step and, unless a step raised, for the run's record too.
    with ExitStack() as holding:
        try:
            try:
                warehouse.prepare(config.warehouse_path, package_version(), hold=holding)
                recordable = True
                _run_steps(config, options, report, step)
            except BaseException:
                # The held database may be unusable now: close it here, where a failure or a
                # signal while closing is handled as the step's; the record opens the file again.
                holding.close()
                raise
        except ConfigError as exc:
            report.outcome, report.exit_code, report.error = "usage_error", ExitCode.USAGE, str(exc)
        except (DodoApiError, warehouse.WarehouseError, ModelError) as exc:
            report.outcome, report.exit_code, report.error = "failed", ExitCode.FAILED, str(exc)
            if warehouse.disk_full(exc):
                report.error = f"{warehouse.DISK_FULL_ADVICE} (step {_step_of(exc, report)}: {exc})"
            if isinstance(exc, DodoUnavailable):
                report.stopped_by = "dodo"
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM from systemd/cron (the CLI maps it)
            report.outcome, report.exit_code = "interrupted", ExitCode.FAILED
            report.error = _STOPPED_BY_SIGNAL
        except Exception as exc:  # an unexpected failure still ends as a recorded, failed run
            root = _root_cause(exc)
            report.outcome, report.exit_code = "failed", ExitCode.FAILED
            if warehouse.disk_full(exc):
                report.error = f"{warehouse.DISK_FULL_ADVICE} (step {_step_of(exc, report)})"
            elif isinstance(root, KeyboardInterrupt):  # dlt wraps a signal in its own exception
                report.outcome = "interrupted"
                report.error = _STOPPED_BY_SIGNAL
            else:
                log.error("run failed", exc_info=exc)
                text = str(root).strip().splitlines()
                report.error = f"{type(root).__name__}: {text[0] if text else ''}"
        if report.webhooks is not None:
            _wait_marked(report)
        if report.error:
            report.error = scrub(report.error)
        if recordable:
            step(step="recording")
            _save(config, report)
            _record_metrics(config, report)
            _prune_bookkeeping(config)
        _close_held(holding)
    if options.command == "run" and not options.dry_run:
        _alert(config, report)
    return report


def _close_held(holding: ExitStack) -> None:
    """Close the held warehouse after the run's record; an error there is logged, the run's
    outcome stands (what it committed is in the file or in DuckDB's write-ahead log, which
    the next open applies). A signal while closing stops the process, as one during the
    record always has."""
    try:
        holding.close()
    except Exception as exc:
        log.warning("could not checkpoint the warehouse at the end of the run: %s",
                    scrub(str(exc).splitlines()[0] if str(exc) else repr(exc)))  # fmt: skip


def _run_steps(config: AppConfig, options: RunOptions, report: RunReport, step: StepHook) -> None:
    """Webhooks, extract, models (and the deep pass's verification), emit; the outcome."""
    _save(config, report)
    _note_typical_duration(config, report, step)
    if clear_scratch(config.warehouse_path):  # customers' data: it must not outlive the check
        log.warning("removed the copy of the warehouse left by a verification that was stopped")
    reads_api = not options.only_emit and not options.webhook_only
    if options.webhook_only and not _has_extract_state(config):
        # A new or lost warehouse: merged alone, the deliveries would be each customer's whole
        # history (total_spent, customer_since from a few payments). They wait, stored, for a
        # run that syncs from the API first (next paragraph).
        from pipelines.webhook_store import WebhookStore, store_folder

        waiting = WebhookStore(store_folder(config.warehouse_path)).pending_count()
        log.warning(
            "webhook-only run: the warehouse has no extract state yet (new or lost); %d "
            "delivery(ies) wait for the next scheduled run, which syncs from the API first",
            waiting,
        )
        report.outcome, report.exit_code = "success", ExitCode.OK
        return
    # A warehouse without extract state (new, lost, or replaced) is synced from the API before
    # the stored deliveries are merged into it: merged first, they would make it look synced.
    first_sync = reads_api and not _has_extract_state(config)
    if first_sync:
        step(step="extract")
        _extract(config, options, report)
    if not options.only_emit:
        step(step="webhooks")
        from pipelines.extract import merge_webhooks

        # webhook-only: the merged deliveries are marked merged while models and emit run
        report.webhooks = merge_webhooks(config, mark_later=options.webhook_only)
    if reads_api and not first_sync:
        step(step="extract")
        _extract(config, options, report)
    if reads_api:
        _release_freed_memory()
    step(step="models")
    blocked = _run_models(config, options, report)
    if report.extract is not None and report.extract.deep and _incremental(config, options):
        step(step="verify")
        _verify_models(config, report)
    if blocked:
        report.outcome, report.exit_code = "data_test_failed", ExitCode.DATA_TEST_FAILED
    elif not options.skip_emit:
        step(step="emit")
        _emit(config, options, report)
    if report.exit_code is None:
        flagged = report.rejected or report.quarantined
        if report.extract and report.extract.rejected_records:
            flagged = True
        report.outcome = "finished_with_rejections" if flagged else "success"
        report.exit_code = ExitCode.REJECTED_OR_QUARANTINED if flagged else ExitCode.OK


def _release_freed_memory() -> None:
    """Give the OS back what the extract freed before the models' buffers grow on top of it:
    otherwise glibc's free lists and pyarrow's pool keep it, and a run's peak RSS is the
    extract's leftovers plus the models' DuckDB memory."""
    import ctypes
    import gc

    import pyarrow

    gc.collect()
    pyarrow.default_memory_pool().release_unused()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): its allocator keeps it
        pass


def _has_extract_state(config: AppConfig) -> bool:
    """Whether the warehouse holds the extract's dlt state (a first sync has completed)."""
    with warehouse.connect(config.warehouse_path) as con:
        return bool(
            con.execute(
                "select count(*) from information_schema.tables "
                "where table_schema = ? and table_name = '_dlt_pipeline_state'",
                [RAW_DATASET],
            ).fetchone()[0]
        )


def _wait_marked(report: RunReport) -> None:
    """The webhook-only run ends once its merged deliveries are marked merged; a failure there
    (a full disk) fails the run in one line: they stay pending, merged again next time."""
    assert report.webhooks is not None
    try:
        report.webhooks.wait_marked()
    except Exception as exc:
        text = (str(exc).splitlines() or [type(exc).__name__])[0]
        error = f"could not mark the merged webhook deliveries: {text}"
        if warehouse.disk_full(exc):
            error = f"{warehouse.DISK_FULL_ADVICE} (step webhook merge)"
        if report.exit_code in (None, ExitCode.OK, ExitCode.REJECTED_OR_QUARANTINED):
            report.outcome, report.exit_code, report.error = "failed", ExitCode.FAILED, error
        else:
            log.error("%s", scrub(error))


def _step_of(exc: BaseException, report: RunReport) -> str:
    """The step a run failed in (for the one-line error)."""
    return {"extract": "extract and load", "webhooks": "webhook merge"}.get(
        report.current_step, report.current_step
    )


def _record_metrics(config: AppConfig, report: RunReport) -> None:
    """Keep the run's step durations and write the metrics textfile; never fails the run."""
    steps = {
        "extract": report.extract.seconds.get("total") if report.extract else None,
        "models": report.models_seconds,
        "emit": report.emit_seconds,
        "total": report.as_row()["duration_seconds"],
    }
    try:
        with warehouse.connect(config.warehouse_path) as con:
            metrics.record_steps(con, report.run_id, steps)
            if config.metrics_textfile:
                metrics.write_textfile(config.metrics_textfile, con, config.warehouse_path)
    except Exception as exc:  # a full disk or an unwritable textfile folder: the run stands
        log.warning("could not write the run's metrics: %s", scrub(str(exc).splitlines()[0]))


def _prune_bookkeeping(config: AppConfig) -> None:
    """Fold away old per-run rows that say nothing new (bookkeeping.py); never fails the run."""
    try:
        with warehouse.connect(config.warehouse_path) as con:
            removed = bookkeeping.prune(con)
        if removed:
            log.debug("bookkeeping: folded away %s", removed)
    except Exception as exc:  # a full disk: the rows stay until a later run
        log.warning("could not prune the run bookkeeping: %s", scrub(str(exc).splitlines()[0]))


def _alert(config: AppConfig, report: RunReport) -> None:
    """Tell the webhook what needs a person (and what cleared); never fails the run."""
    facts = {
        **report.as_row(),
        "stopped_by": report.stopped_by,
        "records_set_aside": report.extract.rejected_records if report.extract else 0,
        "data_test_errors": report.data_test_errors,
        "extracted": report.extract is not None,
        "modelled": report.models_seconds is not None,
        "emitted": report.emit_seconds is not None,
        "models_verified": report.models_verified,
        "models_drift": report.models_drift,
    }
    try:
        alerts.after_run(config, facts)
    except Exception as exc:  # alerting is a courtesy: the run's outcome stands
        log.warning("alerts: %s", scrub(str(exc).splitlines()[0] if str(exc) else repr(exc)))


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception behind wrappers such as dlt's PipelineStepFailed."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "exception", None) or exc.__cause__ or exc.__context__
        if not isinstance(inner, BaseException):
            break
        exc = inner
    return exc


def _extract(config: AppConfig, options: RunOptions, report: RunReport) -> None:
    from pipelines.extract import run_extract

    t0 = time.monotonic()
    log.info("extract: reading the Dodo Payments API at %s", config.extract.base_url)
    progress = Progress("extract", verb="rows read")
    try:
        with heartbeat("extract", "reading the Dodo Payments API"):
            report.extract = run_extract(
                config,
                full_refresh=options.full_refresh,
                on_page=progress.count_page,
                deep=options.deep,
                run_id=report.run_id,
            )
    finally:
        progress.close()
    log.info(
        "extract: loaded %d rows in %.1fs with %d API requests (%s)",
        report.extract.total_rows,
        time.monotonic() - t0,
        sum(report.extract.api_requests.values()),
        ", ".join(f"{k} {v}" for k, v in sorted(report.extract.rows_loaded.items())),
    )
    if report.extract.rejected_records:
        log.warning(
            "extract: %d malformed record(s) set aside in dodo_raw.rejected_records",
            report.extract.rejected_records,
        )


def _run_models(config: AppConfig, options: RunOptions, report: RunReport) -> bool:
    """Build the SQL models and run the data tests; True when an error test blocks emission."""
    t0 = time.monotonic()
    progress = Progress("models", verb="built")
    with (
        warehouse.connect(config.warehouse_path, memory_limit=config.memory_limit) as con,
        closing(progress),
    ):
        user = config.models or ModelsConfig()
        result = run_models(
            con,
            event_catalog=config.segment.event_catalog,
            skip_unchanged=config.skip_unchanged_models and options.command != "transform",
            user_paths=user.paths,
            skip_events=user.skip_events,
            rename_events=user.rename_events,
            identity=user.identity,
            on_model=lambda name, done, total: progress("build", done, total, note=name),
            incremental=_incremental(config, options),
            delta_memory_limit=config.delta_memory_limit,
        )
    report.models_seconds = time.monotonic() - t0
    report.outbox_changes = result.outbox_changes
    report.models_first_build = result.build == "full" and result.build_reason == "first build"
    report.quarantined = sum(result.quarantined.values())
    report.data_test_errors = [str(e) for e in result.errors]
    for name, count in result.quarantined.items():
        if count:
            log.warning("data test %s: %d row(s) quarantined (not emitted)", name, count)
    for error in report.data_test_errors:
        log.error("data test failed: %s", error)
    if result.skipped:
        log.info("models: inputs unchanged and nothing fell due since the last build, kept it")
    elif result.build == "delta":
        log.info(
            "models: delta build of %d touched customer(s) in %.1fs",
            result.touched_customers,
            report.models_seconds,
        )
    elif result.build_reason and result.build_reason != "not incremental":
        log.info("models: built in %.1fs (in full: %s)", report.models_seconds, result.build_reason)
    else:
        log.info("models: built in %.1fs", report.models_seconds)
    if result.emission_blocked:
        report.error = "an error-severity data test failed; nothing was emitted"
    return bool(result.emission_blocked)


def _incremental(config: AppConfig, options: RunOptions) -> bool:
    """Whether this run may build the models by delta (`transform` always builds in full)."""
    return config.incremental_models and options.command != "transform" and not options.dry_run


def full_build(config: AppConfig, con: duckdb.DuckDBPyConnection, incremental: bool) -> None:
    """Build every model in full with the configuration's catalog, user models and rules
    (`incremental`: and keep the delta snapshot for the runs after it)."""
    user = config.models or ModelsConfig()
    run_models(
        con,
        event_catalog=config.segment.event_catalog,
        skip_unchanged=incremental and config.skip_unchanged_models,
        user_paths=user.paths,
        skip_events=user.skip_events,
        rename_events=user.rename_events,
        identity=user.identity,
        incremental=incremental,
    )


def _verify_models(config: AppConfig, report: RunReport) -> None:
    """The deep pass: compare the models with a full build of a scratch copy; on drift, repair
    the warehouse with a full build (which also renews the delta snapshot) and say so."""
    t0 = time.monotonic()
    if report.models_first_build:  # a first sync's build is a full build: equal by construction
        with warehouse.connect(config.warehouse_path) as con:
            record_check(con, report.run_id, [], repaired=False)
        report.models_verified = True
        return
    with warehouse.let_go(config.warehouse_path):  # the file is copied, then attached
        drifts = verify_against_full_build(
            config.warehouse_path, lambda con: full_build(config, con, incremental=False)
        )
    report.models_verified = True
    report.models_drift = [str(d) for d in drifts]
    with warehouse.connect(config.warehouse_path, memory_limit=config.memory_limit) as con:
        if drifts:
            for drift in drifts:
                log.error("models drifted from a full build: %s", drift)
            forget_delta_state(con)
            full_build(config, con, incremental=True)
            log.warning("models: rebuilt in full to repair the drift")
        record_check(con, report.run_id, drifts, repaired=bool(drifts))
    log.info("models: verified against a full build in %.1fs", time.monotonic() - t0)


def emit_settings(config: AppConfig) -> Any:
    """The emitter's settings from the job's configuration."""
    from pipelines.emit import EmitSettings

    sc = config.segment
    return EmitSettings(
        write_key=sc.write_key,
        host=sc.host,
        excluded_fields=sc.excluded_fields,
        max_events_per_second=sc.max_events_per_second,
        max_retries=sc.max_retries,
        timeout=sc.timeout_seconds,
        alias=(config.models or ModelsConfig()).identity.alias,
        event_catalog=sc.event_catalog,
        tracking_plan_path=sc.tracking_plan_path,
    )


def _changed_since(report: RunReport) -> Any:
    """What the emit may read only of (`ChangedSince`): the models' changes, except on the
    deep pass, whose emit reads the whole outboxes as its extract re-reads the whole lookback
    (a bound on how long anything a build failed to tell could wait)."""
    from pipelines.emit import ChangedSince

    changes = report.outbox_changes
    if changes is None:
        return None
    if report.extract is not None and report.extract.deep:
        return ChangedSince(changes.build_id, None)  # everything read, and settled after
    return ChangedSince(
        changes.build_id,
        changes.since_build,
        changes.customer_ids,
        changes.user_ids,
        changes.tracks_table,
    )


def _emit(config: AppConfig, options: RunOptions, report: RunReport) -> None:
    from pipelines.emit import emit, preview

    t0 = time.monotonic()
    with warehouse.connect(config.warehouse_path, memory_limit=config.memory_limit) as con:
        since, previous, restored = _continue_from_checkpoint(config, options, report, con)
        if options.dry_run:
            report.preview = preview(con, emit_settings(config), events_since=since)
            return
        progress = Progress("emit")
        try:
            result = emit(
                con,
                emit_settings(config),
                run_id=report.run_id,
                events_since=since,
                progress=progress,
                changed=_changed_since(report),
            )
        finally:
            progress.close()
        _keep_checkpoint(config, report, con, previous, restored, result.ledger_state)
    report.emit_seconds = time.monotonic() - t0
    report.identifies_sent = result.identifies_sent
    report.tracks_sent = result.tracks_sent
    report.skipped_backlog = result.skipped_backlog
    report.rejected = result.rejected
    report.pending = result.pending
    log.info(
        "emit: %d identify and %d track call(s) delivered in %.1fs, %d pending, %d rejected",
        result.identifies_sent,
        result.tracks_sent,
        report.emit_seconds,
        result.pending,
        result.rejected,
    )
    if result.scoped:
        log.info(
            "emit: read only what the models changed since the last settled emit "
            "(%d customer(s), %d user(s))",
            len(report.outbox_changes.customer_ids),
            len(report.outbox_changes.user_ids),
        )
    if result.skipped_backlog:
        log.info(
            "emit: first sync: %d historical event(s) recorded as skipped, not sent "
            "(send them with --events-since DATE)",
            result.skipped_backlog,
        )
    if result.failed:
        report.outcome, report.exit_code = "failed", ExitCode.FAILED
        report.stopped_by = "segment"
        report.error = (
            f"Segment at {config.segment.host} did not accept every batch "
            f"({result.error or 'no answer'}); the {result.pending} undelivered message(s) stay "
            "pending for the next run (check SEGMENT_HOST and the network)"
        )


def _continue_from_checkpoint(
    config: AppConfig, options: RunOptions, report: RunReport, con: Any
) -> tuple[datetime | None, Any, dict[str, Any] | None]:
    """A first sync on a lost or rebuilt warehouse continues from the checkpoint (unless
    --events-since says otherwise): the events since it are sent, the backlog before skipped.

    Returns the `events_since` for the emitter, the checkpoint found, and the restore's facts.
    """
    from pipelines.emit import (
        catch_up_ledger,
        ledger_is_empty,
        read_checkpoint,
        restore_ledger,
        warehouse_knows_run,
    )

    if options.events_since is not None or config.warehouse_path.startswith("md:"):
        return options.events_since, read_checkpoint(config.warehouse_path), None
    previous = read_checkpoint(config.warehouse_path)
    if previous is None:
        return None, previous, None
    if not ledger_is_empty(con):
        if options.dry_run or warehouse_knows_run(con, previous.run_id):
            return None, previous, None
        caught_up = catch_up_ledger(con, previous)
        log.info(
            "emit: the warehouse is older than the checkpoint of run %s (restored from a "
            "backup?): the %d event(s) it names as settled are recorded as such, not sent again",
            previous.run_id,
            caught_up.settled,
        )
        return None, previous, caught_up.as_json(report.run_id)
    if options.dry_run:  # nothing is written: the preview counts from where the run would send
        return previous.resend_from, previous, None
    restore, since = restore_ledger(con, previous, report.run_id)
    log.info(
        "emit: the warehouse has no delivery ledger but the checkpoint of run %s does: sending "
        "the events since %s (delivered up to %s, minus a %.0fh safety margin) instead of "
        "skipping the backlog",
        previous.run_id,
        restore.resend_from.isoformat() if restore.resend_from else "the start",
        previous.delivered_up_to.isoformat() if previous.delivered_up_to else "-",
        previous.margin_seconds / 3600,
    )
    return since, previous, restore.as_json(report.run_id)


def _keep_checkpoint(
    config: AppConfig,
    report: RunReport,
    con: Any,
    previous: Any,
    restored: dict[str, Any] | None,
    state: Any = None,
) -> None:
    """Write the checkpoint after an emit (`state`: the ledger's as the emit worked it out);
    a failure to write it fails the run (one line)."""
    from pipelines.emit import checkpoint_path, take_checkpoint, write_checkpoint

    if config.warehouse_path.startswith("md:"):
        return
    checkpoint = take_checkpoint(con, report.run_id, previous, state)
    if restored is not None:
        checkpoint.restored = restored
    try:
        write_checkpoint(config.warehouse_path, checkpoint)
    except OSError as exc:
        raise warehouse.WarehouseError(
            f"could not write the delivery checkpoint {checkpoint_path(config.warehouse_path)}: "
            f"{exc.strerror or exc}; what was delivered stays recorded in the warehouse"
        ) from None


def summary_line(report: RunReport) -> str:
    """The one line `run` prints on stdout when it ends."""
    seconds = (datetime.now(UTC) - report.started_at).total_seconds()
    parts = [f"{report.command} {report.run_id}: {report.outcome} in {seconds:.1f}s"]
    if report.extract is not None:
        parts.append(
            f"loaded {report.extract.total_rows} rows with "
            f"{sum(report.extract.api_requests.values())} API requests"
        )
    if report.preview is None and report.exit_code != ExitCode.DATA_TEST_FAILED:
        parts.append(f"sent {report.identifies_sent} identify, {report.tracks_sent} track")
    if report.skipped_backlog:
        parts.append(f"{report.skipped_backlog} historical events skipped")
    parts.append(f"{report.rejected} rejected, {report.quarantined} quarantined")
    if report.pending is not None:
        parts.append(f"{report.pending} pending")
    return "; ".join(parts) + f" (exit {int(report.exit_code or 0)})"


def summary_figures(report: RunReport) -> dict[str, Any]:
    """The summary line's figures, for JSON output."""
    row = report.as_row()
    return {k: row[k] for k in ("run_id", "command", "outcome", "exit_code", "duration_seconds",
                                "rows_loaded", "api_requests", "identifies_sent", "tracks_sent",
                                "skipped_backlog", "rejected", "quarantined", "pending", "error")}  # fmt: skip
