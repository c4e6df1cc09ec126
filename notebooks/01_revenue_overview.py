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
# # Revenue overview
#
# Gross, refunds and net revenue per month, in USD (from Dodo's balance ledger) and in each
# currency as charged; payment success, refund and dispute rates; the top customers.
#
# **Money rules.** Amounts in different currencies are never added together. USD figures are the
# ledger's `usd_equivalent_amount` of each payment and refund (what Dodo converted at the time);
# a payment without a ledger entry has no USD value and is counted separately below, never
# guessed. Per-currency figures are exact amounts in that currency.
#
# Every SQL query below runs as is in the DuckDB CLI: `duckdb -readonly dodo_segment.duckdb`.
# Column definitions: `docs/models.md`.

# %% tags=["parameters"]
MONTHS = 12  # how many recent months the charts show

# %%
import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import display

from pipelines import analysis

analysis.use_style()
wh = analysis.open_warehouse()

# %% [markdown]
# ## Revenue per month and currency (exact, in each currency)
# `analytics.revenue_daily` rolled up to months: gross = succeeded payments by payment date,
# refunds = succeeded refunds by refund date, net = gross - refunds.

# %%
REVENUE_BY_CURRENCY = """
select
    cast(date_trunc('month', date) as date) as month,
    currency,
    round(sum(gross), 3) as gross,
    round(sum(refunds), 3) as refunds,
    round(sum(net), 3) as net,
    sum(payments) as payments
from analytics.revenue_daily
group by all
order by month, currency
"""
by_currency = wh.query(REVENUE_BY_CURRENCY)
by_currency["month"] = pd.to_datetime(by_currency["month"])
display(
    by_currency.pivot(index="month", columns="currency", values="net")
    .tail(MONTHS)
    .rename_axis(columns="net revenue by currency")
)

