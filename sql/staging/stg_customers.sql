-- One row per customer (current state).
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
