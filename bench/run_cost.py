"""A run's fixed cost by step: CPU and wall seconds of soak-like and no-change in-process runs.

`python -m bench.run_cost --runs 6` (`make bench-run-cost`) builds the month soak's sandbox
(150 customers, seed 2023), makes a first sync and a few warm-up runs, then times `--runs` runs
after 5 simulated minutes of business each (with the webhook deliveries of what changed, as the
soak stores them) and `--runs` runs with nothing changed. Steps are cut at the job's own
`on_step` boundaries. CPU is the whole process's (the in-process simulator and collector
included), so compare figures measured in one session, with the load average it prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import resource
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.soak_month import deliver, flags
from bench.webhook_bench import API_KEY, WRITE_KEY
from pipelines.config import load_config
from pipelines.job import RunOptions, run_job
from pipelines.sandbox import DodoSimulator, SegmentCollector, generate_business
from pipelines.sandbox.webhooks import changes_since, snapshot
from pipelines.webhook_store import WebhookStore, store_folder


def process_cpu() -> float:
    """CPU seconds of this process so far, every thread included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class StepClock:
    """CPU and wall seconds per step of one run, cut where the job announces the next step."""

    def __init__(self, cpu: Counter[str], wall: Counter[str]) -> None:
        self.cpu, self.wall = cpu, wall
        self.step, self.cpu_at, self.wall_at = "start", process_cpu(), time.monotonic()

    def __call__(self, **facts: Any) -> None:
        """The job's `on_step` hook: close the current step when a new one starts."""
        if "step" not in facts:
            return
        cpu, wall = process_cpu(), time.monotonic()
        self.cpu[self.step] += cpu - self.cpu_at
        self.wall[self.step] += wall - self.wall_at
        self.step, self.cpu_at, self.wall_at = str(facts["step"]), cpu, wall


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.run_cost")
    parser.add_argument("--runs", type=int, default=6, help="timed runs of each kind")
    parser.add_argument("--warm-up", type=int, default=3)
    parser.add_argument("--customers", type=int, default=150)
    parser.add_argument("--seed", type=int, default=2023)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    rng = random.Random(args.seed)
    now = datetime(2026, 12, 6, 12, tzinfo=UTC)
    business = generate_business(args.seed, args.customers, now=now - timedelta(days=2))
    results: dict[str, Any] = {"runs": args.runs, "load_avg_at_start": os.getloadavg()}
    with (
        tempfile.TemporaryDirectory(prefix="dodo-segment-run-cost-") as work,
        DodoSimulator(business, api_key=API_KEY) as simulator,
        SegmentCollector(write_key=WRITE_KEY) as collector,
    ):
        db = Path(work) / "warehouse.duckdb"
        store = WebhookStore(store_folder(str(db))).ensure()

        def run(changed: bool, clock: StepClock | None = None) -> str:
            if changed:
                before = snapshot(business)
                business.advance_time(days=5 / 1440, seed=rng.randrange(1 << 30))
                deliver(store, changes_since(before, business), rng)
            config = load_config(flags(simulator, collector, db, business.now))
            return run_job(config, RunOptions(), on_step=clock).outcome

        run(changed=False)  # the first sync
        for _ in range(args.warm_up):
            run(changed=True)
        for kind, changed in (("soak_like", True), ("no_change", False)):
            cpu: Counter[str] = Counter()
            wall: Counter[str] = Counter()
            outcomes: Counter[str] = Counter()
            for _ in range(args.runs):
                clock = StepClock(cpu, wall)
                cpu_at, wall_at = process_cpu(), time.monotonic()
                outcomes[run(changed, clock)] += 1
                clock(step="end")
                cpu["run"] += process_cpu() - cpu_at
                wall["run"] += time.monotonic() - wall_at
            results[kind] = {
                "outcomes": dict(outcomes),
                "cpu_seconds": {k: round(v / args.runs, 3) for k, v in cpu.items() if v},
                "wall_seconds": {k: round(v / args.runs, 3) for k, v in wall.items() if v},
            }
    results["load_avg_at_end"] = os.getloadavg()
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
