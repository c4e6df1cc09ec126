-- Group calls for the emitter (`[group] id`): one row per account (group_id), sent for the
-- account's most recently created member (user_id), traits over all its members. Empty when no
-- group source is configured. traits: name (the latest subscription's customer_business_name,
-- else the group id), country (its billing country), plan (its product), mrr and total_spent
-- (summed over members in one currency, else USD from total_spent_usd; mrr omitted when the
-- members bill in several currencies), currency, mrr_currency, active_subscriptions, members
-- (distinct user ids); then the user's custom_group_traits.
-- The inputs are read through (not materialized), so without members (no `[group] id`)
-- nothing of user_traits is read: 32 -> 7 ms at 100k users (236 against 238 ms with groups).
with customer_identity as not materialized (
    select * from analytics.customer_identity
),

user_traits as not materialized (
    select * from analytics.user_traits
),

members as (
    select
        customer_identity.group_id,
        customer_identity.user_id,
        customer_identity.created_at,
        customer_identity.customer_id,
        customer_identity.latest_subscription_at,
        customer_identity.business_name,
        customer_identity.country,
        customer_identity.plan
    from customer_identity
    -- only customers whose identify goes out (not quarantined, not forgotten)
    inner join user_traits on user_traits.user_id = customer_identity.user_id
    where customer_identity.group_id is not null
),

member_users as (
    select distinct members.group_id, user_traits.*
    from members
    inner join user_traits on user_traits.user_id = members.user_id
),

account_money as (
    select
        group_id,
        count(distinct currency) as currencies,
        min(currency) as only_currency,
        sum(total_spent) as total_spent_sum,
        sum(total_spent_usd) as total_spent_usd,
        count(distinct mrr_currency) as mrr_currencies,
        min(mrr_currency) as mrr_currency,
        sum(mrr) as mrr_sum,
        sum(active_subscriptions) as active_subscriptions,
        count(*) as members
    from member_users
    group by group_id
),

accounts as (
    select
        group_id,
        arg_max(user_id, (created_at, customer_id)) as user_id,
        arg_max(business_name, latest_subscription_at) filter (where business_name is not null)
            as business_name,
        arg_max(country, latest_subscription_at) filter (where country is not null) as country,
        arg_max(plan, latest_subscription_at) filter (where plan is not null) as plan
    from members
    group by group_id
),

traits as (
    select
        accounts.group_id,
        accounts.user_id,
        json_strip_nulls(json_object(
            'name', coalesce(accounts.business_name, accounts.group_id),
            'country', accounts.country,
            'plan', accounts.plan,
            'mrr', case when account_money.mrr_currencies <= 1
                        then round(account_money.mrr_sum, 6) end,
            'mrr_currency', account_money.mrr_currency,
            'total_spent', case
                when account_money.currencies <= 1 then round(account_money.total_spent_sum, 6)
                else round(account_money.total_spent_usd, 2)
            end,
            'currency', case
                when account_money.currencies <= 1 then account_money.only_currency
                else 'USD'
            end,
            'active_subscriptions', account_money.active_subscriptions,
            'members', account_money.members
        )) as traits
    from accounts
    inner join account_money on account_money.group_id = accounts.group_id
),

-- the user's custom_group_traits (one row per group_id): every other column is a trait
custom_group_traits as (
    select
        group_id,
        json_strip_nulls(json_merge_patch(to_json(custom_group_traits), '{"group_id": null}'))
            as traits
    from analytics.custom_group_traits
),

with_custom_traits as (
    select
        traits.group_id,
        traits.user_id,
        case
            when custom_group_traits.traits is null then traits.traits
            else json_merge_patch(traits.traits, custom_group_traits.traits)
        end as traits
    from traits
    left join custom_group_traits on custom_group_traits.group_id = traits.group_id
),

final as (
    select group_id, user_id, traits, md5(cast(traits as varchar)) as traits_hash
    from with_custom_traits
)

select group_id, user_id, traits, traits_hash
from final
order by group_id
