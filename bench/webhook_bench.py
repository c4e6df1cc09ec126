"""Latency of webhook-triggered runs: a webhook's arrival to the collector's receipt of its track.

`python -m bench.webhook_bench --payments 100000 --deliveries 200` generates a business in this
process behind the sandbox simulator and collector, runs the first sync, starts
`dodo-segment listen`, then lets the business's time pass and delivers the signed webhooks of
what changed at random moments (exponential gaps), as Dodo would. For every payment that
became `succeeded`, the latency is the collector's first receipt of its `Payment Completed`
minus the moment the listener acknowledged the delivery. Side by side, the same kind of
changes reach Segment through a 1-minute cron instead: the run that reads the API is measured
(its start to each event's receipt) and added to the wait for the next tick, which for changes
arriving at random is uniform over the minute.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from pipelines.sandbox import DodoSimulator, SegmentCollector, generate_business
from pipelines.sandbox.webhooks import WebhookSender, changes_since, snapshot

REPO = Path(__file__).resolve().parents[1]
API_KEY, WRITE_KEY = "bench_api_key", "bench_write_key"
SECRET = "whsec_" + base64.b64encode(b"bench webhook signing key, 32 b!").decode()
CRON_SECONDS = 60


def percentile(values: list[float], share: float) -> float:
    """The nearest-rank percentile (share 0.95 -> p95)."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(share * len(ordered) + 0.5) - 1))]


def job_env(simulator: DodoSimulator, collector: SegmentCollector, db: Path, now: datetime):
    import os

    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SOURCES__", "SEGMENT__"))},
        "DODO_PAYMENTS_API_KEY": API_KEY,
        "DODO_PAYMENTS_BASE_URL": simulator.base_url,
        "DODO_PAYMENTS_ENVIRONMENT": "test_mode",
        "DODO_PAYMENTS_WEBHOOK_KEY": SECRET,
        "DODO_SEGMENT_DB": str(db),
        "SEGMENT_WRITE_KEY": WRITE_KEY,
        "SEGMENT_HOST": collector.base_url,
        "SOURCES__DODO__REQUESTS_PER_MINUTE": "0",
        "SOURCES__DODO__AS_OF": now.isoformat(),
        "RUNTIME__DLTHUB_TELEMETRY": "false",
        "PYTHONPATH": str(REPO),
    }


