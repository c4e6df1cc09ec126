"""`dodo-segment report`: the warehouse on one self-contained HTML page, readable offline.

MRR and its movements, revenue by month, customers gained and churned, dunning, and sync health,
from the same queries and charts as the notebooks (`pipelines.analysis`). Charts are matplotlib
SVG inlined in the page: no script, no font, no request to anywhere.
"""

from __future__ import annotations

import html
import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from pipelines import alerts
from pipelines.analysis import Warehouse, WarehouseChoice, charts, dunning, queries
from pipelines.analysis.reader import NoModelsYet
from pipelines.commands.common import Subcommands, add_command, add_common, load_command_config
from pipelines.commands.report_page import headline, page, section, table

MONTHS = 12
"""How many recent months the monthly charts show."""


@dataclass(frozen=True)
class ReportResult:
    """Where the report was written, how big it is and how long it took."""

    path: Path
    bytes: int
    seconds: float
    sections_with_data: int


def usd(value: float | None) -> str:
    """`$1,234.56`, or a dash when there is no value."""
    if value is None or pd.isna(value):
        return "-"
    return f"-${-value:,.2f}" if value < 0 else f"${value:,.2f}"


def chart(name: str, draw: Callable[..., None], *frames: Any, size=(10.5, 4.2)) -> str:
    """One chart as inline SVG (matplotlib, no pyplot), in a <figure> the browser test finds."""
    import matplotlib
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure

    settings = {**charts.STYLE, "svg.fonttype": "none", "svg.hashsalt": name}
    with matplotlib.rc_context(settings):
        fig = Figure(figsize=size)
        FigureCanvasSVG(fig)
        draw(fig.add_subplot(), *frames)
        fig.tight_layout()
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg") :]
    return f'<figure class="chart" data-chart="{html.escape(name)}">{svg}</figure>'


def _empty(text: str) -> str:
    return f'<p class="empty">{html.escape(text)}</p>'


def mrr_section(data: dict[str, Any]) -> tuple[str, bool]:
    """MRR now, over time, and its movements per month."""
    mrr = data["mrr"]
    if mrr.empty:
        return _empty("No MRR yet: no subscription payment covers a month so far."), False
    movements = data["movements"]
    now = mrr.iloc[-1]
    recent = mrr.tail(MONTHS)
    heads = headline("current_mrr_usd", f"MRR, {now['month']:%B %Y}", usd(now["mrr_usd"]))
    heads += headline("paying_customers", "Paying customers", f"{int(now['paying_customers'])}")
    by_movement = (
        movements.pivot(index="month", columns="movement", values="mrr_change_usd")
        .reindex(index=recent["month"], columns=list(charts.MOVEMENT_COLORS))
        .fillna(0.0)
    )
    rows = [
        [f"{m:%b %Y}", usd(r), *(usd(by_movement.loc[m, k]) for k in charts.MOVEMENT_COLORS)]
        for m, r in zip(recent["month"], recent["mrr_usd"], strict=True)
    ][::-1]
    body = (
        f'<div class="headlines">{heads}</div>'
        + chart("mrr", charts.draw_mrr, recent)
        + chart("mrr_movements", charts.draw_movements, movements, recent["month"])
        + table(["month", "MRR", *charts.MOVEMENT_COLORS], rows)
    )
    return body, True


