-- Extension point: the user's own group (account) traits, like custom_traits for identify.
-- Empty here; a user model named custom_group_traits (in `[models] paths`) replaces it.
-- Contract: one row per group_id (VARCHAR, the `[group] id` value), any other columns; each
-- column is a trait of that account's group call (nulls omitted). A column named like a
-- built-in group trait is an error.
with final as (
    select cast(null as varchar) as group_id
    where false
)

select group_id from final
