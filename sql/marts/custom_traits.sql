-- grain: customer
-- Extension point: the user's own identify traits. Empty here; a user model named
-- custom_traits (in `[models] paths`, default `models/`) replaces it without a warning.
-- Contract: one row per customer_id (VARCHAR), any other columns; each column is a trait of
-- that customer's identify (nulls omitted). A column named like a built-in trait is an error
-- unless the user also replaces customer_traits.
with final as (
    select cast(null as varchar) as customer_id
    where false
)

select customer_id from final
