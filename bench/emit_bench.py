"""Time the emitter against the sandbox collector (own process) vs one HTTP request per event.

    .venv/bin/python bench/emit_bench.py [--events 100000] [--latency-ms 20] [--repeat 3]
        [--no-gzip] [--no-validate] [--warehouse WAREHOUSE.duckdb]

Prints events/s (median of `--repeat` runs, with the load average of each), CPU per event,
events and bytes per batch, fill ratio vs the library's batch byte limit, and the ratio
against the webhook way (sequential keep-alive requests, one event each). `--warehouse` sends
the outboxes of a copy of a real warehouse instead (e.g. one left by `dodo-segment run
--skip-emit` against the sandbox simulator: the real event catalog, identifies then tracks).
Every message is checked against the tracking plan as in a real run (`--no-validate`: not, to
measure what the check costs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import requests
from segment.analytics import Client
from segment.analytics.consumer import BATCH_SIZE_LIMIT

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.emit import EmitSettings, emit  # noqa: E402

WRITE_KEY = "bench_write_key"


def start_collector(latency_ms: float) -> tuple[subprocess.Popen[str], str]:
    """The collector in its own process, so it does not share the emitter's GIL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.sandbox.collector", "--port", "0",
         "--write-key", WRITE_KEY, "--latency-ms", str(latency_ms)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def build_warehouse(path: Path, events: int) -> None:
    """Outboxes shaped like the models' output: Payment/Subscription events, 10 properties."""
    con = duckdb.connect(str(path))
    con.execute("CREATE SCHEMA analytics")
    con.execute(
        "CREATE TABLE analytics.track_outbox(event_id VARCHAR, user_id VARCHAR, event VARCHAR,"
        " occurred_at TIMESTAMPTZ, properties JSON)"
    )
    con.execute(
        "CREATE TABLE analytics.identify_outbox(user_id VARCHAR, traits JSON, traits_hash VARCHAR)"
    )
    con.execute(
        """INSERT INTO analytics.track_outbox
           SELECT 'pay_' || lpad(i::VARCHAR, 12, '0') || ':payment_succeeded',
                  'cus_' || lpad((i % 20000)::VARCHAR, 10, '0'),
                  CASE WHEN i % 7 = 0 THEN 'Subscription Renewed' ELSE 'Order Completed' END,
                  TIMESTAMPTZ '2024-01-01 00:00:00+00' + to_seconds(i * 30),
                  json_object('order_id', 'pay_' || lpad(i::VARCHAR, 12, '0'),
                              'total', round((i % 9000) / 100.0 + 9.99, 2),
                              'revenue', round((i % 9000) / 100.0 + 9.99, 2),
                              'currency', 'USD', 'payment_method', 'card',
                              'card_network', 'visa', 'product_id', 'pdt_' || (i % 40),
                              'subscription_id', 'sub_' || lpad((i % 8000)::VARCHAR, 10, '0'),
                              'products', json_array(json_object('product_id', 'pdt_' || (i % 40),
                                                                 'quantity', 1)),
                              'livemode', true)
           FROM range(?) t(i)""",
        [events],
    )
    # the tracking plan model's table over this outbox (sql/segment/tracking_plan.sql)
    con.execute(
        """CREATE TABLE analytics.tracking_plan AS
           SELECT 'track' AS call, event, entry.key, entry.type AS json_type, count(*) AS rows
           FROM analytics.track_outbox, json_each(properties) AS entry GROUP BY ALL
           UNION ALL SELECT 'track', event, '', '', count(*) FROM analytics.track_outbox
           GROUP BY ALL"""
    )
    con.close()


def collector_stats(url: str) -> dict[str, Any]:
    return requests.get(url + "/_stats", timeout=10).json()


