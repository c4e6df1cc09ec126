-- grain: counts
-- The observed shape of what the outboxes send, for the tracking plan (`dodo-segment
-- tracking-plan`, pipelines/emit/tracking_plan.py): one row per (call, event, key, JSON type)
-- with how many rows carry it, and one row per (call, event) with key = '' for the row count.
-- call: track (event = the event name as sent, after [events] skip/rename), identify, group
-- (event = ''). Types are those DuckDB gives the models' columns in JSON (VARCHAR, BIGINT,
-- UBIGINT, DOUBLE, BOOLEAN, ARRAY, OBJECT); a key present in every row of its event is
-- required. Built over all rows of the outboxes: an aggregate, not a per-customer model.
-- One row call = 'built_from' fingerprints the identify_outbox it was built with.
with track_outbox as (
    select event, properties from analytics.track_outbox
),

identify_outbox as (
    select traits from analytics.identify_outbox
),

group_outbox as (
    select traits from analytics.group_outbox
),

documents as (
    select 'track' as call, event, properties as document from track_outbox
    union all
    select 'identify', '', traits from identify_outbox
    union all
    select 'group', '', traits from group_outbox
),

-- one row per document shape (json_structure: each key's type name, or its array or object
-- shape): an event's documents share a few shapes, so the keys are read from the shapes, not
-- from every document (json_each over 3M tracks took 90 s and 1.1 GB; this ~8x less)
shapes as (
    select call, event, json_structure(document) as shape, count(*) as documents
    from documents
    group by all
),

keys as (
    select
        shapes.call,
        shapes.event,
        entry.key,
        case
            when entry.type <> 'VARCHAR' then entry.type  -- an array or a non-empty object
            when json_extract_string(entry.value, '$') = 'JSON' then 'OBJECT'  -- {}
            else json_extract_string(entry.value, '$')
        end as json_type,
        shapes.documents
    from shapes, json_each(shapes.shape) as entry
    where json_type(shapes.shape) = 'OBJECT'  -- {} has the shape "JSON" and no keys
),

-- what the plan was built from: the emitter checks a plan against the outboxes it sends from
-- (a plan left by another set of models is not used)
built_from as (
    select
        'built_from' as call,
        'identify_outbox' as event,
        analytics.traits_fingerprint(traits_hash) as key,
        '' as json_type,
        count(*) as rows
    from analytics.identify_outbox
),

final as (
    select call, event, key, json_type, sum(documents)::bigint as rows
    from keys
    group by all
    union all
    select call, event, '' as key, '' as json_type, sum(documents)::bigint as rows
    from shapes
    group by all
    union all
    select * from built_from
)

select call, event, key, json_type, rows
from final
order by call, event, key, json_type
