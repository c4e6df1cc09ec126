-- grain: customer
-- One row per customer of dodo_raw.customers: the traits sent with Segment identify.
-- See docs/models.md for every column. Money: `total_spent` / `total_refunded` are in major
-- units of `currency` (the customer's only payment currency), or in USD from the balance ledger
-- when the customer paid in several currencies (then currency = 'USD').
with customers as (
    select * from analytics.stg_customers
),

payments as (
    select * from analytics.stg_payments
),

refunds as (
    select * from analytics.stg_refunds
),

subscriptions as (
    select * from analytics.int_subscriptions
),

ledger as (
    select * from analytics.int_ledger_by_object
),

succeeded_payments as (
    select * from payments where status = 'succeeded'
),

succeeded_refunds as (
    select
        succeeded_payments.customer_id,
        coalesce(refunds.currency, succeeded_payments.currency) as currency,
        coalesce(
            refunds.amount_minor,
            case when not refunds.is_partial then succeeded_payments.amount_minor end,
            0
        ) as amount_minor
    from refunds
    inner join succeeded_payments
        on succeeded_payments.payment_id = refunds.payment_id
    where refunds.status = 'succeeded'
),

payment_stats as (
    select
        customer_id,
        min(created_at) as customer_since,
        max(created_at) as last_payment_date,
        arg_max(payment_method, (created_at, payment_id)) as payment_method,
        count(*) as payments_count
    from succeeded_payments
    group by customer_id
),

money_by_currency as (
    select
        customer_id,
        currency,
        sum(paid_minor) as paid_minor,
        sum(refunded_minor) as refunded_minor
    from (
        select customer_id, currency, amount_minor as paid_minor, 0 as refunded_minor
        from succeeded_payments
        union all
        select customer_id, currency, 0, amount_minor
        from succeeded_refunds
    )
    group by customer_id, currency
),

money_totals as (
    select
        customer_id,
        count(*) as currencies,
        min(currency) as only_currency,
        sum(paid_minor) as paid_minor,
        sum(refunded_minor) as refunded_minor,
        to_json(map_from_entries(list(
            {'k': currency, 'v': analytics.to_major(paid_minor - refunded_minor, currency)}
            order by currency
        ) filter (where currency is not null)) -- a map key cannot be NULL (API item without currency)
        ) as total_spent_by_currency
    from money_by_currency
    group by customer_id
),

-- ledger rows reach a customer through their payment, or through a refund of their payment
ledger_by_customer as (
    select
        payments.customer_id,
        sum(coalesce(ledger.payment_usd_cents, 0)) as payment_usd_cents,
        sum(coalesce(ledger.refund_usd_cents, 0)) as refund_usd_cents,
        sum(coalesce(ledger.refund_reversal_usd_cents, 0)) as refund_reversal_usd_cents
    from (
        select ledger.*, ledger.object_id as payment_id from ledger
        union all by name
        select ledger.*, refunds.payment_id
        from ledger
        inner join refunds on refunds.refund_id = ledger.object_id
    ) as ledger
    inner join payments
        on payments.payment_id = ledger.payment_id
    group by payments.customer_id
),

-- USD per unit of each currency, implied by the customer's latest ledger payment in it
ledger_rates as (
    select
        payments.customer_id,
        ledger.payment_currency as currency,
        arg_max(
            (ledger.payment_usd_cents / 100.0)
            / analytics.to_major(ledger.payment_amount_minor, ledger.payment_currency),
            ledger.payment_entry_at
        ) as usd_rate
    from ledger
    inner join payments
        on payments.payment_id = ledger.object_id
    where ledger.payment_amount_minor > 0
    group by payments.customer_id, ledger.payment_currency
),

active_mrr_by_currency as (
    select
        subscriptions.customer_id,
        subscriptions.currency,
        analytics.to_major(sum(subscriptions.monthly_amount_minor), subscriptions.currency)
            as mrr,
        case
            when subscriptions.currency = 'USD' then 1.0
            else any_value(ledger_rates.usd_rate)
        end as usd_rate
    from subscriptions
    left join ledger_rates
        on ledger_rates.customer_id = subscriptions.customer_id
        and ledger_rates.currency = subscriptions.currency
    -- a customer in a grace period (past_due) is still served: counted, as ChartMogul does
    where subscriptions.status in ('active', 'past_due')
    group by subscriptions.customer_id, subscriptions.currency
),

active_mrr as (
    select
        customer_id,
        case
            when count(*) = 1 then any_value(mrr)
            -- NULL (trait omitted) when a currency has no ledger rate to convert with
            else round(sum(mrr * usd_rate), 2)
        end as mrr,
        case when count(*) = 1 then any_value(currency) else 'USD' end as mrr_currency
    from active_mrr_by_currency
    group by customer_id
),

subscription_stats as (
    select
        customer_id,
        count(*) filter (where status = 'active') as active_subscriptions,
        arg_max(status, (created_at, subscription_id)) as subscription_status,
        bool_or(has_started) and not bool_or(is_live) as churned,
        bool_or(status = 'past_due') as past_due
    from subscriptions
    group by customer_id
),

final as (
    select
        customers.customer_id,
        customers.email,
        customers.name,
        customers.phone,
        customers.created_at,
        payment_stats.customer_since,
        payment_stats.last_payment_date,
        payment_stats.payment_method,
        coalesce(payment_stats.payments_count, 0) as payments_count,
        case
            when money_totals.customer_id is null then 0.0
            when money_totals.currencies = 1 then analytics.to_major(
                money_totals.paid_minor - money_totals.refunded_minor, money_totals.only_currency
            )
            else round(
                (
                    ledger_by_customer.payment_usd_cents
                    - ledger_by_customer.refund_usd_cents
                    + ledger_by_customer.refund_reversal_usd_cents
                ) / 100.0,
                2
            )
        end as total_spent,
        case
            when money_totals.currencies = 1 then money_totals.only_currency
            when money_totals.currencies > 1 then 'USD'
        end as currency,
        coalesce(money_totals.total_spent_by_currency, json('{}')) as total_spent_by_currency,
        case
            when money_totals.customer_id is null then 0.0
            when money_totals.currencies = 1 then analytics.to_major(
                money_totals.refunded_minor, money_totals.only_currency
            )
            else round(
                (
                    ledger_by_customer.refund_usd_cents
                    - ledger_by_customer.refund_reversal_usd_cents
                ) / 100.0,
                2
            )
        end as total_refunded,
        round(
            (
                ledger_by_customer.payment_usd_cents
                - ledger_by_customer.refund_usd_cents
                + ledger_by_customer.refund_reversal_usd_cents
            ) / 100.0,
            2
        ) as total_spent_usd,
        coalesce(subscription_stats.active_subscriptions, 0) as active_subscriptions,
        subscription_stats.subscription_status,
        coalesce(active_mrr.mrr, 0.0) as mrr,
        active_mrr.mrr_currency,
        coalesce(subscription_stats.churned, false) as churned,
        coalesce(subscription_stats.past_due, false) as past_due
    from customers
    left join payment_stats on payment_stats.customer_id = customers.customer_id
    left join money_totals on money_totals.customer_id = customers.customer_id
    left join ledger_by_customer on ledger_by_customer.customer_id = customers.customer_id
    left join subscription_stats on subscription_stats.customer_id = customers.customer_id
    left join active_mrr on active_mrr.customer_id = customers.customer_id
)

select
    customer_id,
    email,
    name,
    phone,
    created_at,
    customer_since,
    last_payment_date,
    payment_method,
    payments_count,
    total_spent,
    currency,
    total_spent_by_currency,
    total_refunded,
    total_spent_usd,
    active_subscriptions,
    subscription_status,
    mrr,
    mrr_currency,
    churned,
    past_due
from final
order by customer_id
