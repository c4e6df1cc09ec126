-- One row per customer (current state).
-- metadata: the object's metadata as JSON; one key as text is `metadata ->> 'company'`
-- (NULL when absent), e.g. `stg_customers.metadata ->> 'company' as company` in custom_traits.
with source as (
    select * from analytics.source_customers()
),

final as (
    select
        cast(customer_id as varchar) as customer_id,
        business_id,
        cast(created_at as timestamptz) as created_at,
        email,
        name,
        phone_number as phone,
        metadata,
        cast(_synced_at as timestamptz) as synced_at
    from source
)

select * from final
