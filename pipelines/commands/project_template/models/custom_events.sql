-- Your own track events, sent once each like the product's (same ledger, history policy and
-- data tests). Columns: event_id, event, customer_id, occurred_at, properties.
-- event_id must be stable across runs: hash a kind of your own and immutable keys with
-- analytics.event_id('<kind>', <keys>), never the event name or anything that changes.
with payments as (
    select * from analytics.stg_payments
),

final as (
    select
        analytics.event_id('high_value_payment', payment_id) as event_id,
        'High Value Payment' as event,
        customer_id,
        created_at as occurred_at,
        json_object('payment_id', payment_id, 'amount', amount, 'currency', currency)
            as properties
    from payments
    where status = 'succeeded' and amount_minor >= 10000
)

select event_id, event, customer_id, occurred_at, properties from final
