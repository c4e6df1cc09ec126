-- grain: user
-- Identify calls for the emitter: one row per Segment user id (analytics.user_traits: the
-- customers that resolve to it, combined), traits named per Segment's identify conventions
-- (createdAt ISO-8601 UTC; dates as ISO strings), null traits omitted.
-- group_id: the account (`[group] id`) the user's messages carry as context.groupId (NULL: none).
-- traits_hash = md5 of the canonical traits JSON (fixed key order), so the emitter sends an
-- identify only when it differs from what Segment last received.
with user_traits as (
    select * from analytics.user_traits
),

-- the user's custom_traits (one row per customer_id): every other column is a trait, nulls
-- omitted; merged after the built-in traits (a name clash is refused before this is built).
-- A user of several customers takes those of dodo_customer_id (the most recent customer).
custom_traits as (
    select
        customer_id,
        json_strip_nulls(json_merge_patch(to_json(custom_traits), '{"customer_id": null}'))
            as traits
    from analytics.custom_traits
),

traits as (
    select
        user_id,
        group_id,
        dodo_customer_id,
        json_strip_nulls(json_object(
            'email', email,
            'name', name,
            'phone', phone,
            'createdAt', analytics.iso_utc(created_at),
            'customer_since', analytics.iso_utc(customer_since),
            'last_payment_date', analytics.iso_utc(last_payment_date),
            'payment_method', payment_method,
            'payments_count', payments_count,
            'total_spent', total_spent,
            'currency', currency,
            'total_spent_by_currency', total_spent_by_currency,
            'total_refunded', total_refunded,
            'total_spent_usd', total_spent_usd,
            'active_subscriptions', active_subscriptions,
            'subscription_status', subscription_status,
            'mrr', mrr,
            'mrr_currency', mrr_currency,
            'churned', churned,
            'past_due', past_due,
            'plan', plan,
            'country', country,
            'dodo_customer_id', dodo_customer_id,
            'dodo_customer_ids', dodo_customer_ids
        )) as builtin_traits
    from user_traits
),

with_custom_traits as (
    select
        traits.user_id,
        traits.group_id,
        case
            when custom_traits.traits is null then traits.builtin_traits
            else json_merge_patch(traits.builtin_traits, custom_traits.traits)
        end as traits
    from traits
    left join custom_traits on custom_traits.customer_id = traits.dodo_customer_id
),

final as (
    select user_id, traits, md5(cast(traits as varchar)) as traits_hash, group_id
    from with_custom_traits
)

select user_id, traits, traits_hash, group_id
from final
order by user_id
