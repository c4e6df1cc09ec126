-- materialized: view
-- Track calls for the emitter: lifecycle events whose customer is known, minus rows quarantined
-- by warn data tests (analytics.quarantined_rows, written by the runner during this build).
-- event_id = Segment messageId; properties ready to send (no nulls, JSON numbers).
-- A view: it only filters lifecycle_events, and copying 1M+ JSON rows again would cost seconds.
-- lifecycle_events here: the product's and the user's custom events after [events] skip/rename.
-- user_id: the customer's Segment user id (customer_identity, `[identity] user_id`); group_id:
-- their account (context.groupId; NULL without `[group] id`); the emitter adds the property
-- dodo_customer_id (= customer_id) to every track, and event_context's plan and product_id.
with lifecycle_events as (
    select * from analytics.outbound_events
),

customer_identity as (
    select * from analytics.customer_identity
),

event_context as (
    select * from analytics.event_context
),

quarantined_events as (
    select key from analytics.quarantined_rows where key_kind = 'event_id'
),

quarantined_users as (
    select key from analytics.quarantined_rows where key_kind = 'user_id'
),

forgotten_customers as (
    select * from analytics.stg_forgotten_customers
),

final as (
    select
        lifecycle_events.event_id,
        customer_identity.user_id,
        lifecycle_events.event,
        lifecycle_events.occurred_at,
        lifecycle_events.properties,
        lifecycle_events.customer_id,
        customer_identity.group_id,
        event_context.plan,
        event_context.product_id
    from lifecycle_events
    inner join customer_identity on customer_identity.customer_id = lifecycle_events.customer_id
    left join event_context on event_context.event_id = lifecycle_events.event_id
    -- anti joins, not `not in`: DuckDB guesses a `not in` keeps a fifth of the rows, then hashes
    -- the events' whole rows (their properties) for the event_context join instead of
    -- event_context (~600 MB at 1M payments: past the 1 GB memory_limit with the emitter's join)
    anti join quarantined_events on quarantined_events.key = lifecycle_events.event_id
    anti join quarantined_users on quarantined_users.key = lifecycle_events.customer_id
    anti join forgotten_customers
        on forgotten_customers.customer_id = lifecycle_events.customer_id
    where lifecycle_events.occurred_at is not null
)

select event_id, user_id, event, occurred_at, properties, customer_id, group_id, plan, product_id
from final
