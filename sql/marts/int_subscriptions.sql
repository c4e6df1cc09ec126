-- grain: customer
-- One row per subscription with derived facts: whether it started, its trial window and
-- conversion, its first succeeded payment and its recurring amount normalised to a month.
-- has_started: a succeeded payment, or status active/on_hold/paused/past_due now, or an earlier
-- sync saw it in one of those. monthly_amount_minor: recurring_pre_tax_amount / (months per
-- interval x payment_frequency_count), in minor units of `currency` (DOUBLE, unrounded).
-- trial_converted: a succeeded non-zero payment at or after trial_end_date (1 hour tolerance).
-- A payment belongs to every subscription of its `subscription_ids` (else `subscription_id`):
-- analytics.stg_payment_subscriptions. API 1.123: has_payment_method, cancelled_by_actor.
with subscriptions as (
    select * from analytics.stg_subscriptions
),

payments as (
    select * from analytics.stg_payment_subscriptions
),

history as (
    select * from analytics.stg_subscription_history
),

products as (
    select * from analytics.stg_products
),

succeeded_payments as (
    select
        subscription_id,
        count(*) as succeeded_payments,
        min(created_at) as first_paid_at
    from payments
    where status = 'succeeded'
    group by subscription_id
),

seen_live as (
    select distinct subscription_id
    from history
    where status in ('active', 'on_hold', 'paused', 'past_due')
),

trial_windows as (
    select
        subscription_id,
        created_at as trial_start_date,
        created_at + to_days(cast(trial_period_days as integer)) as trial_end_date
    from subscriptions
    where trial_period_days > 0
),

trial_conversions as (
    select distinct trial_windows.subscription_id
    from trial_windows
    inner join payments
        on payments.subscription_id = trial_windows.subscription_id
    where payments.status = 'succeeded'
      and payments.amount_minor > 0
      and payments.created_at >= trial_windows.trial_end_date - interval 1 hour
),

final as (
    select
        subscriptions.subscription_id,
        subscriptions.customer_id,
        subscriptions.customer_email,
        subscriptions.created_at,
        subscriptions.status,
        subscriptions.product_id,
        coalesce(subscriptions.product_name, products.name) as product_name,
        subscriptions.quantity,
        subscriptions.currency,
        subscriptions.recurring_amount_minor,
        subscriptions.recurring_amount,
        subscriptions.payment_frequency_interval,
        subscriptions.payment_frequency_count,
        subscriptions.next_billing_date,
        subscriptions.cancelled_at,
        subscriptions.cancel_at_next_billing_date,
        subscriptions.paused_at,
        subscriptions.trial_period_days,
        subscriptions.has_payment_method,
        subscriptions.cancelled_by_actor,
        (
            succeeded_payments.subscription_id is not null
            or subscriptions.status in ('active', 'on_hold', 'paused', 'past_due')
            or seen_live.subscription_id is not null
        ) as has_started,
        subscriptions.status in ('active', 'on_hold', 'paused', 'past_due') as is_live,
        coalesce(succeeded_payments.succeeded_payments, 0) as succeeded_payments,
        succeeded_payments.first_paid_at,
        trial_windows.trial_start_date,
        trial_windows.trial_end_date,
        trial_conversions.subscription_id is not null as trial_converted,
        subscriptions.recurring_amount_minor / (
            analytics.months_per_interval(subscriptions.payment_frequency_interval)
            * greatest(coalesce(subscriptions.payment_frequency_count, 1), 1)
        ) as monthly_amount_minor
    from subscriptions
    left join succeeded_payments
        on succeeded_payments.subscription_id = subscriptions.subscription_id
    left join seen_live
        on seen_live.subscription_id = subscriptions.subscription_id
    left join trial_windows
        on trial_windows.subscription_id = subscriptions.subscription_id
    left join trial_conversions
        on trial_conversions.subscription_id = subscriptions.subscription_id
    left join products
        on products.product_id = subscriptions.product_id
)

select * from final
