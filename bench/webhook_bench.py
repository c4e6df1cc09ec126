"""Latency of webhook-triggered runs: a webhook's arrival to the collector's receipt of its track.

`python -m bench.webhook_bench --payments 100k,1m --deliveries 200` generates, per size, a
business in this process behind the sandbox simulator and collector, runs the first sync,
starts `dodo-segment listen`, then lets the business's time pass and delivers the signed
webhooks of what changed at random moments (exponential gaps), as Dodo would. For every payment
that became `succeeded`, the latency is the collector's first receipt of its `Payment
Completed` minus the moment the listener acknowledged the delivery.

Where that time goes: while the listener's runs last, the bench polls the run lock's step notes
(`starting`, `webhooks`, `models`, `emit`, `recording`) and samples the worker's RSS, so each
payment's latency splits into the wait for its run (debounce, or the run before it), the run's
fixed start (open and prepare the warehouse, record the run), the webhook merge, the models
(with data tests), and the emit up to its receipt. Side by side, the same kind of changes reach
Segment through a 1-minute cron instead: the run that reads the API is measured (its start to
each event's receipt) and added to the wait for the next tick, uniform over the minute.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import orjson
import psutil

from bench.harness import parse_history
from pipelines.dodo_contract import SYNC_SCHEMA
from pipelines.lock import lock_path
from pipelines.sandbox import DodoSimulator, SegmentCollector, generate_business
from pipelines.sandbox.webhooks import Snapshot, WebhookSender, changes_since, snapshot

REPO = Path(__file__).resolve().parents[1]
API_KEY, WRITE_KEY = "bench_api_key", "bench_write_key"
SECRET = "whsec_" + base64.b64encode(b"bench webhook signing key, 32 b!").decode()
CRON_SECONDS = 60
STEPS = ("starting", "webhooks", "models", "emit", "recording")
"""The run's steps as the lock notes them (pipelines/job.py `run_job`), in order."""


def percentile(values: list[float], share: float) -> float:
    """The nearest-rank percentile (share 0.95 -> p95)."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(share * len(ordered) + 0.5) - 1))]


def spread(values: list[float]) -> dict[str, float | None]:
    """Median and p95 of some seconds (None when there are none)."""
    if not values:
        return {"median_s": None, "p95_s": None}
    return {"median_s": round(statistics.median(values), 3),
            "p95_s": round(percentile(values, 0.95), 3)}  # fmt: skip


def rss_mb(process: psutil.Process) -> float:
    """A process's resident memory now, in MB."""
    return process.memory_info().rss / 2**20


def job_env(
    simulator: DodoSimulator, collector: SegmentCollector, db: Path, now: datetime,
    memory_limit: str | None = None,
) -> dict[str, str]:  # fmt: skip
    """The job's environment for the in-process simulator and collector (`memory_limit`: the
    warehouse's, instead of the job's default)."""
    limit = {"WAREHOUSE__MEMORY_LIMIT": memory_limit} if memory_limit else {}
    return limit | {
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


def newly_succeeded(before: Snapshot, payloads: list[dict[str, Any]]) -> set[str]:
    """Payments that reached `succeeded` in the deliveries (not those only updated since)."""
    then = before["payments"]
    out = set()
    for p in payloads:
        key = p["data"].get("payment_id")
        if p["type"] == "payment.succeeded":
            was = then.get(key)
            if was is None or orjson.loads(was)["status"] != "succeeded":
                out.add(key)
    return out


def completed_at(collector: SegmentCollector) -> dict[str, float]:
    """payment_id -> first receipt time of its Payment Completed."""
    received = collector.first_received_at
    return {
        m["properties"]["payment_id"]: received[m["messageId"]]
        for m in collector.tracks()
        if m.get("event") == "Payment Completed" and m["messageId"] in received
    }


class RunWatch:
    """Polls the run lock's step notes and samples RSS (this process: the sandbox; the listener's
    worker: the runs) until stopped."""

    def __init__(self, db: Path, every: float = 0.02) -> None:
        self.lock_file, self.every = lock_path(str(db)), every
        self.steps: dict[str, dict[str, float]] = {}
        """run_id -> step -> time.time() it was first seen."""
        self.worker_peak_mb: dict[str, float] = {}
        self.sandbox_peak_mb = 0.0
        self.listener: psutil.Process | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="run-watch", daemon=True)

    def start(self) -> RunWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            now = time.time()
            self.sandbox_peak_mb = max(self.sandbox_peak_mb, rss_mb(me))
            try:
                note = json.loads(self.lock_file.read_text() or "{}")
            except (OSError, ValueError):
                note = {}
            run_id, step = note.get("run_id"), note.get("step")
            if run_id and step:
                self.steps.setdefault(run_id, {}).setdefault(step, now)
                if step != "recording" and self.listener is not None:
                    try:
                        worst = max((rss_mb(c) for c in self.listener.children()), default=0.0)
                    except psutil.Error:
                        worst = 0.0
                    self.worker_peak_mb[run_id] = max(self.worker_peak_mb.get(run_id, 0), worst)
            time.sleep(self.every)


