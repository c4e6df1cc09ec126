-- Data tests of analytics.stg_payments.

-- test: stg_payments_payment_id_unique
-- severity: error
select payment_id, count(*) as rows
from analytics.stg_payments
group by payment_id
having count(*) > 1 or payment_id is null

-- test: stg_payments_amount_non_negative
-- severity: warn
select payment_id, amount_minor from analytics.stg_payments where amount_minor < 0

-- test: stg_payments_status_accepted_values
-- severity: warn
-- a new API status is data, not an error: listed only
select payment_id, status
from analytics.stg_payments
where status not in (
    'succeeded', 'failed', 'cancelled', 'processing', 'requires_customer_action',
    'requires_merchant_action', 'requires_payment_method', 'requires_confirmation',
    'requires_capture', 'partially_captured', 'partially_captured_and_capturable'
)
