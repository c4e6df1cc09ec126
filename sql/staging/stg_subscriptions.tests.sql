-- Data tests of analytics.stg_subscriptions.

-- test: stg_subscriptions_subscription_id_unique
-- severity: error
select subscription_id, count(*) as rows
from analytics.stg_subscriptions
group by subscription_id
having count(*) > 1 or subscription_id is null

-- test: stg_subscriptions_status_accepted_values
-- severity: warn
select subscription_id, status
from analytics.stg_subscriptions
where status not in (
    'pending', 'active', 'on_hold', 'paused', 'past_due', 'cancelled', 'failed', 'expired'
)

-- test: stg_subscriptions_recurring_amount_non_negative
-- severity: warn
select subscription_id, recurring_amount_minor
from analytics.stg_subscriptions
where recurring_amount_minor < 0
