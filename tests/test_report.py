"""`dodo-segment report`: the page's figures against the warehouse, empty warehouses, the CLI, and
the page as a person sees it in a real headless Chromium."""

from __future__ import annotations

import os
import re
from pathlib import Path

import duckdb
import pytest

from pipelines import warehouse
from pipelines.commands.report import SECTIONS, build_report, write_report
from pipelines.transform import run_models
from tests.conftest import run_cli
from tests.fixtures.hand_worked import build_api_1_123_warehouse

FIGURE = re.compile(r'data-figure="([a-z_]+)"><span class="label">[^<]*</span>'
                    r'<span class="value">([^<]*)</span>')  # fmt: skip


def cli_env() -> dict[str, str]:
    """This environment, without a warehouse or keys of the user's."""
    drop = ("DODO_SEGMENT_DB", "DODO_PAYMENTS_API_KEY", "SEGMENT_WRITE_KEY")
    return {k: v for k, v in os.environ.items() if k not in drop}


def figures_of(page: str) -> dict[str, str]:
    """The headline figures of a report page, as the page writes them."""
    return dict(FIGURE.findall(page))


def dollars(text: str) -> float:
    """`$1,234.56` -> 1234.56."""
    return float(text.replace("$", "").replace(",", ""))


def warehouse_headlines(db: Path) -> dict[str, float | None]:
    """The three headline numbers, straight from the models (not through pipelines.analysis)."""
    with duckdb.connect(str(db), read_only=True) as con:
        con.execute("set TimeZone = 'UTC'")
        mrr = con.execute(
            "select round(sum(mrr_usd), 2) from analytics.mrr_monthly "
            "where month = (select max(month) from analytics.mrr_monthly)"
        ).fetchone()[0]
        last_full_month = con.execute(
            "select round(sum(net_usd), 2) from analytics.revenue_daily "
            "where date_trunc('month', date) = (select date_trunc('month', timezone('UTC', as_of)) "
            "- interval 1 month from analytics.int_as_of)"
        ).fetchone()[0]
        recovered = con.execute(
            "select round(sum(usd.amount_usd), 2) from analytics.int_payments_usd as usd "
            "join analytics.stg_payments as p using (payment_id) "
            "where p.status = 'succeeded' and p.retry_attempt >= 1"
        ).fetchone()[0]
    return {"current_mrr_usd": mrr, "last_full_month_net_usd": last_full_month,
            "recovered_usd": recovered}  # fmt: skip