# %%
currencies = sorted(by_currency["currency"].unique())
recent = by_currency[by_currency["month"] >= by_currency["month"].max() - pd.DateOffset(months=MONTHS - 1)]
columns = min(4, max(1, len(currencies)))
rows = -(-len(currencies) // columns)
fig, axes = plt.subplots(rows, columns, figsize=(12, 2.8 * rows + 0.6), squeeze=False, sharex=True)
for ax, currency in zip(axes.flat, currencies, strict=False):
    months = sorted(recent["month"].unique())  # a month without payments in a currency is 0
    series = recent[recent["currency"] == currency].set_index("month")[["gross", "refunds", "net"]]
    series = series.reindex(months, fill_value=0.0)
    ax.bar(series.index, series["gross"], width=20, color="#4c78a8", label="gross")
    ax.bar(series.index, -series["refunds"], width=20, color="#e45756", label="refunds")
    ax.plot(series.index, series["net"], "k.-", label="net")
    ax.set_title(currency)
    ax.set_ylabel(f"{currency} per month")
    ax.tick_params(axis="x", labelrotation=45)
for ax in list(axes.flat)[len(currencies):]:
    ax.set_visible(False)
axes.flat[0].legend(loc="upper left")
fig.suptitle("Revenue per month in each currency as charged (no conversion)", fontweight="bold")
analysis.finish_figure(fig, wh, "revenue_by_currency")
plt.show()

# %% [markdown]
# ## Revenue per month in USD (balance ledger)
# The same months in USD, plus how many of the month's succeeded payments have no ledger entry
# (and so no USD value): when that column is not 0, the USD total is a lower bound.

# %%
REVENUE_USD = analysis.queries.REVENUE_USD_BY_MONTH  # shared with `dodo-segment report`
print(REVENUE_USD)
usd = analysis.queries.revenue_usd_by_month(wh)
display(usd.tail(MONTHS).set_index("month"))

# %%
fig, ax = plt.subplots()
analysis.charts.draw_revenue(ax, usd.tail(MONTHS))  # the report's revenue chart
analysis.finish_figure(fig, wh, "revenue_usd")
plt.show()

# %% [markdown]
# ## Payment success, refund and dispute rates
# - **success rate** = succeeded / payments with a final outcome (succeeded, failed, cancelled);
#   payments still processing or waiting for the customer are left out.
# - **refund rate** = share of succeeded payments with a succeeded (full or partial) refund.
# - **dispute rate** = share of succeeded payments with a dispute (any status).
#
# Rates are by the month of the payment, counted in payments, so currencies never mix.

# %%
RATES = """
with payments as (
    select
        payment_id,
        status,
        cast(date_trunc('month', timezone('UTC', created_at)) as date) as month
    from analytics.stg_payments
),

refunded as (
    select distinct payment_id from analytics.stg_refunds where status = 'succeeded'
),

disputed as (
    select distinct payment_id from analytics.stg_disputes
)

select
    month,
    count(*) filter (where status = 'succeeded') as succeeded,
    count(*) filter (where status in ('failed', 'cancelled')) as failed_or_cancelled,
    count(*) filter (where status = 'succeeded')
        / nullif(count(*) filter (where status in ('succeeded', 'failed', 'cancelled')), 0)
        as success_rate,
    count(refunded.payment_id) filter (where status = 'succeeded') as refunded,
    count(disputed.payment_id) filter (where status = 'succeeded') as disputed
from payments
left join refunded using (payment_id)
left join disputed using (payment_id)
group by all
order by month
"""
rates = wh.query(RATES)
rates["month"] = pd.to_datetime(rates["month"])
totals = rates[["succeeded", "failed_or_cancelled", "refunded", "disputed"]].sum()
overall = {
    "payment_success_rate": totals["succeeded"] / max(totals["succeeded"] + totals["failed_or_cancelled"], 1),
    "refund_rate": totals["refunded"] / max(totals["succeeded"], 1),
    "dispute_rate": totals["disputed"] / max(totals["succeeded"], 1),
}
print(
    f"All time: payment success {overall['payment_success_rate']:.1%}, "
    f"refund rate {overall['refund_rate']:.2%}, dispute rate {overall['dispute_rate']:.2%} "
    f"of {int(totals['succeeded'])} succeeded payments"
)
display(rates.tail(MONTHS).set_index("month"))

# %%
recent_rates = rates.tail(MONTHS)
fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
left.plot(recent_rates["month"], 100 * recent_rates["success_rate"], "o-", color="#54a24b")
left.set_title("Payment success rate")
left.set_ylabel("% of payments with an outcome")
left.set_ylim(0, 105)
right.plot(recent_rates["month"], 100 * recent_rates["refunded"] / recent_rates["succeeded"], "o-", color="#e45756", label="refunded")
right.plot(recent_rates["month"], 100 * recent_rates["disputed"] / recent_rates["succeeded"], "o-", color="#b279a2", label="disputed")
right.set_title("Refund and dispute rates")
right.set_ylabel("% of succeeded payments")
right.legend()
for ax in (left, right):
    ax.set_xlabel("month of the payment (UTC)")
    ax.tick_params(axis="x", labelrotation=45)
analysis.finish_figure(fig, wh, "payment_rates")
plt.show()

# %% [markdown]
# ## Top customers by lifetime spend (USD)
# Ranked by `customer_traits.total_spent_usd` (ledger: payments - refunds + refund reversals,
# in USD); customers without ledger rows have no USD total and are not ranked. Their spend per
# currency is shown beside, exact.

# %%
TOP_CUSTOMERS = """
select
    customer_id,
    name,
    total_spent_usd,
    payments_count,
    total_spent_by_currency,
    customer_since,
    subscription_status
from analytics.customer_traits
where total_spent_usd is not null
order by total_spent_usd desc, customer_id
limit 10
"""
top = wh.query(TOP_CUSTOMERS)
display(top)

# %%
fig, ax = plt.subplots(figsize=(10, 4.5))
labels = [f"{row.name or row.customer_id}" for row in top.itertuples()]
ax.barh(labels[::-1], top["total_spent_usd"][::-1], color="#4c78a8")
ax.set_title("Top 10 customers by lifetime spend (USD, net of refunds)")
ax.set_xlabel("total spent, USD")
ax.xaxis.set_major_formatter(lambda v, _: f"${v:,.0f}")
analysis.finish_figure(fig, wh, "top_customers")
plt.show()

# %% [markdown]
# ## Key figures
# One JSON line, read by `tests/test_notebooks.py` to check this notebook against the models.

# %%
analysis.publish(
    {
        "net_by_month_currency": {
            f"{r.month:%Y-%m}|{r.currency}": r.net for r in by_currency.itertuples()
        },
        "net_usd_by_month": {
            f"{r.month:%Y-%m}": (None if pd.isna(r.net_usd) else r.net_usd) for r in usd.itertuples()
        },
        **{name: round(float(value), 6) for name, value in overall.items()},
        "succeeded_payments": int(totals["succeeded"]),
        "top_customer": None if top.empty else top.iloc[0]["customer_id"],
        "top_customer_usd": None if top.empty else float(top.iloc[0]["total_spent_usd"]),
        "is_demo": wh.is_demo,
    }
)
