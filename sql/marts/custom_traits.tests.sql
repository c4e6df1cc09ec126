-- Data tests of analytics.custom_traits (they run on the user's replacement too).

-- test: custom_traits_customer_id_unique_not_null
-- severity: error
select customer_id, count(*) as rows
from analytics.custom_traits
group by customer_id
having count(*) > 1 or customer_id is null

-- test: custom_traits_unknown_customer
-- severity: warn
-- a trait of a customer the warehouse does not know is never sent (identify_outbox joins on
-- customer_traits): listed here so it is not dropped silently
select customer_id
from analytics.custom_traits
where customer_id not in (
    select customer_id from analytics.stg_customers where customer_id is not null
)
