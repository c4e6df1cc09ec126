"""The API's rate limit spent on news: the tiered lookback against today's 3-day lookback.

    python -m bench.run --only-lookback [--lookback-size 100k] [--limiter-size 100k]

Side by side in one invocation, on one business and one warehouse: no-change runs with the
short window (`lookback_minutes`, the job's default) and with the old 3-day lookback on every
run (`lookback_minutes` = 4320, what the job did before the deep pass existed), the deep pass
(`run --deep`), and the floor and bound they are held to. Then the same business behind the
simulator's token-bucket limiter (240/min, bursts of 40, X-RateLimit headers): the first sync
and no-change runs, paced by the headers.
"""

from __future__ import annotations

import math
import statistics
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb

from bench.harness import (
    job_env,
    phase_rows,
    request_bound,
    run_probe,
    start_collector,
    start_simulator,
    stop,
)
from pipelines.dodo_contract import NON_TERMINAL_STATUSES, RAW_DATASET, STATUS_FIELDS

PAGE_SIZE = 100
SHORT = timedelta(minutes=60)
OLD_LOOKBACK_MINUTES = str(3 * 24 * 60)
SCHEDULE_S = 60.0
"""The limiter's no-change runs start this far apart, as a job scheduled every minute."""
INCREMENTAL = ("payments", "subscriptions", "customers", "refunds", "disputes", "balance_ledger")


def request_floor(db: Path, as_of: datetime, short: timedelta = SHORT) -> dict[str, int]:
    """The issue's floor for a no-change, non-deep run, per resource: the pages of the open
    objects (one query per status, at least one request each), one page per incremental
    resource for the short window, and the two product queries."""
    floor: dict[str, int] = {}
    with duckdb.connect(str(db), read_only=True) as con:
        for resource in INCREMENTAL:
            recent = con.execute(
                f"select count(*) from {RAW_DATASET}.{resource} where created_at >= ?",
                [as_of - short],
            ).fetchone()[0]
            pages = max(1, math.ceil(recent / PAGE_SIZE))
            for status in NON_TERMINAL_STATUSES.get(resource, ()):
                n = con.execute(
                    f"select count(*) from {RAW_DATASET}.{resource} "
                    f'where "{STATUS_FIELDS[resource]}" = ? and created_at < ?',
                    [status, as_of - short],
                ).fetchone()[0]
                pages += max(1, math.ceil(n / PAGE_SIZE))
            floor[resource] = pages
    floor["products"] = 2
    return floor


