-- Data tests of analytics.custom_events (they run on the user's replacement too).

-- test: custom_events_event_id_unique_not_null
-- severity: error
select event_id, count(*) as rows
from analytics.custom_events
group by event_id
having count(*) > 1 or event_id is null

-- test: custom_events_event_id_length
-- severity: error
select event_id from analytics.custom_events where length(event_id) > 100

-- test: custom_events_event_not_null
-- severity: error
select event_id from analytics.custom_events where event is null or event = ''

-- test: custom_events_unknown_customer
-- severity: warn
-- quarantine: event_id
select event_id, event, customer_id
from analytics.custom_events
where customer_id is null
   or customer_id not in (
       select customer_id from analytics.stg_customers where customer_id is not null
   )

-- test: custom_events_occurred_at_not_null
-- severity: warn
-- quarantine: event_id
select event_id, event
from analytics.custom_events
where occurred_at is null
