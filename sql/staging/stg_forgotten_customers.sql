-- Customers erased on request (`dodo-segment forget`): the outboxes leave them out.
with source as (
    select * from analytics.source_forgotten_customers()
),

final as (
    select
        cast(customer_id as varchar) as customer_id,
        min(cast(forgotten_at as timestamptz)) as forgotten_at
    from source
    where customer_id is not null
    group by 1
)

select * from final
