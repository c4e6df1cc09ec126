-- Append-only history of dispute states, one row each time a sync saw a new state.
with source as (
    select * from analytics.source_dispute_history()
),

final as (
    select
        cast(dispute_id as varchar) as dispute_id,
        cast(observed_at as timestamptz) as observed_at,
        lower(dispute_status) as dispute_status,
        lower(dispute_stage) as dispute_stage
    from source
)

select * from final
