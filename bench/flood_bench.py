"""A flood of webhooks while a scheduled run holds the lock: throughput, acknowledgement, memory.

`python -m bench.flood_bench --rate 200 --seconds 60` (`make bench-flood`) generates a business,
runs the first sync, starts `dodo-segment listen` and a process holding the warehouse's run lock
(a long scheduled pass), then delivers the signed webhooks of a stretch of the business's time
at `--rate` deliveries per second (10% of them a second time under the same webhook-id, as Dodo
retries) from concurrent senders on loopback. It measures each delivery's acknowledgement (the
POST to its 2xx, which the listener sends only once the delivery is fsync'd), the listener's
peak RSS, and, once the lock is released, how long until every event has reached the collector;
then it checks that every derived event arrived exactly once (by messageId).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import orjson
import requests
from standardwebhooks.webhooks import Webhook

from bench.webhook_bench import API_KEY, SECRET, WRITE_KEY, dodo_segment, job_env, percentile
from pipelines.sandbox import DodoSimulator, SegmentCollector, generate_business
from pipelines.sandbox.webhooks import changes_since, snapshot
from pipelines.webhook_store import WebhookStore, store_folder

REPO = Path(__file__).resolve().parents[1]
HOLD_LOCK = (
    "import sys, time\n"
    "from pipelines import lock\n"
    "with lock.run_lock(sys.argv[1], 'run'):\n"
    "    print('held', flush=True)\n"
    "    sys.stdin.readline()\n"
)
"""A scheduled run, as far as the listener can tell: it holds the run lock until told to stop."""


def rss_kib(pid: int) -> int:
    """The resident set of a process in KiB (0 once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    found = re.search(r"VmRSS:\s+(\d+)", text)
    return int(found.group(1)) if found else 0


def children_of(pid: int) -> list[int]:
    """The child processes of a process (the listener's worker)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(child) for child in task.read_text().split()]
        except OSError:
            continue
    return found


def gather_payloads(business: Any, wanted: int, rng: random.Random) -> list[dict[str, Any]]:
    """The webhooks of the business's changes, day by day, until there are `wanted` of them."""
    payloads: list[dict[str, Any]] = []
    for _ in range(400):  # bounded: a few hundred simulated days at most
        if len(payloads) >= wanted:
            break
        before = snapshot(business)
        business.advance_time(days=1, seed=rng.randrange(1 << 30))
        payloads += changes_since(before, business)
    return payloads[:wanted]


def flood(url: str, deliveries: list[tuple[str, bytes]], rate: float, senders: int) -> dict:
    """POST every delivery at `rate` per second from `senders` threads; acknowledgement times."""
    webhook = Webhook(SECRET)
    jobs: queue.Queue[tuple[float, str, bytes] | None] = queue.Queue()
    acks: list[float] = []
    statuses: Counter[int] = Counter()
    late: list[float] = []
    lock = threading.Lock()
    start = time.monotonic() + 0.5
    for i, (webhook_id, body) in enumerate(deliveries):
        jobs.put((start + i / rate, webhook_id, body))
    for _ in range(senders):
        jobs.put(None)

    def sender() -> None:
        session = requests.Session()
        while (job := jobs.get()) is not None:
            due, webhook_id, body = job
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            else:
                late.append(-wait)
            for _attempt in range(20):  # bounded: a 503 is retried, as Dodo would
                now = datetime.now(UTC)
                headers = {
                    "webhook-id": webhook_id,
                    "webhook-timestamp": str(int(now.timestamp())),
                    "webhook-signature": webhook.sign(webhook_id, now, body.decode()),
                    "content-type": "application/json",
                }
                t0 = time.monotonic()
                response = session.post(url, data=body, headers=headers, timeout=30)
                elapsed = time.monotonic() - t0
                with lock:
                    statuses[response.status_code] += 1
                    if 200 <= response.status_code < 300:
                        acks.append(elapsed)
                if 200 <= response.status_code < 300:
                    break
                time.sleep(0.2)

    threads = [threading.Thread(target=sender, daemon=True) for _ in range(senders)]
    t0 = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.monotonic() - max(t0, start)
    return {
        "deliveries": len(deliveries),
        "seconds": round(seconds, 1),
        "per_second": round(len(deliveries) / seconds, 1),
        "statuses": dict(statuses),
        "ack_p50_ms": round(percentile(acks, 0.50) * 1000, 1),
        "ack_p99_ms": round(percentile(acks, 0.99) * 1000, 1),
        "ack_max_ms": round(max(acks) * 1000, 1),
        "senders_behind_schedule_p99_ms": round(percentile(late or [0.0], 0.99) * 1000, 1),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.flood_bench")
    parser.add_argument("--rate", type=float, default=200.0, help="deliveries per second")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--duplicates", type=float, default=0.10)
    parser.add_argument("--senders", type=int, default=32, help="concurrent connections")
    parser.add_argument("--customers", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=23)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results_flood.json")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    wall = datetime.now(UTC).replace(microsecond=0)
    total = int(args.rate * args.seconds)
    unique = int(total / (1 + args.duplicates))
    business = generate_business(args.seed, args.customers, now=wall - timedelta(days=400))
    with (
        tempfile.TemporaryDirectory(prefix="dodo-segment-flood-") as work,
        DodoSimulator(business, api_key=API_KEY) as simulator,
        SegmentCollector(write_key=WRITE_KEY) as collector,
    ):
        db = Path(work) / "warehouse.duckdb"
        dodo_segment("run", env=job_env(simulator, collector, db, business.now))
        payloads = gather_payloads(business, unique, rng)
        env = job_env(simulator, collector, db, business.now)
        deliveries = [(f"msg_{uuid.UUID(int=rng.getrandbits(128)).hex}", orjson.dumps(p))
                      for p in payloads]  # fmt: skip
        deliveries += rng.sample(deliveries, total - len(deliveries))  # Dodo's retries
        rng.shuffle(deliveries)
        exe = Path(sys.executable).with_name("dodo-segment")
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLD_LOCK, str(db)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        listener = subprocess.Popen(
            [str(exe), "listen", "--port", "0"], env=env, stderr=subprocess.PIPE, text=True
        )
        url = None
        while url is None:
            line = listener.stderr.readline() if listener.stderr else ""
            if not line:
                raise RuntimeError("the listener did not start")
            found = re.search(r"listening for Dodo webhooks at (\S+)", line)
            url = found.group(1) if found else None
        run_lines: list[tuple[float, str]] = []

        def drain() -> None:  # the worker's log lines, timed, for the run's step figures
            for line in listener.stderr or ():
                if re.search(r"webhooks: merged|models: |emit: \d+ identify", line):
                    run_lines.append((time.monotonic(), line.strip()))

        threading.Thread(target=drain, daemon=True).start()
        time.sleep(1.0)
        peak = {"listener": 0, "listener_at_start": rss_kib(listener.pid), "worker": 0}
        watching = threading.Event()

        def watch() -> None:  # the listener, and its worker (the run that merges the backlog)
            while not watching.is_set():
                peak["listener"] = max(peak["listener"], rss_kib(listener.pid))
                worker = sum(rss_kib(child) for child in children_of(listener.pid))
                peak["worker"] = max(peak["worker"], worker)
                time.sleep(0.1)

        threading.Thread(target=watch, daemon=True).start()
        received_before = len(collector.tracks())
        figures = flood(url, deliveries, args.rate, args.senders)
        store = WebhookStore(store_folder(str(db)))
        figures["pending_while_locked"] = store.pending_count()
        released = time.monotonic()
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.flush()
        holder.wait(timeout=30)
        deadline = released + 300
        runs_before = (store.read_counters() or {}).get("runs", {}).get("ok", 0)
        last_count, last_change = len(collector.tracks()), released
        while time.monotonic() < deadline:  # bounded: until a run after the release has ended
            count = len(collector.tracks())
            if count != last_count:
                last_count, last_change = count, time.monotonic()
            runs = (store.read_counters() or {}).get("runs", {})
            if store.pending_count() == 0 and runs.get("ok", 0) > runs_before:
                break
            time.sleep(0.05)
        figures["run_ended_after_release_s"] = round(time.monotonic() - released, 1)
        figures["run_steps_after_release_s"] = [
            f"+{at - released:.1f}s {line.split(' ', 2)[-1][:240]}"
            for at, line in run_lines if at >= released
        ]  # fmt: skip
        figures["last_event_received_after_release_s"] = round(last_change - released, 1)
        watching.set()
        figures["listener_rss_at_start_mib"] = round(peak["listener_at_start"] / 1024, 1)
        figures["listener_peak_rss_mib"] = round(peak["listener"] / 1024, 1)
        figures["worker_peak_rss_mib"] = round(peak["worker"] / 1024, 1)
        listener.terminate()
        listener.wait(timeout=120)
        with duckdb.connect(str(db), read_only=True) as con:
            outbox = {r[0] for r in con.execute("select event_id from analytics.track_outbox").fetchall()}  # fmt: skip
            settled = {r[0] for r in con.execute("select event_id from segment_sync.delivered_events").fetchall()}  # fmt: skip
            delivered = {r[0] for r in con.execute(
                "select event_id from segment_sync.delivered_events where status = 'delivered'"
            ).fetchall()}  # fmt: skip
        counts = Counter(m["messageId"] for m in collector.tracks())
        figures["events_sent_after_flood"] = len(collector.tracks()) - received_before
        figures["events_lost"] = len(outbox - settled)
        figures["events_duplicated"] = sum(1 for n in counts.values() if n > 1)
        figures["ledger_matches_collector"] = delivered == set(counts)
    results = {"measured_at": wall.isoformat(), "rate": args.rate, "seconds": args.seconds,
               "duplicate_share": args.duplicates, "senders": args.senders,
               "cpus": os.cpu_count(), "load_avg": os.getloadavg(), **figures}  # fmt: skip
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
