"""Delta build vs full build of the models, and of the whole run, by history size.

    python -m bench.delta_bench [--sizes 100k,1m@100k,1m] [--shares 0.01,0.03,0.05,0.1]

Per size (`1m@100k`: the 100k business over 900k older closed payments, the same delta at ten
times the history; `harness.parse_history`), a generated business of that many payments
(customers = payments / 10) is served by
the sandbox simulator in this process, with the sandbox Segment collector in another, and
synced once. Each build or run then goes in its own process, so its wall time and peak RSS are
its own:

- full: `dodo-segment transform`'s build (models and data tests, no delta state), on a copy;
- first run: the job's first run after the sync (`bench/job_probe.py`: a full build that writes
  the raw snapshot, identifies sent, history skipped);
- then 10 new payments and 5 status changes, five minutes later, and on two copies of that
  warehouse the same job run: with delta builds (`[models] incremental`, the default) and with
  `incremental = false` (a full build): whole-run seconds (webhooks, extract, models, emit),
  the models step's seconds and the peak RSS (the run's and its models step's);
- crossover: on copies of the warehouse after the delta run, a share of the customers touched
  (their customer row re-read with other content) and the models built by delta with no
  crossover, to find the share above which a full build is cheaper.

Before each timed build or run the bench flushes what it wrote itself (`os.sync`): a fresh copy
of a 1M warehouse leaves ~700 MB of dirty pages, and the timed commit's fsync flushed them
(~0.35 s at `1m@100k`), a cost a warehouse written only by its own runs never pays.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import duckdb

from bench.harness import API_KEY, job_env, parse_history, size_label, start_collector, stop
from bench.harness import run_probe as run_job_probe
from pipelines.config import DEFAULT_MEMORY_LIMIT
from pipelines.transform import delta, run_models

# The business and the simulator are imported where used: a probe's peak RSS is the models'
# (and DuckDB's), not the sandbox's.

REPO = Path(__file__).resolve().parents[1]


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: ru_maxrss would carry the parent's over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def probe(db: str, mode: str, crossover: float | None) -> dict[str, Any]:
    """One build of the models in this process: wall seconds, peak RSS, what was built."""
    with duckdb.connect() as warm:  # load DuckDB's extensions (json, ICU) as a job has by then
        warm.execute("set TimeZone = 'UTC'; select json_object('a', 1), now()::date")
    t0 = time.perf_counter()
    with duckdb.connect(db) as con:
        con.execute("set memory_limit = ?", [DEFAULT_MEMORY_LIMIT])  # the job's default
        result = run_models(
            con,
            skip_unchanged=mode != "full",
            incremental=mode != "full",
            crossover=delta.CROSSOVER if crossover is None else crossover,
        )
    return {
        "seconds": round(time.perf_counter() - t0, 3),
        "peak_rss_mb": _peak_rss_mb(),
        "build": result.build,
        "reason": result.build_reason,
        "touched": result.touched_customers,
        "tests_seconds": round(result.tests_seconds, 3),
    }


def run_probe(db: Path, mode: str, crossover: float | None = None) -> dict[str, Any]:
    """`probe` in a child process (its own peak RSS)."""
    args = [sys.executable, "-m", "bench.delta_bench", "probe", "--db", str(db), "--mode", mode]
    if crossover is not None:
        args += ["--crossover", str(crossover)]
    out = subprocess.run(args, cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _run_figures(result: dict[str, Any]) -> dict[str, Any]:
    """What the table shows of one job run (bench/job_probe.py's figures)."""
    peaks = result["peak_rss_mb"]
    return {
        "run_s": result["wall_seconds"],
        "models_s": result["models"]["seconds_total"],
        "tests_s": result["models"]["data_tests_seconds"],
        "extract_s": result["extract"]["seconds"].get("total"),
        "emit_s": result["emit"]["seconds"],
        "tracks_sent": result["emit"]["tracks_sent"],
        "peak_rss_mb": peaks.get("process"),
        "models_peak_rss_mb": peaks.get("models"),
    }


def _touch_share(db: Path, share: float) -> None:
    """A share of the customers re-read with another name (as the API's next page would: a
    sync starting after the last one, so stamped later than the rows the snapshot holds)."""
    with duckdb.connect(str(db)) as con:
        con.execute(
            "update dodo_raw.customers set name = coalesce(name, '') || '.', "
            "_synced_at = (select max(as_of) from dodo_raw.lookback_passes) + interval 1 second "
            "where hash(customer_id) % 10000 < ?",
            [int(share * 10000)],
        )


def bench_size(
    payments: int,
    shares: list[float],
    work: Path,
    seed: int,
    keep: Path | None = None,
    business_payments: int | None = None,
) -> dict[str, Any]:
    """Every figure of one history size: `payments` in all, of which the generated business
    makes `business_payments` (default: all) and older closed payments the rest (a deeper past
    under the same business, `harness.parse_history`)."""
    from pipelines.config import load_config
    from pipelines.extract import run_extract
    from pipelines.sandbox import DodoSimulator, generate_business

    now = datetime.now(UTC).replace(microsecond=0) - timedelta(days=1)
    t0 = time.perf_counter()
    recent = business_payments or payments
    biz = generate_business(seed, customers=max(recent // 10, 24), now=now,
                            payments_target=recent,
                            older_closed_payments=payments - recent)  # fmt: skip
    figures: dict[str, Any] = {
        "payments": payments,
        "business_payments": recent,
        "generate_s": time.perf_counter() - t0,
    }
    db = work / f"w{payments}.duckdb"
    collector, collector_url = start_collector()
    try:
        with DodoSimulator(biz, api_key=API_KEY, page_cap=100) as simulator:

            def env(warehouse: Path, **extra: str) -> dict[str, str]:
                served = SimpleNamespace(base_url=simulator.base_url, now=biz.now.isoformat())
                return {**job_env(served, collector_url, warehouse), **extra}  # type: ignore[arg-type]

            t0 = time.perf_counter()
            run_extract(load_config({
                "warehouse.path": str(db), "sources.dodo.api_key": API_KEY,
                "sources.dodo.base_url": simulator.base_url,
                "sources.dodo.environment": "test_mode",
                "sources.dodo.requests_per_minute": 0,
                "sources.dodo.as_of": biz.now.isoformat(),
            }))  # fmt: skip
            figures["first_sync_extract_s"] = time.perf_counter() - t0
            with duckdb.connect(str(db), read_only=True) as con:
                row = con.execute("select count(*) from dodo_raw.payments").fetchone()
            figures["history_payments"] = row[0] if row else 0
            full_copy = work / "full.duckdb"
            shutil.copyfile(db, full_copy)
            os.sync()  # the copy's pages on disk: a timed commit's fsync then flushes its own
            try:  # a full build that fails (out of memory) still leaves the delta to measure
                figures["full"] = run_probe(full_copy, "full")
            except subprocess.CalledProcessError as exc:
                last = (exc.stderr or "").strip().splitlines()[-1:] or ["failed"]
                figures["full"] = {"error": last[0][:300], "seconds": None}
            full_copy.unlink()
            since = ("--events-since", biz.now.isoformat())
            figures["first_run"] = _run_figures(run_job_probe(env(db), REPO, *since))
            # the delta: 10 new payments and 5 status changes, five minutes later
            biz.now += timedelta(minutes=5)
            biz.add_payments(10)
            live = [s for s in biz.subscriptions if s["status"] == "active"][:5]
            for sub in live:
                biz.set_subscription_status(sub["subscription_id"], "on_hold")
            full_run = work / "full_run.duckdb"
            shutil.copyfile(db, full_run)
            os.sync()
            figures["full_run"] = _run_figures(
                run_job_probe(env(full_run, MODELS__INCREMENTAL="false"), REPO)
            )
            full_run.unlink()
            name = f"{payments}" if recent == payments else f"{payments}_of_{recent}"
            kept = keep / f"pre_delta_{name}.duckdb" if keep else None
            if kept:
                shutil.copyfile(db, kept)
            os.sync()
            figures["delta_run"] = _run_figures(run_job_probe(env(db), REPO))
            if kept:  # the delta's raw rows loaded, models not built: for `probe --mode delta`
                run_job_probe(env(kept), REPO, "--extract-only")
    finally:
        stop(collector)
    figures["crossover"] = []
    for share in shares:
        copy = work / "share.duckdb"
        shutil.copyfile(db, copy)
        _touch_share(copy, share)
        os.sync()
        row = run_probe(copy, "delta", crossover=1.0)
        row["share"] = share
        figures["crossover"].append(row)
        copy.unlink()
    db.unlink()
    return figures


def _label(figures: dict[str, Any]) -> str:
    """'1m', or '1m@100k' for a business of 100k payments over a deeper past."""
    return size_label(figures["payments"], figures.get("business_payments"))


def print_table(results: list[dict[str, Any]]) -> None:
    """The figures side by side."""
    print(
        f"{'payments':>9} {'what':<34} {'run s':>7} {'models s':>9} {'tests s':>8} "
        f"{'peak RSS MB (run / models)':>27}"
    )
    for r in results:
        f = r["full"]
        if "error" in f:
            print(f"{_label(r):>9} {'models only: full (transform)':<34} failed: {f['error']}")
        else:
            print(
                f"{_label(r):>9} {'models only: full (transform)':<34} {'':>7} "
                f"{f['seconds']:>9.2f} {f['tests_seconds']:>8.2f} {f['peak_rss_mb']:>27.0f}"
            )
        for label, key in (("first run (full + snapshot)", "first_run"),
                           ("run, full build", "full_run"),
                           ("run, delta build", "delta_run")):  # fmt: skip
            g = r[key]
            rss = f"{g['peak_rss_mb']} / {g['models_peak_rss_mb']}"
            print(
                f"{_label(r):>9} {label:<34} {g['run_s']:>7.2f} {g['models_s']:>9.2f} "
                f"{g['tests_s'] or 0:>8.2f} {rss:>27}"
            )
        for f in r["crossover"]:
            label = f"models only: delta, {f['share']:.0%} touched"
            print(
                f"{_label(r):>9} {label:<34} {'':>7} {f['seconds']:>9.2f} "
                f"{f['tests_seconds']:>8.2f} {f['peak_rss_mb']:>27.0f}  "
                f"({f['build']}, {f['touched']} customers)"
            )
    small = results[0]
    for big in results[1:]:  # each later size against the first
        for key, label in (("models_s", "models"), ("run_s", "whole run")):
            ratio = big["delta_run"][key] / max(small["delta_run"][key], 1e-9)
            print(f"same delta, {_label(big)} vs {_label(small)} payments, {label}: {ratio:.2f}x")


def main(argv: list[str] | None = None) -> None:
    """Run the bench (or one probe)."""
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="what")
    pr = sub.add_parser("probe")
    pr.add_argument("--db", required=True)
    pr.add_argument("--mode", choices=("full", "delta"), required=True)
    pr.add_argument("--crossover", type=float, default=None)
    parser.add_argument(
        "--sizes", default="100k,1m@100k,1m",
        help="history sizes; '1m@100k' is the 100k business over a past of 900k older closed "
        "payments (the same delta at ten times the history)",
    )  # fmt: skip
    parser.add_argument("--shares", default="0.01,0.03,0.05,0.1")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--keep", type=Path, default=None,
        help="save each size's warehouse with the delta's raw rows loaded, models not built "
        "(for `probe --mode delta` on a copy)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "delta_results.json")
    args = parser.parse_args(argv)
    if args.what == "probe":
        print(json.dumps(probe(args.db, args.mode, args.crossover)))
        return
    shares = [float(s) for s in args.shares.split(",") if s]
    results = []
    with tempfile.TemporaryDirectory(prefix="dodo-delta-bench-") as work:
        for size in args.sizes.split(","):
            payments, business = parse_history(size)
            results.append(bench_size(payments, shares, Path(work), args.seed, args.keep, business))
            print_table(results[-1:])
            args.out.write_text(json.dumps(results, indent=2, default=str))
    print_table(results)


if __name__ == "__main__":
    main()
