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
# # Dunning and involuntary churn
#
# What became of each failed renewal: **recovered** by a retry, **still in grace** (the
# subscription is `past_due`), **on hold**, or **cancelled**; the recovery rate of each retry
# attempt, the revenue the retries recovered and how long a recovery took; the plan changes and
# their proration; and the share of checkouts that started several subscriptions at once.
#
# Sources (Dodo API 1.123 fields): `analytics.stg_payment_subscriptions` (one row per payment and
# subscription it charges, with `charge_type`, `retry_attempt` and the service period's
# `proration_factor`), `analytics.int_subscriptions` (the status now), and
# `analytics.int_payments_usd` (each succeeded payment in USD, from the balance ledger).
# A **dunning episode** starts with a failed renewal charge (`retry_attempt` 0) and ends at the
# subscription's next failed renewal; it is recovered when a retry (`retry_attempt` >= 1) of the
# subscription succeeds in between, else its outcome is the subscription's status now.
#
# The queries are shared with `dodo-segment report` (`pipelines/analysis/dunning.py`); each is
# printed below and runs as is in the DuckDB CLI: `duckdb -readonly dodo_segment.duckdb`.

# %% tags=["parameters"]
MONTHS = 12  # how many recent months the charts show

# %%
import matplotlib.pyplot as plt
from IPython.display import display

from pipelines import analysis
from pipelines.analysis import dunning

analysis.use_style()
wh = analysis.open_warehouse()
if wh.is_sandbox:
    print("These figures are the SANDBOX's: a simulated business, not a Dodo Payments account.")

# %% [markdown]
# ## Failed renewals and their outcomes

# %%
print(dunning.DUNNING_EPISODES)
episodes = dunning.dunning_episodes(wh)
totals = dunning.dunning_totals(episodes)
by_month = dunning.dunning_by_month(episodes)
display(by_month.tail(MONTHS).set_index("month"))
print(
    f"{totals['episodes']} failed renewals: "
    + ", ".join(f"{n} {outcome}" for outcome, n in totals["outcomes"].items())
    + (f"; {totals['recovery_rate']:.1%} recovered, {analysis.money(totals['recovered_usd'])} "
       "of revenue recovered by retries" if totals["episodes"] else "")
)

# %% [markdown]
# ## Recovery rate by retry attempt
# Each retry of a failed renewal carries its number (`retry_attempt` 1, 2, ...): the share of
# the retries with that number that succeeded.

# %%
print(dunning.RECOVERY_BY_RETRY_ATTEMPT)
by_attempt = dunning.recovery_by_retry_attempt(wh)
display(by_attempt)

# %%
fig, (outcomes, attempts) = plt.subplots(1, 2, figsize=(15, 5.2), gridspec_kw={"width_ratios": [2, 1]})
if len(by_month):
    analysis.charts.draw_dunning_outcomes(outcomes, by_month.tail(MONTHS))
else:
    outcomes.text(0.5, 0.5, "no failed renewal yet", ha="center", va="center")
if len(by_attempt):
    analysis.charts.draw_recovery_by_attempt(attempts, by_attempt)
else:
    attempts.text(0.5, 0.5, "no retry yet", ha="center", va="center")
analysis.finish_figure(fig, wh, "dunning_outcomes")
plt.show()

# %% [markdown]
# ## Days from the failed renewal to its recovery

# %%
recovered = episodes[episodes["outcome"] == "recovered"]
display(recovered["days_to_recovery"].describe().round(2).to_frame("days to recovery"))
display(recovered.groupby("recovered_on_attempt")["days_to_recovery"].median().round(2)
        .to_frame("median days, by the retry that recovered"))

# %% [markdown]
# ## Plan changes and their proration
# Succeeded `plan_change` charges: the new plan charged for the rest of the period, so the
# `proration_factor` is the share of a full period paid for (the old plan's credit is not in it).

# %%
print(dunning.PLAN_CHANGES)
changes = dunning.plan_changes(wh)
display(changes[["created_at", "subscription_id", "proration_factor", "amount_minor", "currency",
                 "amount_usd"]].tail(20))
if len(changes):
    display(changes.groupby("month").agg(plan_changes=("payment_id", "count"),
                                         median_proration=("proration_factor", "median"),
                                         charged_usd=("amount_usd", "sum")).round(3))

# %% [markdown]
# ## Multi-subscription checkouts
# First charges (`charge_type` = `new`) that started more than one subscription
# (`is_multi_subscription`).

# %%
print(dunning.MULTI_SUBSCRIPTION_CHECKOUTS)
checkouts = dunning.multi_subscription_checkouts(wh)
print(
    f"{checkouts['multi_subscription']} of {checkouts['checkouts']} subscription checkouts "
    + (f"({checkouts['share']:.1%}) " if checkouts["share"] is not None else "")
    + "started several subscriptions at once"
)

# %% [markdown]
# ## Key figures
# One JSON line, read by `tests/test_notebooks.py` to check this notebook against the payments.

# %%
analysis.publish(
    {
        "episodes": totals["episodes"],
        "outcomes": totals["outcomes"],
        "recovery_rate": totals["recovery_rate"],
        "recovered_usd": totals["recovered_usd"],
        "median_days_to_recovery": totals["median_days_to_recovery"],
        "retries_by_attempt": {int(r.retry_attempt): [int(r.retries), int(r.recovered)]
                               for r in by_attempt.itertuples()},
        "plan_changes": len(changes),
        "multi_subscription_checkouts": checkouts,
        "is_demo": wh.is_demo,
        "is_sandbox": wh.is_sandbox,
    }
)
