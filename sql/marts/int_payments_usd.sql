-- grain: customer
-- Succeeded payments with their amount in USD, the one place this rule lives:
-- the ledger's usd_equivalent_amount of the payment; else the amount itself for USD; else the
-- amount at the currency's fallback rate (int_currency_rates: the rate implied by the latest
-- ledger payment in that currency; NULL when the ledger has no payment in that currency).
-- usd_source says which: 'ledger', 'usd', 'fallback_rate' (an estimate), NULL (no rate yet).
-- Read by mrr_monthly and the cohort notebook.
with payments as (
    select * from analytics.stg_payments
),

ledger as (
    select * from analytics.int_ledger_by_object
),

currency_rates as (
    select * from analytics.int_currency_rates
),

final as (
    select
        payments.payment_id,
        payments.customer_id,
        payments.subscription_id,
        payments.created_at,
        payments.amount_minor,
        payments.amount,
        payments.currency,
        coalesce(
            ledger.payment_usd_cents / 100.0,
            case when payments.currency = 'USD' then payments.amount end,
            payments.amount * currency_rates.usd_rate
        ) as amount_usd,
        case
            when ledger.payment_usd_cents is not null then 'ledger'
            when payments.currency = 'USD' then 'usd'
            when currency_rates.usd_rate is not null then 'fallback_rate'
        end as usd_source
    from payments
    left join ledger on ledger.object_id = payments.payment_id
    left join currency_rates on currency_rates.currency = payments.currency
    where payments.status = 'succeeded'
)

select * from final
