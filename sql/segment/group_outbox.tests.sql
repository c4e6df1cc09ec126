-- Data tests of analytics.group_outbox.

-- test: group_outbox_group_id_unique_not_null
-- severity: error
select group_id, count(*) as rows
from analytics.group_outbox
group by group_id
having count(*) > 1 or group_id is null or bool_or(user_id is null)
