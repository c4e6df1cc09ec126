-- One row per succeeded, non-zero subscription payment: the service period it pays for,
-- [paid_at, paid_at + payment_frequency_count x payment_frequency_interval), and its USD amount
-- per month of that period (Day = 1/30.4375, Week = 12/52, Month = 1, Year = 12 months).
-- USD amount: analytics.int_payments_usd (ledger USD equivalent, else the latest ledger rate).
-- Read by mrr_monthly and int_results_valid_until (a period ending moves the current MRR).
with payments as (
    select * from analytics.int_payments_usd
),

subscriptions as (
    select * from analytics.int_subscriptions
),

final as (
    select
        payments.payment_id,
        payments.customer_id,
        payments.subscription_id,
        payments.created_at as period_start,
        payments.created_at + analytics.billing_interval(
            subscriptions.payment_frequency_interval,
            greatest(coalesce(subscriptions.payment_frequency_count, 1), 1)
        ) as period_end,
        payments.amount_usd / (
            analytics.months_per_interval(subscriptions.payment_frequency_interval)
            * greatest(coalesce(subscriptions.payment_frequency_count, 1), 1)
        ) as monthly_usd
    from payments
    inner join subscriptions on subscriptions.subscription_id = payments.subscription_id
    where payments.amount_minor > 0
      and subscriptions.payment_frequency_interval in ('day', 'week', 'month', 'year')
)

select
    payment_id,
    customer_id,
    subscription_id,
    period_start,
    period_end,
    monthly_usd
from final
