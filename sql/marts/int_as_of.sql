-- grain: global
-- One row: `as_of`, the time the warehouse's knowledge refers to (latest `_synced_at` or history
-- observation in the raw data; now() on an empty warehouse). Used instead of now() so that
-- rebuilding from the same raw data gives the same results ("trial has ended", current month).
with payments as (
    select synced_at from analytics.stg_payments
),

subscriptions as (
    select synced_at from analytics.stg_subscriptions
),

subscription_history as (
    select observed_at from analytics.stg_subscription_history
),

observations as (
    select max(synced_at) as seen_at from payments
    union all
    select max(synced_at) from subscriptions
    union all
    select max(observed_at) from subscription_history
),

final as (
    select coalesce(max(seen_at), now()) as as_of
    from observations
)

select as_of from final
