-- grain: subscription
-- Transitions between consecutive rows of dodo_raw.subscription_history (none for a first row:
-- there is no earlier state). One history row can yield several transitions (a status change
-- and a plan change). fact_key = subscription_id:epoch_us(observed_at), immutable.
-- occurred_at: paused_at for a pause when the API gives it, else when the sync first saw it.
with history as (
    select * from analytics.stg_subscription_history
),

consecutive as (
    select
        subscription_id,
        observed_at,
        status,
        product_id,
        quantity,
        cancel_at_next_billing_date,
        paused_at,
        lag(status) over by_time as previous_status,
        lag(product_id) over by_time as previous_product_id,
        lag(quantity) over by_time as previous_quantity,
        lag(cancel_at_next_billing_date) over by_time as previous_cancel_at_next_billing_date,
        row_number() over by_time as observation_number
    from history
    window by_time as (partition by subscription_id order by observed_at)
),

status_changes as (
    select
        *,
        case
            when status = 'on_hold' then 'subscription_on_hold'
            when status = 'paused' then 'subscription_paused'
            when status = 'past_due' then 'subscription_past_due'
            when status = 'active' and previous_status in ('on_hold', 'paused', 'past_due')
                then 'subscription_resumed'
            when status = 'expired' then 'subscription_expired'
            when status = 'failed' then 'subscription_failed'
        end as fact_kind
    from consecutive
    where observation_number > 1
      and status is distinct from previous_status
),

plan_changes as (
    select *, 'subscription_plan_changed' as fact_kind
    from consecutive
    where observation_number > 1
      and (
          product_id is distinct from previous_product_id
          or quantity is distinct from previous_quantity
      )
),

cancellations_scheduled as (
    select *, 'subscription_cancellation_scheduled' as fact_kind
    from consecutive
    where observation_number > 1
      and cancel_at_next_billing_date
      and not coalesce(previous_cancel_at_next_billing_date, false)
),

transitions as (
    select * from status_changes where fact_kind is not null
    union all by name
    select * from plan_changes
    union all by name
    select * from cancellations_scheduled
),

final as (
    select
        fact_kind,
        subscription_id || ':' || cast(epoch_us(observed_at) as varchar) as fact_key,
        subscription_id,
        observed_at,
        case
            when fact_kind = 'subscription_paused' then coalesce(paused_at, observed_at)
            else observed_at
        end as occurred_at,
        previous_status,
        status,
        previous_product_id,
        product_id,
        previous_quantity,
        quantity
    from transitions
)

select * from final
