"""Prometheus metrics of the job, from segment_sync.runs: `status --format prometheus` and a
textfile for node_exporter's textfile collector, written after each run."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import duckdb
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from pipelines import lock, warehouse
from pipelines.alerts import KINDS, open_alerts
from pipelines.dodo_contract import SYNC_SCHEMA

RUN_STEPS_DDL = (
    f"create schema if not exists {SYNC_SCHEMA};\n"
    f"create table if not exists {SYNC_SCHEMA}.run_steps "
    "(run_id varchar, step varchar, seconds double, primary key (run_id, step));\n"
)
"""How long each step of each run took (extract, models, emit, total); owned here, created
idempotently, no schema version of its own."""

RUNS_TABLE = f"{SYNC_SCHEMA}.runs"
FINISHED = ("success", "finished_with_rejections")
"""Outcomes of a run that went through every step (exit 0 or 3)."""

TEXTFILE_MODE = 0o644
"""node_exporter usually runs as another user; the figures hold no personal data."""


def record_steps(
    con: duckdb.DuckDBPyConnection, run_id: str, seconds: Mapping[str, float | None]
) -> None:
    """Keep how long each step of a run took (steps that did not run are left out)."""
    con.execute(RUN_STEPS_DDL)
    for step, value in seconds.items():
        if value is not None:
            con.execute(
                f"insert or replace into {SYNC_SCHEMA}.run_steps values (?, ?, ?)",
                [run_id, step, float(value)],
            )


def _has_table(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    row = con.execute(
        "select count(*) from information_schema.tables where table_schema = ? and table_name = ?",
        [SYNC_SCHEMA, name],
    ).fetchone()
    return bool(row and row[0])


def _sum_json(values: Iterable[Any]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for text in values:
        for key, value in (json.loads(text) if text else {}).items():
            totals[key] = totals.get(key, 0) + float(value or 0)
    return totals


def _epoch(value: Any) -> float | None:
    return value.timestamp() if value is not None else None


def figures(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    """The run history's figures that the metrics show (read-only)."""
    if not _has_table(con, "runs"):
        return {}
    by_outcome = con.execute(
        f"select command, outcome, count(*) from {RUNS_TABLE} where outcome <> 'running' "
        "group by all order by all"
    ).fetchall()
    sums = con.execute(
        f"select coalesce(sum(identifies_sent), 0), coalesce(sum(tracks_sent), 0), "
        f"coalesce(sum(rejected), 0), coalesce(sum(skipped_backlog), 0) from {RUNS_TABLE}"
    ).fetchone() or (0, 0, 0, 0)
    loaded = con.execute(f"select rows_loaded, api_requests from {RUNS_TABLE}").fetchall()
    success = con.execute(
        f"select max(finished_at) from {RUNS_TABLE} where command = 'run' and outcome in {FINISHED}"
    ).fetchone()
    last = con.execute(
        f"select run_id, finished_at, duration_seconds, exit_code, quarantined, pending "
        f"from {RUNS_TABLE} where command = 'run' and outcome <> 'running' "
        "order by started_at desc limit 1"
    ).fetchone()
    pending = con.execute(
        f"select pending from {RUNS_TABLE} where pending is not null order by started_at desc limit 1"
    ).fetchone()
    steps_total: list[tuple[str, float]] = []
    steps_last: list[tuple[str, float]] = []
    if _has_table(con, "run_steps"):
        steps_total = con.execute(
            f"select step, sum(seconds) from {SYNC_SCHEMA}.run_steps group by all order by all"
        ).fetchall()
        if last:
            steps_last = con.execute(
                f"select step, seconds from {SYNC_SCHEMA}.run_steps where run_id = ? order by 1",
                [last[0]],
            ).fetchall()
    if _has_table(con, "pruned_runs"):  # runs folded away by bookkeeping.prune: still counted
        folded = con.execute(
            f"select command, outcome, runs, rows_loaded::varchar, api_requests::varchar "
            f"from {SYNC_SCHEMA}.pruned_runs"
        ).fetchall()
        counts = {(c, o): n for c, o, n in by_outcome}
        for command, outcome, runs, rows_json, api_json in folded:
            counts[(command, outcome)] = counts.get((command, outcome), 0) + runs
            loaded.append((rows_json, api_json))
        by_outcome = sorted(
            ((c, o, n) for (c, o), n in counts.items()), key=lambda r: (r[0] or "", r[1] or "")
        )
    if _has_table(con, "pruned_steps"):  # the steps of runs older than the kept ones
        totals = dict(steps_total)
        for step, seconds in con.execute(
            f"select step, seconds from {SYNC_SCHEMA}.pruned_steps"
        ).fetchall():
            totals[step] = totals.get(step, 0.0) + seconds
        steps_total = sorted(totals.items())
    return {
        "runs": by_outcome,
        "identifies_sent": sums[0],
        "tracks_sent": sums[1],
        "rejected": sums[2],
        "skipped_backlog": sums[3],
        "rows_loaded": _sum_json(r[0] for r in loaded),
        "api_requests": _sum_json(r[1] for r in loaded),
        "last_success": _epoch(success[0]) if success else None,
        "last_run": last,
        "pending": pending[0] if pending else None,
        "steps_total": steps_total,
        "steps_last": steps_last,
        "identity": identity_figures(con),
        "model_check": _last_model_check(con),
    }


