-- One row per subscription (current state). Intervals lower-cased (day, week, month, year).
-- recurring_amount = recurring_pre_tax_amount in major units of `currency`.
-- API 1.123: has_payment_method; cancelled_by_actor = cancelled_by.actor_type (customer,
-- merchant_user, api_key, dodo_team; NULL when no caller is known, e.g. the system cancelled).
-- tax_id, customer_business_name (blank -> NULL) and billing_country (billing.country, upper-case)
-- are the B2B buyer's details (the `[group]` setting reads them).
-- metadata: the object's metadata as JSON; one key as text is `metadata ->> 'company'`
-- (NULL when absent), e.g. `stg_customers.metadata ->> 'company' as company` in custom_traits.
with source as (
    select * from analytics.source_subscriptions()
),

final as (
    select
        cast(subscription_id as varchar) as subscription_id,
        cast(created_at as timestamptz) as created_at,
        lower(status) as status,
        product_id,
        product_name,
        cast(quantity as bigint) as quantity,
        upper(currency) as currency,
        cast(recurring_pre_tax_amount as bigint) as recurring_amount_minor,
        analytics.to_major(recurring_pre_tax_amount, currency) as recurring_amount,
        tax_inclusive,
        lower(payment_frequency_interval) as payment_frequency_interval,
        cast(payment_frequency_count as bigint) as payment_frequency_count,
        lower(subscription_period_interval) as subscription_period_interval,
        cast(subscription_period_count as bigint) as subscription_period_count,
        cast(next_billing_date as timestamptz) as next_billing_date,
        cast(previous_billing_date as timestamptz) as previous_billing_date,
        cast(cancelled_at as timestamptz) as cancelled_at,
        coalesce(cancel_at_next_billing_date, false) as cancel_at_next_billing_date,
        cast(paused_at as timestamptz) as paused_at,
        coalesce(cast(trial_period_days as bigint), 0) as trial_period_days,
        cast(trial_amount as bigint) as trial_amount_minor,
        on_demand,
        customer__customer_id as customer_id,
        customer__email as customer_email,
        customer__name as customer_name,
        discount_id,
        metadata,
        nullif(trim(tax_id), '') as tax_id,
        nullif(trim(customer_business_name), '') as customer_business_name,
        upper(nullif(trim(try_cast(billing as json) ->> 'country'), '')) as billing_country,
        try_cast(has_payment_method as boolean) as has_payment_method,
        lower(try_cast(cancelled_by as json) ->> 'actor_type') as cancelled_by_actor,
        cast(_synced_at as timestamptz) as synced_at
    from source
)

select * from final
