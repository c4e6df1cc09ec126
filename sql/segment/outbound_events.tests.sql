-- Data tests of analytics.outbound_events (product and custom events, after skip/rename).

-- test: custom_events_event_id_not_a_product_event
-- severity: error
-- a custom event must hash its own kind (analytics.event_id('<kind>', keys)): an event_id of the
-- product's events would be taken for that event by the ledger
select event_id, event
from analytics.custom_events
where event_id in (select event_id from analytics.lifecycle_events)
