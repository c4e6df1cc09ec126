-- materialized: table
-- grain: customer
-- One row per (payment, subscription it charges): the payment-to-subscription bridge of API 1.123.
-- A payment belongs to every subscription in `subscription_ids`; where that list is absent or
-- empty (rows older than the field), to `subscription_id`. One-time payments have no row.
-- The service period is the `service_periods` entry of that subscription (matched by id, not
-- by position: a usage-only renewal has no entry for its subscription), NULL when there is none.
-- Columns: payment_id, subscription_id, subscription_position (1-based, the API's stable order),
-- subscriptions_in_payment, customer_id, created_at, status, charge_type, retry_attempt,
-- includes_usage, is_multi_subscription, amount_minor (the whole payment's), currency,
-- period_start, period_end, proration_factor (DECIMAL(18, 6); '1' = a full period),
-- has_service_period, service_periods_known (the row has the `service_periods` field at all:
-- false on rows older than API 1.123).
with payments as (
    select * from analytics.stg_payments
),

attributed as (
    select
        payment_id,
        case
            when len(coalesce(subscription_ids, [])) > 0 then subscription_ids
            when subscription_id is not null then [subscription_id]
        end as subscription_list
    from payments
),

bridge as (
    select
        payment_id,
        unnest(subscription_list) as subscription_id,
        unnest(range(1, len(subscription_list) + 1)) as subscription_position,
        len(subscription_list) as subscriptions_in_payment
    from attributed
    where subscription_list is not null
),

periods as (
    select
        payment_id,
        period.subscription_id,
        try_cast(period.starts_at as timestamptz) as period_start,
        try_cast(period.ends_at as timestamptz) as period_end,
        try_cast(period.proration_factor as decimal(18, 6)) as proration_factor
    from (
        select
            payment_id,
            unnest(try_cast(json_transform(
                service_periods,
                '[{"subscription_id": "VARCHAR", "starts_at": "VARCHAR", "ends_at": "VARCHAR",
                   "proration_factor": "VARCHAR"}]'
            ) as struct(
                subscription_id varchar, starts_at varchar, ends_at varchar,
                proration_factor varchar
            )[])) as period
        from payments
        where service_periods is not null and json_array_length(service_periods) > 0
    )
    -- one period per (payment, subscription): the API sends one; keep the first if it repeats
    qualify row_number() over (partition by payment_id, period.subscription_id) = 1
),

final as (
    select
        bridge.payment_id,
        bridge.subscription_id,
        bridge.subscription_position,
        bridge.subscriptions_in_payment,
        payments.customer_id,
        payments.created_at,
        payments.status,
        payments.charge_type,
        payments.retry_attempt,
        payments.includes_usage,
        payments.is_multi_subscription,
        payments.amount_minor,
        payments.currency,
        periods.period_start,
        periods.period_end,
        periods.proration_factor,
        periods.payment_id is not null as has_service_period,
        payments.service_periods is not null as service_periods_known
    from bridge
    inner join payments on payments.payment_id = bridge.payment_id
    left join periods
        on periods.payment_id = bridge.payment_id
        and periods.subscription_id = bridge.subscription_id
    where bridge.subscription_id is not null
)

select * from final
