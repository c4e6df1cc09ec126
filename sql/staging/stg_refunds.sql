-- One row per refund (current state). amount/currency may be NULL when the API omits them.
with source as (
    select * from analytics.source_refunds()
),

final as (
    select
        cast(refund_id as varchar) as refund_id,
        payment_id,
        business_id,
        cast(created_at as timestamptz) as created_at,
        lower(status) as status,
        coalesce(is_partial, false) as is_partial,
        cast(amount as bigint) as amount_minor,
        upper(currency) as currency,
        reason,
        cast(_synced_at as timestamptz) as synced_at
    from source
)

select * from final