def revenue_section(data: dict[str, Any]) -> tuple[str, bool]:
    """Gross, refunds and net revenue in USD per month; the last full month as the headline."""
    revenue = data["revenue"]
    if revenue.empty:
        return _empty("No revenue yet: no succeeded payment or refund."), False
    heads = ""
    if data["as_of"] is not None:  # the calendar month before the as-of month, 0 when it had none
        as_of_month = pd.Timestamp(data["as_of"]).tz_convert(None).to_period("M")
        last_full = (as_of_month - 1).to_timestamp()
        net = revenue.loc[revenue["month"] == last_full, "net_usd"]
        heads = headline("last_full_month_net_usd", f"Net revenue, {last_full:%B %Y}",
                         usd(float(net.iloc[0]) if len(net) else 0.0))  # fmt: skip
    recent = revenue.tail(MONTHS)
    rows = [
        [f"{r.month:%b %Y}", usd(r.gross_usd), usd(r.refunds_usd), usd(r.net_usd), int(r.payments),
         int(r.payments_without_usd)]
        for r in recent.itertuples()
    ][::-1]  # fmt: skip
    note = (
        "<p class='note'>USD from Dodo's balance ledger; payments the ledger has no USD value "
        "for yet are counted in the last column, so a month with such payments is a lower "
        "bound.</p>"
    )
    body = (
        (f'<div class="headlines">{heads}</div>' if heads else "")
        + chart("revenue", charts.draw_revenue, recent)
        + table(["month", "gross", "refunds", "net", "payments", "without USD"], rows)
        + note
    )
    return body, True


def customers_section(data: dict[str, Any]) -> tuple[str, bool]:
    """Paying customers gained (new, reactivated) and churned per month."""
    customers = data["customers"]
    if customers.empty:
        return _empty("No paying customers yet."), False
    recent = customers.tail(MONTHS)
    rows = [
        [f"{r.month:%b %Y}", r.new_customers, r.reactivated_customers, r.churned_customers]
        for r in recent.itertuples()
    ][::-1]
    body = chart("customers", charts.draw_customers, recent) + table(
        ["month", "new", "reactivated", "churned"], rows
    )
    return body, True


def dunning_section(data: dict[str, Any]) -> tuple[str, bool]:
    """Failed renewals and their outcomes, recovery by retry, revenue recovered, plan changes."""
    episodes, changes, checkouts = data["episodes"], data["plan_changes"], data["checkouts"]
    extra = ""
    if len(changes):
        extra += (
            f"<p>{len(changes)} plan changes charged {usd(changes['amount_usd'].sum())} "
            f"(median proration factor {changes['proration_factor'].median():.2f} of a period)."
            "</p>"
        )
    if checkouts["checkouts"]:
        extra += (
            f"<p>{checkouts['multi_subscription']} of {checkouts['checkouts']} subscription "
            f"checkouts started several subscriptions at once ({checkouts['share']:.1%}).</p>"
        )
    if episodes.empty:
        return _empty("No failed renewal yet: nothing went into dunning.") + extra, False
    totals = dunning.dunning_totals(episodes)
    days = totals["median_days_to_recovery"]
    heads = (
        headline("recovered_usd", "Revenue recovered by retries", usd(totals["recovered_usd"]))
        + headline("recovery_rate", "Failed renewals recovered", f"{totals['recovery_rate']:.0%}")
        + headline("dunning_episodes", "Failed renewals", str(totals["episodes"]))
        + headline(
            "days_to_recovery", "Median days to recovery", "-" if days is None else f"{days:.1f}"
        )  # fmt: skip
    )
    by_month = dunning.dunning_by_month(episodes).tail(MONTHS)
    by_attempt = data["by_attempt"]
    outcomes = ", ".join(f"{n} {o}" for o, n in totals["outcomes"].items() if n)
    if totals["outcomes"]["other"]:
        outcomes += (" (other: the subscription is active or paused now with no succeeded retry "
                     "in the data, e.g. paid another way)")  # fmt: skip
    body = (
        f'<div class="headlines">{heads}</div><p>Outcomes: {html.escape(outcomes)}.</p>'
        + chart("dunning_outcomes", charts.draw_dunning_outcomes, by_month)
        + (
            chart("recovery_by_attempt", charts.draw_recovery_by_attempt, by_attempt, size=(7, 3.6))
            if len(by_attempt)
            else ""
        )  # fmt: skip
        + extra
    )
    return body, True