def _runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median wall time and the requests of the median run (no-change runs repeat exactly)."""
    chosen = sorted(runs, key=lambda r: r["wall_seconds"])[len(runs) // 2]
    return {
        **phase_rows(chosen),
        "wall_s_all": [r["wall_seconds"] for r in runs],
        "wall_s_median": statistics.median(r["wall_seconds"] for r in runs),
        "api_requests_all": [sum(r["extract"]["api_requests"].values()) for r in runs],
        "api_requests_by_resource": chosen["extract"]["api_requests"],
        "deep": chosen["extract"]["deep"],
        "deep_found": chosen["extract"]["deep_found"],
        "pacing": chosen["extract"]["pacing"],
    }


def bench_tiers(payments: int, seed: int, repeat: int, work: Path) -> dict[str, Any]:
    """No-change runs, short window vs the old 3-day lookback, and the deep pass, interleaved."""
    sim = start_simulator(payments, seed)
    collector, collector_url = start_collector(0)
    db = work / f"lookback_{payments}.duckdb"
    env = job_env(sim, collector_url, db)
    old_env = {**env, "SOURCES__DODO__LOOKBACK_MINUTES": OLD_LOOKBACK_MINUTES}
    try:
        first = run_probe(env, work)
        run_probe(env, work)  # builds the models the next runs keep
        short: list[dict[str, Any]] = []
        old: list[dict[str, Any]] = []
        deep: list[dict[str, Any]] = []
        for _ in range(repeat):
            short.append(run_probe(env, work))
            old.append(run_probe(old_env, work))
            deep.append(run_probe(env, work, "--deep"))
        as_of = datetime.fromisoformat(sim.now)
        floor = request_floor(db, as_of)
        bound = request_bound(db, as_of)
    finally:
        stop(sim.proc)
        stop(collector)
    out = {
        "payments": payments,
        "first_sync": phase_rows(first),
        "no_change_short": _runs(short),
        "no_change_old_3_day_lookback": _runs(old),
        "deep_pass": _runs(deep),
        "floor": {**floor, "total": sum(floor.values())},
        "bound": {**bound, "total": sum(bound.values())},
    }
    s, o = (
        out["no_change_short"]["api_requests"],
        out["no_change_old_3_day_lookback"]["api_requests"],
    )
    out["short_vs_old_requests"] = round(s / o, 3) if o else None
    return out


def bench_limiter(
    payments: int,
    seed: int,
    repeat: int,
    work: Path,
    per_minute: float = 240,
    burst: int = 40,
    schedule_s: float = SCHEDULE_S,
) -> dict[str, Any]:
    """The first sync (extract + load) and no-change runs against the simulator's limiter,
    paced by its headers (no client-side ceiling): requests, wall time, 429s. The no-change runs
    start `schedule_s` apart (a minute: a job scheduled every minute)."""
    sim = start_simulator(
        payments, seed,
        extra=("--rate-limit-per-minute", f"{per_minute:g}", "--rate-limit-burst", str(burst)),
    )  # fmt: skip
    collector, collector_url = start_collector(0)
    db = work / f"limited_{payments}.duckdb"
    env = job_env(sim, collector_url, db)
    env.pop("SOURCES__DODO__REQUESTS_PER_MINUTE")  # the job's default: the server's headers
    try:
        first = run_probe(env, work, "--extract-only")
        run_probe(env, work)  # models, the first emit
        started = time.monotonic()
        run_probe(env, work)  # builds the models the next runs keep
        runs = []
        for _ in range(repeat):  # scheduled every minute: each starts a minute after the last
            time.sleep(max(0.0, schedule_s - (time.monotonic() - started)))
            started = time.monotonic()
            runs.append(run_probe(env, work))
    finally:
        stop(sim.proc)
        stop(collector)
    requests = sum(first["extract"]["api_requests"].values())
    allowed_s = max(0.0, (requests - burst) / (per_minute / 60))
    extract_s = first["extract"]["seconds"]["total"]
    no_change = _runs(runs)
    return {
        "payments": payments,
        "limit": {"per_minute": per_minute, "burst": burst},
        "no_change_runs_every_s": schedule_s,
        "first_sync": {
            "api_requests": requests,
            "responses_429": first["extract"]["pacing"].get("throttled"),
            "retries": sum(first["extract"]["api_retries"].values()),
            "extract_load_s": extract_s,
            "requests_over_limit_s": round(requests / (per_minute / 60), 1),
            "least_time_the_limit_allows_s": round(allowed_s, 1),
            "wall_vs_requests_over_limit": round(extract_s / (requests / (per_minute / 60)), 3),
            "pacing": first["extract"]["pacing"],
            "rows": first["extract"]["rows"],
        },
        "no_change": no_change,
        "no_change_share_of_a_minute_budget": round(no_change["api_requests"] / per_minute, 3),
        "no_change_wall_share_of_a_minute": round(no_change["wall_s_median"] / 60, 3),
    }


def print_lookback(results: dict[str, Any]) -> None:
    """A human summary of the lookback and limiter figures."""
    tiers = results.get("lookback_tiers")
    if tiers:
        s, o, d = (tiers[k] for k in ("no_change_short", "no_change_old_3_day_lookback",
                                      "deep_pass"))  # fmt: skip
        print(f"\nlookback at {tiers['payments']} payments: no-change run requests, short "
              f"window {s['api_requests']} (wall {s['wall_s_median']:.1f} s) vs old 3-day "
              f"lookback {o['api_requests']} (wall {o['wall_s_median']:.1f} s) = "
              f"{tiers['short_vs_old_requests']}; floor {tiers['floor']['total']}; deep pass "
              f"{d['api_requests']} (wall {d['wall_s_median']:.1f} s) vs bound "
              f"{tiers['bound']['total']}")  # fmt: skip
    limited = results.get("limiter")
    if limited:
        f, n = limited["first_sync"], limited["no_change"]
        print(f"limiter {limited['limit']['per_minute']:g}/min at {limited['payments']} payments:"
              f" first sync {f['api_requests']} requests in {f['extract_load_s']:.0f} s "
              f"(requests/limit {f['requests_over_limit_s']:.0f} s, ratio "
              f"{f['wall_vs_requests_over_limit']}), {f['responses_429']} responses 429; "
              f"no-change run {n['api_requests']} requests = "
              f"{limited['no_change_share_of_a_minute_budget']:.0%} of a minute's budget, wall "
              f"{n['wall_s_median']:.1f} s")  # fmt: skip
