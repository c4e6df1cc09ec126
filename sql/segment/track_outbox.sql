-- materialized: view
-- Track calls for the emitter: lifecycle events whose customer is known, minus rows quarantined
-- by warn data tests (analytics.quarantined_rows, written by the runner during this build).
-- event_id = Segment messageId; properties ready to send (no nulls, JSON numbers).
-- A view: it only filters lifecycle_events, and copying 1M+ JSON rows again would cost seconds.
-- lifecycle_events here: the product's and the user's custom events after [events] skip/rename.
with lifecycle_events as (
    select * from analytics.outbound_events
),

customers as (
    select * from analytics.stg_customers
),

quarantined_rows as (
    select * from analytics.quarantined_rows
),

forgotten_customers as (
    select * from analytics.stg_forgotten_customers
),

final as (
    select
        lifecycle_events.event_id,
        lifecycle_events.customer_id as user_id,
        lifecycle_events.event,
        lifecycle_events.occurred_at,
        lifecycle_events.properties
    from lifecycle_events
    where lifecycle_events.customer_id in (select customer_id from customers)
      and lifecycle_events.occurred_at is not null
      and lifecycle_events.event_id not in (
          select key from quarantined_rows where key_kind = 'event_id'
      )
      and lifecycle_events.customer_id not in (
          select key from quarantined_rows where key_kind = 'user_id'
      )
      and lifecycle_events.customer_id not in (select customer_id from forgotten_customers)
)

select event_id, user_id, event, occurred_at, properties
from final
