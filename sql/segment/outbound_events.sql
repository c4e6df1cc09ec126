-- materialized: view
-- The events that may go out: the product's lifecycle_events and the user's custom_events,
-- minus `[events] skip`, with `[events] rename` applied. A renamed event keeps its event_id, so
-- what was delivered under the old name is not sent again under the new one.
-- analytics.event_rules (event, action, renamed_to) is written by the runner from the config.
with lifecycle_events as (
    select event_id, event, customer_id, occurred_at, properties
    from analytics.lifecycle_events
),

custom_events as (
    select
        cast(event_id as varchar) as event_id,
        cast(event as varchar) as event,
        cast(customer_id as varchar) as customer_id,
        cast(occurred_at as timestamptz) as occurred_at,
        cast(properties as json) as properties
    from analytics.custom_events
),

event_rules as (
    select * from analytics.event_rules
),

events as (
    select * from lifecycle_events
    union all
    select * from custom_events
),

final as (
    select
        events.event_id,
        coalesce(renamed.renamed_to, events.event) as event,
        events.customer_id,
        events.occurred_at,
        events.properties
    from events
    left join event_rules as renamed
        on renamed.action = 'rename' and renamed.event = events.event
    -- an anti join, not `not in`: DuckDB guesses a `not in` keeps a fifth of the rows
    -- (track_outbox.sql)
    anti join event_rules as skipped
        on skipped.action = 'skip' and skipped.event = events.event
)

select event_id, event, customer_id, occurred_at, properties
from final
