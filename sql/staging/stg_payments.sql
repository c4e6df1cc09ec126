-- One row per payment (current state). Money in major units of `currency`; enums lower-cased.
-- Columns: payment_id, created_at, status, amount_minor, amount, currency, customer_id,
-- customer_email, customer_name, customer_phone, subscription_id, payment_method,
-- payment_method_type, refund_status, dispute_status, charge_type (NULL when the API does not
-- send it), brand_id, payment_provider, invoice_id, metadata, synced_at.
-- metadata: the object's metadata as JSON; one key as text is `metadata ->> 'company'`
-- (NULL when absent), e.g. `stg_customers.metadata ->> 'company' as company` in custom_traits.
with source as (
    select * from analytics.source_payments()
),

final as (
    select
        cast(payment_id as varchar) as payment_id,
        cast(created_at as timestamptz) as created_at,
        lower(status) as status,
        cast(total_amount as bigint) as amount_minor,
        analytics.to_major(total_amount, currency) as amount,
        upper(currency) as currency,
        customer__customer_id as customer_id,
        customer__email as customer_email,
        customer__name as customer_name,
        customer__phone_number as customer_phone,
        subscription_id,
        payment_method,
        payment_method_type,
        lower(refund_status) as refund_status,
        lower(dispute_status) as dispute_status,
        lower(charge_type) as charge_type,
        brand_id,
        payment_provider,
        invoice_id,
        metadata,
        cast(_synced_at as timestamptz) as synced_at
    from source
)

select * from final
