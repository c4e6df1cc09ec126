-- grain: global
-- The fallback USD rate per currency: the rate implied by the latest ledger payment in that
-- currency (its usd_equivalent_amount over its amount; of two at the same time, the one with
-- the greater object id, so every build picks the same), and that payment (rate_object_id).
-- One row per currency the ledger has a converted payment in; int_payments_usd converts with it
-- the payments the ledger has not converted itself.
with ledger as (
    select * from analytics.int_ledger_by_object
),

final as (
    select
        payment_currency as currency,
        -- one arg_max, so the rate and its payment are the same row's
        arg_max(
            {
                'usd_rate': (payment_usd_cents / 100.0)
                / analytics.to_major(payment_amount_minor, payment_currency),
                'object_id': object_id
            },
            row(payment_entry_at, object_id)
        ) as latest
    from ledger
    where payment_amount_minor > 0 and payment_usd_cents is not null
    group by payment_currency
)

select currency, latest.usd_rate as usd_rate, latest.object_id as rate_object_id
from final
