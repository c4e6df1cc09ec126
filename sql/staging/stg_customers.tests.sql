-- Data tests of analytics.stg_customers.

-- test: stg_customers_customer_id_unique
-- severity: error
select customer_id, count(*) as rows
from analytics.stg_customers
group by customer_id
having count(*) > 1 or customer_id is null
