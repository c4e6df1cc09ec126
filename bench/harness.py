"""The bench's shared harness: simulator and collector processes, the job probe, request bounds.

Used by every bench module (bench/run.py, bench/lookback_bench.py, ...); it imports none of them.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import requests

from pipelines.dodo_contract import (
    NON_TERMINAL_STATUSES,
    RAW_DATASET,
    STATUS_FIELDS,
)

REPO = Path(__file__).resolve().parents[1]
API_KEY = "bench_api_key"
WRITE_KEY = "bench_write_key"
PAGE_SIZE = 100
LOOKBACK = timedelta(days=3)
BATCH_BYTES_LIMIT = 475_000  # segment-analytics-python's BATCH_SIZE_LIMIT


def parse_size(text: str) -> int:
    """'10k' -> 10_000, '1m' -> 1_000_000."""
    text = text.strip().lower()
    factor = {"k": 1_000, "m": 1_000_000}.get(text[-1], 1)
    return int(float(text.rstrip("km")) * factor)


def parse_history(text: str) -> tuple[int, int]:
    """A history size as (payments in all, payments of the generated business): '1m' ->
    (1_000_000, 1_000_000); '1m@100k' -> (1_000_000, 100_000), the 100k business with a past of
    900k older closed payments (`generate_business(older_closed_payments=...)`: the same recent
    and open objects, so the same lookback window and the same delta, over ten times the
    history)."""
    total, _, recent = text.partition("@")
    payments = parse_size(total)
    business = parse_size(recent) if recent else payments
    if business > payments:
        raise ValueError(f"{text}: the business ({business}) is more than the history ({payments})")
    return payments, business


def size_label(payments: int, business: int | None = None) -> str:
    """'1m', or '1m@100k' for a 100k business over a deeper past (`parse_history`'s form)."""

    def short(n: int) -> str:
        return f"{n / 1e6:g}m" if n >= 1_000_000 else f"{n / 1e3:g}k" if n >= 1_000 else str(n)

    if business is None or business == payments:
        return short(payments)
    return f"{short(payments)}@{short(business)}"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as `uptime` shows them."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _spawn(args: list[str], cwd: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True, cwd=cwd,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line:
        proc.kill()
        raise RuntimeError(f"{args[0]} did not start")
    return proc, line


@dataclass
class Simulator:
    """A simulator process serving one generated business (a world frozen at `now`)."""

    proc: subprocess.Popen[str]
    base_url: str
    now: str
    generation_s: float


def start_simulator(
    payments: int, seed: int, older_closed_payments: int = 0, extra: tuple[str, ...] = ()
) -> Simulator:
    """The simulator in its own process, once it serves (`extra`: more of its flags)."""
    t0 = time.perf_counter()
    proc, line = _spawn(
        ["pipelines.sandbox.simulator", "--port", "0", "--payments", str(payments),
         "--seed", str(seed), "--api-key", API_KEY,
         "--older-closed-payments", str(older_closed_payments), *extra], REPO,
    )  # fmt: skip
    base_url, _, now = line.split()
    return Simulator(proc, base_url, now, time.perf_counter() - t0)


def job_env(simulator: Simulator, collector_url: str, db: Path) -> dict[str, str]:
    """The job's environment for one simulator, collector and warehouse.

    The job runs on the simulator's clock (`sources.dodo.as_of`, as `dodo-segment demo` does):
    the simulated world does not move, so a wall clock would have paid periods end and trials
    run out between runs with no renewal ever arriving, which no real business does.
    """
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SOURCES__", "SEGMENT__"))},
        "DODO_PAYMENTS_API_KEY": API_KEY,
        "DODO_PAYMENTS_BASE_URL": simulator.base_url,
        "DODO_PAYMENTS_ENVIRONMENT": "test_mode",
        "DODO_SEGMENT_DB": str(db),
        "SEGMENT_WRITE_KEY": WRITE_KEY,
        "SEGMENT_HOST": collector_url,
        "SOURCES__DODO__REQUESTS_PER_MINUTE": "0",
        "SOURCES__DODO__AS_OF": simulator.now,
        "RUNTIME__DLTHUB_TELEMETRY": "false",
        "PYTHONPATH": str(REPO),
    }