def identity_figures(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    """How customers became Segment users (`analytics.customer_identity` of the last build):
    customers per source, fallbacks, invalid metadata values, user ids claimed by customers with
    different emails, accounts. Empty before the first build."""
    present = con.execute(
        "select count(*) from information_schema.tables "
        "where table_schema = 'analytics' and table_name = 'customer_identity'"
    ).fetchone()
    if not present or not present[0]:
        return {}
    by_source = dict(
        con.execute(
            "select user_id_source, count(*) from analytics.customer_identity group by 1 order by 1"
        ).fetchall()
    )
    row = con.execute(
        """select count(*), count(distinct user_id), count(*) filter (where fell_back),
                  coalesce(sum(invalid_values), 0), count(distinct group_id)
           from analytics.customer_identity"""
    ).fetchone() or (0, 0, 0, 0, 0)
    claimed = [
        r[0]
        for r in con.execute(
            """select user_id from analytics.customer_identity group by user_id
               having count(distinct lower(email)) > 1 order by user_id"""
        ).fetchall()
    ]
    return {
        "customers": row[0],
        "user_ids": row[1],
        "by_source": by_source,
        "fell_back": row[2],
        "invalid_values": int(row[3]),
        "claimed_by_different_emails": claimed,
        "groups": row[4],
    }


def _last_model_check(con: duckdb.DuckDBPyConnection) -> dict[str, Any] | None:
    """The deep pass's latest comparison of the models with a full build (model_checks)."""
    if not _has_table(con, "model_checks"):
        return None
    row = con.execute(
        f"select checked_at, drifted_tables from {SYNC_SCHEMA}.model_checks "
        "order by checked_at desc limit 1"
    ).fetchone()
    return {"checked_at": row[0], "drifted_tables": row[1]} if row else None


class _Snapshot:
    """A prometheus_client collector over figures read once (no live instrumentation)."""

    def __init__(self, found: Mapping[str, Any], holder: lock.LockHolder | None, alerts: Any):
        self.found, self.holder, self.alerts = found, holder, alerts

    def collect(self) -> Iterator[Metric]:
        yield from self._progress()
        yield from self._history()

    def _progress(self) -> Iterator[Metric]:
        running = GaugeMetricFamily(
            "dodo_segment_run_in_progress", "1 while a run holds the warehouse's lock"
        )
        running.add_metric([], 1 if self.holder else 0)
        yield running
        if self.holder and self.holder.held_seconds is not None:
            yield GaugeMetricFamily(
                "dodo_segment_run_in_progress_seconds",
                "How long the run in progress has held the lock",
                value=self.holder.held_seconds,
            )
        alert = GaugeMetricFamily(
            "dodo_segment_alert_open", "1 while an alert condition is open", labels=["kind"]
        )
        for kind in KINDS:
            alert.add_metric([kind], 1 if kind in self.alerts else 0)
        yield alert

    def _history(self) -> Iterator[Metric]:
        found = self.found
        if not found:
            return
        runs = CounterMetricFamily(
            "dodo_segment_runs",
            "Finished runs by command and outcome",
            labels=["command", "outcome"],
        )
        for command, outcome, count in found["runs"]:
            runs.add_metric([command or "", outcome or ""], count)
        yield runs
        if found["last_success"] is not None:
            yield GaugeMetricFamily(
                "dodo_segment_last_success_timestamp_seconds",
                "When the last `run` that went through every step (exit 0 or 3) finished",
                value=found["last_success"],
            )
        last = found["last_run"]
        if last:
            _, finished, duration, exit_code, quarantined, _ = last
            for name, text, value in (
                ("last_run_timestamp_seconds", "When the last `run` finished", _epoch(finished)),
                ("last_run_duration_seconds", "How long the last `run` took", duration),
                ("last_run_exit_code", "The last `run`'s exit code", exit_code),
                ("last_run_quarantined_rows", "Rows the last `run` quarantined", quarantined),
            ):
                if value is not None:
                    yield GaugeMetricFamily(f"dodo_segment_{name}", text, value=value)
        check = found.get("model_check")
        if check:
            yield GaugeMetricFamily(
                "dodo_segment_models_drifted_tables",
                "Analytics tables that differed from a full build at the last verification",
                value=check["drifted_tables"],
            )
            yield GaugeMetricFamily(
                "dodo_segment_models_verified_timestamp_seconds",
                "When the deep pass last compared the models with a full build",
                value=_epoch(check["checked_at"]),
            )
        yield from self._counters()

    def _counters(self) -> Iterator[Metric]:
        found = self.found
        for name, text, label, values in (
            ("rows_loaded", "Rows loaded into the raw tables", "table", found["rows_loaded"]),
            ("api_requests", "Requests to the Dodo API", "resource", found["api_requests"]),
        ):
            family = CounterMetricFamily(f"dodo_segment_{name}", text, labels=[label])
            for key, value in sorted(values.items()):
                family.add_metric([key], value)
            yield family
        sent = CounterMetricFamily(
            "dodo_segment_messages_sent", "Messages Segment acknowledged", labels=["type"]
        )
        sent.add_metric(["identify"], found["identifies_sent"])
        sent.add_metric(["track"], found["tracks_sent"])
        yield sent
        yield CounterMetricFamily(
            "dodo_segment_messages_rejected",
            "Messages set aside as invalid or refused by Segment",
            value=found["rejected"],
        )
        yield CounterMetricFamily(
            "dodo_segment_events_skipped",
            "Historical events recorded as skipped on the first sync",
            value=found["skipped_backlog"],
        )
        if found["pending"] is not None:
            yield GaugeMetricFamily(
                "dodo_segment_messages_pending",
                "Messages left for the next run, as the last run counted them",
                value=found["pending"],
            )
        yield from _identity_metrics(found.get("identity") or {})
        total = CounterMetricFamily(
            "dodo_segment_step_seconds", "Time spent in each step, all runs", labels=["step"]
        )
        for step, seconds in found["steps_total"]:
            total.add_metric([step], seconds)
        yield total
        last = GaugeMetricFamily(
            "dodo_segment_last_run_step_duration_seconds",
            "How long each step of the last `run` took",
            labels=["step"],
        )
        for step, seconds in found["steps_last"]:
            last.add_metric([step], seconds)
        yield last


def _identity_metrics(identity: Mapping[str, Any]) -> Iterator[Metric]:
    if not identity:
        return
    resolved = GaugeMetricFamily(
        "dodo_segment_customers_by_user_id_source",
        "Customers whose Segment user id came from each [identity] user_id source",
        labels=["source"],
    )
    for source, count in sorted(identity["by_source"].items()):
        resolved.add_metric([source], count)
    yield resolved
    for name, text, value in (
        ("customers_fell_back", "Customers resolved by a later source than the first",
         identity["fell_back"]),
        ("user_id_invalid_values", "Metadata user id values that could not be used",
         identity["invalid_values"]),
        ("user_ids_claimed_by_different_emails",
         "User ids resolved by customers whose emails differ",
         len(identity["claimed_by_different_emails"])),
        ("groups", "Accounts ([group] id) the customers belong to", identity["groups"]),
    ):  # fmt: skip
        yield GaugeMetricFamily(f"dodo_segment_{name}", text, value=value)


def exposition(
    found: Mapping[str, Any], holder: lock.LockHolder | None, warehouse_path: str
) -> bytes:
    """The metrics in Prometheus' text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(found, holder, open_alerts(warehouse_path)))  # type: ignore[arg-type]
    return generate_latest(registry)


def render(warehouse_path: str) -> bytes:
    """What `status --format prometheus` prints. Never writes; while a run holds the warehouse
    (or another program does) only the run-in-progress and alert metrics are shown."""
    holder = lock.is_locked(warehouse_path)
    found: dict[str, Any] = {}
    exists = warehouse_path.startswith("md:") or os.path.exists(warehouse_path)
    if holder is None and exists:
        try:
            with warehouse.connect(warehouse_path, read_only=True) as con:
                found = figures(con)
        except warehouse.WarehouseBusy:
            pass
    return exposition(found, holder, warehouse_path)


def write_textfile(path: str, con: duckdb.DuckDBPyConnection, warehouse_path: str) -> None:
    """Write the metrics for node_exporter's textfile collector (atomically: it may read any
    time). The path should end in `.prom`."""
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{os.getpid()}.{time.monotonic_ns()}")
    try:
        staging.write_bytes(exposition(figures(con), None, warehouse_path))
        os.chmod(staging, TEXTFILE_MODE)
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)
