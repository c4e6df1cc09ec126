"""Charts shared by the notebooks and `dodo-segment report`: one style, one drawing per picture.

Each `draw_*` function draws one frame of `queries`/`dunning` into a matplotlib Axes that the
caller made (a notebook with pyplot, the report with a plain Figure), so both show the same
picture of the same query.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from pipelines.analysis.reader import Warehouse

SAVE_FIGURES_ENV = "DODO_SEGMENT_FIGURES_DIR"
"""When set, `finish_figure` writes PNGs there (how notebooks/images/ is rendered)."""
STYLE = {
    "figure.figsize": (11, 4.8),
    "figure.dpi": 100,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 13,
    "axes.titleweight": "bold",
    "axes.labelsize": 11,
    "legend.frameon": False,
}
MOVEMENT_COLORS = {"new": "#54a24b", "expansion": "#88d27a", "reactivation": "#4c78a8",
                   "contraction": "#f58518", "churn": "#e45756"}  # fmt: skip
OUTCOME_COLORS = {"recovered": "#54a24b", "still in grace": "#eeca3b", "on hold": "#f58518",
                  "cancelled": "#e45756", "other": "#bab0ac"}  # fmt: skip
PATH_COLORS = {"first sync (history)": "#bab0ac", "scheduled run": "#4c78a8",
               "webhook-triggered": "#f58518", "other": "#b279a2"}  # fmt: skip
STEP_COLORS = {"extract": "#4c78a8", "models": "#54a24b", "emit": "#f58518"}


def use_style() -> None:
    """One readable chart style for every notebook."""
    import matplotlib.pyplot as plt

    plt.rcParams.update(STYLE)


def finish_figure(fig: Any, warehouse: Warehouse, name: str | None = None) -> None:
    """Add the source line under a chart, and save it when DODO_SEGMENT_FIGURES_DIR is set."""
    fig.text(0.01, 0.005, warehouse.source_note(), fontsize=8, color="#666666", ha="left")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    target = os.environ.get(SAVE_FIGURES_ENV)
    if target and name:
        Path(target).mkdir(parents=True, exist_ok=True)
        fig.savefig(Path(target) / f"{name}.png", dpi=110)


def money(value: float | None, currency: str = "USD") -> str:
    """A readable amount: `USD 1,234.50` (no rounding beyond cents)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{currency} {value:,.2f}"


def _dollars(ax: Any) -> None:
    ax.yaxis.set_major_formatter(lambda v, _: f"-${-v:,.0f}" if v < 0 else f"${v:,.0f}")


def _month_ticks(ax: Any, months: pd.Series) -> None:
    ax.set_xticks(range(len(months)), [f"{m:%b %Y}" for m in months], rotation=45, ha="right")


def draw_mrr(ax: Any, mrr: pd.DataFrame) -> None:
    """MRR per month (queries.mrr_by_month) as a line over the months."""
    ax.plot(mrr["month"], mrr["mrr_usd"], "o-", color="#4c78a8")
    ax.fill_between(mrr["month"], mrr["mrr_usd"], alpha=0.15, color="#4c78a8")
    ax.set_title("Monthly recurring revenue (USD)")
    ax.set_xlabel("month (UTC; the last month is measured at the data's as-of time)")
    ax.set_ylabel("MRR, USD")
    _dollars(ax)


def draw_movements(ax: Any, movements: pd.DataFrame, months: pd.Series) -> None:
    """MRR movements per month (queries.mrr_movements), gains above zero, losses below."""
    table = (
        movements.pivot(index="month", columns="movement", values="mrr_change_usd")
        .reindex(index=months, columns=list(MOVEMENT_COLORS))
        .fillna(0.0)
    )
    above = [0.0] * len(table)
    below = [0.0] * len(table)
    for movement, color in MOVEMENT_COLORS.items():
        values = table[movement].tolist()
        base = [a if v >= 0 else b for v, a, b in zip(values, above, below, strict=True)]
        ax.bar(range(len(table)), values, bottom=base, color=color, label=movement, width=0.75)
        above = [a + max(v, 0) for a, v in zip(above, values, strict=True)]
        below = [b + min(v, 0) for b, v in zip(below, values, strict=True)]
    ax.plot(range(len(table)), table.sum(axis=1), "ko-", markersize=4, label="net change")
    ax.axhline(0, color="black", linewidth=0.8)
    _month_ticks(ax, table.index.to_series())
    ax.set_title("MRR movements per month")
    ax.set_xlabel("month (UTC)")
    ax.set_ylabel("change in MRR, USD")
    _dollars(ax)
    ax.set_ylim(min(below, default=0) * 1.15 - 1, max(above, default=0) * 1.3 + 1)  # legend room
    ax.legend(loc="upper left", ncol=3, fontsize=9)


def draw_revenue(ax: Any, revenue: pd.DataFrame) -> None:
    """Gross and refunded USD per month (queries.revenue_usd_by_month), net as a line."""
    x = range(len(revenue))
    ax.bar(x, revenue["gross_usd"].fillna(0), color="#54a24b", label="gross", width=0.75)
    ax.bar(x, -revenue["refunds_usd"].fillna(0), color="#e45756", label="refunds", width=0.75)
    ax.plot(x, revenue["net_usd"].fillna(0), "ko-", markersize=4, label="net")
    ax.axhline(0, color="black", linewidth=0.8)
    _month_ticks(ax, revenue["month"])
    ax.set_title("Revenue per month in USD (ledger equivalents of every currency)")
    ax.set_xlabel("month (UTC)")
    ax.set_ylabel("USD")
    _dollars(ax)
    ax.legend(loc="upper left", fontsize=9)