def raw_rows(db: Path) -> int:
    """Rows in the warehouse's raw tables: the depth of history a run works over."""
    with duckdb.connect(str(db), read_only=True) as con:
        tables = con.execute(
            "select table_name from information_schema.tables where table_schema = ? "
            "and table_name not like '\\_dlt%' escape '\\'",
            [RAW_DATASET],
        ).fetchall()
        return sum(
            con.execute(f'select count(*) from {RAW_DATASET}."{name}"').fetchone()[0]
            for (name,) in tables
        )


def start_collector(latency_ms: float = 0) -> tuple[subprocess.Popen[str], str]:
    """The Segment-compatible collector in its own process."""
    return _spawn(
        ["pipelines.sandbox.collector", "--port", "0", "--write-key", WRITE_KEY,
         "--latency-ms", str(latency_ms)], REPO,
    )  # fmt: skip


def stop(proc: subprocess.Popen[str]) -> None:
    """End a process this script started."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_probe(env: dict[str, str], cwd: Path, *args: str) -> dict[str, Any]:
    """One job run in its own process (bench/job_probe.py); its JSON figures."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.job_probe", *args], env=env, cwd=cwd,
        capture_output=True, text=True, check=False,
        timeout=3600,
    )  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"job probe failed ({proc.returncode}): {proc.stderr[-2000:]}")
    result = json.loads(lines[-1])
    if result["exit_code"] not in (0, 3):
        raise RuntimeError(f"job run failed: {result}")
    return result


def collector_stats(url: str) -> dict[str, Any]:
    """Requests, messages and bytes the collector received since its last reset."""
    stats = requests.get(url + "/_stats", timeout=10).json()
    requests.post(url + "/_reset", timeout=10)
    batches = len(stats.get("batch_sizes", [])) or 0
    body = sum(stats.get("accepted_body_bytes", [])) if batches else 0
    return {
        "requests": stats["requests"],
        "messages": stats["messages"],
        "wire_bytes": stats["bytes_received"],
        "body_bytes_per_batch": round(body / batches) if batches else 0,
        "fill_ratio": round(body / batches / BATCH_BYTES_LIMIT, 3) if batches else None,
    }


def request_bound(db: Path, as_of: datetime) -> dict[str, int]:
    """The issue's bound for a no-change run, per resource: pages of the lookback window and of
    the non-terminal objects (one query per status), plus one short page per query."""
    bound: dict[str, int] = {}
    with duckdb.connect(str(db), read_only=True) as con:
        for resource in ("payments", "subscriptions", "customers", "refunds", "disputes",
                         "balance_ledger"):  # fmt: skip
            recent = con.execute(
                f"select count(*) from {RAW_DATASET}.{resource} where created_at >= ?",
                [as_of - LOOKBACK],
            ).fetchone()[0]
            pages = math.ceil(recent / PAGE_SIZE) + 1
            for status in NON_TERMINAL_STATUSES.get(resource, ()):
                n = con.execute(
                    f"select count(*) from {RAW_DATASET}.{resource} "
                    f'where "{STATUS_FIELDS[resource]}" = ? and created_at < ?',
                    [status, as_of - LOOKBACK],
                ).fetchone()[0]
                pages += math.ceil(n / PAGE_SIZE) + 1
            bound[resource] = pages
    bound["products"] = 2
    return bound


def phase_rows(result: dict[str, Any]) -> dict[str, Any]:
    """Seconds, throughput and memory of one run, flattened for the table."""
    ex = result["extract"]
    secs = ex["seconds"]
    e_l = secs.get("total", 0.0)
    models = result["models"]
    return {
        "wall_s": result["wall_seconds"],
        "cpu_s": result["cpu_seconds"],
        "extract_s": secs.get("extract"),
        "normalize_s": secs.get("normalize"),
        "load_s": secs.get("load"),
        "extract_load_total_s": e_l,
        "rows": ex["rows"],
        "rows_per_s": round(ex["rows"] / e_l) if e_l else None,
        "api_requests": sum(ex["api_requests"].values()),
        "models_and_tests_s": models["seconds_total"],
        "data_tests_s": models["data_tests_seconds"],
        "models_skipped": models["skipped"],
        "emit_s": result["emit"]["seconds"],
        "peak_rss_mb": result["peak_rss_mb"],
    }
