-- One row per product (current state). price in major units of `currency`.
with source as (
    select * from analytics.source_products()
),

final as (
    select
        cast(product_id as varchar) as product_id,
        business_id,
        cast(created_at as timestamptz) as created_at,
        cast(updated_at as timestamptz) as updated_at,
        name,
        description,
        coalesce(is_recurring, false) as is_recurring,
        cast(price as bigint) as price_minor,
        analytics.to_major(price, currency) as price,
        upper(currency) as currency,
        tax_category,
        tax_inclusive,
        coalesce(is_archived, false) as is_archived,
        metadata,
        cast(_synced_at as timestamptz) as synced_at
    from source
)

select * from final
