-- Data tests of analytics.mrr_monthly.

-- test: mrr_monthly_month_customer_unique
-- severity: error
select month, customer_id, count(*) as rows
from analytics.mrr_monthly
group by month, customer_id
having count(*) > 1 or customer_id is null

-- test: mrr_monthly_movement_accepted_values
-- severity: error
select month, customer_id, movement
from analytics.mrr_monthly
where movement is null
   or movement not in ('new', 'churn', 'reactivation', 'expansion', 'contraction', 'unchanged')

-- test: mrr_monthly_mrr_non_negative
-- severity: error
select month, customer_id, mrr_usd from analytics.mrr_monthly where mrr_usd < 0
