"""The notebooks in notebooks/, executed top to bottom on a sandbox warehouse and on the
hand-worked fixture warehouse, whose figures must agree with the hand arithmetic."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import jupytext
import nbformat
import pytest

from pipelines import analysis, warehouse
from pipelines.emit import EmitSettings, emit
from pipelines.sandbox.collector import SegmentCollector
from pipelines.transform import run_models
from tests.conftest import REPO, WRITE_KEY
from tests.fixtures.hand_worked import (
    CUSTOMERS,
    EXPECTED,
    PAYMENTS,
    SUBSCRIPTIONS,
    build_api_1_123_warehouse,
    build_hand_worked_warehouse,
)

pytestmark = pytest.mark.xdist_group("test_notebooks")  # one worker builds the module-scoped setup

NOTEBOOKS = REPO / "notebooks"
HAND_RUN_ID = "20240630T000000Z-handwork"


def execute_all(db: Path, workdir: Path, parameters: dict[str, dict[str, Any]] | None = None):
    """Execute every notebook on `db` (in parallel: mostly kernel start-up); figures or error."""

    def one(name: str) -> dict[str, Any] | BaseException:
        try:
            notebook = analysis.execute_notebook(
                NOTEBOOKS / f"{name}.ipynb",
                env={"DODO_SEGMENT_DB": str(db), "MPLBACKEND": "Agg"},
                cwd=workdir,
                parameters=(parameters or {}).get(name),
            )
            return analysis.read_figures(notebook)
        except BaseException as exc:  # reported by the test of that notebook
            return exc

    with ThreadPoolExecutor(max_workers=len(analysis.NOTEBOOKS)) as pool:
        return dict(zip(analysis.NOTEBOOKS, pool.map(one, analysis.NOTEBOOKS), strict=True))


def figures_of(results: dict[str, Any], name: str) -> dict[str, Any]:
    result = results[name]
    if isinstance(result, BaseException):
        raise result
    return result


# --- the sandbox warehouse: every notebook runs -----------------------------------------------


@pytest.fixture(scope="module")
def sandbox_results(synced_sandbox_db: Path, tmp_path_factory: pytest.TempPathFactory):
    """Every notebook on the shared sandbox warehouse (two runs: a first sync, a week later)."""
    return execute_all(synced_sandbox_db, tmp_path_factory.mktemp("sandbox"))


@pytest.mark.slow
@pytest.mark.parametrize("name", analysis.NOTEBOOKS)
def test_notebook_runs_on_the_sandbox_warehouse(sandbox_results, name: str) -> None:
    figures = figures_of(sandbox_results, name)  # raises the failing cell's error
    assert figures["is_demo"] is False


@pytest.mark.slow
def test_sandbox_figures_are_plausible(sandbox_results) -> None:
    revenue = figures_of(sandbox_results, "01_revenue_overview")
    assert revenue["succeeded_payments"] > 0 and 0 < revenue["payment_success_rate"] <= 1
    mrr = figures_of(sandbox_results, "02_subscriptions_mrr")
    assert max(mrr["mrr_by_month"].values()) > 0
    cohorts = figures_of(sandbox_results, "03_retention_cohorts")
    assert all(row[0] == 1.0 for row in cohorts["logo_retention"].values())  # month 0 is 100 %
    sync = figures_of(sandbox_results, "04_segment_sync_health")
    assert sync["runs"] == 2 and sync["tracks_sent_total"] > 0 and sync["pending_tracks"] == 0
    # both runs read the API (scheduled); the first one's events are the history it was sent
    assert sync["runs_by_path"] == {"scheduled run": 2} and sync["step_runs"] == 2
    delays = sync["delay_by_path"]
    assert set(delays) <= {"first sync (history)", "scheduled run"}
    assert sum(d["events"] for d in delays.values()) == sync["delivered_total"]


@pytest.mark.slow
def test_dunning_figures_agree_with_the_sandbox_payments(sandbox_results, synced_sandbox_db):
    figures = figures_of(sandbox_results, "05_dunning")
    assert figures["is_sandbox"] is False  # written by `run`, not by `demo`
    with duckdb.connect(str(synced_sandbox_db), read_only=True) as con:
        retries = con.execute(
            "select retry_attempt, count(*), count(*) filter (where status = 'succeeded') "
            "from analytics.stg_payments where retry_attempt >= 1 group by 1"
        ).fetchall()
        recovered_usd = con.execute(
            "select coalesce(sum(amount_usd), 0) from analytics.int_payments_usd "
            "join analytics.stg_payments using (payment_id) where retry_attempt >= 1"
        ).fetchone()[0]
        plan_changes = con.execute(
            "select count(*) from analytics.stg_payments "
            "where charge_type = 'plan_change' and status = 'succeeded'"
        ).fetchone()[0]
    assert figures["retries_by_attempt"] == {str(n): [t, s] for n, t, s in retries}
    assert figures["recovered_usd"] == pytest.approx(recovered_usd, abs=0.01)
    assert figures["outcomes"]["recovered"] == sum(s for _, _, s in retries)
    assert sum(figures["outcomes"].values()) == figures["episodes"] > 0
    assert figures["plan_changes"] == plan_changes


@pytest.fixture(scope="module")
def api_1_123_figures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Notebook 05 on the hand-worked API 1.123 warehouse (dunning, plan change, checkouts)."""
    tmp = tmp_path_factory.mktemp("api-1-123")
    db = tmp / "warehouse.duckdb"
    build_api_1_123_warehouse(db)
    with duckdb.connect(str(db)) as con:
        run_models(con)
    notebook = analysis.execute_notebook(
        NOTEBOOKS / "05_dunning.ipynb",
        env={"DODO_SEGMENT_DB": str(db), "MPLBACKEND": "Agg"},
        cwd=tmp,
    )
    return analysis.read_figures(notebook)


