-- Identify calls for the emitter: one row per customer, traits named per Segment's identify
-- conventions (createdAt ISO-8601 UTC; dates as ISO strings), null traits omitted.
-- traits_hash = md5 of the canonical traits JSON (fixed key order), so the emitter sends an
-- identify only when it differs from what Segment last received.
with customer_traits as (
    select * from analytics.customer_traits
),

quarantined_rows as (
    select * from analytics.quarantined_rows
),

traits as (
    select
        customer_id as user_id,
        json_strip_nulls(json_object(
            'email', email,
            'name', name,
            'phone', phone,
            'createdAt', analytics.iso_utc(created_at),
            'customer_since', analytics.iso_utc(customer_since),
            'last_payment_date', analytics.iso_utc(last_payment_date),
            'payment_method', payment_method,
            'payments_count', payments_count,
            'total_spent', total_spent,
            'currency', currency,
            'total_spent_by_currency', total_spent_by_currency,
            'total_refunded', total_refunded,
            'total_spent_usd', total_spent_usd,
            'active_subscriptions', active_subscriptions,
            'subscription_status', subscription_status,
            'mrr', mrr,
            'mrr_currency', mrr_currency,
            'churned', churned,
            'past_due', past_due
        )) as traits
    from customer_traits
    where customer_id not in (select key from quarantined_rows where key_kind = 'user_id')
),

final as (
    select user_id, traits, md5(cast(traits as varchar)) as traits_hash
    from traits
)

select user_id, traits, traits_hash
from final
order by user_id
