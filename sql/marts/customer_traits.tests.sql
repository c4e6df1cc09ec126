-- Data tests of analytics.customer_traits.

-- test: customer_traits_customer_id_not_null
-- severity: error
select * from analytics.customer_traits where customer_id is null

-- test: customer_traits_customer_id_unique
-- severity: error
select customer_id, count(*) as rows
from analytics.customer_traits
group by customer_id
having count(*) > 1

-- test: customer_traits_subscription_status_accepted_values
-- severity: warn
-- a new API status is data, not an error: listed only
select customer_id, subscription_status
from analytics.customer_traits
where subscription_status not in (
    'pending', 'active', 'on_hold', 'paused', 'past_due', 'cancelled', 'failed', 'expired'
)

-- test: customer_traits_counts_non_negative
-- severity: error
select customer_id, payments_count, active_subscriptions, total_refunded
from analytics.customer_traits
where payments_count < 0 or active_subscriptions < 0 or total_refunded < 0 or mrr < 0