@pytest.fixture(scope="module")
def api_1_123_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The hand-worked API 1.123 warehouse with its models and no run (nothing sent yet)."""
    db = tmp_path_factory.mktemp("api-1-123") / "warehouse.duckdb"
    build_api_1_123_warehouse(db)
    with duckdb.connect(str(db)) as con:
        run_models(con)
    return db


def test_dunning_figures_match_the_hand_worked_payments(api_1_123_db: Path) -> None:
    page, filled = build_report(str(api_1_123_db))
    figures = figures_of(page)
    # sub_dun: renewal failed 05-20, retry 1 failed, retry 2 succeeded 05-24 (15.00 USD, 4 days);
    # sub_la: renewal and both retries failed, on hold; sub_gr: failed 06-28, past_due at as-of
    assert figures["recovered_usd"] == "$15.00"
    assert figures["dunning_episodes"] == "3"
    assert figures["recovery_rate"] == "33%"
    assert figures["days_to_recovery"] == "4.0"
    assert "1 recovered, 1 still in grace, 1 on hold." in page
    assert "1 plan changes charged $5.81 (median proration factor 0.29 of a period)" in page
    assert "1 of 7 subscription checkouts started several subscriptions at once" in page
    # the models ran but nothing was sent: that section says so, the others have data
    assert "Nothing sent to Segment yet" in page and filled == len(SECTIONS) - 1
    assert 'data-chart="dunning_outcomes"' in page and 'data-chart="recovery_by_attempt"' in page


def test_a_warehouse_without_a_run_gives_a_page_that_says_so(tmp_path: Path) -> None:
    db = tmp_path / "new.duckdb"
    warehouse.prepare(str(db), "test")  # what a first run creates before it fails
    result = write_report(str(db), tmp_path / "out" / "report.html")
    page = result.path.read_text()
    assert result.sections_with_data == 0
    assert "no successful run yet" in page and "Traceback" not in page
    assert "<svg" not in page


def test_a_file_that_is_not_a_warehouse_is_one_line(tmp_path: Path, capsys) -> None:
    from pipelines.commands.report import run_report

    bogus = tmp_path / "notes.duckdb"
    bogus.write_text("not a database\n" * 100)
    assert run_report(str(bogus), str(tmp_path / "r.html")) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "cannot read the warehouse" in err
    assert bogus.read_text() == "not a database\n" * 100  # untouched
    assert not (tmp_path / "r.html").exists()


@pytest.mark.slow
def test_cli_refuses_a_missing_warehouse_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.duckdb"
    result = run_cli(
        "report", "--db", str(missing), "--out", str(tmp_path / "r.html"), env=cli_env()
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and str(missing) in result.stderr
    assert not missing.exists() and not (tmp_path / "r.html").exists()


# --- in a real browser ----------------------------------------------------------------------

CHECK_PAGE = """JSON.stringify({
  charts: [...document.querySelectorAll('figure.chart')].map(f => {
    const svg = f.querySelector('svg'); const box = svg.getBoundingClientRect();
    return {name: f.dataset.chart, width: box.width, height: box.height,
            marks: svg.querySelectorAll('path, rect, use').length,
            texts: [...svg.querySelectorAll('text')].filter(t => t.getBBox().width > 0).length};
  }),
  figures: Object.fromEntries([...document.querySelectorAll('[data-figure]')].map(
    e => [e.dataset.figure, e.querySelector('.value').innerText])),
  sections: [...document.querySelectorAll('section h2')].map(h => h.innerText),
  asOf: document.getElementById('as-of').innerText,
})"""


@pytest.mark.slow
def test_the_report_in_headless_chromium(synced_sandbox_db: Path, tmp_path: Path) -> None:
    import json

    from tests.browser import CHROMIUM, Chromium

    if not CHROMIUM.exists():
        pytest.fail("no /usr/bin/chromium: run `make install` (it installs Debian's chromium)")
    out = tmp_path / "report.html"
    result = run_cli("report", "--db", str(synced_sandbox_db), "--out", str(out), env=cli_env())
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout
    browser = Chromium(tmp_path / "profile")
    try:
        browser.open(out.as_uri())
        seen = json.loads(browser.evaluate(CHECK_PAGE))
        errors, urls = browser.errors(), browser.requested_urls()
    finally:
        browser.close()
    assert errors == []
    assert urls and all(u.startswith("file://") for u in urls), urls  # nothing leaves the machine
    assert seen["sections"] == [title for _, title, _ in SECTIONS]
    expected_charts = {"mrr", "mrr_movements", "revenue", "customers", "dunning_outcomes",
                       "recovery_by_attempt", "delivery_delay", "run_steps"}  # fmt: skip
    assert {c["name"] for c in seen["charts"]} == expected_charts
    for drawn in seen["charts"]:  # laid out, with bars/lines and readable labels
        assert drawn["width"] > 300 and drawn["height"] > 150, drawn
        assert drawn["marks"] > 10 and drawn["texts"] > 5, drawn
    truth = warehouse_headlines(synced_sandbox_db)
    assert truth["recovered_usd"], "the sandbox has no recovered renewal: the check would be empty"
    for key, value in truth.items():
        assert dollars(seen["figures"][key]) == pytest.approx(value, abs=0.005), key
    with duckdb.connect(str(synced_sandbox_db), read_only=True) as con:
        con.execute("set TimeZone = 'UTC'")
        as_of = con.execute("select strftime(max(as_of), '%Y-%m-%d %H:%M UTC') "
                            "from analytics.int_as_of").fetchone()[0]  # fmt: skip
    assert seen["asOf"] == as_of
