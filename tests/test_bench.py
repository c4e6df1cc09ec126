"""Smoke run of the benchmark (bench/run.py) at a tiny size, so the script cannot rot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.run import bench_emitter, main

pytestmark = pytest.mark.slow  # every test here drives a subprocess


def test_bench_runs_end_to_end_and_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    main(
        ["--sizes", "2k", "--repeat", "1", "--formats-size", "2k", "--baseline-events", "50",
         "--baseline-latency-events", "20", "--limiter-schedule-seconds", "0", "--out", str(out)]
    )  # fmt: skip
    results = json.loads(out.read_text())
    (size,) = results["sizes"]
    first = size["first_sync"]
    assert size["payments"] == 2_000
    assert first["rows"] >= 2_000 and first["rows_per_s"] > 0
    assert first["api_requests"] == sum(size["first_sync_api_requests"].values())
    # the first sync of a small size sends the whole history: every message reached the collector
    assert first["emit_backfill"] and first["segment"]["messages"] == first["emit_messages"] > 0
    assert first["peak_rss_mb"]["process"] > 0
    # a no-change run reads far less than the first sync, and stays within the bound
    again = size["no_change_models_rebuilt"]
    assert 0 < again["api_requests"] < first["api_requests"]
    assert again["api_requests"] <= size["no_change_request_bound"]["total"] + 10
    assert size["no_change_models_kept"]["models_skipped"] is True
    assert again["models_skipped"] is False
    # the same business with a ten times deeper past: the same re-reads, more history
    deeper = results["same_delta_deeper_history"]
    assert deeper["payments"] == 20_000 and deeper["history_rows"] > 5 * size["history_rows"]
    assert deeper["no_change_models_kept"]["models_skipped"] is True
    assert (
        deeper["no_change_models_kept"]["api_requests_by_resource"]
        == size["no_change_models_kept"]["api_requests_by_resource"]
    )
    # comparison (c): dlt's Python-dict paths load exactly the rows the job's Arrow path loads
    formats = results["extract_formats"]
    assert formats["same_rows_loaded"] is True
    loaded = {f["rows"] for f in formats["formats"].values()}
    assert loaded == {first["rows"]}
    assert formats["formats"]["dlt-defaults"]["loader_file_format"] == "default"
    assert formats["formats"]["dlt-normaliser"]["normalize_s"] > 0
    assert set(formats["speedup_vs"]) == {"dlt-normaliser", "dlt-defaults"}
    # the emitter comparison sends the first sync's real outboxes again, all of them
    for pair in results["emitter_vs_webhook"].values():
        emitter = pair["emitter"]
        assert emitter["outbox"] == "real catalog"
        assert emitter["events"] == first["emit_messages"]
        assert 0 < emitter["fill_ratio"] <= 1
        assert pair["one_request_per_event"]["events"] in (50, 20)

    # the tiered lookback against the old 3-day lookback, the deep pass against the old bound
    tiers = results["lookback_tiers"]
    short, old, deep = (tiers[k] for k in ("no_change_short", "no_change_old_3_day_lookback",
                                           "deep_pass"))  # fmt: skip
    assert short["deep"] is False and old["deep"] is False and deep["deep"] is True
    assert short["api_requests"] <= tiers["floor"]["total"] + 7  # a short page per resource
    assert deep["api_requests"] <= tiers["bound"]["total"]
    assert set(deep["deep_found"]) >= {"payments", "balance_ledger"}
    # against the simulator's 240/min limiter: paced by its headers, never refused
    limited = results["limiter"]
    assert limited["first_sync"]["responses_429"] == 0 and limited["first_sync"]["retries"] == 0
    assert limited["first_sync"]["pacing"]["headers_seen"] is True
    assert limited["first_sync"]["api_requests"] > limited["limit"]["burst"]
    assert limited["no_change"]["pacing"]["throttled"] == 0


def test_emitter_comparison_on_synthetic_events_reports_a_ratio() -> None:
    compared = bench_emitter(events=300, baseline=50, baseline_latency=20, latency=20)
    for pair in compared.values():
        assert pair["emitter"]["events"] == 300 and pair["emitter"]["outbox"] == "synthetic"
        # too few events for a meaningful ratio: only check that it is computed
        assert pair["emitter"]["ratio_vs_one_per_event"] > 0


def test_incremental_bench_puts_delta_and_webhook_figures_in_one_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bench.incremental_bench import LABELS
    from bench.incremental_bench import main as incremental_bench

    out = tmp_path / "results_incremental.json"
    # a 1,000-payment business over 1,000 older closed payments: the deeper-past size
    results = incremental_bench(
        ["--sizes", "2000@1000", "--deliveries", "3", "--out", str(out)]
    )  # fmt: skip
    assert json.loads(out.read_text())["sizes"][0]["rows"] == results["sizes"][0]["rows"]
    rows = results["sizes"][0]["rows"]
    assert results["sizes"][0]["business_payments"] == 1000
    assert rows["history_payments"] >= 1000 + 1000 * 0.9  # the older past was served and read
    assert rows["full_models_s"] > 0 and rows["delta_models_s"] > 0
    assert 0 < rows["webhook_p50_s"] <= rows["webhook_p95_s"]
    assert rows["webhook_runs_models_s"] > 0 and rows["webhook_runs_peak_rss_mb"] > 0
    # the webhook latency bench, run inside it (it was its own smoke test; merged: one sandbox)
    webhook_results = results["sizes"][0]["webhooks"]
    hooks, cron = webhook_results["webhooks"], webhook_results["cron_1_minute"]
    assert hooks["measured"] >= 3 and hooks["missing"] == 0
    assert hooks["api_requests"] == 0  # what the webhooks carried needed no API request
    assert 0 < hooks["median_s"] <= hooks["p95_s"] <= hooks["max_s"]
    assert cron["measured"] > 0 and cron["api_requests"] > 0
    split = hooks["breakdown"]["per_payment"]
    assert all(split[step]["median_s"] is not None for step in ("models", "emit_to_receipt"))
    table = capsys.readouterr().out
    assert all(label in table for label in LABELS.values())
    assert "| 2,000 (1,000 business + 1,000 older closed) |" in table


def test_history_sizes_name_the_business_and_its_deeper_past() -> None:
    from bench.harness import parse_history, size_label

    assert size_label(*parse_history("1m@100k")) == "1m@100k"
    assert size_label(*parse_history("100k")) == "100k"
    assert parse_history("100k") == (100_000, 100_000)
    assert parse_history("1m@100k") == (1_000_000, 100_000)
    with pytest.raises(ValueError, match="more than the history"):
        parse_history("100k@1m")


def test_flood_bench_runs_end_to_end(tmp_path: Path) -> None:
    from bench.flood_bench import main as flood_bench

    out = tmp_path / "results_flood.json"
    results = flood_bench(
        ["--rate", "40", "--seconds", "2", "--senders", "4", "--customers", "60",
         "--out", str(out)]
    )  # fmt: skip
    assert json.loads(out.read_text())["deliveries"] == results["deliveries"] == 80
    assert results["statuses"] == {200: 80}
    assert results["pending_while_locked"] > 0  # the lock held the run back
    assert results["events_lost"] == 0 and results["events_duplicated"] == 0
    assert results["ledger_matches_collector"]
    assert results["worker_peak_rss_mib"] > 0


def test_soak_month_runs_end_to_end_and_resumes(tmp_path: Path) -> None:
    from bench.soak_month import main as soak_month

    out = tmp_path / "results_soak.json"
    # 12 runs of 5 simulated minutes (a tenth of them SIGKILLed), the warehouse lost at the sixth;
    # the soak pauses after 4 and the same command resumes it from its state folder
    argv = ["--days", str(12 * 5 / 1440), "--customers", "40", "--kill-share", "0.1",
            "--seed", "7", "--out", str(out), "--state-dir", str(tmp_path / "soak")]  # fmt: skip
    paused = soak_month([*argv, "--stop-after-ticks", "4"])
    assert not paused["complete"] and paused["runs"] == 1 + 4  # the first sync and 4 ticks
    assert "checks" not in paused and "warehouse_lost" not in paused["outcomes"]
    with (tmp_path / "soak" / "collector.jsonl").open("ab") as journal:
        journal.write(b'{"type": "track", "messageId": "cut sh')  # killed while writing it
    results = soak_month(argv)
    assert results["complete"] and results["sessions"] == 2
    assert results["outcomes"]["soak_resumed"] == 1
    assert json.loads(out.read_text())["runs"] == results["runs"] == 14
    assert results["days_simulated"] == pytest.approx(12 * 5 / 1440, abs=0.01)
    assert results["outcomes"]["warehouse_lost"] == 1
    checks = results["checks"]
    assert checks["events_received"] > 0
    assert checks["events_lost"] == 0 and checks["events_sent_twice_under_other_ids"] == 0
    assert results["seconds_per_in_process_run"]["total"] > 0
    with pytest.raises(SystemExit, match="finished soak"):  # not its checks a second time
        soak_month(argv)