def draw_customers(ax: Any, customers: pd.DataFrame) -> None:
    """Customers gained (new, reactivated) and churned per month."""
    x = range(len(customers))
    ax.bar(x, customers["new_customers"], color="#54a24b", label="new", width=0.75)
    ax.bar(x, customers["reactivated_customers"], bottom=customers["new_customers"],
           color="#4c78a8", label="reactivated", width=0.75)  # fmt: skip
    ax.bar(x, -customers["churned_customers"], color="#e45756", label="churned", width=0.75)
    ax.axhline(0, color="black", linewidth=0.8)
    _month_ticks(ax, customers["month"])
    ax.set_title("Paying customers gained and churned per month")
    ax.set_ylabel("customers")
    ax.legend(loc="upper left", fontsize=9)


def draw_dunning_outcomes(ax: Any, by_month: pd.DataFrame) -> None:
    """Failed renewals per month by what became of them (dunning.dunning_by_month)."""
    x = range(len(by_month))
    bottom = [0] * len(by_month)
    for outcome, color in OUTCOME_COLORS.items():
        values = by_month[outcome].tolist()
        ax.bar(x, values, bottom=bottom, color=color, label=outcome, width=0.75)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    _month_ticks(ax, by_month["month"])
    ax.set_title("Failed renewals per month, by outcome")
    ax.set_ylabel("subscriptions past due")
    ax.legend(loc="upper left", fontsize=9, ncol=2)
    recovered = ax.twinx()
    recovered.plot(x, by_month["recovered_usd"].fillna(0), "D--", color="#2f6b2a",
                   label="revenue recovered (USD)")  # fmt: skip
    recovered.set_ylabel("revenue recovered, USD")
    recovered.set_ylim(bottom=0)
    recovered.grid(False)
    _dollars(recovered)
    recovered.legend(loc="upper right", fontsize=9)


def draw_recovery_by_attempt(ax: Any, by_attempt: pd.DataFrame) -> None:
    """Share of dunning retries that succeeded, per retry_attempt."""
    labels = [f"retry {int(n)}" for n in by_attempt["retry_attempt"]]
    ax.bar(labels, by_attempt["recovery_rate"] * 100, color="#54a24b", width=0.6)
    for i, (rate, n) in enumerate(zip(by_attempt["recovery_rate"], by_attempt["retries"],
                                      strict=True)):  # fmt: skip
        ax.annotate(f"{rate:.0%} of {int(n)}", (i, rate * 100), ha="center", va="bottom",
                    fontsize=9, xytext=(0, 2), textcoords="offset points")  # fmt: skip
    ax.set_title("Recovery rate by retry attempt")
    ax.set_ylabel("retries that succeeded, %")
    ax.set_ylim(0, 110)


def draw_delivery_delay(ax: Any, by_run: pd.DataFrame) -> None:
    """Median and p90 event-to-acknowledgement delay per run, by path, on a log scale."""
    for path, group in by_run.groupby("path", sort=True):
        color = PATH_COLORS.get(str(path), "#b279a2")
        # a log scale has no room for a delay <= 0: an event time after its acknowledgement
        # (a source clock ahead of this one, as the sandbox's is for its webhook run)
        shown = group[group["median_seconds"] > 0]
        hidden = len(group) - len(shown)
        label = f"{path} ({int(group['events'].sum())} events)"
        if hidden:
            label += f"; {hidden} run(s) with a median <= 0 not shown"
        ax.vlines(shown["started_at"], shown["median_seconds"],
                  shown["p90_seconds"].clip(lower=shown["median_seconds"]), color=color,
                  alpha=0.5)  # fmt: skip
        ax.plot(shown["started_at"], shown["median_seconds"], "o", color=color, label=label)
    ax.set_yscale("log")
    ax.set_title("Delay from an event to Segment's acknowledgement, per run")
    ax.set_xlabel("run start (UTC)")
    ax.set_ylabel("seconds (dot: median, line: to p90)")
    ax.legend(fontsize=9)
    ax.tick_params(axis="x", labelrotation=30)


def draw_run_steps(ax: Any, steps: pd.DataFrame) -> None:
    """Seconds per step of each run (extract, models, emit), stacked, oldest run first."""
    table = (
        steps[steps["step"] != "total"]
        .pivot_table(index=["started_at", "run_id"], columns="step", values="seconds")
        .reindex(columns=list(STEP_COLORS))
        .fillna(0.0)
    )
    x = range(len(table))
    bottom = [0.0] * len(table)
    for step, color in STEP_COLORS.items():
        values = table[step].tolist()
        ax.bar(x, values, bottom=bottom, color=color, label=step, width=0.75)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    labels = [f"{started:%m-%d %H:%M:%S}" for started, _ in table.index]
    step = max(1, len(labels) // 20)
    ax.set_xticks(list(x)[::step], labels[::step], rotation=45, ha="right")
    ax.set_title("Duration of each recent run (the newest 288), by step")
    ax.set_xlabel("run start (UTC)")
    ax.set_ylabel("seconds")
    ax.legend(fontsize=9)