def runs_of(db: Path, since: datetime) -> list[dict[str, Any]]:
    """The runs started since (listener runs), with their models and emit seconds."""
    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute(
            f"select r.run_id, r.started_at, r.finished_at, r.tracks_sent, r.identifies_sent, "
            f"  s.models, s.emit from {SYNC_SCHEMA}.runs r left join (select run_id, "
            f"  max(seconds) filter (where step = 'models') as models, "
            f"  max(seconds) filter (where step = 'emit') as emit "
            f"  from {SYNC_SCHEMA}.run_steps group by run_id) s using (run_id) "
            f"where r.started_at >= ? order by r.started_at",
            [since],
        ).fetchall()
    keys = ("run_id", "started", "finished", "tracks", "identifies", "models_s", "emit_s")
    out = [dict(zip(keys, row, strict=True)) for row in rows]
    for run in out:
        run["started"], run["finished"] = run["started"].timestamp(), run["finished"].timestamp()
    return out


def breakdown(
    acknowledged: dict[str, float], received: dict[str, float], runs: list[dict[str, Any]],
    watch: RunWatch,
) -> dict[str, Any]:  # fmt: skip
    """Each payment's latency split by the steps of the run that sent its track."""
    parts: dict[str, list[float]] = {k: [] for k in
        ("wait_for_run", "run_start", "merge", "models", "emit_to_receipt")}  # fmt: skip
    for key, acked in acknowledged.items():
        got = received.get(key)
        run = next((r for r in runs if r["started"] <= (got or 0) <= r["finished"]), None)
        steps = watch.steps.get(run["run_id"], {}) if run else {}
        if got is None or not all(s in steps for s in ("webhooks", "models", "emit")):
            continue
        parts["wait_for_run"].append(run["started"] - acked)
        parts["run_start"].append(steps["webhooks"] - run["started"])
        parts["merge"].append(steps["models"] - steps["webhooks"])
        parts["models"].append(steps["emit"] - steps["models"])
        parts["emit_to_receipt"].append(got - steps["emit"])
    per_run = [r for r in runs if r["models_s"] is not None]
    return {
        "per_payment": {name: spread(values) for name, values in parts.items()},
        "runs": len(runs),
        "run_s": spread([r["finished"] - r["started"] for r in runs]),
        "run_models_s": spread([r["models_s"] for r in per_run]),
        "run_models_s_max": max((r["models_s"] for r in per_run), default=None),
        "run_emit_s": spread([r["emit_s"] for r in per_run if r["emit_s"] is not None]),
        "run_tracks": spread([float(r["tracks"] or 0) for r in runs]),
        "worker_peak_rss_mb": round(max(watch.worker_peak_mb.values(), default=0)),
    }


def _drain(stream: Any, lines: list[str]) -> None:
    """Keep reading the listener's log so it never blocks on a full pipe."""
    for line in stream:
        lines.append(line)
        del lines[:-200]


