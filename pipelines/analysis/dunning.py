"""Dunning and involuntary churn (API 1.123): failed renewals, retries, recoveries, plan changes.

Shared by notebook 05 and `dodo-segment report`; every constant runs as is in the DuckDB CLI.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from pipelines.analysis.queries import as_months
from pipelines.analysis.reader import Warehouse

# One row per dunning episode: a subscription's failed renewal charge (retry_attempt 0, API
# 1.123; on older rows without charge_type, a failed payment after the subscription's first)
# and what followed it, until the subscription's next failed renewal. Outcome: recovered
# (a retry, retry_attempt >= 1, succeeded), else by the subscription's status now: still in grace
# (past_due), on hold, cancelled (cancelled, expired, failed), other (e.g. active again without a
# retry the API shows). recovered_usd: the recovering payment in USD (analytics.int_payments_usd),
# counted on the payment's first subscription only, so a checkout of several adds up once.
DUNNING_EPISODES = """
with subscription_payments as (
    select
        *,
        row_number() over (
            partition by subscription_id order by created_at, payment_id
        ) as payment_number
    from analytics.stg_payment_subscriptions
),

-- rows older than charge_type: a retry, or any payment after the subscription's first
renewals as (
    select * from subscription_payments
    where charge_type = 'renewal'
       or (charge_type is null and (payment_number > 1 or retry_attempt >= 1))
),

subscriptions as (
    select subscription_id, status from analytics.int_subscriptions
),

payments_usd as (
    select payment_id, amount_usd from analytics.int_payments_usd
),

failed_renewals as (
    select
        subscription_id,
        customer_id,
        payment_id,
        created_at as failed_at,
        lead(created_at) over (
            partition by subscription_id order by created_at, payment_id
        ) as next_failed_at
    from renewals
    where status = 'failed' and coalesce(retry_attempt, 0) = 0
),

recoveries as (
    select
        failed_renewals.payment_id as failed_payment_id,
        renewals.payment_id,
        renewals.created_at,
        renewals.retry_attempt,
        renewals.subscription_position
    from failed_renewals
    inner join renewals
        on renewals.subscription_id = failed_renewals.subscription_id
        and renewals.status = 'succeeded'
        and renewals.retry_attempt >= 1
        and renewals.created_at > failed_renewals.failed_at
        and (
            failed_renewals.next_failed_at is null
            or renewals.created_at < failed_renewals.next_failed_at
        )
    qualify row_number() over (
        partition by failed_renewals.payment_id, failed_renewals.subscription_id
        order by renewals.created_at, renewals.payment_id
    ) = 1
),

final as (
    select
        cast(date_trunc('month', timezone('UTC', failed_renewals.failed_at)) as date) as month,
        failed_renewals.subscription_id,
        failed_renewals.customer_id,
        failed_renewals.payment_id as failed_payment_id,
        failed_renewals.failed_at,
        case
            when recoveries.payment_id is not null then 'recovered'
            when subscriptions.status = 'past_due' then 'still in grace'
            when subscriptions.status = 'on_hold' then 'on hold'
            when subscriptions.status in ('cancelled', 'expired', 'failed') then 'cancelled'
            else 'other'
        end as outcome,
        recoveries.payment_id as recovery_payment_id,
        recoveries.created_at as recovered_at,
        recoveries.retry_attempt as recovered_on_attempt,
        case when recoveries.subscription_position = 1 then payments_usd.amount_usd end
            as recovered_usd,
        (epoch(recoveries.created_at) - epoch(failed_renewals.failed_at)) / 86400.0
            as days_to_recovery
    from failed_renewals
    left join recoveries
        on recoveries.failed_payment_id = failed_renewals.payment_id
    left join subscriptions
        on subscriptions.subscription_id = failed_renewals.subscription_id
    left join payments_usd
        on payments_usd.payment_id = recoveries.payment_id
)

select * from final
order by failed_at, subscription_id
"""

# Each dunning retry (retry_attempt n >= 1) of a renewal, and how many of them succeeded.
RECOVERY_BY_RETRY_ATTEMPT = """
select
    retry_attempt,
    count(distinct payment_id) as retries,
    count(distinct payment_id) filter (where status = 'succeeded') as recovered,
    round(
        count(distinct payment_id) filter (where status = 'succeeded')
        / count(distinct payment_id), 4
    ) as recovery_rate
