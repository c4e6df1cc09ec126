-- grain: global
-- One row: valid_until, the earliest instant after as_of at which a model's result would change
-- with no new raw data, only because time passed: a new UTC month begins (mrr_monthly gains its
-- month and samples the old one at its end), a trial ends (lifecycle_events' Trial Ended), or a
-- paid service period ends (the current month's MRR drops it). While the raw data is unchanged
-- and the new as_of is before valid_until, a rebuild gives the same tables, so the runner skips
-- it (pipelines/transform.py). Conservative on purpose: every trial end and every period end
-- counts, whatever its subscription's state.
with as_of as (
    select as_of from analytics.int_as_of
),

next_month as (
    select timezone('UTC', date_trunc('month', timezone('UTC', as_of)) + interval 1 month) as at
    from as_of
),

next_trial_end as (
    select min(subscriptions.trial_end_date) as at
    from analytics.int_subscriptions as subscriptions
    cross join as_of
    where subscriptions.trial_end_date > as_of.as_of
),

-- a period ending exactly at as_of still covers it; one instant later it does not
next_period_end as (
    select min(service_periods.period_end) as at
    from analytics.int_service_periods as service_periods
    cross join as_of
    where service_periods.period_end >= as_of.as_of
),

final as (
    select
        as_of.as_of,
        least(
            next_month.at,
            coalesce(next_trial_end.at, next_month.at),
            coalesce(next_period_end.at, next_month.at)
        ) as valid_until
    from as_of
    cross join next_month
    cross join next_trial_end
    cross join next_period_end
)

select as_of, valid_until from final
