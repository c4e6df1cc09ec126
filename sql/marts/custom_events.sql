-- grain: customer
-- Extension point: the user's own track events. Empty here; a user model named custom_events
-- (in `[models] paths`, default `models/`) replaces it without a warning.
-- Contract: the columns of lifecycle_events that are sent:
--   event_id     VARCHAR <= 100 chars, stable across runs: Segment's messageId and the ledger's
--                key. Make it like the product does: analytics.event_id('<kind>', <immutable
--                keys>), e.g. analytics.event_id('plan_upgraded', subscription_id || ':' ||
--                observed_at). Never hash the event name or anything that may change.
--   event        the event name
--   customer_id  Segment userId (a customer of stg_customers; others are quarantined)
--   occurred_at  TIMESTAMPTZ
--   properties   JSON (nulls are sent as they are: use json_object and json_strip_nulls)
-- Same history policy, ledger, data tests and quarantine as the product's events.
with final as (
    select
        cast(null as varchar) as event_id,
        cast(null as varchar) as event,
        cast(null as varchar) as customer_id,
        cast(null as timestamptz) as occurred_at,
        cast(null as json) as properties
    where false
)

select event_id, event, customer_id, occurred_at, properties from final
