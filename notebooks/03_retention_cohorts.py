# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Retention cohorts
#
# Customers grouped by the month they became customers (`customer_traits.customer_since`, their
# first succeeded payment), followed month by month:
#
# - **logo retention**: share of the cohort *active* in month N after joining. Active = a
#   succeeded payment in that month, or MRR > 0 at the month's end (`mrr_monthly`), so a yearly
#   subscriber counts as retained in the months between renewals.
# - **revenue retention**: the cohort's revenue in month N as a share of its revenue in its first
#   month. Revenue = succeeded payments in USD: the balance ledger's USD value, else the amount
#   when charged in USD, else at the latest ledger rate of the currency (the rule of
#   `mrr_monthly`). Payments of a currency the ledger has never converted have no USD value: they
#   are counted below and left out, never added in their own currency.
#
# The current month is incomplete (it ends at the data's as-of time).
# Every SQL query below runs as is in the DuckDB CLI: `duckdb -readonly dodo_segment.duckdb`.

# %% tags=["parameters"]
COHORTS = 12  # how many recent cohorts the heatmaps show

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import display

from pipelines import analysis

analysis.use_style()
wh = analysis.open_warehouse()

# %% [markdown]
# ## Customer-months: activity and USD revenue per customer and month

# %%
COHORT_ACTIVITY = """
with customers as (
    select
        customer_id,
        cast(date_trunc('month', timezone('UTC', customer_since)) as date) as cohort_month
    from analytics.customer_traits
    where customer_since is not null
),

payments as (
    select
        customer_id,
        cast(date_trunc('month', timezone('UTC', created_at)) as date) as month,
        amount_usd
    from analytics.int_payments_usd
),

paid_months as (
    select
        customer_id,
        month,
        sum(amount_usd) as revenue_usd,
        count(*) filter (where amount_usd is null) as payments_without_usd
    from payments
    group by all
),

subscribed_months as (
    select customer_id, month from analytics.mrr_monthly where mrr_usd > 0
),

active_months as (
    select customer_id, month from paid_months
    union
    select customer_id, month from subscribed_months
)

select
    customers.cohort_month,
    active_months.month,
    (year(active_months.month) - year(customers.cohort_month)) * 12
        + month(active_months.month) - month(customers.cohort_month) as months_since,
    count(distinct customers.customer_id) as active_customers,
    coalesce(sum(paid_months.revenue_usd), 0) as revenue_usd,
    coalesce(sum(paid_months.payments_without_usd), 0) as payments_without_usd
from customers
inner join active_months using (customer_id)
left join paid_months using (customer_id, month)
where active_months.month >= customers.cohort_month
group by all
order by cohort_month, month
"""
COHORT_SIZES = """
select
    cast(date_trunc('month', timezone('UTC', customer_since)) as date) as cohort_month,
    count(*) as customers
from analytics.customer_traits
where customer_since is not null
group by all
order by cohort_month
"""
activity = wh.query(COHORT_ACTIVITY)
sizes = wh.query(COHORT_SIZES)
for frame in (activity, sizes):
    frame["cohort_month"] = pd.to_datetime(frame["cohort_month"])
sizes = sizes.set_index("cohort_month")["customers"]
without_usd = int(activity["payments_without_usd"].sum())
print(
    f"{int(sizes.sum())} customers in {len(sizes)} monthly cohorts; "
    f"{without_usd} succeeded payment(s) have no USD value and are left out of revenue"
)

# %%
as_of_month = pd.Timestamp(wh.as_of.strftime("%Y-%m-01"))
ages = {c: (as_of_month.year - c.year) * 12 + as_of_month.month - c.month for c in sizes.index}
columns = range(max(ages.values(), default=0) + 1)
# months a cohort has not lived through yet stay blank; lived months without activity are 0
lived = np.array([[m <= ages[c] for m in columns] for c in sizes.index], dtype=bool).reshape(len(sizes), len(columns))


def cohort_matrix(values):
    matrix = activity.pivot(index="cohort_month", columns="months_since", values=values)
    return matrix.reindex(index=sizes.index, columns=columns).fillna(0.0).where(lived)


logo = cohort_matrix("active_customers").div(sizes, axis=0)
revenue = cohort_matrix("revenue_usd")
revenue_retention = revenue.div(revenue[0].where(revenue[0] > 0), axis=0)
display((100 * logo).round(1).rename_axis(index="cohort", columns="months since joining").tail(COHORTS))

# %% [markdown]
# ## Heatmaps

# %%
def heatmap(ax, matrix, title, colorbar_label, cmap):
    shown = matrix.tail(COHORTS)
    shown = shown.loc[:, shown.notna().any()]
    values = 100 * shown.to_numpy(dtype=float)
    image = ax.imshow(values, cmap=cmap, vmin=0, vmax=100, aspect="auto")
    for (i, j), value in np.ndenumerate(values):
        if not np.isnan(value):
            ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if value > 60 else "black")
    ax.set_xticks(range(shown.shape[1]), [str(c) for c in shown.columns])
    ax.set_yticks(range(len(shown)), [f"{c:%Y-%m} (n={sizes[c]})" for c in shown.index])
    ax.set_xlabel("months since first payment")
    ax.set_ylabel("cohort: month of first payment (customers)")
    ax.set_title(title)
    ax.grid(False)
    plt.colorbar(image, ax=ax, label=colorbar_label, fraction=0.04)


fig, (left, right) = plt.subplots(1, 2, figsize=(16, 0.42 * min(COHORTS, len(sizes)) + 2.6))
heatmap(left, logo, "Logo retention: % of the cohort active", "% of cohort customers", "Blues")
heatmap(right, revenue_retention, "Revenue retention: % of the first month's USD revenue",
        "% of month-0 revenue in USD (colour capped at 100)", "Greens")
fig.suptitle("Monthly cohorts by first payment", fontweight="bold")
analysis.finish_figure(fig, wh, "cohort_heatmap")
plt.show()

# %%
display((100 * revenue_retention).round(1).rename_axis(index="cohort", columns="months since joining").tail(COHORTS))
display(revenue.round(2).rename_axis(index="cohort (USD revenue)", columns="months since joining").tail(COHORTS))

# %% [markdown]
# ## Key figures
# One JSON line, read by `tests/test_notebooks.py` to check this notebook against the models.

# %%
def _row(frame, cohort):
    return [None if pd.isna(v) else round(float(v), 6) for v in frame.loc[cohort]]


analysis.publish(
    {
        "cohort_sizes": {f"{c:%Y-%m}": int(n) for c, n in sizes.items()},
        "logo_retention": {f"{c:%Y-%m}": _row(logo, c) for c in logo.index},
        "revenue_retention": {f"{c:%Y-%m}": _row(revenue_retention, c) for c in revenue_retention.index},
        "revenue_usd": {f"{c:%Y-%m}": _row(revenue, c) for c in revenue.index},
        "payments_without_usd": without_usd,
        "is_demo": wh.is_demo,
    }
)
