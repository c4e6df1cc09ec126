"""Benchmark `dodo-segment report` on a warehouse of a generated business.

    python -m bench.report_bench [--size 100k] [--repeat 3] [--out bench/results-report.json]

A simulator (own process) serves a business of that many payments (as in bench/run.py), the job
syncs it once into a fresh warehouse (first sync, with the sandbox collector), and then the real
CLI writes the report `--repeat` times, each in a fresh process (imports included, as a person
running it sees it). Figures: wall seconds of each build (the CLI's, and the process's), the
page's size and its sections with data.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.run import REPO, job_env, parse_size, run_probe, start_collector, start_simulator, stop


def build_once(env: dict[str, str], db: Path, out: Path) -> dict[str, Any]:
    """One `dodo-segment report` process: its wall time, the build time it printed, the size."""
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "report", "--db", str(db), "--out", str(out)],
        env=env, capture_output=True, text=True, check=False, timeout=600, cwd=REPO,
    )  # fmt: skip
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"report failed ({proc.returncode}): {proc.stderr[-2000:]}")
    found = re.search(r"with data\) in ([0-9.]+)s", proc.stdout)
    sections = re.search(r"(\d+) of (\d+) sections with data", proc.stdout)
    return {
        "process_wall_s": round(wall, 2),
        "build_s": float(found.group(1)) if found else None,
        "bytes": out.stat().st_size,
        "sections_with_data": sections.group(0) if sections else None,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="100k")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results-report.json")
    parser.add_argument("--keep", type=Path, help="copy the synced warehouse here (to profile)")
    args = parser.parse_args(argv)
    payments = parse_size(args.size)
    with tempfile.TemporaryDirectory(prefix="dodo-report-bench-") as tmp:
        work = Path(tmp)
        sim = start_simulator(payments, args.seed)
        collector, collector_url = start_collector(0)
        db = work / f"report_{payments}.duckdb"
        env = job_env(sim, collector_url, db)
        try:
            first = run_probe(env, work)
        finally:
            stop(sim.proc)
            stop(collector)
        if args.keep:
            shutil.copyfile(db, args.keep)
        builds = [build_once(env, db, work / f"report-{i}.html") for i in range(args.repeat)]
        results = {
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "payments": payments,
            "load_average": os.getloadavg(),
            "first_sync_wall_s": first["wall_seconds"],
            "warehouse_bytes": db.stat().st_size,
            "builds": builds,
            "build_s_median": statistics.median(b["build_s"] for b in builds),
            "process_wall_s_median": statistics.median(b["process_wall_s"] for b in builds),
            "report_bytes": builds[-1]["bytes"],
        }
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
