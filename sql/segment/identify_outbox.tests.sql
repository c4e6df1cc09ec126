-- Data tests of analytics.identify_outbox.

-- test: identify_outbox_user_id_unique_not_null
-- severity: error
select user_id, count(*) as rows
from analytics.identify_outbox
group by user_id
having count(*) > 1 or user_id is null
