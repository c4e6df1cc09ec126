-- Append-only history of subscription states, one row each time a sync saw a new state.
with source as (
    select * from analytics.source_subscription_history()
),

final as (
    select
        cast(subscription_id as varchar) as subscription_id,
        cast(observed_at as timestamptz) as observed_at,
        lower(status) as status,
        product_id,
        cast(quantity as bigint) as quantity,
        coalesce(cancel_at_next_billing_date, false) as cancel_at_next_billing_date,
        cast(paused_at as timestamptz) as paused_at,
        cast(cancelled_at as timestamptz) as cancelled_at
    from source
)

select * from final
