-- One row per dispute (current state). The API's string `amount` (minor units) cast to BIGINT.
with source as (
    select * from analytics.source_disputes()
),

final as (
    select
        cast(dispute_id as varchar) as dispute_id,
        payment_id,
        business_id,
        cast(created_at as timestamptz) as created_at,
        try_cast(trim(amount) as bigint) as amount_minor,
        analytics.to_major(try_cast(trim(amount) as bigint), currency) as amount,
        upper(currency) as currency,
        lower(dispute_stage) as dispute_stage,
        lower(dispute_status) as dispute_status,
        payment_provider,
        is_resolved_by_rdr,
        cast(_synced_at as timestamptz) as synced_at
    from source
)

select * from final