def sync_section(data: dict[str, Any]) -> tuple[str, bool]:
    """The last runs, what is pending or rejected, open alerts, delivery delay, step durations."""
    runs = data["runs"]
    if runs.empty or data["pending"] is None:
        return _empty("Nothing sent to Segment yet: no run has reached the emit step."), False
    now, open_alerts = data["pending"], data["open_alerts"]
    heads = (
        headline("pending_tracks", "Events pending", str(now["pending_tracks"]))
        + headline("rejected_total", "Rejected by Segment", str(now["rejected_total"]))
        + headline("quarantined_now", "Rows quarantined", str(now["quarantined_now"]))
        + headline("open_alerts", "Open alerts", str(len(open_alerts)))
    )
    alert_list = "".join(
        f"<li>{html.escape(kind)} since {html.escape(str(info.get('since', '?')))}</li>"
        for kind, info in sorted(open_alerts.items())
    )
    run_rows = [
        [f"{r.started_at:%Y-%m-%d %H:%M:%S}", r.command, r.path, r.seconds, r.outcome,
         r.identifies_sent, r.tracks_sent, r.rejected, r.pending]
        for r in runs.itertuples()
    ][::-1]  # fmt: skip
    by_path = data["delay_by_path"]
    delay_rows = [
        [r.path, r.runs, r.events, _seconds(r.median_seconds), _seconds(r.p90_seconds)]
        for r in by_path.itertuples()
    ]
    steps = data["steps"]
    body = (
        f'<div class="headlines">{heads}</div>'
        + (f"<ul class='alerts'>{alert_list}</ul>" if alert_list else "")
        + "<h3>Last runs</h3>"
        + table(
            [
                "started (UTC)",
                "command",
                "path",
                "seconds",
                "outcome",
                "identifies",
                "tracks",
                "rejected",
                "pending",
            ],
            run_rows,
        )  # fmt: skip
        + "<h3>Delivery delay: from an event to Segment's acknowledgement</h3>"
        + (
            table(["path", "runs", "events", "median", "p90"], delay_rows)
            if delay_rows
            else _empty("No event delivered yet.")
        )  # fmt: skip
        + (DELAY_NOTE if delay_rows else "")
        + (
            chart("delivery_delay", charts.draw_delivery_delay, data["delay_by_run"])
            if delay_rows
            else ""
        )  # fmt: skip
        + (chart("run_steps", charts.draw_run_steps, steps) if len(steps) else "")
    )
    return body, True


DELAY_NOTE = (
    "<p class='note'>The first sync's events are the history it was asked to send: their delay "
    "is the age of that history. A negative delay is an event time after Segment's "
    "acknowledgement: the source's clock is ahead (the sandbox's business clock runs ahead for "
    "its webhook run).</p>"
)


def _seconds(value: float | None) -> str:
    if value is None or pd.isna(value):
        return "-"
    if abs(value) >= 86400:
        return f"{value / 86400:,.1f} days"
    if abs(value) >= 3600:
        return f"{value / 3600:,.1f} h"
    return f"{value:,.1f} s"


def fetch(wh: Warehouse) -> dict[str, Any]:
    """Every frame the page shows, read on one connection (the charts are drawn after it closed)."""
    with wh.session():
        synced = queries.sync_is_set_up(wh)
        return {
            "as_of": wh.as_of,
            "mrr": queries.mrr_by_month(wh),
            "movements": queries.mrr_movements(wh),
            "revenue": queries.revenue_usd_by_month(wh),
            "customers": queries.customers_gained_and_churned(wh),
            "episodes": dunning.dunning_episodes(wh),
            "by_attempt": dunning.recovery_by_retry_attempt(wh),
            "plan_changes": dunning.plan_changes(wh),
            "checkouts": dunning.multi_subscription_checkouts(wh),
            "runs": queries.recent_runs(wh, limit=10),
            "pending": queries.pending(wh) if synced else None,
            "open_alerts": alerts.open_alerts(wh.path),
            "delay_by_path": queries.delivery_delay_by_path(wh),
            "delay_by_run": queries.delivery_delay_by_run(wh),
            "steps": queries.run_steps(wh),
        }