from analytics.stg_payment_subscriptions
where coalesce(charge_type, 'renewal') = 'renewal' and retry_attempt >= 1
group by retry_attempt
order by retry_attempt
"""

# Succeeded plan-change charges (API 1.123 charge_type = 'plan_change'): proration_factor is
# the share of a full period the new plan's charge pays for ('1' = a whole period).
PLAN_CHANGES = """
select
    plan_changes.payment_id,
    plan_changes.subscription_id,
    plan_changes.customer_id,
    plan_changes.created_at,
    cast(date_trunc('month', timezone('UTC', plan_changes.created_at)) as date) as month,
    cast(plan_changes.proration_factor as double) as proration_factor,
    plan_changes.amount_minor,
    plan_changes.currency,
    payments_usd.amount_usd
from analytics.stg_payment_subscriptions as plan_changes
left join analytics.int_payments_usd as payments_usd using (payment_id)
where plan_changes.charge_type = 'plan_change' and plan_changes.status = 'succeeded'
order by plan_changes.created_at, plan_changes.payment_id
"""

# First charges of subscriptions (charge_type 'new'), and how many started several at once.
MULTI_SUBSCRIPTION_CHECKOUTS = """
select
    count(*) as subscription_checkouts,
    count(*) filter (where is_multi_subscription) as multi_subscription_checkouts
from analytics.stg_payments
where status = 'succeeded' and charge_type = 'new'
"""


def dunning_episodes(wh: Warehouse) -> pd.DataFrame:
    """One row per failed renewal and its outcome (see DUNNING_EPISODES)."""
    return as_months(wh.query(DUNNING_EPISODES))


DUNNING_OUTCOMES = ("recovered", "still in grace", "on hold", "cancelled", "other")


def dunning_by_month(episodes: pd.DataFrame) -> pd.DataFrame:
    """Episodes per month of their failed renewal, by outcome, with the USD recovered."""
    if episodes.empty:
        return pd.DataFrame(columns=["month", *DUNNING_OUTCOMES, "recovered_usd"])
    counts = (
        episodes.pivot_table(
            index="month",
            columns="outcome",
            values="subscription_id",
            aggfunc="count",
            fill_value=0,
        )  # fmt: skip
        .reindex(columns=list(DUNNING_OUTCOMES), fill_value=0)
        .astype(int)
    )
    counts["recovered_usd"] = episodes.groupby("month")["recovered_usd"].sum().round(2)
    return counts.reset_index()


def recovery_by_retry_attempt(wh: Warehouse) -> pd.DataFrame:
    """Retries per retry_attempt and the share of them that succeeded."""
    return wh.query(RECOVERY_BY_RETRY_ATTEMPT)


def plan_changes(wh: Warehouse) -> pd.DataFrame:
    """Succeeded plan-change charges with their proration factor."""
    return as_months(wh.query(PLAN_CHANGES))


def multi_subscription_checkouts(wh: Warehouse) -> dict[str, Any]:
    """First subscription charges, those that started several subscriptions, and the share."""
    row = wh.query(MULTI_SUBSCRIPTION_CHECKOUTS).iloc[0]
    total, multi = int(row["subscription_checkouts"]), int(row["multi_subscription_checkouts"])
    return {"checkouts": total, "multi_subscription": multi,
            "share": multi / total if total else None}  # fmt: skip


def dunning_totals(episodes: pd.DataFrame) -> dict[str, Any]:
    """Episodes, their outcomes, the USD recovered and the median days to a recovery."""
    recovered = episodes[episodes["outcome"] == "recovered"] if len(episodes) else episodes
    days = recovered["days_to_recovery"].dropna() if len(recovered) else pd.Series(dtype=float)
    return {
        "episodes": len(episodes),
        "outcomes": {
            o: int((episodes["outcome"] == o).sum()) if len(episodes) else 0
            for o in DUNNING_OUTCOMES
        },  # fmt: skip
        "recovery_rate": len(recovered) / len(episodes) if len(episodes) else None,
        "recovered_usd": round(float(recovered["recovered_usd"].fillna(0).sum()), 2)
        if len(recovered)
        else 0.0,
        "median_days_to_recovery": float(days.median()) if len(days) else None,
    }
