-- Your own identify traits: one row per customer_id; every other column is sent as a trait of
-- that customer (a null is omitted). Change it and run again: only customers whose traits
-- changed get a new identify (`dodo-segment traits recompute` sends them all).
-- Read the product's models as analytics.<name> (stg_customers, stg_payments,
-- stg_subscriptions, customer_traits, ...). A metadata key is `metadata ->> 'key'`.
with customers as (
    select * from analytics.stg_customers
),

subscriptions as (
    select * from analytics.stg_subscriptions
),

latest_subscription as (
    select customer_id, arg_max(product_name, created_at) as latest_plan
    from subscriptions
    group by customer_id
),

final as (
    select
        customers.customer_id,
        customers.metadata ->> 'signup_source' as signup_source,
        latest_subscription.latest_plan
    from customers
    left join latest_subscription on latest_subscription.customer_id = customers.customer_id
)

select customer_id, signup_source, latest_plan from final