def webhook_phase(args, business, simulator, collector, env, db) -> dict[str, Any]:
    exe = Path(sys.executable).with_name("dodo-segment")
    watch = RunWatch(db)
    since = datetime.now(UTC)
    listener = subprocess.Popen(
        [str(exe), "listen", "--port", "0"], env=env, stderr=subprocess.PIPE, text=True
    )
    url, log_lines = None, []
    while url is None:
        line = listener.stderr.readline()
        if not line:
            raise RuntimeError("the listener did not start")
        found = re.search(r"listening for Dodo webhooks at (\S+)", line)
        url = found.group(1) if found else None
    threading.Thread(target=_drain, args=(listener.stderr, log_lines), daemon=True).start()
    watch.listener = psutil.Process(listener.pid)
    watch.start()
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
            del before  # stop watching the business's changes
            rng.shuffle(payloads)
            for payload in payloads:
                time.sleep(rng.expovariate(1 / args.mean_gap_seconds))
                report = sender.deliver([payload])
                deliveries += 1
                key = payload["data"].get("payment_id")
                if key in wanted and report.sent_at:
                    acknowledged[key] = next(iter(report.sent_at.values()))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not set(acknowledged) <= set(completed_at(collector)):
            time.sleep(0.5)
        requests_before = sum(simulator.request_counts_by_endpoint().values())
    finally:
        listener.terminate()
        listener.wait(timeout=300)
        watch.stop()
    received = completed_at(collector)
    latencies = [received[k] - t for k, t in acknowledged.items() if k in received]
    if not latencies:
        raise RuntimeError("no delivery reached Segment: " + "".join(log_lines[-20:]))
    return {
        "deliveries": deliveries,
        "measured": len(latencies),
        "missing": len(set(acknowledged) - set(received)),
        "median_s": round(statistics.median(latencies), 3),
        "p95_s": round(percentile(latencies, 0.95), 3),
        "max_s": round(max(latencies), 3),
        "api_requests": requests_before,
        "breakdown": breakdown(acknowledged, received, runs_of(db, since), watch),
        "sandbox_peak_rss_mb": round(watch.sandbox_peak_mb),
    }


def cron_phase(args, business, simulator, collector, db) -> dict[str, Any]:
    rng = random.Random(args.seed + 1)
    before = snapshot(business)
    business.advance_time(days=args.days_per_round, seed=rng.randrange(1 << 30))
    wanted = newly_succeeded(before, changes_since(before, business))
    del before
    simulator.reset_counts()
    env = job_env(simulator, collector, db, business.now, args.memory_limit)
    started = time.time()
    dodo_segment("run", env=env)
    run_seconds = time.time() - started
    received = completed_at(collector)
    to_receipt = [received[k] - started for k in wanted if k in received]
    # changes arrive at random: the wait for the next tick is uniform over the cron interval
    latencies = [rng.uniform(0, CRON_SECONDS) + r for r in to_receipt]
    return {
        "measured": len(latencies),
        "run_seconds": round(run_seconds, 2),
        "api_requests": sum(simulator.request_counts_by_endpoint().values()),
        **spread(latencies),
    }