@pytest.mark.slow
def test_dunning_notebook_matches_the_hand_worked_payments(api_1_123_figures) -> None:
    figures = api_1_123_figures
    # sub_dun: renewal failed 05-20, retry 1 failed 05-22, retry 2 succeeded 05-24 (15.00 USD);
    # sub_la: renewal and retries 1, 2 failed -> on_hold; sub_gr: failed 06-28, past_due at as-of
    assert figures["episodes"] == 3
    assert figures["outcomes"] == {"recovered": 1, "still in grace": 1, "on hold": 1,
                                   "cancelled": 0, "other": 0}  # fmt: skip
    assert figures["recovery_rate"] == pytest.approx(1 / 3)
    assert figures["recovered_usd"] == 15.0 and figures["median_days_to_recovery"] == 4.0
    # retry 1: pay_dun3, pay_la3 (both failed); retry 2: pay_dun4 (succeeded), pay_la4
    assert figures["retries_by_attempt"] == {"1": [2, 0], "2": [2, 1]}
    assert figures["plan_changes"] == 1  # pay_up2, proration 9/31
    # pay_mc1 starts sub_mc_a and sub_mc_b; six other `new` charges start one each
    assert figures["multi_subscription_checkouts"] == {"checkouts": 7, "multi_subscription": 1,
                                                       "share": pytest.approx(1 / 7)}  # fmt: skip


# --- the hand-worked warehouse: figures agree with the hand arithmetic --------------------------


