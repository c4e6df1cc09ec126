"""Benchmark the whole job against the sandbox: first sync, no-change runs, emitter vs webhook.

    python -m bench.run [--sizes 10k,100k,1m] [--quick] [--out bench/results.json]

Per size, a Dodo API simulator (own process) serves a generated business of that many payments
(customers = payments / 10, and the subscriptions, refunds and ledger rows that go with them)
and a Segment-compatible collector (own process) receives the events. The job runs in a third
process (bench/job_probe.py), so its peak RSS is its own. Figures: per phase wall seconds,
rows or messages per second and peak RSS; API requests by resource; Segment requests and bytes;
and, side by side, the no-change run at every size and the emitter vs one request per event.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb

from bench.harness import (
    REPO,
    collector_stats,
    job_env,
    parse_size,
    phase_rows,
    raw_rows,
    request_bound,
    run_probe,
    start_collector,
    start_simulator,
    stop,
)
from bench.lookback_bench import bench_limiter, bench_tiers, print_lookback
from pipelines.config import pipeline_dir
from pipelines.dodo_contract import (
    SYNCED_AT_COLUMN,
)
from pipelines.transform import raw_table_hashes


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median wall time, with every run's wall time beside it."""
    walls = [r["wall_seconds"] for r in runs]
    chosen = sorted(runs, key=lambda r: r["wall_seconds"])[len(runs) // 2]
    return {
        **phase_rows(chosen),
        "wall_s_all": walls,
        "wall_s_median": statistics.median(walls),
        "api_requests_by_resource": chosen["extract"]["api_requests"],
    }


def bench_size(
    payments: int, seed: int, repeat: int, backfill_emit_max: int, work: Path
) -> dict[str, Any]:
    """First sync and no-change runs at one size."""
    sim = start_simulator(payments, seed)
    collector, collector_url = start_collector(0)
    db = work / f"bench_{payments}.duckdb"
    env = job_env(sim, collector_url, db)
    try:
        backfill = payments <= backfill_emit_max
        args = ["--events-since", "2000-01-01"] if backfill else []
        first = run_probe(env, work, *args)
        first["segment"] = collector_stats(collector_url)
        rebuilt = [run_probe(env, work, "--rebuild-models") for _ in range(repeat)]
        # a forced rebuild records no build to keep: the next run builds, the ones after keep it
        warmup = run_probe(env, work)
        kept = [run_probe(env, work) for _ in range(repeat)]
        bound = request_bound(db, datetime.fromisoformat(sim.now))
        history_rows = raw_rows(db)
    finally:
        stop(sim.proc)
        stop(collector)
    emitted = first["emit"]["tracks_sent"] + first["emit"]["identifies_sent"]
    first_rows = phase_rows(first)
    first_rows["emit_messages"] = emitted
    first_rows["emit_messages_per_s"] = (
        round(emitted / first["emit"]["seconds"]) if first["emit"]["seconds"] else None
    )
    first_rows["emit_backfill"] = backfill
    first_rows["segment"] = first["segment"]
    return {
        "payments": payments,
        "history_rows": history_rows,
        "simulator_generation_s": round(sim.generation_s, 1),
        "first_sync": first_rows,
        "first_sync_rows_by_table": first["extract"]["rows_by_table"],
        "first_sync_api_requests": first["extract"]["api_requests"],
        "no_change_models_rebuilt": median_run(rebuilt),
        "no_change_models_kept": median_run(kept),
        "no_change_keep_warmup": phase_rows(warmup),
        "no_change_request_bound": {**bound, "total": sum(bound.values())},
    }


def bench_deeper_history(payments: int, seed: int, repeat: int, depth: int, work: Path) -> dict:
    """No-change runs over the same business with a past `depth` times as deep: (depth - 1) x
    `payments` more payments, all closed, before its history (the same lookback window and open
    objects, so the same delta)."""
    older = (depth - 1) * payments
    sim = start_simulator(payments, seed, older_closed_payments=older)
    collector, collector_url = start_collector(0)
    db = work / f"bench_{payments}_deeper_{depth}x.duckdb"
    env = job_env(sim, collector_url, db)
    try:
        first = run_probe(env, work)
        run_probe(env, work)  # builds the models the next runs keep
        kept = [run_probe(env, work) for _ in range(repeat)]
        history_rows = raw_rows(db)
    finally:
        stop(sim.proc)
        stop(collector)
    return {
        "payments": payments + older,
        "recent_business_payments": payments,
        "older_closed_payments": older,
        "history_rows": history_rows,
        "first_sync": phase_rows(first),
        "no_change_models_kept": median_run(kept),
    }


RAW_CONTENT_SKIPS = (SYNCED_AT_COLUMN, "_dlt_id", "_dlt_load_id")
"""Columns that tell when and how a row was loaded, not what it holds."""


def raw_content(db: Path) -> dict[str, tuple[int, str | None]]:
    """Per raw table: row count and a sum of row hashes over its data columns, so warehouses
    loaded by different paths can be compared."""
    with duckdb.connect(str(db), read_only=True) as con:
        return raw_table_hashes(con, RAW_CONTENT_SKIPS)


EXTRACT_FORMATS = ("job", "dlt-normaliser", "dlt-defaults")
"""bench/job_probe.py's --extract-format choices: the job, and dlt's Python-dict path with
parquet and with DuckDB's default loader file format (insert_values)."""


def bench_extract_formats(payments: int, seed: int, repeat: int, work: Path) -> dict[str, Any]:
    """Comparison (c): the first extract + load of one business in each format, into fresh
    warehouses, runs interleaved; every format must load the same rows."""
    sim = start_simulator(payments, seed)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in EXTRACT_FORMATS}
    content: dict[str, dict[str, tuple[int, str | None]]] = {}
    try:
        for attempt in range(repeat):
            for name in EXTRACT_FORMATS:
                db = work / f"formats_{payments}_{name}_{attempt}.duckdb"
                env = job_env(sim, "http://127.0.0.1:9", db)  # no emit: no collector
                result = run_probe(env, work, "--extract-only", "--extract-format", name)
                runs[name].append(result)
                content.setdefault(name, raw_content(db))
                db.unlink()
                shutil.rmtree(pipeline_dir(str(db)), ignore_errors=True)
    finally:
        stop(sim.proc)
    out: dict[str, Any] = {"payments": payments, "formats": {}}
    for name, results in runs.items():
        chosen = sorted(results, key=lambda r: r["wall_seconds"])[len(results) // 2]
        secs = chosen["extract"]["seconds"]
        total = secs["total"]
        out["formats"][name] = {
            "items": chosen["format"]["items"],
            "loader_file_format": chosen["format"]["loader_file_format"],
            "extract_load_total_s": total,
            "total_s_all": [r["extract"]["seconds"]["total"] for r in results],
            "extract_s": secs.get("extract"),
            "normalize_s": secs.get("normalize"),
            "load_s": secs.get("load"),
            "rows": chosen["extract"]["rows"],
            "rows_per_s": round(chosen["extract"]["rows"] / total),
            "cpu_s": chosen["cpu_seconds"],
            "peak_rss_mb": chosen["peak_rss_mb"]["process"],
        }
    job = out["formats"]["job"]
    out["same_rows_loaded"] = all(content[name] == content["job"] for name in EXTRACT_FORMATS)
    out["speedup_vs"] = {
        name: round(job["rows_per_s"] / out["formats"][name]["rows_per_s"], 1)
        for name in EXTRACT_FORMATS[1:]
    }
    return out


def without_ledger(warehouse: Path, copy: Path) -> Path:
    """A copy of a synced warehouse with its Segment ledger dropped: everything in its outboxes
    (the real event catalog, identifies then tracks) is pending again."""
    shutil.copy(warehouse, copy)
    with duckdb.connect(str(copy)) as con:
        con.execute("drop schema if exists segment_sync cascade")
    return copy


def bench_emitter(
    events: int,
    baseline: int,
    baseline_latency: int,
    latency: float,
    warehouse: Path | None = None,
) -> dict:
    """The emitter vs one request per event, without and with collector latency: the outboxes
    of `warehouse` (see `without_ledger`), or `events` synthetic Order Completed events."""
    from bench.emit_bench import run_emitter, run_one_per_event
    from bench.emit_bench import start_collector as start_bench_collector

    out: dict[str, Any] = {}
    for label, ms, n in (("no_latency", 0.0, baseline), (f"latency_{latency:g}ms", latency,
                                                           baseline_latency)):  # fmt: skip
        proc, url = start_bench_collector(ms)
        try:
            emitter = run_emitter(url, events, threads=3, warehouse=warehouse)
            emitter["outbox"] = "real catalog" if warehouse else "synthetic"
            webhook = run_one_per_event(url, n)
        finally:
            stop(proc)
        emitter["ratio_vs_one_per_event"] = round(
            emitter["events_per_s"] / webhook["events_per_s"], 1
        )
        out[label] = {"emitter": emitter, "one_request_per_event": webhook}
    return out


def print_table(results: dict[str, Any]) -> None:
    """A human summary of results.json."""
    print(f"\n{'size':>8} {'run':<22} {'wall s':>7} {'E+L s':>7} {'rows/s':>8} {'API req':>8} "
          f"{'models s':>8} {'emit s':>7} {'msg/s':>7} {'RSS MB':>7}")  # fmt: skip
    for size in results["sizes"]:
        for label, key in (("first sync", "first_sync"),
                           ("no-change (rebuilt)", "no_change_models_rebuilt"),
                           ("no-change (kept)", "no_change_models_kept")):  # fmt: skip
            r = size[key]
            print(
                f"{size['payments']:>8} {label:<22} {r['wall_s']:>7.1f} "
                f"{r['extract_load_total_s']:>7.1f} {r['rows_per_s'] or 0:>8} "
                f"{r['api_requests']:>8} {r['models_and_tests_s']:>8.2f} {r['emit_s']:>7.1f} "
                f"{r.get('emit_messages_per_s') or '':>7} {r['peak_rss_mb']['process']:>7}"
            )
        print(
            f"{'':>8} request bound for a no-change run: {size['no_change_request_bound']['total']}"
        )
    deeper = results.get("same_delta_deeper_history")
    if deeper:
        r = deeper["no_change_models_kept"]
        print(
            f"{deeper['payments']:>8} {'no-change, deep past':<22} {r['wall_s']:>7.1f} "
            f"{r['extract_load_total_s']:>7.1f} {r['rows_per_s'] or 0:>8} {r['api_requests']:>8} "
            f"{r['models_and_tests_s']:>8.2f} {r['emit_s']:>7.1f} {'':>7} "
            f"{r['peak_rss_mb']['process']:>7}   (the {deeper['recent_business_payments']} "
            f"business + {deeper['older_closed_payments']} older closed payments)"
        )
    formats = results.get("extract_formats")
    if formats:
        print(f"\nextract + load of {formats['payments']} payments, first sync "
              f"(same rows loaded by each: {formats['same_rows_loaded']})")  # fmt: skip
        print(f"{'format':<16} {'items':<6} {'file':<8} {'total s':>7} {'extract':>7} "
              f"{'normal.':>7} {'load':>7} {'rows/s':>8} {'RSS MB':>7}")  # fmt: skip
        for name, f in formats["formats"].items():
            print(
                f"{name:<16} {f['items']:<6} {f['loader_file_format']:<8} "
                f"{f['extract_load_total_s']:>7.1f} {f['extract_s']:>7.1f} {f['normalize_s']:>7.1f} "
                f"{f['load_s']:>7.1f} {f['rows_per_s']:>8} {f['peak_rss_mb']:>7}"
            )
    for label, ratio in results.get("ratios", {}).items():
        print(f"ratio {label}: {ratio}")
    for label, pair in results.get("emitter_vs_webhook", {}).items():
        e, w = pair["emitter"], pair["one_request_per_event"]
        print(
            f"emitter {label}: {e['events_per_s']} ev/s (fill {e['fill_ratio']}) vs "
            f"one-per-event {w['events_per_s']} ev/s = {e['ratio_vs_one_per_event']}x "
            f"({e['outbox']} outbox, {e['events']} messages)"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="10k,100k,1m")
    parser.add_argument("--quick", action="store_true", help="10k only, small emitter runs")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=3, help="no-change runs per variant")
    parser.add_argument("--backfill-emit-max", default="100k",
                        help="sizes up to this send their whole event history (--events-since)")  # fmt: skip
    parser.add_argument("--emitter-events", type=int, default=100_000,
                        help="synthetic events, when no size sent its history")  # fmt: skip
    parser.add_argument("--baseline-events", type=int, default=10_000,
                        help="events sent one request each, no latency")  # fmt: skip
    parser.add_argument("--baseline-latency-events", type=int, default=2_000,
                        help="events sent one request each, with 20 ms latency")  # fmt: skip
    parser.add_argument("--same-delta-base", default="100k",
                        help="the size whose business gets a 10x deeper past for ratio (b)")  # fmt: skip
    parser.add_argument("--skip-same-delta", action="store_true")
    parser.add_argument("--skip-emitter", action="store_true")
    parser.add_argument("--formats-size", default="100k",
                        help="the size comparison (c) loads in each extract format")  # fmt: skip
    parser.add_argument("--skip-formats", action="store_true")
    parser.add_argument("--lookback-size", default=None,
                        help="the size whose no-change runs compare the short window, the old "
                             "3-day lookback and the deep pass (default: the largest of --sizes "
                             "up to 100k; '0': skip)")  # fmt: skip
    parser.add_argument("--limiter-size", default=None,
                        help="the size synced against the simulator's 240/min limiter (default "
                             "as --lookback-size; '0': skip)")  # fmt: skip
    parser.add_argument("--limiter-schedule-seconds", type=float, default=60,
                        help="the limiter's no-change runs start this far apart")  # fmt: skip
    parser.add_argument("--only-lookback", action="store_true",
                        help="only the lookback and limiter figures")  # fmt: skip
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results.json")
    args = parser.parse_args(argv)
    sizes = [10_000] if args.quick else [parse_size(s) for s in args.sizes.split(",")]
    repeat = 1 if args.quick else args.repeat
    results: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_at_start": os.getloadavg(),
        },  # fmt: skip
        "sizes": [],
    }
    with tempfile.TemporaryDirectory(prefix="dodo-bench-") as tmp:
        work = Path(tmp)
        lookback_figures(args, repeat, work, results)
        if args.only_lookback:
            sizes = []
        backfill_max = parse_size(args.backfill_emit_max)
        for payments in sizes:
            results["sizes"].append(bench_size(payments, args.seed, repeat, backfill_max, work))
        by_size = {s["payments"]: s for s in results["sizes"]}
        if not by_size:
            return _finish(args, results)
        small, large = min(by_size), max(by_size)
        ratios: dict[str, float] = {}
        if small != large:
            for variant in ("no_change_models_rebuilt", "no_change_models_kept"):
                ratios[f"{variant} {large} vs {small} (denser business, bigger delta)"] = round(
                    by_size[large][variant]["wall_s_median"]
                    / by_size[small][variant]["wall_s_median"],
                    2,
                )
        if not args.skip_same_delta:
            base = parse_size(args.same_delta_base)
            base = base if base in by_size else small
            deeper = bench_deeper_history(base, args.seed, repeat, 10, work)
            results["same_delta_deeper_history"] = deeper
            shallow = by_size[base]
            ratios[f"no-change, same delta: {deeper['payments']} vs {base} payments of history"] = (
                round(
                    deeper["no_change_models_kept"]["wall_s_median"]
                    / shallow["no_change_models_kept"]["wall_s_median"],
                    2,
                )
            )
            ratios["history rows of the two"] = round(
                deeper["history_rows"] / shallow["history_rows"], 2
            )
        if not args.skip_formats:
            formats_size = 2_000 if args.quick else parse_size(args.formats_size)
            results["extract_formats"] = bench_extract_formats(
                formats_size, args.seed, repeat, work
            )
            for name, speedup in results["extract_formats"]["speedup_vs"].items():
                ratios[f"extract+load rows/s, job vs {name} at {formats_size}"] = speedup
        if ratios:
            results["ratios"] = ratios
        if not args.skip_emitter:
            # the real catalog: the outboxes of the largest size that sent its whole history
            backfilled = [p for p in by_size if p <= backfill_max]
            outboxes = (
                without_ledger(work / f"bench_{max(backfilled)}.duckdb", work / "emitter.duckdb")
                if backfilled
                else None
            )
            events = 5_000 if args.quick else args.emitter_events
            results["emitter_vs_webhook"] = bench_emitter(
                events,
                500 if args.quick else args.baseline_events,
                100 if args.quick else args.baseline_latency_events,
                20,
                outboxes,
            )
    return _finish(args, results)


def lookback_figures(
    args: argparse.Namespace, repeat: int, work: Path, results: dict[str, Any]
) -> None:
    """The tiered lookback against the old 3-day lookback, and the limiter runs."""
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    default = 2_000 if args.quick else max([s for s in sizes if s <= 100_000] or [min(sizes)])
    size = parse_size(args.lookback_size) if args.lookback_size else default
    if size:
        results["lookback_tiers"] = bench_tiers(size, args.seed, repeat, work)
    size = parse_size(args.limiter_size) if args.limiter_size else default
    if size:
        results["limiter"] = bench_limiter(
            size, args.seed, repeat, work, schedule_s=args.limiter_schedule_seconds
        )


def _finish(args: argparse.Namespace, results: dict[str, Any]) -> dict[str, Any]:
    results["machine"]["load_average_at_end"] = os.getloadavg()
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print_table(results)
    print_lookback(results)
    return results


if __name__ == "__main__":
    main()
