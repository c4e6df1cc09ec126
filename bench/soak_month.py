"""A month of 5-minute cron runs, compressed in time, with faults, kills and a lost warehouse.

`python -m bench.soak_month --days 30` (`make soak-month`; not part of `make test`) generates a
small business behind the sandbox simulator and collector and, every simulated `--every-minutes`,
lets the business's time pass, stores the signed-webhook deliveries of what changed (10% of them
twice, as Dodo retries) in the listener's store, and runs the job. At random: Dodo faults (5xx,
429, timeouts), a Segment outage for the run, a run started through the real CLI and SIGKILLed
at a random moment. Halfway through, the warehouse file is deleted (the checkpoint beside it
stays). At the end, one clean run, then the checks: every event the models derive reached the
collector (or was skipped as history by the very first sync), none twice under a different
messageId, and the repeats under the same messageId (a kill between Segment's acknowledgement
and the ledger) counted. The warehouse's size and rows per schema after the first day and at the
end show whether it grows with the business's changes or with the number of runs.

A month is hours of runs. With `--state-dir` the soak keeps its warehouse, webhook store, what
the collector received (`collector.jsonl`) and its progress (`state.json`, after every tick)
there; stopped, killed or paused (`--wall-minutes`, `--stop-after-ticks`), the same command
resumes it: the business is generated again and advanced through the ticks already done (every
tick's random draws are its own, so they are the same either way) and the soak goes on. A soak
killed in the middle of a run resumes by redoing that tick, which is a killed run for the job.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import orjson

from bench.webhook_bench import API_KEY, WRITE_KEY, job_env
from pipelines import bookkeeping
from pipelines.config import load_config
from pipelines.job import RunOptions, run_job
from pipelines.sandbox import DodoSimulator, SegmentCollector, generate_business
from pipelines.sandbox.webhooks import changes_since, snapshot
from pipelines.webhook_store import WebhookStore, store_folder

REPO = Path(__file__).resolve().parents[1]


BOOKKEEPING = (
    "segment_sync.runs", "segment_sync.run_steps", "dodo_raw._dlt_loads",
    "dodo_raw._dlt_pipeline_state", "dodo_raw.lookback_passes", "segment_sync.delivered_events",
)  # fmt: skip
"""Tables that could grow with the number of runs rather than with the business's changes."""


def flags(simulator: DodoSimulator, collector: SegmentCollector, db: Path, now: datetime) -> dict:
    """The job's settings aimed at the sandbox (fast retries), as the tests use them."""
    return {
        "warehouse.path": str(db),
        "sources.dodo.api_key": API_KEY,
        "sources.dodo.base_url": simulator.base_url,
        "sources.dodo.environment": "test_mode",
        "sources.dodo.requests_per_minute": 0,
        "sources.dodo.max_retries": 3,
        "sources.dodo.backoff_seconds": 0.05,
        "sources.dodo.timeout_seconds": 5,
        "segment.write_key": WRITE_KEY,
        "segment.host": collector.base_url,
        "segment.max_retries": 1,
        "segment.timeout_seconds": 5,
        "sources.dodo.as_of": now.isoformat(),
    }


def sizes(db: Path) -> dict[str, Any]:
    """The warehouse file's size and the rows of every table, by schema."""
    found: dict[str, Any] = {"file_bytes": db.stat().st_size if db.exists() else 0}
    if not db.exists():
        return found
    with duckdb.connect(str(db), read_only=True) as con:
        tables = con.execute(
            "select schema_name, table_name, estimated_size from duckdb_tables()"
        ).fetchall()
        blocks = con.execute("select total_blocks, used_blocks, free_blocks from pragma_database_size()").fetchone()  # fmt: skip
    rows: Counter[str] = Counter()
    per_table: dict[str, int] = {}
    for schema, table, count in tables:
        rows[schema] += int(count or 0)
        per_table[f"{schema}.{table}"] = int(count or 0)
    found["rows_by_schema"] = dict(rows)
    found["rows_by_table"] = per_table
    found["blocks"] = {"total": blocks[0], "used": blocks[1], "free": blocks[2]} if blocks else None
    return found