def run_emitter(
    url: str,
    events: int,
    threads: int,
    gzip: bool = True,
    warehouse: Path | None = None,
    validate: bool = True,
) -> dict[str, Any]:
    """One emitter run: `events` synthetic events, or every outbox row of a copy of `warehouse`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.duckdb"
        if warehouse is None:
            build_warehouse(path, events)
        else:
            shutil.copy(warehouse, path)
        con = duckdb.connect(str(path))
        settings = EmitSettings(
            write_key=WRITE_KEY, host=url, threads=threads, gzip=gzip, validate=validate
        )
        requests.post(url + "/_reset", timeout=10)
        cpu = time.process_time()
        started = time.perf_counter()
        result = emit(con, settings, "bench", events_since=datetime(2000, 1, 1, tzinfo=UTC))
        seconds = time.perf_counter() - started
        cpu = time.process_time() - cpu
        con.close()
    stats = collector_stats(url)
    sent = result.tracks_sent + result.identifies_sent
    assert stats["messages"] == sent and not result.failed and result.pending == 0, (result, stats)
    assert warehouse is not None or sent == events, (result, stats)
    batches = len(stats["batch_sizes"])
    body = sum(stats["accepted_body_bytes"]) / batches
    return {
        "events": sent,
        "seconds": round(seconds, 2),
        "events_per_s": round(sent / seconds),
        "cpu_us_per_event": round(cpu / sent * 1e6, 1),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "requests": stats["requests"],
        "events_per_batch": round(sent / batches, 1),
        "body_bytes_per_batch": round(body),
        "wire_bytes_per_batch": round(stats["bytes_received"] / stats["requests"]),
        "fill_ratio": round(body / BATCH_SIZE_LIMIT, 3),
    }


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median events/s, plus every run's events/s and load average."""
    middle = sorted(runs, key=lambda r: r["events_per_s"])[len(runs) // 2]
    return {
        **middle,
        "events_per_s": round(statistics.median(r["events_per_s"] for r in runs)),
        "events_per_s_all": [r["events_per_s"] for r in runs],
        "load_average_all": [r["load_average_1m"] for r in runs],
    }


def run_one_per_event(url: str, events: int) -> dict[str, Any]:
    """The webhook way: one keep-alive request per event, sequential."""
    shaper = Client(WRITE_KEY, send=False)
    session = requests.Session()
    session.auth = (WRITE_KEY, "")
    requests.post(url + "/_reset", timeout=10)
    started = time.perf_counter()
    for i in range(events):
        _, msg = shaper.track(
            user_id=f"cus_{i % 20000:010d}",
            event="Order Completed",
            properties={"order_id": f"pay_{i:012d}", "total": 19.99, "revenue": 19.99,
                        "currency": "USD", "payment_method": "card", "card_network": "visa",
                        "product_id": f"pdt_{i % 40}", "livemode": True},
            timestamp=datetime(2024, 1, 1, tzinfo=UTC),
            message_id=f"pay_{i:012d}:payment_succeeded",
        )  # fmt: skip
        response = session.post(url + "/v1/track", data=json.dumps(msg), timeout=10,
                                headers={"Content-Type": "application/json"})  # fmt: skip
        response.raise_for_status()
    seconds = time.perf_counter() - started
    return {"events": events, "seconds": round(seconds, 2), "events_per_s": round(events / seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--baseline-events", type=int, default=10_000)
    parser.add_argument("--baseline-latency-events", type=int, default=2_000)
    parser.add_argument("--latency-ms", type=float, default=20)
    parser.add_argument("--threads", type=int, default=EmitSettings("x").threads)
    parser.add_argument("--repeat", type=int, default=3, help="emitter runs per latency (median)")
    parser.add_argument("--no-gzip", dest="gzip", action="store_false", help="uncompressed bodies")
    parser.add_argument(
        "--no-validate", dest="validate", action="store_false", help="skip the tracking plan check"
    )
    parser.add_argument("--warehouse", type=Path, help="send a copy of this warehouse's outboxes")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    for label, latency, base_events in (
        ("no_latency", 0.0, args.baseline_events),
        (f"latency_{args.latency_ms:g}ms", args.latency_ms, args.baseline_latency_events),
    ):
        proc, url = start_collector(latency)
        try:
            emitter = median_run(
                [
                    run_emitter(
                        url, args.events, args.threads, args.gzip, args.warehouse, args.validate
                    )
                    for _ in range(args.repeat)
                ]
            )
            baseline = run_one_per_event(url, base_events)
        finally:
            proc.terminate()
            proc.wait()
        emitter["ratio_vs_one_per_event"] = round(
            emitter["events_per_s"] / baseline["events_per_s"], 1
        )
        results[label] = {"emitter": emitter, "one_request_per_event": baseline}
        print(f"\n== {label} (collector latency {latency:g} ms) ==")
        for key, value in emitter.items():
            print(f"  emitter {key:>24}: {value}")
        for key, value in baseline.items():
            print(f"  webhook {key:>24}: {value}")
    print(f"\nbatch byte limit of the client (BATCH_SIZE_LIMIT): {BATCH_SIZE_LIMIT}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
