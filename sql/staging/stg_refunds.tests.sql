-- Data tests of analytics.stg_refunds.

-- test: stg_refunds_refund_id_unique
-- severity: error
select refund_id, count(*) as rows
from analytics.stg_refunds
group by refund_id
having count(*) > 1 or refund_id is null

-- test: stg_refunds_amount_non_negative
-- severity: warn
select refund_id, amount_minor from analytics.stg_refunds where amount_minor < 0
