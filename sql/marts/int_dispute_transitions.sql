-- grain: dispute
-- Disputes whose status became dispute_won or dispute_lost between two syncs (consecutive rows
-- of dodo_raw.dispute_history; none on the first observation).
with history as (
    select * from analytics.stg_dispute_history
),

consecutive as (
    select
        dispute_id,
        observed_at,
        dispute_status,
        dispute_stage,
        lag(dispute_status) over by_time as previous_status,
        row_number() over by_time as observation_number
    from history
    window by_time as (partition by dispute_id order by observed_at)
),

final as (
    select
        case dispute_status
            when 'dispute_won' then 'dispute_won'
            when 'dispute_lost' then 'dispute_lost'
        end as fact_kind,
        dispute_id || ':' || cast(epoch_us(observed_at) as varchar) as fact_key,
        dispute_id,
        observed_at as occurred_at,
        previous_status,
        dispute_status as status,
        dispute_stage
    from consecutive
    where observation_number > 1
      and dispute_status in ('dispute_won', 'dispute_lost')
      and dispute_status is distinct from previous_status
)

select * from final
