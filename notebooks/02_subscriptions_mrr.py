# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Subscriptions and MRR
#
# MRR over time, the MRR movements of each month (new, expansion, contraction, churn,
# reactivation), subscriptions by status, and trial conversion.
#
# **MRR** comes from `analytics.mrr_monthly`: USD per customer and month, billed (tax included),
# from the subscription payments whose service period covers the month's last instant (the
# current month: the data's as-of time). Each payment is in USD from the balance ledger, else its
# own amount when charged in USD, else at the latest ledger rate of its currency, so every MRR
# figure here is USD and can be added up. A renewal paid after a month ended shows as churn in
# that month and reactivation in the next. Definitions: `docs/models.md`.
#
# Every SQL query below runs as is in the DuckDB CLI: `duckdb -readonly dodo_segment.duckdb`.

# %% tags=["parameters"]
MONTHS = 12  # how many recent months the charts show

# %%
import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import display

from pipelines import analysis

analysis.use_style()
wh = analysis.open_warehouse()
MOVEMENTS = ["new", "expansion", "reactivation", "contraction", "churn"]
COLORS = analysis.charts.MOVEMENT_COLORS

# %% [markdown]
# ## MRR per month

# %%
MRR_BY_MONTH = analysis.queries.MRR_BY_MONTH  # shared with `dodo-segment report`
print(MRR_BY_MONTH)
mrr = analysis.queries.mrr_by_month(wh)
display(mrr.tail(MONTHS).set_index("month"))

fig, ax = plt.subplots()
analysis.charts.draw_mrr(ax, mrr)  # the report's MRR chart
analysis.finish_figure(fig, wh, "mrr")
plt.show()

# %% [markdown]
# ## MRR movements per month
# Each customer-month is classified once (first match): new, churn, reactivation, expansion,
# contraction, unchanged. A movement's amount is `mrr_usd - previous_mrr_usd`, so
# MRR(previous month) + the month's movements = MRR(month).

# %%
MRR_MOVEMENTS = analysis.queries.MRR_MOVEMENTS  # shared with `dodo-segment report`
print(MRR_MOVEMENTS)
movements = analysis.queries.mrr_movements(wh)
waterfall = (
    movements.pivot(index="month", columns="movement", values="mrr_change_usd")
    .reindex(index=mrr["month"], columns=MOVEMENTS)
    .fillna(0.0)
)
waterfall["net_change"] = waterfall[MOVEMENTS].sum(axis=1)
waterfall["mrr_end"] = mrr.set_index("month")["mrr_usd"]
# the movements explain the whole change: previous MRR + movements = this month's MRR
check = waterfall["mrr_end"].shift(1, fill_value=0.0) + waterfall["net_change"] - waterfall["mrr_end"]
assert check.abs().max() < 0.05, check
display(waterfall.tail(MONTHS).round(2))

# %%
recent = waterfall.tail(MONTHS)
last_month = waterfall.index[-2] if len(waterfall) > 1 else waterfall.index[-1]  # last complete month
fig, (bars, fall) = plt.subplots(1, 2, figsize=(14, 5.2), gridspec_kw={"width_ratios": [1.7, 1]})

# left: stacked movements per month, gains above zero, losses below, net change as a line
# (the report's chart: analysis.charts.draw_movements)
analysis.charts.draw_movements(bars, movements, recent.index.to_series())

# right: the waterfall of the last complete month, from the MRR it started with to its end
row = waterfall.loc[last_month]
start = row["mrr_end"] - row["net_change"]
steps = [("start", start)] + [(m, row[m]) for m in MOVEMENTS] + [("end", row["mrr_end"])]
level = 0.0
for i, (name, value) in enumerate(steps):
    if name in ("start", "end"):
        fall.bar(i, value, color="#9d9d9d")
        level = value
        label_y = value
    else:
        fall.bar(i, value, bottom=level, color=COLORS[name])
        level += value
        label_y = max(level, level - value)
    fall.annotate(f"{value:+,.0f}" if name not in ("start", "end") else f"{value:,.0f}",
                  (i, label_y), ha="center", va="bottom", fontsize=9, xytext=(0, 2),
                  textcoords="offset points")
fall.set_xticks(range(len(steps)), [s[0] for s in steps], rotation=45, ha="right")
fall.set_title(f"MRR waterfall, {last_month:%B %Y}")
fall.set_ylabel("MRR, USD")
fall.yaxis.set_major_formatter(lambda v, _: f"${v:,.0f}")
fall.set_ylim(0, max(start, row["mrr_end"], level) * 1.15 + 1)
analysis.finish_figure(fig, wh, "mrr_waterfall")
plt.show()

# %% [markdown]
# ## Subscriptions by current status
# Every subscription Dodo knows, by its status now (`analytics.int_subscriptions`). "Live"
# statuses (active, on_hold, paused, past_due) are the ones that can still bill.

# %%
BY_STATUS = """
select status, count(*) as subscriptions, bool_or(is_live) as is_live
from analytics.int_subscriptions
group by status
order by subscriptions desc, status
"""
by_status = wh.query(BY_STATUS)
display(by_status)

fig, ax = plt.subplots(figsize=(9, 4))
ax.barh(by_status["status"][::-1], by_status["subscriptions"][::-1],
        color=["#54a24b" if live else "#bab0ac" for live in by_status["is_live"][::-1]])
ax.set_title("Subscriptions by current status (green: live)")
ax.set_xlabel("subscriptions")
analysis.finish_figure(fig, wh, "subscriptions_by_status")
plt.show()

# %% [markdown]
# ## Trial conversion
# Share of trials that have ended (trial start + trial days <= as-of) with a succeeded, non-zero
# payment at or after the trial's end (1 hour tolerance): `int_subscriptions.trial_converted`.
# Trials still running are listed but not in the rate.

# %%
TRIALS = """
select
    cast(date_trunc('month', timezone('UTC', trial_start_date)) as date) as trial_month,
    count(*) as trials_started,
    count(*) filter (where trial_end_date <= (select as_of from analytics.int_as_of))
        as trials_ended,
    count(*) filter (
        where trial_end_date <= (select as_of from analytics.int_as_of) and trial_converted
    ) as trials_converted
from analytics.int_subscriptions
where trial_start_date is not null
group by all
order by trial_month
"""
trials = wh.query(TRIALS)
trials["conversion_rate"] = trials["trials_converted"] / trials["trials_ended"].where(trials["trials_ended"] > 0)
ended, converted = int(trials["trials_ended"].sum()), int(trials["trials_converted"].sum())
trial_conversion_rate = converted / ended if ended else None
print(
    f"{int(trials['trials_started'].sum())} trials started, {ended} ended, {converted} converted: "
    + (f"conversion {trial_conversion_rate:.1%}" if ended else "no trial has ended yet")
)
display(trials)

# %% [markdown]
# ## Key figures
# One JSON line, read by `tests/test_notebooks.py` to check this notebook against the models.

# %%
analysis.publish(
    {
        "mrr_by_month": {f"{m:%Y-%m}": v for m, v in zip(mrr["month"], mrr["mrr_usd"], strict=True)},
        "movements": {
            f"{r.month:%Y-%m}|{r.movement}": {"customers": r.customers, "usd": r.mrr_change_usd}
            for r in movements.itertuples()
        },
        "waterfall_month": f"{last_month:%Y-%m}",
        "subscriptions_by_status": dict(zip(by_status["status"], by_status["subscriptions"], strict=True)),
        "trials_ended": ended,
        "trials_converted": converted,
        "trial_conversion_rate": trial_conversion_rate,
        "is_demo": wh.is_demo,
    }
)
