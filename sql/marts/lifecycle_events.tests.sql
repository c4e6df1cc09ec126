-- Data tests of analytics.lifecycle_events (format: pipelines/data_tests.py).

-- test: lifecycle_events_event_id_not_null
-- severity: error
select * from analytics.lifecycle_events where event_id is null

-- test: lifecycle_events_event_id_unique
-- severity: error
select event_id, count(*) as rows
from analytics.lifecycle_events
group by event_id
having count(*) > 1

-- test: lifecycle_events_event_id_length
-- severity: error
select event_id from analytics.lifecycle_events where length(event_id) > 100

-- test: lifecycle_events_event_accepted_values
-- severity: error
select event_id, event
from analytics.lifecycle_events
where event is null or event not in (select event from analytics.event_catalog)

-- test: lifecycle_events_unknown_customer
-- severity: warn
-- quarantine: event_id
-- the refunded/disputed payment or the subscription is missing, or its customer is not in
-- dodo_raw.customers: listed and set aside rather than dropped silently
select event_id, event, customer_id, object_id
from analytics.lifecycle_events
where customer_id is null
   or customer_id not in (
       select customer_id from analytics.stg_customers where customer_id is not null
   )

-- test: lifecycle_events_occurred_at_not_null
-- severity: warn
-- quarantine: event_id
select event_id, event, object_id
from analytics.lifecycle_events
where occurred_at is null

-- test: lifecycle_events_amount_non_negative
-- severity: warn
-- quarantine: event_id
select event_id, event, properties
from analytics.lifecycle_events
where coalesce(cast(properties ->> 'amount' as double), 0) < 0
   or coalesce(cast(properties ->> 'total' as double), 0) < 0
