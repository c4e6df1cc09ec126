-- grain: customer
-- One row per lifecycle event about a subscription: the subscription events and the payments
-- of a subscription (completed, failed, recovered, renewed), with the plan they concern.
-- product_id: the event's own product_id property when it has one (the product at that moment:
-- a plan change names the new one), else the subscription's current product; plan: that
-- product's name (stg_products, else the subscription's product_name). Added to the tracks'
-- properties by track_outbox; event_ids are untouched. Per event, so per customer (customer_id:
-- the event's).
with lifecycle_events as (
    select event_id, customer_id, fact_kind, object_id, properties
    from analytics.lifecycle_events
),

payments as (
    select payment_id, subscription_id, subscription_ids from analytics.stg_payments
),

subscriptions as (
    select subscription_id, product_id, product_name from analytics.stg_subscriptions
),

products as (
    select product_id, name from analytics.stg_products
),

subscription_of_event as (
    select
        lifecycle_events.event_id,
        lifecycle_events.customer_id,
        case
            when lifecycle_events.fact_kind in ('payment_completed', 'payment_failed',
                                                'payment_recovered')
                then coalesce(payments.subscription_id, payments.subscription_ids[1])
            when lifecycle_events.fact_kind = 'subscription_renewed'
                then lifecycle_events.properties ->> 'subscription_id'
            when lifecycle_events.fact_kind like 'subscription_%'
                or lifecycle_events.fact_kind like 'trial_%'
                then lifecycle_events.object_id
        end as subscription_id,
        lifecycle_events.properties ->> 'product_id' as event_product_id
    from lifecycle_events
    left join payments
        on payments.payment_id = lifecycle_events.object_id
        and lifecycle_events.fact_kind in ('payment_completed', 'payment_failed',
                                           'payment_recovered')
),

final as (
    select
        subscription_of_event.event_id,
        subscription_of_event.customer_id,
        subscription_of_event.subscription_id,
        coalesce(subscription_of_event.event_product_id, subscriptions.product_id) as product_id,
        coalesce(products.name, subscriptions.product_name) as plan
    from subscription_of_event
    inner join subscriptions
        on subscriptions.subscription_id = subscription_of_event.subscription_id
    left join products
        on products.product_id
            = coalesce(subscription_of_event.event_product_id, subscriptions.product_id)
)

select event_id, customer_id, subscription_id, product_id, plan
from final
