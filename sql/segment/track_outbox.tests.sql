-- Data tests of analytics.track_outbox (what the emitter will send).

-- test: track_outbox_event_id_unique_not_null
-- severity: error
select event_id, count(*) as rows
from analytics.track_outbox
group by event_id
having count(*) > 1 or event_id is null

-- test: track_outbox_message_id_length
-- severity: error
select event_id from analytics.track_outbox where length(event_id) > 100

-- test: track_outbox_user_id_not_null
-- severity: error
select event_id from analytics.track_outbox where user_id is null or event is null
