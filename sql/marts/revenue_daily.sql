-- grain: day by date
-- Revenue per UTC day and currency, in major units of `currency`:
-- gross = succeeded payments (by payment date), refunds = succeeded refunds (by refund date),
-- net = gross - refunds, payments = number of succeeded payments. *_usd from the balance
-- ledger's usd_equivalent_amount (refunds_usd = refund - refund_reversal entries); NULL when the
-- ledger has no entry for that day's payments/refunds.
with payments as (
    select * from analytics.stg_payments
),

refunds as (
    select * from analytics.stg_refunds
),

ledger as (
    select * from analytics.int_ledger_by_object
),

payments_daily as (
    select
        cast(timezone('UTC', payments.created_at) as date) as date,
        payments.currency,
        sum(payments.amount_minor) as gross_minor,
        count(*) as payments,
        sum(ledger.payment_usd_cents) as gross_usd_cents
    from payments
    left join ledger on ledger.object_id = payments.payment_id
    where payments.status = 'succeeded'
    group by all
),

refunds_daily as (
    select
        cast(timezone('UTC', refunds.created_at) as date) as date,
        coalesce(refunds.currency, payments.currency) as currency,
        sum(coalesce(
            refunds.amount_minor,
            case when not refunds.is_partial then payments.amount_minor end,
            0
        )) as refunds_minor,
        sum(
            coalesce(ledger.refund_usd_cents, 0) - coalesce(ledger.refund_reversal_usd_cents, 0)
        ) filter (where ledger.object_id is not null) as refunds_usd_cents
    from refunds
    left join payments on payments.payment_id = refunds.payment_id
    left join ledger on ledger.object_id = refunds.refund_id
    where refunds.status = 'succeeded'
    group by all
),

final as (
    select
        coalesce(payments_daily.date, refunds_daily.date) as date,
        coalesce(payments_daily.currency, refunds_daily.currency) as currency,
        analytics.to_major(coalesce(payments_daily.gross_minor, 0), day_currency.currency)
            as gross,
        analytics.to_major(coalesce(refunds_daily.refunds_minor, 0), day_currency.currency)
            as refunds,
        analytics.to_major(
            coalesce(payments_daily.gross_minor, 0) - coalesce(refunds_daily.refunds_minor, 0),
            day_currency.currency
        ) as net,
        coalesce(payments_daily.payments, 0) as payments,
        payments_daily.gross_usd_cents / 100.0 as gross_usd,
        refunds_daily.refunds_usd_cents / 100.0 as refunds_usd,
        case
            when payments_daily.gross_usd_cents is not null
                or refunds_daily.refunds_usd_cents is not null
                then (
                    coalesce(payments_daily.gross_usd_cents, 0)
                    - coalesce(refunds_daily.refunds_usd_cents, 0)
                ) / 100.0
        end as net_usd
    from payments_daily
    full outer join refunds_daily
        on refunds_daily.date = payments_daily.date
        and refunds_daily.currency = payments_daily.currency
    cross join lateral (
        select coalesce(payments_daily.currency, refunds_daily.currency) as currency
    ) as day_currency
)

select
    date,
    currency,
    gross,
    refunds,
    net,
    payments,
    gross_usd,
    refunds_usd,
    net_usd
from final
order by date, currency