def bench_size(
    args: argparse.Namespace, payments: int, business_payments: int | None = None
) -> dict[str, Any]:
    """Generation, first sync, webhook phase and cron phase of one business size: `payments`
    in all, of which the generated business makes `business_payments` (default: all) and older
    closed payments the rest (`harness.parse_history`)."""
    wall = datetime.now(UTC).replace(microsecond=0)
    me = psutil.Process()
    t0 = time.perf_counter()
    recent = business_payments or payments
    business = generate_business(
        args.seed, max(300, recent // 10), payments_target=recent,
        now=wall - timedelta(days=30), older_closed_payments=payments - recent,
    )  # fmt: skip
    generation = time.perf_counter() - t0
    generated_mb = rss_mb(me)
    with (
        tempfile.TemporaryDirectory(prefix="dodo-segment-webhooks-") as work,
        DodoSimulator(business, api_key=API_KEY) as simulator,
        SegmentCollector(write_key=WRITE_KEY) as collector,
    ):
        db = Path(work) / "warehouse.duckdb"
        t0 = time.perf_counter()
        env = job_env(simulator, collector, db, business.now, args.memory_limit)
        dodo_segment("run", env=env)
        first_sync = time.perf_counter() - t0
        after_sync_mb = rss_mb(me)
        collector.reset()  # the first sync's identifies are not measured: keep none of them
        hooks = webhook_phase(args, business, simulator, collector, env, db)
        cron = cron_phase(args, business, simulator, collector, db)
    return {
        "payments": payments,
        "business_payments": recent,
        "memory_limit": args.memory_limit or "job default",
        "generation_s": round(generation, 1),
        "first_sync_s": round(first_sync, 1),
        "sandbox_rss_mb": {
            "generated": round(generated_mb),
            "after_first_sync": round(after_sync_mb),
            "peak_webhook_phase": hooks.pop("sandbox_peak_rss_mb"),
        },  # fmt: skip
        "webhooks": hooks,
        "cron_1_minute": cron,
    }


def _of_business(r: dict[str, Any]) -> str:
    business = r.get("business_payments", r["payments"])
    return "" if business == r["payments"] else f" (a {business:,}-payment business)"


def print_size(r: dict[str, Any]) -> None:
    """One size's figures, in a few lines."""
    hooks, cron, b = r["webhooks"], r["cron_1_minute"], r["webhooks"]["breakdown"]
    part = b["per_payment"]
    print(
        f"{r['payments']:,} payments{_of_business(r)} (generated in {r['generation_s']} s, first sync "
        f"{r['first_sync_s']} s, sandbox RSS {r['sandbox_rss_mb']})\n"
        f"  webhook -> Segment, {hooks['measured']} payments over {hooks['deliveries']} "
        f"deliveries: median {hooks['median_s']:.2f} s, p95 {hooks['p95_s']:.2f} s "
        f"(max {hooks['max_s']:.2f} s; {hooks['api_requests']} API requests)\n"
        f"  {b['runs']} webhook-triggered runs: median {b['run_s']['median_s']} s, models median "
        f"{b['run_models_s']['median_s']} s (p95 {b['run_models_s']['p95_s']}, max "
        f"{b['run_models_s_max']}), worker peak RSS {b['worker_peak_rss_mb']} MB\n"
        "  per payment, median / p95 s: "
        + ", ".join(f"{k} {v['median_s']} / {v['p95_s']}" for k, v in part.items())
        + f"\n  1-minute cron, {cron['measured']} payments: median {cron['median_s']} s, "
        f"p95 {cron['p95_s']} s (its run: {cron['run_seconds']} s, "
        f"{cron['api_requests']} API requests)",
        flush=True,
    )


def parser() -> argparse.ArgumentParser:
    """The bench's command line (bench/incremental_bench.py runs it in a subprocess)."""
    parser = argparse.ArgumentParser(prog="python -m bench.webhook_bench")
    parser.add_argument(
        "--payments", default="100k",
        help="sizes, e.g. 100k,1m (each in turn); 1m@100k: the 100k business over 900k older "
        "closed payments",
    )  # fmt: skip
    parser.add_argument("--deliveries", type=int, default=200, help="payments measured at least")
    parser.add_argument("--days-per-round", type=float, default=1.0)
    parser.add_argument("--mean-gap-seconds", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--memory-limit", help="the job's [warehouse] memory_limit (default: the job's, 1GB)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results_webhooks.json")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the bench for each size; write and return the figures."""
    args = parser().parse_args(argv)
    measured_at = datetime.now(UTC).replace(microsecond=0).isoformat()
    sizes: list[dict[str, Any]] = []
    for size in args.payments.split(","):
        sizes.append({"measured_at": measured_at, **bench_size(args, *parse_history(size))})
        sizes[-1]["bench_peak_rss_mb"] = round(resource_peak_mb())
        print_size(sizes[-1])
    # one size: its figures (as before several sizes could be asked); several: a list of them
    results = sizes[0] if len(sizes) == 1 else {"measured_at": measured_at, "sizes": sizes}
    args.out.write_text(json.dumps(results, indent=2))
    return results


def resource_peak_mb() -> float:
    """This process's peak RSS so far (VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


if __name__ == "__main__":
    main()
