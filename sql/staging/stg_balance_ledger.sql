-- One row per balance ledger entry. amount in major units of `currency`; usd_equivalent_amount
-- is US cents, converted to dollars as usd_amount.
with source as (
    select * from analytics.source_balance_ledger()
),

final as (
    select
        cast(id as varchar) as ledger_entry_id,
        business_id,
        cast(created_at as timestamptz) as created_at,
        lower(event_type) as event_type,
        cast(amount as bigint) as amount_minor,
        analytics.to_major(amount, currency) as amount,
        upper(currency) as currency,
        cast(usd_equivalent_amount as bigint) as usd_amount_cents,
        analytics.to_major(usd_equivalent_amount, 'USD') as usd_amount,
        is_credit,
        reference_object_id,
        description,
        payout_id,
        cast(_synced_at as timestamptz) as synced_at
    from source
)

select * from final
