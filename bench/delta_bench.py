"""Delta build vs full build of the models, by history size, and the crossover share.

    python -m bench.delta_bench [--sizes 10k,100k] [--shares 0.01,0.05,0.1,0.2,0.4]

Per size, a generated business of that many payments (customers = payments / 10) is served by
the sandbox simulator in this process and synced once. Each build of the models then runs in
its own process (`probe`), so its wall time and peak RSS are its own:

- full: `dodo-segment transform`'s build (no delta state), on a copy of the warehouse;
- first: the job's first incremental build (full, and the raw snapshot written);
- delta: after 10 new payments and 5 status changes (read by a short extract), the job's delta
  build: touched keys, every model's touched rows, data tests, snapshot update;
- crossover: on copies, a share of the customers touched (their raw customer row changed) and
  the delta build forced, to find the share above which a full build is cheaper.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb

from pipelines.config import DEFAULT_MEMORY_LIMIT
from pipelines.transform import delta, run_models

# The business, simulator and extract are imported where used: a probe's peak RSS is the
# models' (and DuckDB's), not dlt's and the sandbox's.

REPO = Path(__file__).resolve().parents[1]
API_KEY = "bench_api_key"


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
    }


def run_probe(db: Path, mode: str, crossover: float | None = None) -> dict[str, Any]:
    """`probe` in a child process (its own peak RSS)."""
    args = [sys.executable, "-m", "bench.delta_bench", "probe", "--db", str(db), "--mode", mode]
    if crossover is not None:
        args += ["--crossover", str(crossover)]
    out = subprocess.run(args, cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_size(payments: int, shares: list[float], work: Path, seed: int) -> dict[str, Any]:
    """Every figure of one history size."""
    from pipelines.config import load_config
    from pipelines.extract import run_extract
    from pipelines.sandbox import DodoSimulator, generate_business

    now = datetime.now(UTC).replace(microsecond=0) - timedelta(days=1)
    t0 = time.perf_counter()
    biz = generate_business(seed, customers=max(payments // 10, 24), now=now,
                            payments_target=payments)  # fmt: skip
    figures: dict[str, Any] = {"payments": payments, "generate_s": time.perf_counter() - t0}
    db = work / f"w{payments}.duckdb"
    with DodoSimulator(biz, api_key=API_KEY, page_cap=100) as simulator:

        def config():  # type: ignore[no-untyped-def]
            return load_config({
                "warehouse.path": str(db), "sources.dodo.api_key": API_KEY,
                "sources.dodo.base_url": simulator.base_url,
                "sources.dodo.environment": "test_mode",
                "sources.dodo.requests_per_minute": 0,
                "sources.dodo.as_of": biz.now.isoformat(),
            })  # fmt: skip

        t0 = time.perf_counter()
        run_extract(config())
        figures["first_sync_extract_s"] = time.perf_counter() - t0
        full_copy = work / "full.duckdb"
        shutil.copyfile(db, full_copy)
        figures["full"] = run_probe(full_copy, "full")
        full_copy.unlink()
        figures["first"] = run_probe(db, "delta")
        # the delta: 10 new payments and 5 status changes, read by a short extract
        biz.now += timedelta(minutes=5)
        biz.add_payments(10)
        live = [s for s in biz.subscriptions if s["status"] == "active"][:5]
        for sub in live:
            biz.set_subscription_status(sub["subscription_id"], "on_hold")
        t0 = time.perf_counter()
        run_extract(config())
        figures["delta_extract_s"] = time.perf_counter() - t0
        base = work / "base.duckdb"
        shutil.copyfile(db, base)
        figures["delta"] = run_probe(db, "delta")
    figures["crossover"] = []
    for share in shares:
        copy = work / "share.duckdb"
        shutil.copyfile(base, copy)
        with duckdb.connect(str(copy)) as con:
            con.execute(
                "update dodo_raw.customers set name = coalesce(name, '') || '.' "
                "where hash(customer_id) % 10000 < ?",
                [int(share * 10000)],
            )
        row = run_probe(copy, "delta", crossover=1.0)
        row["share"] = share
        figures["crossover"].append(row)
        copy.unlink()
    base.unlink()
    db.unlink()
    return figures


def print_table(results: list[dict[str, Any]]) -> None:
    """The figures side by side."""
    print(f"{'payments':>9} {'build':<22} {'models s':>9} {'peak RSS MB':>12}  note")
    for r in results:
        for label, key in (("full (transform)", "full"), ("first (full+snapshot)", "first"),
                           ("delta 10 new + 5 status", "delta")):  # fmt: skip
            f = r[key]
            note = f"{f['build']}, touched {f['touched']}" if key == "delta" else f["build"]
            print(
                f"{r['payments']:>9} {label:<22} {f['seconds']:>9.2f} {f['peak_rss_mb']:>12.0f}  {note}"
            )
        for f in r["crossover"]:
            print(
                f"{r['payments']:>9} {'delta, share ' + str(f['share']):<22} {f['seconds']:>9.2f} "
                f"{f['peak_rss_mb']:>12.0f}  touched {f['touched']}"
            )


def main(argv: list[str] | None = None) -> None:
    """Run the bench (or one probe)."""
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="what")
    pr = sub.add_parser("probe")
    pr.add_argument("--db", required=True)
    pr.add_argument("--mode", choices=("full", "delta"), required=True)
    pr.add_argument("--crossover", type=float, default=None)
    parser.add_argument("--sizes", default="10k,100k")
    parser.add_argument("--shares", default="0.01,0.05,0.1,0.2,0.4")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "delta_results.json")
    args = parser.parse_args(argv)
    if args.what == "probe":
        print(json.dumps(probe(args.db, args.mode, args.crossover)))
        return
    from bench.run import parse_size

    shares = [float(s) for s in args.shares.split(",") if s]
    results = []
    with tempfile.TemporaryDirectory(prefix="dodo-delta-bench-") as work:
        for size in args.sizes.split(","):
            results.append(bench_size(parse_size(size), shares, Path(work), args.seed))
            print_table(results[-1:])
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print_table(results)


if __name__ == "__main__":
    main()