@pytest.fixture(scope="module")
def hand_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The fixture warehouse, its models, one emitter run to the sandbox collector, its run row."""
    tmp = tmp_path_factory.mktemp("hand")
    db = tmp / "warehouse.duckdb"
    build_hand_worked_warehouse(db)
    warehouse.prepare(str(db), "test")
    con = duckdb.connect(str(db))
    try:
        run_models(con)
        with SegmentCollector(WRITE_KEY) as collector:
            settings = EmitSettings(write_key=WRITE_KEY, host=collector.base_url, max_retries=1)
            started = datetime(2024, 6, 30, tzinfo=UTC)
            result = emit(con, settings, HAND_RUN_ID, events_since=datetime(2020, 1, 1, tzinfo=UTC))
        warehouse.record_run(
            con,
            {
                "run_id": HAND_RUN_ID,
                "command": "run",
                "started_at": started,
                "finished_at": started + timedelta(seconds=3),
                "duration_seconds": 3.0,
                "outcome": "success",
                "exit_code": 0,
                "identifies_sent": result.identifies_sent,
                "tracks_sent": result.tracks_sent,
                "skipped_backlog": result.skipped_backlog,
                "rejected": result.rejected,
                "quarantined": 1,
                "pending": result.pending,
            },
        )
    finally:
        con.close()
    return execute_all(db, tmp, parameters={"04_segment_sync_health": {"CUSTOMER_ID": "cus_renew"}})


@pytest.mark.slow
def test_revenue_overview_matches_the_fixture(hand_results) -> None:
    figures = figures_of(hand_results, "01_revenue_overview")
    daily = EXPECTED["revenue_daily"]
    # KWD in January: 12.345 paid - 2.345 refunded = 10.000 (cus_kwd's total_spent)
    kwd_january = sum(
        v[2] for (day, cur), v in daily.items() if cur == "KWD" and day[:7] == "2024-01"
    )
    assert figures["net_by_month_currency"]["2024-01|KWD"] == pytest.approx(kwd_january)
    assert kwd_january == pytest.approx(EXPECTED["traits"]["cus_kwd"]["total_spent"])
    # February in USD from the ledger: 120.50 (pay_m_usd) + 20.00 (pay_m_jpy) = cus_multi's USD
    assert figures["net_usd_by_month"]["2024-02"] == pytest.approx(
        EXPECTED["traits"]["cus_multi"]["total_spent_usd"]
    )
    assert figures["top_customer"] == "cus_multi"  # the only customer with ledger rows
    succeeded = sum(1 for p in PAYMENTS if p[2] == "succeeded")
    failed = sum(1 for p in PAYMENTS if p[2] == "failed")
    assert (
        figures["succeeded_payments"] == succeeded == EXPECTED["event_counts"]["Payment Completed"]
    )
    assert figures["payment_success_rate"] == pytest.approx(
        succeeded / (succeeded + failed), abs=1e-6
    )
    assert figures["refund_rate"] == pytest.approx(1 / succeeded, abs=1e-6)  # ref_kwd1
    assert figures["dispute_rate"] == pytest.approx(1 / succeeded, abs=1e-6)  # dp_1


@pytest.mark.slow
def test_subscriptions_mrr_matches_the_fixture(hand_results) -> None:
    figures = figures_of(hand_results, "02_subscriptions_mrr")
    assert figures["mrr_by_month"]["2024-06"] == pytest.approx(EXPECTED["mrr_total_2024_06"])
    movements: dict[str, dict[str, float]] = {}
    for (_customer, month), (mrr, previous, movement) in EXPECTED["mrr_monthly"].items():
        if movement != "unchanged":
            entry = movements.setdefault(f"{month[:7]}|{movement}", {"customers": 0, "usd": 0.0})
            entry["customers"] += 1
            entry["usd"] += mrr - previous
    # every month's movements as worked out by hand: e.g. June = contraction (cus_back 25 -> 20)
    # and churn (cus_cancel 5 -> 0); January = new (cus_back 15)
    assert figures["movements"].keys() == movements.keys()
    for key, expected in movements.items():
        assert figures["movements"][key]["customers"] == expected["customers"], key
        assert figures["movements"][key]["usd"] == pytest.approx(expected["usd"]), key
    assert figures["waterfall_month"] == "2024-05"  # June is the as-of month
    assert figures["subscriptions_by_status"] == dict(Counter(s[2] for s in SUBSCRIPTIONS))
    assert EXPECTED["trial_ended_converted"] is True
    assert (figures["trials_ended"], figures["trials_converted"]) == (1, 1)
    assert figures["trial_conversion_rate"] == 1.0


@pytest.mark.slow
def test_retention_cohorts_match_the_fixture(hand_results) -> None:
    figures = figures_of(hand_results, "03_retention_cohorts")
    known = {c[0] for c in CUSTOMERS}
    first_paid: dict[str, str] = {}
    for payment in sorted(PAYMENTS, key=lambda p: p[1]):
        if payment[2] == "succeeded" and payment[5] in known:
            first_paid.setdefault(payment[5], payment[1][:7])
    # Jan: jpy, kwd, back; Feb: multi, plan; Mar: renew; Apr: trial; May: cancel, hold
    assert figures["cohort_sizes"] == dict(Counter(first_paid.values()))
    assert figures["cohort_sizes"]["2024-01"] == 3
    # January cohort, month 1 (Feb): only cus_jpy pays (cus_back's MRR churned, cus_kwd is gone);
    # month 2 (Mar): only cus_back (renewed; cus_jpy's payment failed)
    january = figures["logo_retention"]["2024-01"]
    assert january[:3] == pytest.approx([1.0, 1 / 3, 1 / 3], abs=1e-6)
    # cus_plan's yearly plan keeps the February cohort at 50 % with no further payments
    assert figures["logo_retention"]["2024-02"][1:5] == pytest.approx([0.5] * 4, abs=1e-6)
    assert len(january) == 6 and figures["logo_retention"]["2024-05"][2:] == [None] * 4


@pytest.mark.slow
def test_segment_sync_health_matches_the_fixture(hand_results) -> None:
    figures = figures_of(hand_results, "04_segment_sync_health")
    latest = figures["latest_run"]
    assert figures["runs"] == 1 and latest["run_id"] == HAND_RUN_ID
    assert latest["identifies_sent"] == len(CUSTOMERS)  # first sync: every customer
    assert latest["tracks_sent"] == EXPECTED["track_outbox_rows"]  # 48, backlog sent from 2020
    assert figures["delivered_total"] == EXPECTED["track_outbox_rows"]
    assert (figures["pending_tracks"], figures["pending_identifies"]) == (0, 0)
    assert figures["quarantined_now"] == 1  # pay_ghost's event (unknown customer)
    assert figures["customer_id"] == "cus_renew"
    for trait in ("total_spent", "mrr", "subscription_status", "active_subscriptions"):
        assert figures["customer_traits"][trait] == EXPECTED["traits"]["cus_renew"][trait]
    # 4 Payment Completed + 3 Subscription Renewed + 1 Subscription Started, all delivered
    renewals = EXPECTED["renewed_by_subscription"]["sub_renew"]
    assert figures["customer_events_by_state"] == {"delivered": 4 + renewals + 1}
    # the latest: pay_r4 on 2024-06-10, sent as Payment Completed and Subscription Renewed
    assert sorted(figures["customer_last_events"][:2]) == [
        "Payment Completed",
        "Subscription Renewed",
    ]


# --- the files themselves and the path rule ---------------------------------------------------


@pytest.mark.parametrize("name", analysis.NOTEBOOKS)
def test_committed_notebook_has_no_outputs_and_matches_its_pair(name: str) -> None:
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, name
    paired = jupytext.read(NOTEBOOKS / f"{name}.py")
    assert [c.source for c in notebook.cells] == [c.source for c in paired.cells], (
        f"{name}.ipynb and {name}.py differ: run `jupytext --sync notebooks/{name}.py`"
    )


def test_rendered_charts_are_committed() -> None:
    for image in (f"{name}.png" for name in analysis.README_IMAGES):
        assert (NOTEBOOKS / "images" / image).stat().st_size > 10_000, image


@pytest.fixture
def demo_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    yield analysis.demo_cache_path()


def test_path_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, demo_cache: Path) -> None:
    work = tmp_path / "repo" / "notebooks"
    work.mkdir(parents=True)
    # nothing anywhere: the demo warehouse, to be built in the cache
    choice = analysis.choose_warehouse(work)
    assert choice.is_demo and choice.path == str(demo_cache)
    # a `make demo` warehouse beside the notebooks folder
    (work.parent / "demo.duckdb").touch()
    assert analysis.choose_warehouse(work) == analysis.WarehouseChoice(
        str(work.parent / "demo.duckdb"), True, "demo warehouse"
    )
    # the job's default path wins over demo data
    (work.parent / "dodo_segment.duckdb").touch()
    choice = analysis.choose_warehouse(work)
    assert not choice.is_demo and choice.path == str(work.parent / "dodo_segment.duckdb")
    # DODO_SEGMENT_DB wins over everything; pointing at nothing is an error, not demo data
    monkeypatch.setenv("DODO_SEGMENT_DB", str(tmp_path / "elsewhere.duckdb"))
    with pytest.raises(FileNotFoundError, match="DODO_SEGMENT_DB"):
        analysis.choose_warehouse(work)
    (tmp_path / "elsewhere.duckdb").touch()
    assert analysis.choose_warehouse(work).path == str(tmp_path / "elsewhere.duckdb")


def test_demo_banner_and_read_only(tmp_path: Path, demo_cache: Path, capsys) -> None:
    demo_cache.parent.mkdir(parents=True)
    build_hand_worked_warehouse(demo_cache)
    with duckdb.connect(str(demo_cache)) as con:
        run_models(con)
    wh = analysis.open_warehouse()
    assert wh.is_demo and "DEMO DATA" in capsys.readouterr().out
    assert "DEMO DATA" in wh.source_note()
    assert wh.scalar("select count(*) from analytics.customer_traits") == len(CUSTOMERS)
    with pytest.raises(duckdb.Error, match="read-only"):
        wh.query("create table analytics.scratch (x int)")
