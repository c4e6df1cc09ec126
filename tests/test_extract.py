"""Extract + load against the Dodo API simulator over HTTP, checked against the simulator's truth."""

from __future__ import annotations

import gzip
import math
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest

from pipelines.config import pipeline_dir
from pipelines.dodo_contract import NON_TERMINAL_STATUSES, PRIMARY_KEYS, RESOURCES, STATUS_FIELDS
from pipelines.extract import build_plan, dodo_source, make_pipeline, run_extract
from pipelines.extract.dodo.client import ClientSettings, DodoClient, format_timestamp
from pipelines.sandbox.faults import PageContext, set_field
from pipelines.sandbox.loopback import LoopbackServer
from tests.conftest import API_KEY, Sandbox, make_sandbox, run_cli


def warehouse_ids(db: str, resource: str) -> list[str]:
    with duckdb.connect(db, read_only=True) as con:
        key = PRIMARY_KEYS[resource]
        return [r[0] for r in con.execute(f'select "{key}" from dodo_raw."{resource}"').fetchall()]


def truth_ids(sandbox: Sandbox, resource: str) -> set[str]:
    return {item[PRIMARY_KEYS[resource]] for item in getattr(sandbox.business, resource)}


def assert_matches_truth(sandbox: Sandbox) -> None:
    for resource in RESOURCES:
        loaded = warehouse_ids(sandbox.db, resource)
        assert len(loaded) == len(set(loaded)), f"duplicate rows in {resource}"
        assert set(loaded) == truth_ids(sandbox, resource), resource


def test_full_extract_loads_every_row_of_every_resource(sandbox: Sandbox) -> None:
    result = run_extract(sandbox.config())
    assert_matches_truth(sandbox)
    assert result.rows_loaded["payments"] == len(sandbox.business.payments)
    assert sum(result.api_requests.values()) == sum(
        sandbox.simulator.request_counts_by_endpoint().values()
    )
    with duckdb.connect(sandbox.db, read_only=True) as con:
        # money stays in integer minor units; metadata is one JSON column
        types = dict(
            con.execute(
                "select column_name, data_type from duckdb_columns() where schema_name = 'dodo_raw' and table_name = 'payments'"
            ).fetchall()
        )
        assert types["total_amount"] == "BIGINT"
        assert types["metadata"] == "JSON"
        assert types["created_at"] == "TIMESTAMP WITH TIME ZONE"
        jpy = con.execute(
            "select total_amount from dodo_raw.payments where currency = 'JPY' limit 1"
        ).fetchone()
        assert jpy is not None
        archived = con.execute(
            "select count(*) from dodo_raw.products where is_archived"
        ).fetchone()[0]
        assert archived == len(sandbox.business.archived_product_ids) > 0


