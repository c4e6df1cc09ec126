-- grain: ledger_object
-- Ledger USD equivalents (US cents, absolute values) summed per referenced object (payment or
-- refund id) and event type. Fees are ignored by every consumer; tax_amount_minor (the
-- payment's tax entries, in its currency's minor units) gives int_service_periods the pre-tax
-- amount of a subscription charge.
with ledger as (
    select * from analytics.stg_balance_ledger
),

final as (
    select
        reference_object_id as object_id,
        sum(abs(usd_amount_cents)) filter (where event_type = 'payment') as payment_usd_cents,
        sum(abs(usd_amount_cents)) filter (where event_type = 'refund') as refund_usd_cents,
        sum(abs(usd_amount_cents)) filter (
            where event_type = 'refund_reversal'
        ) as refund_reversal_usd_cents,
        -- the latest payment entry's amount pair gives the rate implied for its currency
        arg_max(abs(amount_minor), created_at) filter (
            where event_type = 'payment'
        ) as payment_amount_minor,
        arg_max(currency, created_at) filter (where event_type = 'payment') as payment_currency,
        max(created_at) filter (where event_type = 'payment') as payment_entry_at,
        sum(abs(amount_minor)) filter (where event_type = 'tax') as tax_amount_minor
    from ledger
    where reference_object_id is not null
      and event_type in ('payment', 'refund', 'refund_reversal', 'tax')
    group by reference_object_id
)

select * from final
