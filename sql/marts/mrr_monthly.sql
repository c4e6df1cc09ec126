-- grain: customer
-- MRR per customer per month (USD), with the movement classified mrr-playbook style.
-- Definition: each succeeded subscription payment that pays for a service period contributes
-- the plan's pre-tax amount per month, in USD (analytics.int_service_periods: the API's service
-- periods where it gives them, tax and metered usage left out). A customer's MRR for a month is
-- the sum over their subscriptions of the period covering the last instant of the month (for
-- the current month: as_of); where two periods of one subscription cover it (a plan change
-- mid-cycle), the one that started last.
-- Rows: every month from the customer's first month with MRR up to as_of, except months where
-- both mrr_usd and previous_mrr_usd are 0 (inactive between a churn and a reactivation).
-- movement, first match wins: new (first month), churn (mrr 0, previous > 0), reactivation
-- (previous 0, mrr > 0), expansion (mrr > previous), contraction (mrr < previous), unchanged.
with as_of as (
    select as_of, cast(date_trunc('month', timezone('UTC', as_of)) as date) as as_of_month
    from analytics.int_as_of
),

service_periods as (
    select * from analytics.int_service_periods
),

covered_months as (
    select
        service_periods.customer_id,
        service_periods.subscription_id,
        service_periods.monthly_usd,
        cast(covered.month as date) as month
    from service_periods
    cross join as_of
    cross join lateral (
        select unnest(generate_series(
            date_trunc('month', timezone('UTC', service_periods.period_start)),
            date_trunc('month', timezone('UTC', least(service_periods.period_end, as_of.as_of))),
            interval 1 month
        )) as month
    ) as covered
    -- the month's sample point: its last instant, or as_of for the current month
    cross join lateral (
        select least(timezone('UTC', covered.month + interval 1 month), as_of.as_of) as cutoff
    ) as sample
    where service_periods.period_start < sample.cutoff
      and service_periods.period_end >= sample.cutoff
    qualify row_number() over (
        partition by service_periods.subscription_id, covered.month
        order by service_periods.period_start desc, service_periods.payment_id desc
    ) = 1
),

customer_month_mrr as (
    select
        customer_id,
        month,
        sum(monthly_usd) as mrr_usd,
        count(distinct subscription_id) as subscriptions
    from covered_months
    where customer_id is not null
    group by customer_id, month
),

customer_spine as (
    select
        first_months.customer_id,
        cast(unnest(generate_series(
            first_months.first_month, as_of.as_of_month, interval 1 month
        )) as date) as month
    from (
        select customer_id, min(month) as first_month
        from customer_month_mrr
        group by customer_id
    ) as first_months
    cross join as_of
),

monthly as (
    select
        customer_spine.month,
        customer_spine.customer_id,
        round(coalesce(customer_month_mrr.mrr_usd, 0), 2) as mrr_usd,
        coalesce(customer_month_mrr.subscriptions, 0) as subscriptions
    from customer_spine
    left join customer_month_mrr
        on customer_month_mrr.customer_id = customer_spine.customer_id
        and customer_month_mrr.month = customer_spine.month
),

with_previous as (
    select
        *,
        lag(mrr_usd) over (partition by customer_id order by month) as lagged_mrr_usd
    from monthly
),

final as (
    select
        month,
        customer_id,
        mrr_usd,
        coalesce(lagged_mrr_usd, 0) as previous_mrr_usd,
        round(mrr_usd - coalesce(lagged_mrr_usd, 0), 2) as mrr_change_usd,
        case
            when lagged_mrr_usd is null then 'new'
            when mrr_usd = 0 and lagged_mrr_usd > 0 then 'churn'
            when lagged_mrr_usd = 0 and mrr_usd > 0 then 'reactivation'
            when mrr_usd > lagged_mrr_usd then 'expansion'
            when mrr_usd < lagged_mrr_usd then 'contraction'
            else 'unchanged'
        end as movement,
        subscriptions
    from with_previous
    where mrr_usd > 0 or coalesce(lagged_mrr_usd, 0) > 0
)

select
    month,
    customer_id,
    mrr_usd,
    previous_mrr_usd,
    mrr_change_usd,
    movement,
    subscriptions
from final
order by month, customer_id