@pytest.mark.parametrize("rows", [100, 101, 250])
def test_paging_crosses_page_boundaries_exactly(sandbox: Sandbox, rows: int) -> None:
    moment = sandbox.business.now - timedelta(days=1, seconds=7)
    added = {c["customer_id"] for c in sandbox.business.add_customers(rows, at=moment)}
    client = DodoClient(ClientSettings(base_url=sandbox.simulator.base_url, api_key=API_KEY))
    stamp = format_timestamp(moment)
    pages = list(client.list_query("customers", {"created_at_gte": stamp, "created_at_lte": stamp}))
    got = [item["customer_id"] for page in pages for item in page]
    assert len(got) == rows and set(got) == added
    # 0-based: pages 0..n, the last one short or empty (100 rows -> a second, empty page)
    assert client.requests_by_resource["customers"] == rows // 100 + 1
    numbers = [int(q["page_number"]) for p, q in sandbox.simulator.requests if p == "/customers"]
    assert numbers == list(range(rows // 100 + 1))


class GzipServer(LoopbackServer):
    """Answers every list request with one page, compressed when the client accepts gzip."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.host, self.port, self.items = "127.0.0.1", 0, items
        self.accept_encodings: list[str] = []

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet."""

            def do_GET(self) -> None:
                accepted = self.headers.get("Accept-Encoding", "")
                server.accept_encodings.append(accepted)
                body = orjson.dumps({"items": server.items})
                self.send_response(200)
                if "gzip" in accepted:
                    body = gzip.compress(body)
                    self.send_header("Content-Encoding", "gzip")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler


def test_pages_travel_compressed() -> None:
    items = [{"customer_id": f"cus_{n}", "email": "a@example.com"} for n in range(3)]
    with GzipServer(items) as server:
        client = DodoClient(ClientSettings(base_url=server.base_url, api_key=API_KEY))
        try:
            pages = [client.get_page("customers", {"page_number": n}) for n in range(3)]
        finally:
            client.close()
    assert pages == [items] * 3
    assert all("gzip" in accepted for accepted in server.accept_encodings)


def test_windows_shrink_below_the_servers_paging_cap(tmp_path: Path) -> None:
    # The server caps paging at 3 pages; the extract may read 2 per query: windows must split.
    for sandbox in make_sandbox(tmp_path, page_cap=3):
        run_extract(sandbox.config(**{"sources.dodo.max_pages_per_query": 2}))
        assert len(sandbox.business.payments) > 300  # more than one query could ever return
        assert_matches_truth(sandbox)
        deepest = max(int(q.get("page_number", 0)) for _, q in sandbox.simulator.requests)
        assert deepest <= 1


def test_second_run_reads_only_the_lookback_window_and_open_objects(sandbox: Sandbox) -> None:
    config = sandbox.config()
    first = run_extract(config)
    cursor = sandbox.business.now.replace(microsecond=0)
    sandbox.simulator.reset_counts()
    second = run_extract(config)
    lookback_start = cursor - timedelta(days=config.extract.lookback_days)
    for path, query in sandbox.simulator.requests:
        if path == "/products":
            continue
        status_filter = query.get("status") or query.get("dispute_status")
        exact = query.get("created_at_gte") == query.get("created_at_lte")
        if not status_filter and not exact:
            assert query["created_at_gte"] >= format_timestamp(lookback_start), (path, query)
    assert sum(second.api_requests.values()) < sum(first.api_requests.values())
    assert second.total_rows < first.total_rows / 2  # only the re-read window comes back
    assert_matches_truth(sandbox)


def no_change_request_bound(db: str, as_of: datetime, lookback: timedelta, page_size: int) -> int:
    """The issue's bound for a run that finds nothing new (as bench/run.py computes it): the
    pages of the lookback window and of each non-terminal status, one short page per query."""
    pages = 0
    with duckdb.connect(db, read_only=True) as con:
        for resource in RESOURCES:
            if resource == "products":
                continue
            recent = con.execute(
                f"select count(*) from dodo_raw.{resource} where created_at >= ?",
                [as_of - lookback],
            ).fetchone()[0]
            pages += math.ceil(recent / page_size) + 1
            for status in NON_TERMINAL_STATUSES.get(resource, ()):
                opened = con.execute(
                    f'select count(*) from dodo_raw.{resource} where "{STATUS_FIELDS[resource]}" = ? '
                    "and created_at < ?",
                    [status, as_of - lookback],
                ).fetchone()[0]
                pages += math.ceil(opened / page_size) + 1
    return pages


@pytest.mark.slow  # heavy: several job runs in process (over 2.5 s on the 2-core box)
def test_a_no_change_run_stays_within_the_request_bound(sandbox: Sandbox) -> None:
    # Pages of 4 and 4 pages a query: the 34 active subscriptions are more than one query may
    # return, as the open subscriptions of a business of 1M payments are with real page sizes.
    config = sandbox.config(**{"sources.dodo.page_size": 4, "sources.dodo.max_pages_per_query": 4})
    run_extract(config)
    second = run_extract(config)
    assert config.extract.as_of is not None
    lookback = timedelta(days=config.extract.lookback_days)
    bound = no_change_request_bound(sandbox.db, config.extract.as_of, lookback, 4)
    requests = sum(n for resource, n in second.api_requests.items() if resource != "products")
    assert requests <= bound + 3  # a few short pages where a status needs several windows
    assert_matches_truth(sandbox)


@pytest.mark.slow  # heavy: several job runs in process (over 2.5 s on the 2-core box)
def test_a_first_sync_in_several_loads_reads_every_row_once(sandbox: Sandbox) -> None:
    small = {"sources.dodo.page_size": 10, "sources.dodo.max_pages_per_query": 5}
    result = run_extract(sandbox.config(**small, **{"sources.dodo.rows_per_load": 300}))
    assert result.loads > 3
    # the next load of the backfill starts right after the last one: no row read twice
    assert result.total_rows == sum(len(truth_ids(sandbox, r)) for r in RESOURCES)
    assert_matches_truth(sandbox)
    run_extract(sandbox.config(**small))  # and the next run finds everything in place
    assert_matches_truth(sandbox)


def test_a_window_answered_with_a_row_from_elsewhere_is_loaded_once(sandbox: Sandbox) -> None:
    # The API answers a later window of the first sync's ledger with a row of an earlier one:
    # that load cannot append (the row would be there twice), it merges on the primary key.
    seen: dict[str, Any] = {}

    def repeat_a_row(items: list[dict[str, Any]], context: PageContext) -> list[dict[str, Any]]:
        window = context.query.get("created_at_gte")
        if "row" not in seen and items:
            seen["row"], seen["window"] = dict(items[0]), window
        elif "row" in seen and window != seen["window"] and not seen.get("repeated"):
            items.append(seen["row"])
            seen["repeated"] = True
        return items

    sandbox.simulator.inject_fault(path="/balances/ledger", mutate=repeat_a_row, times=10_000)
    config = sandbox.config()
    plan = build_plan(config)
    plan.rows_per_batch = 100  # the repeated row reaches dlt after appended batches
    pipeline = make_pipeline(config.warehouse_path)
    pipeline.run(dodo_source(plan, ("balance_ledger",)), loader_file_format="parquet")
    assert seen.get("repeated")
    ids = warehouse_ids(sandbox.db, "balance_ledger")
    assert len(ids) == len(set(ids))
    assert set(ids) == truth_ids(sandbox, "balance_ledger")


def test_status_changes_are_picked_up_whatever_their_age(sandbox: Sandbox) -> None:
    config = sandbox.config()
    run_extract(config)
    old = [p for p in sandbox.business.payments if p["status"] == "succeeded"][0]
    processing = sandbox.business.add_payments(
        1, "processing", at=sandbox.business.now - timedelta(days=40)
    )[0]
    run_extract(config)  # the old processing payment is now known to the warehouse
    sandbox.business.set_payment_status(processing["payment_id"], "succeeded")
    run_extract(config)
    with duckdb.connect(sandbox.db, read_only=True) as con:
        status = con.execute(
            "select status from dodo_raw.payments where payment_id = ?", [processing["payment_id"]]
        ).fetchone()
        assert status == ("succeeded",)
        assert con.execute(
            "select count(*) from dodo_raw.payments where payment_id = ?", [old["payment_id"]]
        ).fetchone() == (1,)


@pytest.mark.slow  # heavy: several job runs in process (over 2.5 s on the 2-core box)
def test_an_incremental_run_in_several_loads_still_rereads_open_objects(sandbox: Sandbox) -> None:
    small = {"sources.dodo.page_size": 10, "sources.dodo.max_pages_per_query": 5}
    run_extract(sandbox.config(**small))
    processing = sandbox.business.add_payments(
        1, "processing", at=sandbox.business.now - timedelta(days=40)
    )[0]
    run_extract(sandbox.config(**small))  # the warehouse knows it as processing
    for minutes in range(1, 301):  # new payments in the lookback window, a minute apart
        sandbox.business.add_payments(1, at=sandbox.business.now - timedelta(minutes=minutes))
    sandbox.business.set_payment_status(processing["payment_id"], "succeeded")
    window = {"sources.dodo.rows_per_load": 150, "sources.dodo.lookback_minutes": 360}
    result = run_extract(sandbox.config(**small, **window))
    assert result.loads > 1  # the re-reads the first load owed are made by a later one
    with duckdb.connect(sandbox.db, read_only=True) as con:
        status = con.execute(
            "select status from dodo_raw.payments where payment_id = ?", [processing["payment_id"]]
        ).fetchone()
    assert status == ("succeeded",)
    assert_matches_truth(sandbox)


def test_subscription_transitions_are_kept_as_history(sandbox: Sandbox) -> None:
    def sync(hours_later: int) -> None:
        as_of = (sandbox.business.now + timedelta(hours=hours_later)).isoformat()
        run_extract(sandbox.config(**{"sources.dodo.as_of": as_of}))

    sync(0)
    active = next(s for s in sandbox.business.subscriptions if s["status"] == "active")
    sandbox.business.set_subscription_status(active["subscription_id"], "on_hold")
    sync(1)
    sandbox.business.set_subscription_status(active["subscription_id"], "active")
    sync(2)
    with duckdb.connect(sandbox.db, read_only=True) as con:
        history = con.execute(
            "select status from dodo_raw.subscription_history where subscription_id = ? order by observed_at",
            [active["subscription_id"]],
        ).fetchall()
        per_sub = con.execute(
            "select max(n) from (select count(*) n from dodo_raw.subscription_history group by subscription_id)"
        ).fetchone()
    assert [h[0] for h in history] == ["active", "on_hold", "active"]
    assert per_sub[0] == 3  # nothing else gained history rows


@pytest.mark.slow  # heavy: several job runs in process (over 2.5 s on the 2-core box)
def test_rate_limits_and_server_errors_are_survived_without_loss(sandbox: Sandbox) -> None:
    sim = sandbox.simulator
    sim.inject_fault(path="/payments", status=429, retry_after=0.2, times=3)
    sim.inject_fault(path="/payments", status=429, times=1)  # no Retry-After: backoff
    for status in (500, 502, 503):
        sim.inject_fault(path="/payments", status=status, times=1)
    result = run_extract(sandbox.config(**{"sources.dodo.max_retries": 8}))
    assert result.api_retries["payments"] == 7
    assert_matches_truth(sandbox)


def test_unknown_fields_and_enum_values_are_loaded_not_fatal(sandbox: Sandbox) -> None:
    new_field = set_field("loyalty_tier", "gold")
    new_enum = set_field("status", "partially_refunded_v2", first_only=True)
    sandbox.simulator.inject_fault(
        path="/payments",
        mutate=lambda items, ctx: new_enum(new_field(items, ctx), ctx),
        times=10_000,
    )
    run_extract(sandbox.config())
    assert_matches_truth(sandbox)
    with duckdb.connect(sandbox.db, read_only=True) as con:
        assert (
            con.execute(
                "select count(*) from dodo_raw.payments where loyalty_tier = 'gold'"
            ).fetchone()[0]
            > 0
        )
        assert (
            con.execute(
                "select count(*) from dodo_raw.payments where status = 'partially_refunded_v2'"
            ).fetchone()[0]
            > 0
        )


def test_an_item_missing_its_key_is_set_aside_and_reported(sandbox: Sandbox) -> None:
    def drop_first_refund_id(items: list, _context: object) -> list:
        if items:
            items[0].pop("refund_id")
        return items

    sandbox.simulator.inject_fault(path="/refunds", mutate=drop_first_refund_id, times=10_000)
    result = run_extract(sandbox.config())
    assert result.rejected_records > 0
    with duckdb.connect(sandbox.db, read_only=True) as con:
        reasons = con.execute(
            "select distinct resource, reason from dodo_raw.rejected_records"
        ).fetchall()
        loaded = con.execute("select count(*) from dodo_raw.refunds").fetchone()[0]
    assert reasons == [("refunds", "missing refund_id")]
    assert loaded + result.rejected_records == len(sandbox.business.refunds)


@pytest.mark.slow
def test_a_failed_load_is_cleaned_and_its_rows_read_again(sandbox: Sandbox) -> None:
    config = sandbox.config()
    run_extract(config)
    new = sandbox.business.add_payments(30, at=sandbox.business.now - timedelta(hours=1))
    # The next load fails for real: another process holds the warehouse while dlt loads.
    pipeline = make_pipeline(config.warehouse_path)
    pipeline.extract(dodo_source(build_plan(config)), loader_file_format="parquet")
    pipeline.normalize()
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import duckdb,time; c=duckdb.connect({config.warehouse_path!r}); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(Exception, match="(?i)lock"):
            pipeline.load()
    finally:
        holder.kill()
        holder.wait()
    assert pipeline.has_pending_data  # the state was advanced locally, the rows never landed
    result = run_extract(config)
    assert result.recovered and "rewound" in result.recovered
    assert {p["payment_id"] for p in new} <= set(warehouse_ids(config.warehouse_path, "payments"))
    assert_matches_truth(sandbox)


def test_state_is_restored_from_the_warehouse_when_the_local_folder_is_gone(
    sandbox: Sandbox,
) -> None:
    config = sandbox.config()
    first = run_extract(config)
    import shutil

    shutil.rmtree(pipeline_dir(config.warehouse_path))
    second = run_extract(config)
    assert sum(second.api_requests.values()) < sum(first.api_requests.values()) / 2
    assert_matches_truth(sandbox)


def test_a_pipeline_folder_a_kill_left_incomplete_is_discarded(sandbox: Sandbox) -> None:
    """A run killed while dlt made or removed its pipeline folder leaves part of it (the month
    soak met one without `load/normalized`; dlt makes the other missing folders again): the next
    run discards the folder and reads on from the warehouse's own state, instead of every run
    after it failing on the missing folder."""
    import shutil

    from pipelines.extract.load import PIPELINE_NAME

    config = sandbox.config()
    first = run_extract(config)
    shutil.rmtree(pipeline_dir(config.warehouse_path) / PIPELINE_NAME / "load" / "normalized")
    second = run_extract(config)
    assert second.recovered and "incomplete" in second.recovered
    assert sum(second.api_requests.values()) < sum(first.api_requests.values()) / 2
    assert_matches_truth(sandbox)
    assert not run_extract(config).recovered


@pytest.mark.slow
def test_bad_key_gives_one_line_error_and_nonzero_exit(sandbox: Sandbox) -> None:
    env = sandbox.env(DODO_PAYMENTS_API_KEY="sk_wrong_key_123456")
    started = time.monotonic()
    result = run_cli("run", "--skip-emit", env=env)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("dodo-segment:")]
    assert len(lines) == 1 and "DODO_PAYMENTS_API_KEY" in lines[0] and "test_mode" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert "sk_wrong_key_123456" not in result.stderr + result.stdout
    assert time.monotonic() - started < 60  # no retries on 401


def test_telemetry_is_off_by_default(sandbox: Sandbox) -> None:
    pipeline = make_pipeline(sandbox.db)
    assert pipeline.run_context.runtime_config.dlthub_telemetry is False


@pytest.mark.slow  # a fresh process: dlt keeps its runtime settings for the life of a process
def test_telemetry_stays_off_when_the_settings_are_read_before_the_pipeline_is_made(
    tmp_path: Path,
) -> None:
    """A library user (a notebook, a script) who loads the settings first, as `run_job`'s
    callers do: dlt's first configuration lookup must already see telemetry off."""
    code = (
        "from pipelines.config import load_config\n"
        "from pipelines.extract.load import make_pipeline\n"
        f"load_config({{'warehouse.path': {str(tmp_path / 'w.duckdb')!r}}})\n"
        f"pipeline = make_pipeline({str(tmp_path / 'w.duckdb')!r})\n"
        "print(pipeline.run_context.runtime_config.dlthub_telemetry)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RUNTIME__DLTHUB_TELEMETRY"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"


@pytest.mark.slow  # heavy: several job runs in process (over 2.5 s on the 2-core box)
def test_ledger_of_a_payment_that_settles_late_is_read_by_its_id(sandbox: Sandbox) -> None:
    """A payment created 20 days ago sits in processing, then succeeds and books its ledger
    entries at its own creation time, far before the ledger's lookback: they still arrive,
    read with reference_object_id (issue 13)."""
    config = sandbox.config()
    business = sandbox.business
    created = business.now - timedelta(days=20)
    payment = business.add_payments(1, "processing", at=created)[0]
    run_extract(config)  # the warehouse knows it as processing, without ledger entries
    business.set_payment_status(payment["payment_id"], "succeeded", at=created)
    sandbox.simulator.reset_counts()
    run_extract(config)
    asked = [
        q for path, q in sandbox.simulator.requests
        if path == "/balances/ledger" and q.get("reference_object_id") == payment["payment_id"]
    ]  # fmt: skip
    assert asked
    with duckdb.connect(sandbox.db, read_only=True) as con:
        entries = con.execute(
            "select event_type, amount, created_at from dodo_raw.balance_ledger "
            "where reference_object_id = ? order by event_type",
            [payment["payment_id"]],
        ).fetchall()
    assert [(e[0], e[1]) for e in entries] == [
        ("payment", payment["total_amount"]),
        (
            "payment_fees",
            max(1, payment["total_amount"] * 4 // 100 + payment["total_amount"] // 200),
        ),
    ]
    assert all(e[2] < business.now - timedelta(days=config.extract.lookback_days) for e in entries)
    sandbox.simulator.reset_counts()
    run_extract(config)  # settled once: not read again
    assert not [q for path, q in sandbox.simulator.requests if q.get("reference_object_id")]