def dodo_segment(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("dodo-segment")
    result = subprocess.run([str(exe), *args], env=env, capture_output=True, text=True)
    if result.returncode not in (0, 3):
        raise RuntimeError(f"dodo-segment {' '.join(args)} failed: {result.stderr[-2000:]}")
    return result


def newly_succeeded(before: dict[str, dict[str, bytes]], payloads: list[dict[str, Any]]):
    was = {k: orjson.loads(v)["status"] for k, v in before["payments"].items()}
    return {
        p["data"]["payment_id"]
        for p in payloads
        if p["type"] == "payment.succeeded" and was.get(p["data"]["payment_id"]) != "succeeded"
    }


def completed_at(collector: SegmentCollector) -> dict[str, float]:
    """payment_id -> first receipt time of its Payment Completed."""
    received = collector.first_received_at
    return {
        m["properties"]["payment_id"]: received[m["messageId"]]
        for m in collector.tracks()
        if m.get("event") == "Payment Completed" and m["messageId"] in received
    }


def webhook_phase(args, business, simulator, collector, env) -> dict[str, Any]:
    exe = Path(sys.executable).with_name("dodo-segment")
    listener = subprocess.Popen(
        [str(exe), "listen", "--port", "0"], env=env, stderr=subprocess.PIPE, text=True
    )
    url = None
    while url is None:
        line = listener.stderr.readline()
        if not line:
            raise RuntimeError("the listener did not start")
        found = re.search(r"listening for Dodo webhooks at (\S+)", line)
        url = found.group(1) if found else None
    rng = random.Random(args.seed)
    sender = WebhookSender(url, SECRET, seed=args.seed)
    acknowledged: dict[str, float] = {}
    deliveries = requests_before = 0
    simulator.reset_counts()
    try:
        while len(acknowledged) < args.deliveries:
            before = snapshot(business)
            business.advance_time(days=args.days_per_round, seed=rng.randrange(1 << 30))
            payloads = changes_since(before, business)
            wanted = newly_succeeded(before, payloads)
            rng.shuffle(payloads)
            for payload in payloads:
                time.sleep(rng.expovariate(1 / args.mean_gap_seconds))
                report = sender.deliver([payload])
                deliveries += 1
                key = payload["data"].get("payment_id")
                if key in wanted and report.sent_at:
                    acknowledged[key] = next(iter(report.sent_at.values()))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not set(acknowledged) <= set(completed_at(collector)):
            time.sleep(0.2)
        requests_before = sum(simulator.request_counts_by_endpoint().values())
    finally:
        listener.terminate()
        listener.wait(timeout=60)
    received = completed_at(collector)
    latencies = [received[k] - t for k, t in acknowledged.items() if k in received]
    return {
        "deliveries": deliveries,
        "measured": len(latencies),
        "missing": len(set(acknowledged) - set(received)),
        "median_s": statistics.median(latencies),
        "p95_s": percentile(latencies, 0.95),
        "max_s": max(latencies),
        "api_requests": requests_before,
    }


def cron_phase(args, business, simulator, collector, db) -> dict[str, Any]:
    rng = random.Random(args.seed + 1)
    before = snapshot(business)
    business.advance_time(days=args.days_per_round, seed=rng.randrange(1 << 30))
    wanted = newly_succeeded(before, changes_since(before, business))
    simulator.reset_counts()
    env = job_env(simulator, collector, db, business.now)
    started = time.time()
    dodo_segment("run", env=env)
    run_seconds = time.time() - started
    received = completed_at(collector)
    to_receipt = [received[k] - started for k in wanted if k in received]
    # changes arrive at random: the wait for the next tick is uniform over the cron interval
    latencies = [rng.uniform(0, CRON_SECONDS) + r for r in to_receipt]
    return {
        "measured": len(latencies),
        "run_seconds": run_seconds,
        "api_requests": sum(simulator.request_counts_by_endpoint().values()),
        "median_s": statistics.median(latencies),
        "p95_s": percentile(latencies, 0.95),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.webhook_bench")
    parser.add_argument("--payments", type=int, default=100_000)
    parser.add_argument("--deliveries", type=int, default=200, help="payments measured at least")
    parser.add_argument("--days-per-round", type=float, default=1.0)
    parser.add_argument("--mean-gap-seconds", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results_webhooks.json")
    args = parser.parse_args(argv)
    wall = datetime.now(UTC).replace(microsecond=0)
    t0 = time.perf_counter()
    business = generate_business(
        args.seed, max(300, args.payments // 10), payments_target=args.payments,
        now=wall - timedelta(days=30),
    )  # fmt: skip
    generation = time.perf_counter() - t0
    with (
        tempfile.TemporaryDirectory(prefix="dodo-segment-webhooks-") as work,
        DodoSimulator(business, api_key=API_KEY) as simulator,
        SegmentCollector(write_key=WRITE_KEY) as collector,
    ):
        db = Path(work) / "warehouse.duckdb"
        t0 = time.perf_counter()
        dodo_segment("run", env=job_env(simulator, collector, db, business.now))
        first_sync = time.perf_counter() - t0
        hooks = webhook_phase(args, business, simulator, collector,
                              job_env(simulator, collector, db, business.now))  # fmt: skip
        cron = cron_phase(args, business, simulator, collector, db)
    results = {
        "measured_at": wall.isoformat(),
        "payments": args.payments,
        "generation_s": round(generation, 1),
        "first_sync_s": round(first_sync, 1),
        "webhooks": hooks,
        "cron_1_minute": cron,
    }
    args.out.write_text(json.dumps(results, indent=2))
    print(
        f"webhook -> Segment, {hooks['measured']} payments over {hooks['deliveries']} deliveries: "
        f"median {hooks['median_s']:.2f} s, p95 {hooks['p95_s']:.2f} s "
        f"(max {hooks['max_s']:.2f} s; {hooks['api_requests']} API requests)\n"
        f"1-minute cron, {cron['measured']} payments: median {cron['median_s']:.1f} s, "
        f"p95 {cron['p95_s']:.1f} s (its run: {cron['run_seconds']:.1f} s, "
        f"{cron['api_requests']} API requests)"
    )
    return results


if __name__ == "__main__":
    main()