def killed_cli_run(env: dict[str, str], rng: random.Random) -> str:
    """`dodo-segment run` through the real CLI, SIGKILLed after a random moment (or ended)."""
    exe = Path(sys.executable).with_name("dodo-segment")
    process = subprocess.Popen([str(exe), "run"], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        process.wait(timeout=rng.uniform(0.5, 5.0))
        return "ended"
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        return "killed"


def deliver(store: WebhookStore, payloads: list[dict[str, Any]], rng: random.Random) -> int:
    """Store the deliveries of these changes (about 70% come by webhook), some twice."""
    stored = 0
    for payload in payloads:
        if rng.random() > 0.7:
            continue
        webhook_id = f"msg_{uuid.UUID(int=rng.getrandbits(128)).hex}"
        for _ in range(2 if rng.random() < 0.1 else 1):
            stored += store.store(webhook_id, payload)
    return stored


def check(db: Path, collector: SegmentCollector, skipped_first: set[str]) -> dict[str, Any]:
    """Lost, duplicated and repeated events, by messageId at the collector."""
    with duckdb.connect(str(db), read_only=True) as con:
        outbox = {r[0] for r in con.execute("select event_id from analytics.track_outbox").fetchall()}  # fmt: skip
    tracks = collector.tracks()
    counts = Counter(m["messageId"] for m in tracks)
    by_content: dict[bytes, set[str]] = {}
    for m in tracks:
        key = orjson.dumps([m["userId"], m["event"], m["timestamp"], m.get("properties")],
                           option=orjson.OPT_SORT_KEYS)  # fmt: skip
        by_content.setdefault(key, set()).add(m["messageId"])
    return {
        "events_derived": len(outbox),
        "events_received": len(counts),
        "events_lost": len(outbox - set(counts) - skipped_first),
        "events_sent_twice_under_other_ids": sum(len(v) - 1 for v in by_content.values()),
        "repeats_under_the_same_message_id": sum(n - 1 for n in counts.values()),
    }


STATE_VERSION = 1
SETTINGS = ("days", "every_minutes", "customers", "fault_share", "outage_share", "kill_share",
            "seed", "keep_runs")  # fmt: skip
"""The arguments a resumed soak must share with the one it continues."""


def tick_rng(seed: int, tick: int, stream: str) -> random.Random:
    """The tick's own random draws: the same whether the soak runs straight or is resumed."""
    return random.Random(f"{seed}:{stream}:{tick}")


def save_state(folder: Path, state: dict[str, Any]) -> None:
    """The soak's progress after a finished tick, replaced atomically."""
    tmp = folder / "state.json.tmp"
    tmp.write_bytes(orjson.dumps(state, default=str))
    os.replace(tmp, folder / "state.json")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak_month")
    parser.add_argument("--days", type=float, default=30.0)
    parser.add_argument("--every-minutes", type=float, default=5.0)
    parser.add_argument("--customers", type=int, default=150)
    parser.add_argument("--fault-share", type=float, default=0.04, help="runs with a Dodo fault")
    parser.add_argument("--outage-share", type=float, default=0.02, help="runs in a Segment outage")
    parser.add_argument("--kill-share", type=float, default=0.01, help="runs SIGKILLed (CLI)")
    parser.add_argument("--seed", type=int, default=2023)
    parser.add_argument(
        "--keep-runs", type=int, default=None,
        help="runs kept in full by the bookkeeping retention (default: the job's own, 288; a "
        "shortened soak keeps proportionally fewer so that the retention shows)",
    )  # fmt: skip
    parser.add_argument(
        "--wall-minutes", type=float, default=None,
        help="stop the simulated time after this many real minutes: without --state-dir, then the "
        "final run and the checks (the days reached are reported); with it, the soak pauses and "
        "the same command resumes it",
    )  # fmt: skip
    parser.add_argument(
        "--stop-after-ticks", type=int, default=None,
        help="as --wall-minutes, after this many simulated intervals of this session",
    )  # fmt: skip
    parser.add_argument(
        "--state-dir", type=Path, default=None,
        help="keep the warehouse, the webhook store, what the collector received and the soak's "
        "progress here, so that a stopped or killed soak resumes where it was (the same command "
        "again); default: a temporary folder, no resume",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results_soak.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.keep_runs is not None:  # the bench's compression of time, not the job's setting
        bookkeeping.KEEP_RECENT_RUNS = args.keep_runs
    logging.basicConfig(level=logging.ERROR)  # the runs' own lines: only errors
    if args.state_dir is None:
        with tempfile.TemporaryDirectory(prefix="dodo-segment-soak-") as work:
            return soak(args, Path(work), resumable=False)
    args.state_dir.mkdir(parents=True, exist_ok=True)
    return soak(args, args.state_dir, resumable=True)


def soak(args: argparse.Namespace, folder: Path, resumable: bool) -> dict[str, Any]:
    """Run (or resume) the soak in `folder`; the results once the month is done or paused."""
    settings = {k: getattr(args, k) for k in SETTINGS}
    saved = orjson.loads((folder / "state.json").read_bytes()) if resumable and (folder / "state.json").exists() else None  # fmt: skip
    if saved is not None and (saved["version"], saved["settings"]) != (STATE_VERSION, settings):
        raise SystemExit(
            f"{folder} holds a soak with other settings ({saved['settings']}); "
            "give another --state-dir or the same settings"
        )
    if saved is not None and saved.get("complete"):
        raise SystemExit(
            f"{folder} holds a finished soak (its figures: {args.out}); give another --state-dir"
        )
    if saved is None and resumable and any(folder.iterdir()):
        raise SystemExit(f"{folder} is not empty and holds no soak to resume: give an empty folder")
    state: dict[str, Any] = saved or {
        "version": STATE_VERSION, "settings": settings, "ticks_done": 0, "wall_seconds": 0.0,
        "measured_at": datetime.now(UTC).replace(microsecond=0).isoformat(),
        "outcomes": {}, "steps": {}, "figures": {}, "sessions": 0, "first_run_done": False,
    }  # fmt: skip
    state["sessions"] += 1
    outcomes: Counter[str] = Counter(state["outcomes"])
    steps: Counter[str] = Counter(state["steps"])
    """Seconds spent per step over the in-process runs (where a soak run's time goes)."""
    figures: dict[str, Any] = state["figures"]
    wall = datetime.fromisoformat(state["measured_at"])
    ticks = int(args.days * 24 * 60 / args.every_minutes)
    business = generate_business(
        args.seed, args.customers, now=wall - timedelta(days=args.days + 1)
    )

    def advance(business: Any, tick: int) -> None:
        """The business's time through one tick (its changes drawn from the tick's own seed)."""
        seed = tick_rng(args.seed, tick, "business").randrange(1 << 30)
        business.advance_time(days=args.every_minutes / 1440, seed=seed)

    for tick in range(1, state["ticks_done"] + 1):  # a resumed soak: the business as it was
        advance(business, tick)
    if saved is not None:
        outcomes["soak_resumed"] += 1
        print(f"resumed at tick {state['ticks_done']} (session {state['sessions']})", flush=True)
    started = time.monotonic()
    stop_at = started + args.wall_minutes * 60 if args.wall_minutes else None
    with (
        DodoSimulator(business, api_key=API_KEY) as simulator,
        SegmentCollector(write_key=WRITE_KEY, journal=folder / "collector.jsonl" if resumable else None) as collector,
    ):  # fmt: skip
        db = folder / "warehouse.duckdb"
        store = WebhookStore(store_folder(str(db))).ensure()
        skipped_path = folder / "skipped_first.json"
        if saved is None:
            collector.reset()
        if not state.get("first_run_done", True):  # (a soak killed in it does it again)
            if resumable:
                save_state(folder, {**state, "outcomes": outcomes})
            first = run_job(
                load_config(flags(simulator, collector, db, business.now)), RunOptions()
            )
            outcomes[f"run:{first.outcome}"] += 1
            with duckdb.connect(str(db), read_only=True) as con:
                skipped = [r[0] for r in con.execute(
                    "select event_id from segment_sync.delivered_events where status = 'skipped'"
                ).fetchall()]  # fmt: skip
            skipped_path.write_bytes(orjson.dumps(skipped))
            state["first_run_done"] = True
            if resumable:
                save_state(folder, {**state, "outcomes": outcomes})
        skipped_first = set(orjson.loads(skipped_path.read_bytes()))
        paused = False
        first_tick = state["ticks_done"]
        for tick in range(state["ticks_done"] + 1, ticks + 1):  # one run per simulated interval
            if (stop_at is not None and time.monotonic() >= stop_at) or (
                args.stop_after_ticks is not None and tick > first_tick + args.stop_after_ticks
            ):
                paused = resumable
                break
            rng = tick_rng(args.seed, tick, "tick")
            before = snapshot(business)
            advance(business, tick)
            outcomes["webhook_deliveries"] += deliver(store, changes_since(before, business), rng)
            if tick == ticks // 2:
                for path in (db, Path(f"{db}.wal")):
                    path.unlink(missing_ok=True)
                outcomes["warehouse_lost"] += 1
            draw = rng.random()
            outage = draw < args.outage_share
            if args.outage_share <= draw < args.outage_share + args.fault_share:
                kind = rng.choice(["500", "429", "timeout"])
                if kind == "500":
                    simulator.inject_fault(status=500, times=2)
                elif kind == "429":
                    simulator.inject_fault(status=429, retry_after=0.05, times=3)
                else:
                    simulator.inject_fault(path="/payments", kind="timeout", delay=1.0)
                outcomes[f"dodo_fault:{kind}"] += 1
            collector.outage(outage)
            outcomes["segment_outage_runs"] += outage
            if rng.random() < args.kill_share:
                env = job_env(simulator, collector, db, business.now)
                outcomes[f"cli_run:{killed_cli_run(env, rng)}"] += 1
            else:
                t0 = time.monotonic()
                config = load_config(flags(simulator, collector, db, business.now))
                report = run_job(config, RunOptions())
                outcomes[f"run:{report.outcome}"] += 1
                steps["runs"] += 1
                steps["total"] += time.monotonic() - t0
                steps["extract"] += report.extract.seconds.get("total", 0) if report.extract else 0
                steps["models"] += report.models_seconds or 0
                steps["emit"] += report.emit_seconds or 0
            collector.outage(False)
            simulator.clear_faults()
            if tick == int(24 * 60 / args.every_minutes):
                figures["after_day_1"] = sizes(db)
            if tick % max(1, int(6 * 60 / args.every_minutes)) == 0:  # every 6 simulated hours
                found = sizes(db)
                figures.setdefault("every_6_hours", []).append({
                    "hours": round(tick * args.every_minutes / 60, 1),
                    "file_bytes": found["file_bytes"],
                    "rows_by_schema": found.get("rows_by_schema"),
                    "bookkeeping_rows": {k: v for k, v in found.get("rows_by_table", {}).items()
                                         if k in BOOKKEEPING},
                })  # fmt: skip
            state.update(ticks_done=tick, outcomes=outcomes, steps=steps, figures=figures)
            if resumable:
                save_state(folder, {**state, "wall_seconds": state["wall_seconds"] + time.monotonic() - started})  # fmt: skip
            if tick % 50 == 0:
                print(f"tick {tick}/{ticks} ({time.monotonic() - started:.0f}s) {dict(outcomes)}",
                      flush=True)  # fmt: skip
        if not paused:
            final = run_job(
                load_config(flags(simulator, collector, db, business.now)), RunOptions()
            )
            outcomes[f"final:{final.outcome}"] += 1
            figures["after_all"] = sizes(db)
            figures["checks"] = check(db, collector, skipped_first)
            if resumable:  # done: the same command again does not run the checks twice
                save_state(folder, {**state, "outcomes": outcomes, "figures": figures,
                                    "complete": True})  # fmt: skip
    runs = max(1, steps.get("runs", 0))
    results = {
        "measured_at": wall.isoformat(),
        "complete": not paused,
        "days": args.days,
        "days_simulated": round(state["ticks_done"] * args.every_minutes / 1440, 2),
        "every_minutes": args.every_minutes,
        "runs": state["ticks_done"] + (1 if paused else 2),
        "seconds_per_in_process_run": {
            k: round(v / runs, 2) for k, v in steps.items() if k != "runs"
        },
        "customers": args.customers,
        "keep_runs": bookkeeping.KEEP_RECENT_RUNS,
        "wall_seconds": round(state["wall_seconds"] + time.monotonic() - started, 1),
        "sessions": state["sessions"],
        "cpus": os.cpu_count(),
        "load_avg_at_end": os.getloadavg(),
        "outcomes": dict(outcomes),
        **figures,
    }
    args.out.write_text(json.dumps(results, indent=2, default=str))
    summary = {
        k: v for k, v in results.items() if k not in ("after_day_1", "after_all", "every_6_hours")
    }
    summary["file_bytes"] = {
        "after_day_1": figures.get("after_day_1", {}).get("file_bytes"),
        "now" if paused else "after_all": (figures.get("after_all") or sizes(db))["file_bytes"],
    }
    print(json.dumps(summary, indent=2, default=str))
    if paused:
        print(f"paused at tick {state['ticks_done']}/{ticks}: the same command resumes it", flush=True)  # fmt: skip
    return results


if __name__ == "__main__":
    main()
