"""Run one `dodo-segment run` in this process and print its figures as one JSON line.

    python -m bench.job_probe [--events-since DATE] [--rebuild-models] [--deep]
    python -m bench.job_probe --extract-only [--extract-format job|dlt-normaliser|dlt-defaults]

Configured by the job's own environment variables (bench/run.py sets them). Peak RSS is sampled
per phase (the job logs the end of each phase) and for the whole process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Any

import psutil

import pipelines.job as job
from pipelines.config import load_config
from pipelines.extract import JOB_FORMAT, ExtractFormat, ExtractResult, run_extract
from pipelines.job import RunOptions, run_job
from pipelines.transform import TransformResult, run_models

EXTRACT_FORMATS = {
    "job": JOB_FORMAT,
    "dlt-normaliser": ExtractFormat(items="dicts", loader_file_format="parquet"),
    "dlt-defaults": ExtractFormat(items="dicts", loader_file_format=None),
}
"""The job's Arrow + parquet path, and the same rows as Python dicts through dlt's normaliser,
written as parquet or in DuckDB's default loader file format (insert_values)."""


class PhaseMemory(logging.Handler):
    """Samples RSS every 50 ms; the job's end-of-phase log lines close each phase's peak."""

    MARKS = {
        "extract: loaded": "extract_load",
        "models: built": "models",
        "models: delta build": "models",
        "models: inputs unchanged": "models",
        "emit: ": "emit",
    }

    def __init__(self) -> None:
        super().__init__()
        self.process = psutil.Process()
        self.peak = 0
        self.peaks: dict[str, int] = {}
        self.stopped = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self.stopped.wait(0.05):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        for prefix, phase in self.MARKS.items():
            if message.startswith(prefix) and phase not in self.peaks:
                self.peak = max(self.peak, self.process.memory_info().rss)
                self.peaks[phase] = self.peak
                self.peak = self.process.memory_info().rss


def extract_figures(ex: ExtractResult | None) -> dict[str, Any]:
    """Rows, requests, loads and phase seconds of one extract + load."""
    return {
        "rows": ex.total_rows if ex else 0,
        "rows_by_table": ex.rows_loaded if ex else {},
        "api_requests": ex.api_requests if ex else {},
        "api_retries": ex.api_retries if ex else {},
        "loads": ex.loads if ex else 0,
        "seconds": {k: round(v, 3) for k, v in (ex.seconds if ex else {}).items()},
        "deep": ex.deep if ex else None,
        "lookback_seconds": ex.lookback_seconds if ex else None,
        "deep_found": ex.deep_found if ex else {},
        "pacing": ex.pacing if ex else {},
    }


def extract_only(extract_format: ExtractFormat) -> None:
    """One extract + load in the given format; prints its figures as one JSON line."""
    cpu0 = psutil.Process().cpu_times()
    started = time.perf_counter()
    result = run_extract(load_config(), extract_format=extract_format)
    wall = time.perf_counter() - started
    cpu1 = psutil.Process().cpu_times()
    out = {
        "exit_code": 0,
        "format": {"items": extract_format.items,
                   "loader_file_format": extract_format.loader_file_format or "default"},
        "wall_seconds": round(wall, 3),
        "cpu_seconds": round((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system), 2),
        "extract": extract_figures(result),
        "peak_rss_mb": {"process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)},
    }  # fmt: skip
    print(json.dumps(out), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events-since", type=datetime.fromisoformat, default=None)
    parser.add_argument(
        "--rebuild-models", action="store_true",
        help="rebuild the models even when a rebuild would give the same tables",
    )  # fmt: skip
    parser.add_argument(
        "--extract-only", action="store_true", help="only extract + load, no models or emit"
    )
    parser.add_argument("--extract-format", choices=EXTRACT_FORMATS, default="job")
    parser.add_argument("--deep", action="store_true", help="make the run the deep pass")
    args = parser.parse_args()
    if args.extract_only:
        extract_only(EXTRACT_FORMATS[args.extract_format])
        return

    transform: list[TransformResult] = []

    def models(*a: Any, **kw: Any) -> TransformResult:
        result = run_models(*a, **kw)
        transform.append(result)
        return result

    if args.rebuild_models:  # the job's own setting, [models] skip_unchanged
        os.environ["MODELS__SKIP_UNCHANGED"] = "false"
    job.run_models = models  # type: ignore[assignment]  # observed, not changed
    memory = PhaseMemory()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logger = logging.getLogger("dodo_segment")
    logger.setLevel(logging.INFO)
    logger.addHandler(memory)

    cpu0 = psutil.Process().cpu_times()
    started = time.perf_counter()
    since = args.events_since
    report = run_job(
        load_config(),
        RunOptions(
            events_since=since.replace(tzinfo=since.tzinfo or UTC) if since else None,
            deep=args.deep,
        ),
    )
    wall = time.perf_counter() - started
    cpu1 = psutil.Process().cpu_times()
    memory.stopped.set()
    tr = transform[0] if transform else None
    out = {
        "exit_code": int(report.exit_code or 0),
        "error": report.error,
        "wall_seconds": round(wall, 3),
        "cpu_seconds": round((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system), 2),
        "extract": extract_figures(report.extract),
        "models": {
            "seconds_total": round(report.models_seconds or 0, 3),
            "data_tests_seconds": round(tr.tests_seconds, 3) if tr else None,
            "skipped": tr.skipped if tr else None,
            "models_built": len(tr.models) if tr else 0,
            "data_tests": len(tr.tests) if tr else 0,
        },
        "emit": {
            "seconds": round(report.emit_seconds or 0, 3),
            "identifies_sent": report.identifies_sent,
            "tracks_sent": report.tracks_sent,
            "skipped_backlog": report.skipped_backlog,
            "rejected": report.rejected,
            "pending": report.pending,
        },
        "peak_rss_mb": {
            "process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            **{k: round(v / 2**20) for k, v in memory.peaks.items()},
        },
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