SECTIONS = (
    ("mrr", "MRR", mrr_section),
    ("revenue", "Revenue by month (USD)", revenue_section),
    ("customers", "Customers gained and churned", customers_section),
    ("dunning", "Dunning: failed renewals and recoveries", dunning_section),
    ("sync", "Sync health", sync_section),
)


def build_report(db_path: str) -> tuple[str, int]:
    """The page's HTML and how many sections have data (0 for a warehouse with no models)."""
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    try:
        wh = Warehouse(WarehouseChoice(db_path, False, "--db"))
    except NoModelsYet:
        body = _empty(
            "This warehouse has no successful run yet, so there is nothing to show: run "
            "'dodo-segment run' (or 'dodo-segment demo' for sandbox data), then this again."
        )
        return page(banner="", as_of="no data yet", source=html.escape(Path(db_path).name),
                    generated=generated, nav="", body=body), 0  # fmt: skip
    data = fetch(wh)
    parts, filled = [], 0
    for anchor, title, build in SECTIONS:
        content, has_data = build(data)
        filled += has_data
        parts.append(section(anchor, title, content))
    banner = (
        "<div class='banner'><b>SANDBOX DATA</b>: written by <code>dodo-segment demo</code> "
        "from the simulated business, not from a Dodo Payments account.</div>"
        if wh.is_sandbox
        else ""
    )
    as_of = f"{wh.as_of:%Y-%m-%d %H:%M UTC}" if wh.as_of is not None else "unknown"
    nav = "".join(f"<a href='#{a}'>{html.escape(t)}</a>" for a, t, _ in SECTIONS)
    text = page(banner=banner, as_of=as_of, source=html.escape(Path(db_path).name),
                generated=generated, nav=nav, body="".join(parts))  # fmt: skip
    return text, filled


def write_report(db_path: str, out: Path) -> ReportResult:
    """Build the report of `db_path` and write it to `out` (its folder is created)."""
    started = time.perf_counter()
    text, filled = build_report(db_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return ReportResult(out, out.stat().st_size, time.perf_counter() - started, filled)


def run_report(db_path: str, out: str) -> int:
    """The command: 2 with one line when the warehouse file does not exist, 1 with one line
    when it cannot be read, else write the page (0)."""
    from pipelines.logs import complain

    if not db_path.startswith("md:") and not Path(db_path).expanduser().exists():
        complain(f"no warehouse at {db_path}: run 'dodo-segment run' first, or pass --db PATH")
        return 2
    try:
        result = write_report(db_path, Path(out).expanduser())
    except duckdb.Error as exc:  # not a DuckDB file, damaged, or held by a run for over 10 s
        complain(f"cannot read the warehouse {db_path}: {str(exc).splitlines()[0][:200]}")
        return 1
    print(
        f"wrote {result.path} ({result.bytes / 1024:,.0f} KiB, {result.sections_with_data} of "
        f"{len(SECTIONS)} sections with data) in {result.seconds:.1f}s; open it in any browser"
    )
    return 0


def add_arguments(commands: Subcommands, summary: str) -> None:
    """`report` and its flags."""
    parser = add_command(
        commands, "report", summary,
        "Write one static HTML page (charts inlined, readable offline in any browser): MRR and "
        "its movements, revenue by month (USD), customers gained and churned, dunning outcomes "
        "and revenue recovered, and sync health. Reads the warehouse read-only. Exit 2 when the "
        "warehouse file does not exist.",
        lambda args: run_report(load_command_config(args).warehouse_path, args.out),
    )  # fmt: skip
    add_common(parser)
    parser.add_argument(
        "--out", metavar="FILE", default="report.html",
        help="where to write the page (default: report.html)",
    )  # fmt: skip
